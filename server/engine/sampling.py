"""Per-row sampling: every row in a batch keeps its own temperature, top-k, top-p and seed.

Built on transformers' logits warpers so the semantics match `model.generate`.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from qlora_serve.server.engine.request import SamplingParams


class RowSampler:
    """Samples the next token of one sequence. Holds the row's RNG so a seeded
    request draws the same tokens whatever else shares its batch."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self._warpers = LogitsProcessorList()
        self._generator: torch.Generator | None = None
        if not params.greedy:
            self._warpers.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                self._warpers.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                self._warpers.append(TopPLogitsWarper(params.top_p))
            self._generator = torch.Generator(device=device)
            if params.seed is not None:
                self._generator.manual_seed(params.seed)
            else:
                self._generator.seed()

    def sample(self, logits: torch.Tensor, input_ids: torch.Tensor | None = None) -> int:
        """logits: [vocab] float scores of the next token. Returns a token id."""
        if self.params.greedy:
            return int(torch.argmax(logits).item())
        scores = self._warpers(input_ids, logits.float().unsqueeze(0))
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self._generator).item())


def sample_rows(samplers: list[RowSampler], logits: torch.Tensor) -> list[int | Exception]:
    """logits: [batch, vocab]. One token per row; greedy rows share one argmax.
    A row whose sampling raises (e.g. NaN probabilities) gets the exception in
    place of its token, so one bad row never costs the others."""
    greedy = [i for i, s in enumerate(samplers) if s.params.greedy]
    out = [0] * len(samplers)
    if greedy:
        ids = torch.argmax(logits[greedy], dim=-1).tolist()
        for i, tok in zip(greedy, ids):
            out[i] = tok
    for i, s in enumerate(samplers):
        if not s.params.greedy:
            try:
                out[i] = s.sample(logits[i])
            except Exception as exc:  # noqa: BLE001 - reported per row by the engine
                out[i] = exc
    return out
