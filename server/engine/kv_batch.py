"""The running batch's KV cache: a paged pool, so cost follows live tokens.

Each layer keeps one pool of token slots, `[kv_heads, slots, head_dim]` for keys and
for values, handed out in pages of `page_tokens` slots (page 0 is never handed out:
it stays zero and stands in for padding). A row owns a list of pages; nothing ties
a row to a place in the pool, so:

- joining copies only the joining rows' prompt KV into free pages;
- leaving returns the row's pages to the free list (no tensor is touched);
- the batch order is just the order of the handles the engine passes each step
  (the engine keeps it sorted by adapter slot for segmented multi-LoRA);
- memory is the pages the live rows hold, rounded up to a page per row; the pool
  grows by half when it runs out (at most 1.5x the peak of live pages, never past
  the KV budget) and is released when the batch empties.

A decode step writes each row's new key/value into its next slot and gathers, once
per layer, a dense left-padded `[rows, kv_heads, length, head_dim]` view for the
attention (one `index_select` with an index built once per step, so no host sync per
layer). The view, its 2-D mask and the position ids are exactly what one left-padded
DynamicCache held before, so attention sees the same numbers; the model input stays
batch-major (`[rows, 1]` token ids). The gather copies each live token once per layer
and step, as `DynamicCache`'s per-step `torch.cat` did (measured: less time, see
benchmarks/bench_kv.py); what changes is that joins and leaves no longer copy every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, CacheLayerMixin

PAGE_TOKENS = 16  # slots per page: small pages waste little (< one page per row)


@dataclass(eq=False)
class KVRow:
    """One row's share of the pool: its pages and how many tokens it holds."""

    pages: list[int] = field(default_factory=list)
    length: int = 0  # tokens written (prompt + generated so far)
    live: bool = True


class _ViewLayer(CacheLayerMixin):
    """One layer of a decode step: writes the new token, returns the gathered view."""

    is_sliding = False

    def __init__(self, batch: "PagedKVBatch", layer: int, step: "_Step") -> None:
        super().__init__()
        self._batch, self._layer, self._step = batch, layer, step
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # pool exists before the step
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        k_pool, v_pool = self._batch._k[self._layer], self._batch._v[self._layer]
        s = self._step
        d = k_pool.shape[-1]
        # key_states: [rows, kv_heads, 1, head_dim] -> rows-major, head-minor like s.write
        k_pool.view(-1, d).index_copy_(0, s.write, key_states.reshape(-1, d))
        v_pool.view(-1, d).index_copy_(0, s.write, value_states.reshape(-1, d))
        shape = (s.rows, k_pool.shape[0], s.length, d)
        return (k_pool.view(-1, d).index_select(0, s.read).view(shape),
                v_pool.view(-1, d).index_select(0, s.read).view(shape))

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._step.length - 1 + query_length, 0

    def get_seq_length(self) -> int:
        return self._step.length - 1

    def get_max_length(self) -> int:
        return -1


@dataclass
class _Step:
    rows: int
    length: int  # L: longest row including the new token
    write: torch.Tensor  # [rows * kv_heads] flat pool index of each row's new token, per head
    read: torch.Tensor  # [rows * kv_heads * L] flat pool index of the left-padded view (0 = padding)


class PagedKVBatch:
    """KV cache of the running rows in a paged pool. Engine thread only."""

    def __init__(self, page_tokens: int = PAGE_TOKENS, max_tokens: int | None = None) -> None:
        """max_tokens: the KV budget admission keeps to (tokens); growth stops there."""
        if page_tokens < 1:
            raise ValueError(f"page_tokens must be >= 1, got {page_tokens}")
        self.page_tokens = page_tokens
        self._max_pages = None if max_tokens is None else 1 + self.pages_for(max_tokens)
        self._k: list[torch.Tensor] = []  # per layer [kv_heads, pages * page_tokens, head_dim]
        self._v: list[torch.Tensor] = []
        self._free: list[int] = []  # free page ids (never 0)
        self._pages = 0  # pages in the pool, page 0 included
        self._rows: set[int] = set()  # id() of live KVRows, for accounting

    # ------------------------------------------------------------ accounting
    @property
    def rows(self) -> int:
        """Live rows."""
        return len(self._rows)

    @property
    def pages_held(self) -> int:
        """Pages owned by live rows."""
        return 0 if self._pages == 0 else self._pages - 1 - len(self._free)

    def nbytes(self) -> int:
        """Bytes of the pool tensors (capacity, all layers, keys and values)."""
        return sum(t.numel() * t.element_size() for t in self._k + self._v)

    def held_bytes(self) -> int:
        """Bytes of the pages live rows own: live tokens rounded up to a page per row."""
        if not self._k:
            return 0
        per_slot = sum(t[:, 0].numel() * t.element_size() for t in self._k + self._v)
        return self.pages_held * self.page_tokens * per_slot

    def pages_for(self, tokens: int) -> int:
        """Pages a row of `tokens` tokens holds."""
        return -(-tokens // self.page_tokens)

    def slots_for(self, tokens: int) -> int:
        """Token slots a row of `tokens` tokens holds: whole pages (admission sizes rows with it)."""
        return self.pages_for(tokens) * self.page_tokens

    # ------------------------------------------------------------ pool
    def _init_pool(self, layers: int, heads: int, dim: int, dtype: torch.dtype, device: torch.device, pages: int) -> None:
        slots = pages * self.page_tokens
        self._k = [torch.empty(heads, slots, dim, dtype=dtype, device=device) for _ in range(layers)]
        self._v = [torch.empty(heads, slots, dim, dtype=dtype, device=device) for _ in range(layers)]
        for t in self._k + self._v:
            t[:, : self.page_tokens].zero_()  # page 0: what padding positions read
        self._pages = pages
        self._free = list(range(pages - 1, 0, -1))  # pop() hands out low pages first

    def _alloc(self, n: int) -> list[int]:
        """n free pages; when short the pool grows by half (one copy of what it holds:
        amortized, each token is copied at most twice on average)."""
        if n > len(self._free):
            need = self._pages + n - len(self._free)
            new = self._pages + self._pages // 2
            new = max(need, new if self._max_pages is None else min(new, self._max_pages))
            for pool in (self._k, self._v):
                for i, t in enumerate(pool):
                    grown = torch.empty(t.shape[0], new * self.page_tokens, t.shape[2], dtype=t.dtype, device=t.device)
                    grown[:, : t.shape[1]].copy_(t)
                    pool[i] = grown
            self._free = list(range(new - 1, self._pages - 1, -1)) + self._free
            self._pages = new
        taken = self._free[-n:] if n else []
        del self._free[len(self._free) - n:]
        return taken[::-1]

    # ------------------------------------------------------------ join / leave
    def join(self, cache: DynamicCache, mask: torch.Tensor) -> list[KVRow]:
        """Take the rows of a left-padded prefill (`cache` over `mask` [rows, T]) into
        the pool; returns one handle per row, in the prefill's row order. Copies only
        these rows' real tokens."""
        lengths = mask.sum(dim=1).tolist()
        layers = cache.layers
        k0 = layers[0].keys
        heads, dim = int(k0.shape[1]), int(k0.shape[3])
        if not self._k:
            pages = 1 + sum(self.pages_for(n) for n in lengths)
            self._init_pool(len(layers), heads, dim, k0.dtype, k0.device, max(2, pages))
        handles = [KVRow(self._alloc(self.pages_for(n)), n) for n in lengths]
        # Real tokens in (row, position) order, and the pool slot each one goes to.
        b_idx, t_idx = mask.nonzero(as_tuple=True)
        slots = torch.cat([self._slots(h.pages, 0, h.length) for h in handles]).to(k0.device)
        dst = self._per_head(slots, heads)
        for i, layer in enumerate(layers):
            # keys [rows, heads, T, dim] -> real tokens [n, heads, dim]
            self._k[i].view(-1, dim).index_copy_(0, dst, layer.keys[b_idx, :, t_idx].reshape(-1, dim))
            self._v[i].view(-1, dim).index_copy_(0, dst, layer.values[b_idx, :, t_idx].reshape(-1, dim))
        for h in handles:
            self._rows.add(id(h))
        return handles

    def leave(self, row: KVRow) -> None:
        """Return the row's pages to the pool (no tensor work); idempotent. The pool is
        released when no row is left."""
        if not row.live:
            return
        row.live = False
        if id(row) not in self._rows:  # a handle from before clear(): its pages are not ours
            row.pages = []
            return
        self._rows.discard(id(row))
        self._free.extend(reversed(row.pages))  # the next row gets them in ascending order
        row.pages = []
        if not self._rows:
            self.clear()

    def clear(self) -> None:
        """Drop everything (the rows' handles become invalid; leaving them is a no-op)."""
        self._k, self._v, self._free, self._pages = [], [], [], 0
        self._rows.clear()

    # ------------------------------------------------------------ decode
    def decode(self, rows: list[KVRow]) -> tuple[Cache, torch.Tensor, torch.Tensor]:
        """Inputs of one decode step over `rows`, in this order: (cache view for the
        model, attention mask [rows, L] left-padded, position ids [rows, 1]). Call
        `advance(rows)` after the forward succeeded."""
        assert rows and all(id(r) in self._rows for r in rows), "decode over rows that left the batch"
        for r in rows:  # a slot for each row's new token
            if r.length == len(r.pages) * self.page_tokens:
                r.pages += self._alloc(1)
        device = self._k[0].device
        heads, total = self._k[0].shape[0], self._k[0].shape[1]
        lengths = [r.length + 1 for r in rows]  # tokens incl. the new one
        length = max(lengths)
        table = torch.zeros(len(rows), max(len(r.pages) for r in rows), dtype=torch.long)
        for i, r in enumerate(rows):
            table[i, : len(r.pages)] = torch.tensor(r.pages)
        # Only the small page table and counts cross to the device (once per step);
        # the [rows, heads, L] index is built there.
        table, counts = table.to(device), torch.tensor(lengths).to(device)
        # Left-padded: view column j of row i holds its token j - (L - n_i).
        tok = torch.arange(length, device=device)[None, :] - (length - counts)[:, None]
        real = tok >= 0
        tok = tok.clamp(min=0)
        p = self.page_tokens
        slot = torch.where(real, table.gather(1, tok // p) * p + tok % p, 0)
        step = _Step(len(rows), length, self._per_head(slot[:, -1], heads), self._per_head_rows(slot, heads, total))
        view = Cache(layers=[_ViewLayer(self, i, step) for i in range(len(self._k))])
        return view, real.long(), (counts - 1)[:, None]

    @staticmethod
    def advance(rows: list[KVRow]) -> None:
        """The decode step's forward succeeded: each row holds one more token."""
        for r in rows:
            r.length += 1

    # ------------------------------------------------------------ index helpers
    def _slots(self, pages: list[int], start: int, stop: int) -> torch.Tensor:
        """Pool slots of a row's tokens start..stop-1."""
        t = torch.arange(start, stop)
        return torch.tensor(pages, dtype=torch.long)[t // self.page_tokens] * self.page_tokens + t % self.page_tokens

    def _per_head(self, slots: torch.Tensor, heads: int) -> torch.Tensor:
        """[n] slots -> [n * heads] flat indices into pool.view(-1, dim), token-major."""
        total = self._k[0].shape[1] if self._k else 0
        return (torch.arange(heads, device=slots.device)[None, :] * total + slots[:, None]).reshape(-1)

    @staticmethod
    def _per_head_rows(slot: torch.Tensor, heads: int, total: int) -> torch.Tensor:
        """[rows, L] slots -> [rows * heads * L] flat indices, laid out [rows, heads, L]."""
        return (slot[:, None, :] + torch.arange(heads, device=slot.device)[None, :, None] * total).reshape(-1)
