"""Segmented multi-LoRA: every row of a batch may use a different adapter, at its own rank.

PEFT's mixed batch loops over one sub-batch per adapter, so throughput falls as
adapters multiply. Here (the Punica / S-LoRA idea, without their rank padding)
adapters are grouped into *classes*: a class is (rank class, set of target modules),
the rank class being the adapter's rank rounded up to a power of two (capped at
max_rank). Each adapted Linear keeps, per class that targets it, the stacks

    A [G, r_c, in]     B^T [G, r_c, out]     scaling [G]      (G = adapters in the class)

sized exactly to the adapters resident in that class (an r=8 adapter never sits in
an r=64 slot; a q/v-only adapter holds nothing for the MLP). Per step, `row_slots`
orders the adapted rows by (class, entry) once; per layer and class, the rows are
one contiguous segment per adapter and the delta is two grouped GEMMs
(`torch.nn.functional.grouped_mm` with `offs`, shrink then expand), or plain matmuls
when the class has one adapter in the batch. No weight is copied per row or per step.

Usage (engine thread only; slot ids are state of one MultiLoRA instance):

    lora = MultiLoRA(model, max_slots=8, max_rank=64)
    lora.load(0, load_lora_adapter(path))
    with lora.row_slots([0, -1, 0]):       # one entry per batch row, -1 = base only
        logits = model(input_ids).logits
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from qlora_serve.adapters.peft_format import LoraAdapter, check_finite_in, check_fits_base
from qlora_serve.errors import FailedPrecondition

ClassKey = tuple[int, tuple[str, ...]]  # (rank class, sorted target module names)

# Distinct adapters of one class in a batch up to which a per-adapter matmul loop is
# used instead of grouped_mm (benchmarks/bench_lora_layers.py measures the crossover).
LOOP_MAX_ADAPTERS = 1


@dataclass(frozen=True)
class _Group:
    """One class's adapted rows in one step (prepared by `row_slots`, read by every layer).

    rows: the batch rows of this class in (entry) order: a slice when they are
        contiguous in the batch, else a LongTensor for index_select/index_add.
    n: number of rows. entry_of_row: LongTensor[n], each row's entry in the class stacks.
    offs: IntTensor[G], cumulative row count per entry (grouped_mm offsets, T = 1).
    segments: host-side (entry, lo, hi) runs over the n rows, for the matmul loop.
    """

    key: ClassKey
    rows: slice | torch.Tensor
    n: int
    entry_of_row: torch.Tensor
    offs: torch.Tensor
    segments: tuple[tuple[int, int, int], ...]
    offs_by_tokens: dict = field(default_factory=dict, compare=False, repr=False)  # T -> offs * T


@dataclass(frozen=True)
class _Rows:
    batch: int
    groups: tuple[_Group, ...]


@dataclass
class _Class:
    rank: int
    names: tuple[str, ...]
    slots: list[int] = field(default_factory=list)  # entry -> slot id


MIN_RANK_CLASS = 8  # grouped_mm needs 16-byte strides: r * element size (bf16: r >= 8)


def rank_class(rank: int, max_rank: int) -> int:
    """The stack rank an adapter of `rank` uses: next power of two, at least
    MIN_RANK_CLASS, capped at max_rank (never below `rank`)."""
    return min(max(1 << (max(rank, 1) - 1).bit_length(), MIN_RANK_CLASS), max(max_rank, rank))


class LoRALinear(nn.Module):
    """A base Linear (nn.Linear or bitsandbytes Linear4bit) plus per-class LoRA stacks.

    The base layer is kept as the child `base_layer` and called unchanged, so rows
    without an adapter get exactly the base output.
    """

    def __init__(self, base_layer: nn.Linear, owner: MultiLoRA):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        self._owner = owner  # plain attribute, shared by all wrappers
        # class key -> (A [G, r, in], B^T [G, r, out], scaling [G]); serving state, not weights.
        # B is kept transposed (contiguous [r, out]): grouped_mm over a transposed *view*
        # of B [G, out, r] was measured up to ~10x slower on CPU for G >= 8.
        self.stacks: dict[ClassKey, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads `linear.weight` (dtype/device checks)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def nbytes(self) -> int:
        """Bytes held by this layer's LoRA stacks."""
        return sum(t.numel() * t.element_size() for st in self.stacks.values() for t in st)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, ..., in_features] (usually [B, T, in] or [B, in]) -> [B, ..., out_features]."""
        out = self.base_layer(x)
        rows = self._owner._rows
        if rows is None:  # outside `row_slots`, or every row is -1: the base, untouched
            return out
        if x.shape[0] != rows.batch:
            raise ValueError(
                f"row_slots set {rows.batch} rows but this layer got input of shape {tuple(x.shape)}; "
                "the first dimension must be the batch (flattened-token layers such as MoE experts are not supported)"
            )
        xs = x.reshape(x.shape[0], -1, self.in_features)  # [B, T, in]; T = 1 for 2-D input
        tokens = xs.shape[1]
        res = None
        for g in rows.groups:
            st = self.stacks.get(g.key)
            if st is None:  # this class's adapters do not target this layer
                continue
            delta = self._delta(g, st, xs, tokens)  # [n, T, out]
            if res is None:
                # PEFT adds the delta in the wider dtype and rounds once to the output dtype.
                wide = torch.promote_types(out.dtype, delta.dtype)
                res = out.reshape(x.shape[0], tokens, self.out_features).to(wide, copy=True)
            if isinstance(g.rows, slice):
                res[g.rows] += delta.to(res.dtype)
            else:
                # Base rows are never touched: they stay bit-identical to the base (even -0.0).
                res.index_add_(0, g.rows, delta.to(res.dtype))
        if res is None:
            return out
        return res.view(out.shape).to(out.dtype)

    def _delta(self, g: _Group, st, xs: torch.Tensor, tokens: int) -> torch.Tensor:
        a, b, scaling = st
        xg = xs[g.rows] if isinstance(g.rows, slice) else xs.index_select(0, g.rows)
        xg = xg.to(a.dtype)  # PEFT casts the input to the adapter's dtype
        owner = self._owner
        if len(g.segments) <= owner.loop_max_adapters or not owner.grouped or a.shape[1] * a.element_size() % 16:
            parts = []
            for entry, lo, hi in g.segments:  # host-side bounds: no device sync
                d = torch.matmul(torch.matmul(xg[lo:hi], a[entry].t()), b[entry])
                parts.append(d * scaling[entry])
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        offs = g.offs if tokens == 1 else g.offs_by_tokens.get(tokens)
        if offs is None:
            offs = g.offs_by_tokens[tokens] = g.offs * tokens
        flat = xg.reshape(g.n * tokens, self.in_features)
        h = F.grouped_mm(flat, a.transpose(1, 2), offs=offs)  # shrink: [nT, r]
        d = F.grouped_mm(h, b, offs=offs)  # expand: [nT, out]
        # PEFT's order: (x A^T B^T) * scaling, per row.
        return d.view(g.n, tokens, self.out_features) * scaling.index_select(0, g.entry_of_row).view(-1, 1, 1)

    def extra_repr(self) -> str:
        classes = ", ".join(f"r{k[0]}x{st[0].shape[0]}" for k, st in self.stacks.items())
        return f"in={self.in_features}, out={self.out_features}, classes=[{classes}], dtype={self._owner.dtype}"


class MultiLoRA:
    """Per-class LoRA stacks applied to a base model with segmented GEMMs per layer.

    Wraps, in place, every nn.Linear / bitsandbytes Linear4bit of `model` except the
    output head. Memory: for each resident adapter, rank_class(r) * sum(in + out) over
    the modules it targets, elements of `dtype` (see `footprint`). `max_slots` is the
    range of slot ids (how many adapters may be resident at once), not preallocated
    memory. Not thread-safe: the engine thread owns load/unload/row_slots.
    """

    def __init__(self, model: nn.Module, *, max_slots: int, max_rank: int, dtype: torch.dtype | str | None = None,
                 loop_max_adapters: int = LOOP_MAX_ADAPTERS):
        if max_slots < 1 or max_rank < 1:
            raise ValueError(f"max_slots and max_rank must be >= 1, got max_slots={max_slots}, max_rank={max_rank}")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError("model is already wrapped by a MultiLoRA; wrap a freshly loaded base")
        self.model = model
        self.max_slots = int(max_slots)
        self.max_rank = int(max_rank)
        self.loop_max_adapters = int(loop_max_adapters)
        self._rows: _Rows | None = None
        self._where: dict[int, tuple[ClassKey, int]] = {}  # slot -> (class, entry)
        self._classes: dict[ClassKey, _Class] = {}
        self._recent: dict[tuple, _Rows] = {}  # (row slots, version) -> _Rows: decode reuses the step's plan
        self._version = 0

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
        if not targets:
            raise ValueError("model has no Linear layers to adapt")
        # float32 by default, as PEFT keeps and computes adapters (autocast_adapter_dtype):
        # with a bf16 base our tokens then round exactly where plain PEFT's do.
        # dtype="compute": the base's compute dtype (half the bytes with a bf16 base).
        self.compute_dtype = _compute_dtype(model, targets[0][1])
        self.dtype = self.compute_dtype if dtype == "compute" else dtype or torch.float32
        self.device = targets[0][1].weight.device
        # grouped_mm runs on CPU in float32/bf16; on CUDA in bf16 only (else the matmul loop).
        self.grouped = self.device.type == "cpu" or self.dtype == torch.bfloat16

        self.linear_shapes: dict[str, tuple[int, int]] = {}
        self._layers: dict[str, LoRALinear] = {}
        for name, linear in targets:
            wrapper = LoRALinear(linear, self)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, wrapper)
            self.linear_shapes[name] = (wrapper.in_features, wrapper.out_features)
            self._layers[name] = wrapper

    # ------------------------------------------------------------ accounting
    @property
    def loaded_slots(self) -> frozenset[int]:
        """Slots currently holding an adapter."""
        return frozenset(self._where)

    def footprint(self, adapter: LoraAdapter) -> int:
        """Device bytes `adapter` takes once loaded (its rank class, its target modules)."""
        r = rank_class(adapter.rank, self.max_rank)
        elem = torch.empty((), dtype=self.dtype).element_size()
        return sum((r * sum(self.linear_shapes[n]) + 1) * elem for n in adapter.modules)

    def full_footprint(self, rank: int) -> int:
        """Bytes of one adapter of `rank` targeting every wrapped Linear (for capacity reports)."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        r = rank_class(rank, self.max_rank)
        return sum((r * (i + o) + 1) * elem for i, o in self.linear_shapes.values())

    def nbytes(self) -> int:
        """Device bytes held by all LoRA stacks (exactly the resident adapters' footprints)."""
        return sum(layer.nbytes() for layer in self._layers.values())

    def segment_order(self, slot: int) -> tuple:
        """Sort key of a batch row using `slot` (-1 = base): rows sorted by it hold each
        class's rows contiguously and in entry order, so every layer slices them instead
        of gathering and scattering activations. Any order stays correct."""
        where = self._where.get(slot)
        return (0,) if where is None else (1, *where)

    def slot_class(self, slot: int) -> ClassKey | None:
        where = self._where.get(slot)
        return None if where is None else where[0]

    # ------------------------------------------------------------ load / unload
    def _check_slot(self, slot: int) -> int:
        if isinstance(slot, bool):
            raise IndexError(f"slot must be an int in [0, {self.max_slots}), got {slot!r}")
        slot = operator.index(slot)
        if not 0 <= slot < self.max_slots:
            raise IndexError(f"slot {slot} is out of range: this MultiLoRA has slots 0..{self.max_slots - 1}")
        return slot

    def load(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy `adapter` into `slot`, replacing whatever was there.

        Everything is validated and converted first (slot range, module names and
        shapes, rank <= max_rank, finite in `dtype`); only then is the slot written,
        so a refused adapter leaves the slot's previous contents intact.
        Raises IndexError/TypeError (bad slot), InvalidArgument (does not fit the base, or
        overflows `dtype`), FailedPrecondition (rank > max_rank).
        """
        slot = self._check_slot(slot)
        check_fits_base(adapter, self.linear_shapes)
        if adapter.rank > self.max_rank:
            raise FailedPrecondition(
                f"adapter {adapter.path} has rank {adapter.rank} > max_lora_rank {self.max_rank}; "
                "raise --max-lora-rank or retrain with a smaller r"
            )
        r = rank_class(adapter.rank, self.max_rank)
        staged = {}
        for name, mod in adapter.modules.items():
            a = mod.lora_a.to(device=self.device, dtype=self.dtype)
            b = mod.lora_b.to(device=self.device, dtype=self.dtype)
            for dtype in {self.dtype, self.compute_dtype}:
                check_finite_in(a, b, dtype, f"adapter {adapter.path}: module {name!r}")
            pa = a.new_zeros(r, a.shape[1])
            pa[: a.shape[0]] = a  # rank_pattern modules below the class rank: zero padding is exact
            pb = b.new_zeros(r, b.shape[0])
            pb[: b.shape[1]] = b.t()
            staged[name] = (pa, pb, torch.tensor([float(mod.scaling)], dtype=self.dtype, device=self.device))
        key: ClassKey = (r, tuple(sorted(staged)))
        # inference_mode: writes work whether or not the model was built inside it.
        with torch.inference_mode():
            if slot in self._where:
                self._remove(slot)
            cls = self._classes.setdefault(key, _Class(r, key[1]))
            for name, (a, b, s) in staged.items():
                layer = self._layers[name]
                old = layer.stacks.get(key)
                new = (a[None], b[None], s)
                # Exactly sized stacks: memory follows what is resident (a load is rare; its copy is off the step).
                layer.stacks[key] = new if old is None else tuple(torch.cat([o, n]) for o, n in zip(old, new))
            cls.slots.append(slot)
            self._where[slot] = (key, len(cls.slots) - 1)
        self._invalidate()

    def unload(self, slot: int) -> None:
        """Free `slot`'s weights in every layer (idempotent); its memory is released."""
        slot = self._check_slot(slot)
        if slot in self._where:
            with torch.inference_mode():
                self._remove(slot)
            self._invalidate()

    def _remove(self, slot: int) -> None:
        """Swap-remove the slot's entry from its class stacks (the last entry takes its place)."""
        key, entry = self._where.pop(slot)
        cls = self._classes[key]
        last = len(cls.slots) - 1
        for name in cls.names:
            layer = self._layers[name]
            if last == 0:
                del layer.stacks[key]
                continue
            stacks = []
            for t in layer.stacks[key]:
                if entry != last:
                    t[entry] = t[last]
                stacks.append(t[:last].clone())  # clone: really give the memory back
            layer.stacks[key] = tuple(stacks)
        moved = cls.slots.pop()
        if entry != last:
            cls.slots[entry] = moved
            self._where[moved] = (key, entry)
        if not cls.slots:
            del self._classes[key]

    def _invalidate(self) -> None:
        self._version += 1
        self._recent.clear()

    # ------------------------------------------------------------ per step
    @contextmanager
    def row_slots(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Within the `with`, forwards use `slots[i]` for batch row i (-1 = base only).

        slots: list[int] or LongTensor[B]. Every non-negative slot must be loaded.
        The rows' order by adapter is worked out here, once per step, on the host;
        every layer then reads it (no device sync per layer). A batch the scheduler
        keeps sorted by slot needs no activation reordering at all (slices).
        Nesting restores the outer assignment on exit.
        """
        if isinstance(slots, torch.Tensor) and slots.dim() != 1:
            raise ValueError(f"slots must be 1-D (one per batch row), got shape {tuple(slots.shape)}")
        ids = slots.tolist() if isinstance(slots, torch.Tensor) else [operator.index(s) for s in slots]
        bad = [s for s in ids if s != -1 and s not in self._where]
        if bad:
            raise ValueError(f"row slots {sorted(set(bad))} are not loaded slots (loaded: {sorted(self._where)}); use -1 for base rows")
        key = (tuple(ids), self._version)
        rows = self._recent.get(key)
        if rows is None and any(s >= 0 for s in ids):  # all -1: rows None, every layer skips the delta
            rows = self._plan(ids)
            self._recent = {k: v for k, v in list(self._recent.items())[-1:]}  # the prefill's and the decode's
            self._recent[key] = rows
        previous, self._rows = self._rows, rows
        try:
            yield
        finally:
            self._rows = previous

    def _plan(self, ids: list[int]) -> _Rows:
        by_class: dict[ClassKey, list[tuple[int, int]]] = {}
        for row, s in enumerate(ids):
            if s >= 0:
                ckey, entry = self._where[s]
                by_class.setdefault(ckey, []).append((entry, row))
        groups = []
        dev = self.device
        for ckey, pairs in by_class.items():
            pairs.sort()  # stable by (entry, row): each adapter's rows form one segment
            order = [row for _, row in pairs]
            entries = [e for e, _ in pairs]
            lo = order[0]
            contiguous = order == list(range(lo, lo + len(order)))
            counts = [0] * len(self._classes[ckey].slots)
            segments, start = [], 0
            for i, e in enumerate(entries):
                counts[e] += 1
                if i + 1 == len(entries) or entries[i + 1] != e:
                    segments.append((e, start, i + 1))
                    start = i + 1
            offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32)
            groups.append(_Group(
                key=ckey,
                rows=slice(lo, lo + len(order)) if contiguous else torch.tensor(order, dtype=torch.long, device=dev),
                n=len(order),
                entry_of_row=torch.tensor(entries, dtype=torch.long, device=dev),
                offs=offs.to(dev),
                segments=tuple(segments),
            ))
        return _Rows(batch=len(ids), groups=tuple(groups))


def _compute_dtype(model: nn.Module, linear: nn.Linear) -> torch.dtype:
    """The dtype the base computes in: Linear4bit's compute_dtype, else the float weights'."""
    compute = getattr(linear, "compute_dtype", None)
    if compute is not None:
        return compute
    if linear.weight.is_floating_point():
        return linear.weight.dtype
    # A 4-bit layer without a compute dtype computes in its input's dtype: the
    # dtype of the model's float (non-quantized) parameters.
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
