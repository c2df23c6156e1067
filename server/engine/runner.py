"""The runner: the forward passes over the batch, and the sampling call.

Prefill runs the admitted prompts in one left-padded pass and copies their KV into
the paged pool (`kv_batch.py`); decode runs one token for every running row in one
pass over the pool. Both go through multi-LoRA (`multi_lora.py`): each row through
the adapter in its slot, rows sorted by slot so each adapter is one segment.
Engine thread only.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from qlora_serve.server.engine.kv_batch import PagedKVBatch
from qlora_serve.server.engine.loader import LoadedBase
from qlora_serve.server.engine.multi_lora import MultiLoRA
from qlora_serve.server.engine.request import Request
from qlora_serve.server.engine.sampling import RowSampler, sample_rows
from qlora_serve.server.engine.scheduler import Row

Picked = tuple[list[int | Exception], list]  # per row: the sampled token (or its error), its logprob


class PrefillFailed(Exception):
    """The prefill forward pass raised: only the new rows fail (the pool is untouched).
    `cause` is the original exception."""

    def __init__(self, cause: Exception) -> None:
        super().__init__(repr(cause))
        self.cause = cause


class ModelRunner:
    """Forward passes of the base model with per-row adapters over the paged KV pool."""

    def __init__(self, base: LoadedBase, lora: MultiLoRA, kv: PagedKVBatch) -> None:
        self.base = base
        self.lora = lora
        self.kv = kv
        self._pad_id = next(i for i in (base.tokenizer.pad_token_id, base.tokenizer.eos_token_id, 0) if i is not None)

    def sampler(self, req: Request) -> RowSampler:
        """A fresh sampler for a row of `req` (its sampling params and prompt)."""
        return RowSampler(req.params, self.base.device, req.prompt_ids, self.base.eos_token_ids)

    @torch.inference_mode()
    def prefill(self, rows: list[Row]) -> Picked:
        """One left-padded forward pass over the rows' prompts (sorted by slot); their KV
        joins the pool and each row's first token is sampled. PrefillFailed when the
        forward pass raises."""
        device = self.base.device
        length = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.request.prompt_ids
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()  # every layer keeps all tokens: join copies them into the pool
        try:
            with self.lora.row_slots([r.slot for r in rows]):
                out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                      use_cache=True, logits_to_keep=1)
        except Exception as exc:
            raise PrefillFailed(exc) from exc
        for row, kv in zip(rows, self.kv.join(cache, mask)):
            row.kv = kv
        return sample_rows([r.sampler for r in rows], out.logits[:, -1, :])

    @torch.inference_mode()
    def decode(self, rows: list[Row]) -> Picked:
        """One token for every row, in one forward pass over the pool."""
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self.base.device)
        kv = [r.kv for r in rows]
        cache, mask, positions = self.kv.decode(kv)
        with self.lora.row_slots([r.slot for r in rows]):
            out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=True)
        self.kv.advance(kv)
        return sample_rows([r.sampler for r in rows], out.logits[:, -1, :])

    def free(self, rows: list[Row]) -> None:
        """These rows left the batch: their pages go back to the pool (no other row's KV moves)."""
        for r in rows:
            if r.kv is not None:
                self.kv.leave(r.kv)
