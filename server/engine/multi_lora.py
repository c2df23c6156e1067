"""One-pass batched multi-LoRA: every row of a batch may use a different adapter.

PEFT's mixed batch (`model(..., adapter_names=[...])`) loops over one sub-batch per
adapter, so throughput falls as adapters multiply. Here (the Punica / S-LoRA idea)
each adapted Linear keeps every resident adapter stacked by *slot*:

    A stack [max_slots, max_rank, in_features]    (rank zero-padded to max_rank)
    B stack [max_slots, out_features, max_rank]
    scaling [max_slots]                            (alpha / r, or alpha / sqrt(r); 0 = empty)

and a forward gathers the A/B of each row's slot and adds the delta for all adapted
rows with two batched matmuls, however many distinct adapters the batch holds.
Zero padding is exact: padded rank columns contribute 0 to every sum.

Usage (engine thread only; the slot indices are state of one MultiLoRA instance):

    lora = MultiLoRA(model, max_slots=8, max_rank=16)
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

from qlora_serve.adapters.peft_format import LoraAdapter, check_finite_in, check_fits_base
from qlora_serve.errors import FailedPrecondition


@dataclass(frozen=True)
class _Rows:
    """Per-step row assignment, prepared once by `row_slots` and read by every layer.

    batch: number of rows B the forward must have.
    slot_ids: LongTensor[n_active], the slot of each adapted row, in row order.
    active_rows: LongTensor[n_active], which rows are adapted; None when all B are
        (then no select/scatter is needed).
    single: the one slot every adapted row uses, else None. Then no per-row gather
        is needed: two plain matmuls (the common all-one-adapter traffic).
    gathered: layer -> its per-row (A, B, scaling), filled on first use when
        `cache_gathers`. Decode steps reuse one _Rows while the batch composition and
        the slots are unchanged, so the per-row copy (profiled as the largest LoRA
        cost) happens once per composition instead of once per step.
    """

    batch: int
    slot_ids: torch.Tensor
    active_rows: torch.Tensor | None
    single: int | None = None
    cache_gathers: bool = False
    gathered: dict = field(default_factory=dict, compare=False, repr=False)


class LoRALinear(nn.Module):
    """A base Linear (nn.Linear or bitsandbytes Linear4bit) plus slot-stacked LoRA deltas.

    The base layer is kept as the child `base_layer` and called unchanged, so rows
    without an adapter get exactly the base output.
    """

    def __init__(self, base_layer: nn.Linear, owner: MultiLoRA, *, max_slots: int, max_rank: int, dtype: torch.dtype):
        super().__init__()
        self.base_layer = base_layer
        self.in_features = int(base_layer.in_features)
        self.out_features = int(base_layer.out_features)
        # A plain attribute, not a submodule: the owner is shared by all wrappers.
        self._owner = owner
        device = base_layer.weight.device
        # Non-persistent buffers: they follow model.to(), but stay out of state_dict
        # (they are serving state, not model weights).
        self.register_buffer("lora_a", torch.zeros(max_slots, max_rank, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(max_slots, self.out_features, max_rank, dtype=dtype, device=device), persistent=False)
        # The scaling stays a separate per-slot vector instead of being folded into B:
        # B then holds the adapter's weights exactly as trained (same rounding as PEFT
        # in a 16-bit dtype), and the multiply is applied to the small [n, T, r]
        # intermediate, which costs next to nothing.
        self.register_buffer("scaling", torch.zeros(max_slots, dtype=dtype, device=device), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The base weight, for code that reads `linear.weight` (dtype/device checks)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

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
        slot_ids, active = rows.slot_ids.to(x.device), rows.active_rows
        if active is not None:
            active = active.to(x.device)
            xs = xs.index_select(0, active)  # [n, T, in], only the adapted rows
        # PEFT's arithmetic: delta = (x @ A.T @ B.T) * scaling in the stacks' dtype, added
        # to the base output in the wider dtype, rounded to the output dtype once.
        if rows.single is not None:
            s = rows.single
            delta = torch.matmul(torch.matmul(xs.to(self.lora_a.dtype), self.lora_a[s].t()), self.lora_b[s].t())
            delta = delta * self.scaling[s]  # [n, T, out]
        else:
            cached = rows.gathered.get(self)
            if cached is None:
                # index_select copies the per-row stacks ~3x faster than advanced indexing.
                cached = (self.lora_a.index_select(0, slot_ids),  # [n, r, in]
                          self.lora_b.index_select(0, slot_ids),  # [n, out, r]
                          self.scaling.index_select(0, slot_ids).view(-1, 1, 1))  # [n, 1, 1]
                if rows.cache_gathers:
                    rows.gathered[self] = cached
            a, b, scale = cached
            # One gathered bmm pair for all adapted rows, however many adapters they use.
            delta = torch.bmm(torch.bmm(xs.to(a.dtype), a.transpose(1, 2)), b.transpose(1, 2)) * scale
        if active is None:
            return (out + delta.view(out.shape)).to(out.dtype)
        # Out-of-place scatter-add: base rows are never touched, so they stay
        # bit-identical to the base (even -0.0, which `+ 0.0` would flip).
        wide = torch.promote_types(out.dtype, delta.dtype)
        return out.to(wide).index_add(0, active, delta.view(-1, *out.shape[1:]).to(wide)).to(out.dtype)

    def extra_repr(self) -> str:
        slots, rank = self.lora_a.shape[:2]
        return f"in={self.in_features}, out={self.out_features}, max_slots={slots}, max_rank={rank}, dtype={self.lora_a.dtype}"


class MultiLoRA:
    """Slot-stacked LoRA weights applied to a base model in one batched pass per layer.

    Wraps, in place, every nn.Linear / bitsandbytes Linear4bit of `model` except the
    output head. Memory per wrapped Linear: max_slots * max_rank * (in + out) elements
    of `dtype`. Not thread-safe: the engine thread owns load/unload/row_slots.
    """

    def __init__(self, model: nn.Module, *, max_slots: int, max_rank: int, dtype: torch.dtype | None = None,
                 gather_cache_bytes: int = 256 << 20):
        if max_slots < 1 or max_rank < 1:
            raise ValueError(f"max_slots and max_rank must be >= 1, got max_slots={max_slots}, max_rank={max_rank}")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise ValueError("model is already wrapped by a MultiLoRA; wrap a freshly loaded base")
        self.model = model
        self.max_slots = int(max_slots)
        self.max_rank = int(max_rank)
        self._rows: _Rows | None = None
        self._loaded: set[int] = set()
        # Per-row gathers are cached for a batch composition while they fit this budget (bytes).
        self.gather_cache_bytes = int(gather_cache_bytes)
        self._version = 0  # bumped by load/unload: cached gathers of older slot contents are stale
        self._recent: dict[tuple, _Rows] = {}  # (row slots, version) -> _Rows, for the last few compositions

        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]
        if not targets:
            raise ValueError("model has no Linear layers to adapt")
        # float32 by default, as PEFT keeps and computes adapters (autocast_adapter_dtype):
        # with a bf16 base our tokens then round exactly where plain PEFT's do.
        self.dtype = dtype or torch.float32
        # The dtype the base computes (and rounds each layer's output) in: an adapter
        # whose weights overflow it is refused (see `load` and AdapterSlots.read_adapter).
        self.compute_dtype = _compute_dtype(model, targets[0][1])
        self.device = targets[0][1].weight.device

        self.linear_shapes: dict[str, tuple[int, int]] = {}
        self._layers: dict[str, LoRALinear] = {}
        for name, linear in targets:
            wrapper = LoRALinear(linear, self, max_slots=self.max_slots, max_rank=self.max_rank, dtype=self.dtype)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, wrapper)
            self.linear_shapes[name] = (wrapper.in_features, wrapper.out_features)
            self._layers[name] = wrapper
        elem = torch.empty((), dtype=self.dtype).element_size()
        self._gather_bytes_per_row = elem * (self.max_rank * sum(i + o for i, o in self.linear_shapes.values()) + 1)

    @property
    def loaded_slots(self) -> frozenset[int]:
        """Slots currently holding an adapter."""
        return frozenset(self._loaded)

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
        staged = {}
        for name, mod in adapter.modules.items():
            layer = self._layers[name]
            a = mod.lora_a.to(device=layer.lora_a.device, dtype=self.dtype)
            b = mod.lora_b.to(device=layer.lora_b.device, dtype=self.dtype)
            for dtype in {self.dtype, self.compute_dtype}:
                check_finite_in(a, b, dtype, f"adapter {adapter.path}: module {name!r}")
            staged[name] = (a, b, mod.scaling)
        # inference_mode, not no_grad: in-place writes then work whether the stacks
        # were created inside inference_mode (inference tensors) or outside it.
        with torch.inference_mode():
            for name, layer in self._layers.items():
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                layer.scaling[slot] = 0.0
                if name in staged:  # untargeted modules stay zero: no delta for this slot
                    a, b, scaling = staged[name]
                    layer.lora_a[slot, : a.shape[0]].copy_(a)
                    layer.lora_b[slot, :, : b.shape[1]].copy_(b)
                    layer.scaling[slot] = scaling
        self._loaded.add(slot)
        self._invalidate()

    def unload(self, slot: int) -> None:
        """Zero `slot` in every layer (idempotent). The memory stays allocated for reuse."""
        slot = self._check_slot(slot)
        with torch.inference_mode():
            for layer in self._layers.values():
                layer.lora_a[slot].zero_()
                layer.lora_b[slot].zero_()
                layer.scaling[slot] = 0.0
        self._loaded.discard(slot)
        self._invalidate()

    def _invalidate(self) -> None:
        """Slot contents changed: gathers cached from the old contents must not be reused."""
        self._version += 1
        self._recent.clear()

    @contextmanager
    def row_slots(self, slots: Sequence[int] | torch.Tensor) -> Iterator[None]:
        """Within the `with`, forwards use `slots[i]` for batch row i (-1 = base only).

        slots: list[int] or LongTensor[B]. Every non-negative slot must be loaded.
        Validation reads the slots on the host (one device sync per call, i.e. per
        engine step, not per layer). Nesting restores the outer assignment on exit.
        """
        if isinstance(slots, torch.Tensor) and slots.dim() != 1:
            raise ValueError(f"slots must be 1-D (one per batch row), got shape {tuple(slots.shape)}")
        ids = slots.tolist() if isinstance(slots, torch.Tensor) else [operator.index(s) for s in slots]
        bad = [s for s in ids if s != -1 and s not in self._loaded]
        if bad:
            raise ValueError(f"row slots {sorted(set(bad))} are not loaded slots (loaded: {sorted(self._loaded)}); use -1 for base rows")
        key = (tuple(ids), self._version)
        rows = self._recent.get(key)
        active = [i for i, s in enumerate(ids) if s >= 0]
        if rows is None and active:  # all -1: leave rows None so every layer skips the delta entirely
            rows = _Rows(
                batch=len(ids),
                slot_ids=torch.tensor([ids[i] for i in active], dtype=torch.long, device=self.device),
                active_rows=None if len(active) == len(ids) else torch.tensor(active, dtype=torch.long, device=self.device),
                single=ids[active[0]] if len({ids[i] for i in active}) == 1 else None,
                cache_gathers=len(active) * self._gather_bytes_per_row <= self.gather_cache_bytes,
            )
            # Keep the prefill's and the decode's compositions; older ones are gone for good.
            self._recent = {k: v for k, v in list(self._recent.items())[-1:]}
            self._recent[key] = rows
        previous, self._rows = self._rows, rows
        try:
            yield
        finally:
            self._rows = previous


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
