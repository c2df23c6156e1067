"""The running batch's KV cache: one left-padded DynamicCache for all rows.

Rows join (after their own prefill) and leave at any decode step. Joining pads
the shorter side on the left; leaving selects the remaining rows and trims
columns that are padding in every row, so the cache length is always the
longest live sequence. The attention mask marks padding (0) vs real tokens (1);
position ids come from the mask, so padding never shifts a row's positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [n, 0]
    return F.pad(t, pad)


class PaddedKVBatch:
    """KV cache + attention mask of the running rows, in row order."""

    def __init__(self) -> None:
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [rows, length], int64 {0, 1}

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    def positions(self) -> torch.Tensor:
        """[rows, 1] position id of each row's next token (its count of real tokens)."""
        assert self.mask is not None
        return self.mask.sum(dim=1, keepdim=True)

    def decode_mask(self) -> torch.Tensor:
        """[rows, length + 1] mask for a one-token decode step over this cache."""
        assert self.mask is not None
        return torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)

    def advance(self, mask: torch.Tensor) -> None:
        """Record the mask the decode step used (the cache grew by one column)."""
        self.mask = mask

    def join(self, cache: DynamicCache, mask: torch.Tensor) -> None:
        """Append rows prefilled in `cache` (with their mask) after the current rows."""
        if self.cache is None:
            self.cache, self.mask = cache, mask
            return
        assert self.mask is not None
        a, b = self.length, int(mask.shape[1])
        length = max(a, b)
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, length - a, 2), _pad_left(theirs.keys, length - b, 2)])
            mine.values = torch.cat([_pad_left(mine.values, length - a, 2), _pad_left(theirs.values, length - b, 2)])
        self.mask = torch.cat([_pad_left(self.mask, length - a, 1), _pad_left(mask, length - b, 1)])

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order); drop all-padding leading columns."""
        if not rows:
            self.cache = self.mask = None
            return
        assert self.cache is not None and self.mask is not None
        idx = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        # Leading columns that are padding in every remaining row are dead weight.
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if len(real) else mask.shape[1]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.mask = mask[:, start:]

    def nbytes(self) -> int:
        """Bytes held by the cache tensors."""
        if self.cache is None:
            return 0
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.cache.layers)
