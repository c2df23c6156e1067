"""Per-row sampling, vectorised over the batch.

Every row keeps its own controls (temperature, top-k, top-p, min-p, penalties,
min_tokens, seed, logprobs). Each step applies every control with batched torch
ops to the rows that use it and to no other row, so a penalty on one row never
changes another, and rows without controls pay what they always did (one argmax,
or one softmax and a draw).

Semantics and order are those of transformers' logits processors in
`model.generate`: repetition penalty, then temperature, top-k, top-p, min-p (the
tests compare with RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper). Presence and frequency
penalties are OpenAI's, applied after the repetition penalty as vLLM does. The
transformers processors take one value for a whole batch; that is why the
per-row versions are written here.
"""

from __future__ import annotations

import torch

from qlora_serve.server.engine.request import SamplingParams, TokenLogprob

_NEG_INF = float("-inf")


class RowSampler:
    """The sampling state of one sequence: its parameters, its own RNG (a seeded
    request draws the same tokens whatever else shares its batch) and, when it is
    penalised, counts of the tokens it has seen (device tensors, [vocab])."""

    def __init__(self, params: SamplingParams, device: torch.device, prompt_ids=(),
                 eos_token_ids: frozenset[int] = frozenset()):
        self.params = params
        self.device = device
        self.generated = 0
        self._prompt_ids = list(prompt_ids) if params.penalized else []
        self.counts: torch.Tensor | None = None  # float32 [vocab]: times each token was generated
        self.seen: torch.Tensor | None = None  # bool [vocab]: in the prompt or generated
        # Ids that min_tokens keeps from being generated too early.
        ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self._end_ids = torch.tensor(sorted(ends), dtype=torch.long, device=device) \
            if params.min_tokens and ends else None
        self._rng: torch.Generator | None = None
        if not params.greedy:
            # A CPU generator: one uniform draw per step, the same numbers on any device.
            self._rng = torch.Generator()
            if params.seed is not None:
                self._rng.manual_seed(params.seed)
            else:
                self._rng.seed()

    @property
    def masks_ends(self) -> bool:
        """min_tokens not reached yet: eos / stop_token_ids are masked this step."""
        return self._end_ids is not None and self.generated < self.params.min_tokens

    @property
    def adjusts(self) -> bool:
        """This step changes the row's logits before greedy or sampled choice."""
        return self.params.penalized or self.masks_ends

    def _state(self, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.counts is None:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=self.device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=self.device)
            if self._prompt_ids:
                self.seen[torch.tensor(self._prompt_ids, dtype=torch.long, device=self.device)] = True
        return self.counts, self.seen

    def draw(self) -> float:
        """The next uniform number in [0, 1) of this row's generator."""
        return float(torch.rand(1, generator=self._rng, dtype=torch.float64).item())

    def accept(self, token: int) -> None:
        """Record the token chosen this step."""
        self.generated += 1
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def _rows(samplers: list[RowSampler], pred) -> list[int]:
    return [i for i, s in enumerate(samplers) if pred(s)]


def _part(scores: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The rows' scores: the tensor itself when every row is in (no copy), else a copy."""
    return scores if len(rows) == scores.shape[0] else scores[rows]


def _put(scores: torch.Tensor, rows: list[int], part: torch.Tensor) -> None:
    """Write back what `_part` gave (nothing to do when it was the tensor itself)."""
    if part is not scores:
        scores[rows] = part


def _col(values, device) -> torch.Tensor:
    """One float32 column [n, 1] of per-row values."""
    return torch.tensor([float(v) for v in values], dtype=torch.float32, device=device).unsqueeze(1)


def adjust(scores: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """Penalties and the min_tokens mask, on the rows that use them. scores: float32
    [n, vocab], a private copy (changed in place and returned)."""
    dev, vocab = scores.device, scores.shape[-1]
    pen = _rows(samplers, lambda s: s.params.penalized)
    if pen:
        ps = [samplers[i].params for i in pen]
        state = [samplers[i]._state(vocab) for i in pen]
        counts = torch.stack([c for c, _ in state])
        seen = torch.stack([m for _, m in state])
        part = scores[pen]
        rep = torch.where(seen, _col([p.repetition_penalty for p in ps], dev), 1.0)
        part = torch.where(part < 0, part * rep, part / rep)  # as RepetitionPenaltyLogitsProcessor
        part -= _col([p.frequency_penalty for p in ps], dev) * counts
        part -= _col([p.presence_penalty for p in ps], dev) * (counts > 0)
        scores[pen] = part
    ends = _rows(samplers, lambda s: s.masks_ends)
    if ends:
        rows = torch.cat([torch.full_like(samplers[i]._end_ids, i) for i in ends])
        scores[rows, torch.cat([samplers[i]._end_ids for i in ends])] = _NEG_INF
    return scores


def warp(scores: torch.Tensor, samplers: list[RowSampler]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, on the rows that use each. Every
    row samples (temperature >= 1e-5). scores: float32 [n, vocab], changed in place."""
    dev, vocab = scores.device, scores.shape[-1]
    scores /= _col([s.params.temperature for s in samplers], dev)
    rows = _rows(samplers, lambda s: 0 < s.params.top_k < vocab)
    if rows:
        part = _part(scores, rows)
        k = torch.tensor([samplers[i].params.top_k for i in rows], device=dev)
        kth = part.topk(int(k.max())).values.gather(1, (k - 1).unsqueeze(1))
        _put(scores, rows, part.masked_fill_(part < kth, _NEG_INF))
    rows = _rows(samplers, lambda s: s.params.top_p < 1.0)
    if rows:
        part = _part(scores, rows)
        sorted_scores, order = torch.sort(part, descending=False)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= _col([1 - samplers[i].params.top_p for i in rows], dev)
        drop[:, -1] = False  # keep at least the most likely token
        _put(scores, rows, part.masked_fill_(drop.scatter(1, order, drop), _NEG_INF))
    rows = _rows(samplers, lambda s: s.params.min_p > 0.0)
    if rows:
        part = _part(scores, rows)
        probs = part.softmax(dim=-1)
        floor = _col([samplers[i].params.min_p for i in rows], dev) * probs.amax(dim=-1, keepdim=True)
        drop = probs < floor
        drop.scatter_(1, probs.argmax(dim=-1, keepdim=True), False)
        _put(scores, rows, part.masked_fill_(drop, _NEG_INF))
    return scores


def sampling_scores(samplers: list[RowSampler], logits: torch.Tensor) -> torch.Tensor:
    """float32 [n, vocab]: the scores each (sampling) row draws from, softmax-ready."""
    return warp(adjust(logits.to(torch.float32, copy=True), samplers), samplers)


def sample_rows(samplers: list[RowSampler], logits: torch.Tensor) -> tuple[list[int | Exception], list[TokenLogprob | None]]:
    """logits: [batch, vocab], raw model scores of the next token. Returns one token
    per row (an exception in place of the token for a row whose sampling failed,
    e.g. NaN probabilities, so one bad row never costs the others) and, per row, its
    TokenLogprob when the request asked for logprobs. Every row's sampler records
    the token it got."""
    n, vocab = logits.shape
    picked = torch.zeros(n, dtype=torch.long, device=logits.device)
    bad = torch.zeros(n, dtype=torch.long, device=logits.device)  # 1 = this row's sampling failed
    greedy = _rows(samplers, lambda s: s.params.greedy)
    sampled = _rows(samplers, lambda s: not s.params.greedy)
    if greedy:
        sub = [samplers[i] for i in greedy]
        scores = logits if len(greedy) == n else logits[greedy]
        if any(s.adjusts for s in sub):
            scores = adjust(scores.to(torch.float32, copy=True), sub)
        picked[greedy] = torch.argmax(scores, dim=-1)
    if sampled:
        sub = [samplers[i] for i in sampled]
        probs = sampling_scores(sub, logits[sampled]).softmax(dim=-1)
        cdf = probs.cumsum(dim=-1)
        total = cdf[:, -1:].contiguous()
        # Inverse-CDF draw: one uniform per row from the row's own generator: the first
        # token whose CDF exceeds u x total. A token of probability 0 adds nothing to
        # the CDF, so it is never chosen; `last` (the last token of nonzero
        # probability) catches u x total rounding up to total.
        u = torch.tensor([s.draw() for s in sub], dtype=torch.float32, device=logits.device).unsqueeze(1)
        last = torch.searchsorted(cdf, total, right=False)
        picked[sampled] = torch.minimum(torch.searchsorted(cdf, u * total, right=True), last).squeeze(1)
        bad[sampled] = (~(torch.isfinite(total) & (total > 0))).squeeze(1).long()
    tokens, flags = torch.stack([picked, bad]).tolist()  # one device sync per step
    failed = {i for i, f in enumerate(flags) if f}
    for i in failed:
        tokens[i] = RuntimeError("sampling failed: the probabilities are NaN, infinite or all zero")
    return tokens, _logprobs(samplers, logits, picked, failed, tokens)


def _logprobs(samplers, logits, picked, failed, tokens) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(samplers)
    for i, s in enumerate(samplers):
        if i not in failed:
            s.accept(tokens[i])
    rows = _rows(samplers, lambda s: s.params.logprobs)
    rows = [i for i in rows if i not in failed]
    if not rows:
        return out
    lp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = lp.gather(1, picked[rows].unsqueeze(1)).squeeze(1).tolist()
    k = max(samplers[i].params.top_logprobs for i in rows)
    top_v, top_i = (lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long()))
    top_v, top_i = top_v.tolist(), top_i.tolist()
    for j, i in enumerate(rows):
        kk = samplers[i].params.top_logprobs
        out[i] = TokenLogprob(tokens[i], chosen[j], tuple(zip(top_i[j][:kk], top_v[j][:kk])))
    return out
