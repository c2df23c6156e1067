"""Reading and checking PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors).

Everything here runs before any tensor reaches the model: an adapter that fails a
check is refused with a message naming the file and what to change. The
checks follow vLLM's `PEFTHelper.validate_legal` idea: validate the config once, up front.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qlora_serve.errors import FailedPrecondition, InvalidArgument, clip, clip_repr

from qlora_serve.adapters.layout import CONFIG_FILE, FINGERPRINT_KEY, PICKLE_WEIGHTS, WEIGHTS_FILE

_KEY_PREFIX = "base_model.model."
# Config switches whose behaviour our batched LoRA does not implement. Refusing is
# better than serving an adapter that silently computes something else.
_UNSUPPORTED_TRUE = ("use_dora", "lora_bias", "use_qalora", "fan_in_fan_out",
                     # aLoRA applies the adapter only after its invocation tokens: plain LoRA differs.
                     "alora_invocation_tokens")


@dataclass(frozen=True)
class LoraModule:
    """One adapted Linear: delta(x) = scaling * (x @ lora_a.T) @ lora_b.T.

    lora_a: [r, in_features]; lora_b: [out_features, r]; scaling: alpha / r (or alpha / sqrt(r) with rsLoRA).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])


@dataclass(frozen=True)
class LoraAdapter:
    """A parsed, validated adapter. `modules` is keyed by the base model's module
    name as in `model.named_modules()`, e.g. "model.layers.0.self_attn.q_proj"."""

    path: Path
    config: AdapterConfig
    modules: dict[str, LoraModule] = field(repr=False)

    @property
    def rank(self) -> int:
        """The largest rank over all modules (rank_pattern can vary it per module)."""
        return max(m.rank for m in self.modules.values())

    @property
    def alpha(self) -> float:
        return self.config.lora_alpha

    @property
    def target_modules(self) -> list[str]:
        """Module name suffixes the adapter targets, sorted (e.g. ["q_proj", "v_proj"])."""
        return sorted({name.rsplit(".", 1)[-1] for name in self.modules})

    @property
    def nbytes(self) -> int:
        """Host bytes the adapter really holds: the storages behind its tensors, each counted once
        (a view of a larger buffer holds the whole buffer)."""
        storages = {}
        for m in self.modules.values():
            for t in (m.lora_a, m.lora_b):
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


def _pattern(cfg: dict, key: str, cfg_path: Path) -> dict[str, float]:
    """A rank_pattern / alpha_pattern: {module name or regex: number} ({} when absent)."""
    value = cfg.get(key) or {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in value.items()):
        raise InvalidArgument(f"{cfg_path}: field {key!r} must map module names to numbers, got {clip_repr(value)}")
    return value


@dataclass(frozen=True)
class AdapterConfig:
    """adapter_config.json, parsed and checked once (as vLLM's `PEFTHelper`): the
    fields that decide how the adapter computes. `raw` keeps the whole object.

    r: default rank; lora_alpha: scaling numerator (default r); use_rslora: scale by
    alpha / sqrt(rank) instead of alpha / rank; rank_pattern / alpha_pattern: per-module
    overrides (PEFT's key rules); target_modules: list of name suffixes, a regex, or
    None; base_fingerprint: the base it declares it was trained on (FINGERPRINT_KEY),
    None when it declares none."""

    r: int
    lora_alpha: float
    target_modules: tuple[str, ...] | str | None
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    base_fingerprint: object = None  # checked by the registry, which names the server's base
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def parse(cls, cfg: object, cfg_path: Path) -> "AdapterConfig":
        """Check a decoded adapter_config.json; InvalidArgument naming `cfg_path` and the field."""
        if not isinstance(cfg, dict):
            raise InvalidArgument(f"{cfg_path} must hold a JSON object")
        peft_type = str(cfg.get("peft_type", "")).upper()
        if peft_type != "LORA":
            raise InvalidArgument(f"{cfg_path}: peft_type is {cfg.get('peft_type')!r}; only LORA adapters are served")
        r = cfg.get("r")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise InvalidArgument(f"{cfg_path}: field 'r' must be a positive integer, got {r!r}")
        alpha = cfg.get("lora_alpha", r)
        # Any finite number: PEFT accepts a negative (or zero) alpha and scales by it as it is.
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise InvalidArgument(f"{cfg_path}: field 'lora_alpha' must be a finite number, got {clip_repr(alpha)}")
        # use_dora is one of these: DoRA's magnitude vector is not plain LoRA.
        for key in _UNSUPPORTED_TRUE:
            if cfg.get(key):
                raise InvalidArgument(f"{cfg_path}: '{key}: {clip(json.dumps(cfg[key]), 40)}' is not supported by the serving engine; retrain without it or merge the adapter (qlora-serve merge)")
        if cfg.get("modules_to_save"):
            raise InvalidArgument(f"{cfg_path}: modules_to_save={cfg['modules_to_save']} replaces whole base modules, which a shared base cannot do per request; retrain without modules_to_save or merge the adapter (qlora-serve merge)")
        if cfg.get("bias", "none") != "none":
            raise InvalidArgument(f"{cfg_path}: bias={cfg['bias']!r} trains base biases, which a shared base cannot apply per request; use bias='none'")
        targets = cfg.get("target_modules")
        if not (targets is None or isinstance(targets, str)
                or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
            raise InvalidArgument(f"{cfg_path}: field 'target_modules' must be a list of module names or a regex "
                                  f"string, got {clip_repr(targets)}")
        return cls(r=r, lora_alpha=float(alpha), target_modules=tuple(targets) if isinstance(targets, list) else targets,
                   use_rslora=bool(cfg.get("use_rslora")), rank_pattern=_pattern(cfg, "rank_pattern", cfg_path),
                   alpha_pattern=_pattern(cfg, "alpha_pattern", cfg_path),
                   base_fingerprint=cfg.get(FINGERPRINT_KEY), raw=cfg)

    def rank_of(self, module_name: str) -> int:
        """The rank the config gives a module: its rank_pattern entry, else r (PEFT's key rule)."""
        from peft.utils.other import get_pattern_key

        if not self.rank_pattern:
            return self.r
        return self.rank_pattern.get(get_pattern_key(self.rank_pattern.keys(), module_name), self.r)

    def scaling(self, module_name: str, rank: int) -> float:
        """PEFT's rule: alpha_pattern overrides lora_alpha by key; rsLoRA divides by sqrt(rank)."""
        from peft.utils.other import get_pattern_key

        alpha = self.lora_alpha
        if self.alpha_pattern:
            alpha = self.alpha_pattern.get(get_pattern_key(self.alpha_pattern.keys(), module_name), alpha)
        return float(alpha) / (math.sqrt(rank) if self.use_rslora else rank)


def read_adapter_config(adapter_dir: Path) -> AdapterConfig:
    """Parse and check `adapter_config.json`; raise InvalidArgument naming the file and field."""
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise InvalidArgument(f"adapter path {adapter_dir} is not a directory; pass the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    cfg_path = adapter_dir / CONFIG_FILE
    if not cfg_path.is_file():
        raise InvalidArgument(f"{cfg_path} is missing: a PEFT adapter directory needs {CONFIG_FILE} and {WEIGHTS_FILE} (save it with PeftModel.save_pretrained)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"{cfg_path} is not valid JSON: {exc}") from None
    except RecursionError:  # json recurses per nesting level: deep nesting is bad input, not a crash
        raise InvalidArgument(f"{cfg_path}: the JSON is nested too deeply; a PEFT adapter config is a flat object") from None
    return AdapterConfig.parse(cfg, cfg_path)


def load_lora_adapter(adapter_dir: Path, *, max_rank: int | None = None, dtype: torch.dtype | None = None) -> LoraAdapter:
    """Read an adapter directory into host (CPU) fp32 tensors, checking everything
    that can be checked without a base model: file formats, config, ranks, NaN/Inf.
    With `dtype` (the dtype the serving slots hold), weights must also stay finite
    in it: 3.4e38 is finite in fp32 but inf in bfloat16 (INVALID_ARGUMENT)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [p for p in PICKLE_WEIGHTS if (adapter_dir / p).exists()]
        if pickled:
            raise InvalidArgument(
                f"{adapter_dir / pickled[0]} is a pickle checkpoint, which can run code when loaded and is refused; "
                f"convert it: PeftModel.from_pretrained(base, dir).save_pretrained(out_dir, safe_serialization=True)"
            )
        raise InvalidArgument(f"{weights} is missing: a PEFT adapter directory needs {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise InvalidArgument(f"{weights} is not a readable safetensors file: {exc}") from None

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise InvalidArgument(f"{weights}: tensor {clip_repr(key)} has dtype {str(tensor.dtype).removeprefix('torch.')}; "
                                  "LoRA weights must be floating point (F32, F16 or BF16)")
        if "lora_embedding_" in key or "lora_magnitude_vector" in key:
            raise InvalidArgument(f"{weights}: tensor {key!r} belongs to an embedding/DoRA adapter, which the serving engine does not support")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                module = module[len(_KEY_PREFIX):] if module.startswith(_KEY_PREFIX) else module
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise InvalidArgument(f"{weights}: unexpected tensor {key!r}; only lora_A/lora_B weights are supported")
    if not pairs:
        raise InvalidArgument(f"{weights} holds no LoRA tensors")

    modules: dict[str, LoraModule] = {}
    for name, pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidArgument(f"{weights}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidArgument(f"{weights}: module {name!r} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; expected [r, in] and [out, r]")
        rank = int(a.shape[0])
        check_config_rank(cfg, name, rank, weights)
        if max_rank is not None and rank > max_rank:
            raise FailedPrecondition(f"{weights}: module {name!r} has rank {rank} > the server's max_lora_rank {max_rank}; raise --max-lora-rank or retrain with a smaller r")
        a, b = a.float(), b.float()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidArgument(f"{weights}: module {name!r} has NaN or Inf weights; the adapter is corrupt or diverged in training")
        if dtype is not None and dtype != torch.float32:
            check_finite_in(a, b, dtype, f"{weights}: module {name!r}")
        modules[name] = LoraModule(lora_a=a, lora_b=b, scaling=cfg.scaling(name, rank))
        check_delta_range(modules[name], dtype or torch.float32, f"{weights}: module {name!r}")
    return LoraAdapter(path=adapter_dir, config=cfg, modules=modules)


def check_config_rank(cfg: AdapterConfig, module_name: str, rank: int, weights: Path) -> None:
    """Refuse tensors whose rank is not the one the config gives the module (`r`, or
    its `rank_pattern` entry): PEFT refuses such an adapter, so must we."""
    from peft.utils.other import get_pattern_key

    expected = cfg.rank_of(module_name)
    if expected != rank:
        key = get_pattern_key(cfg.rank_pattern.keys(), module_name) if cfg.rank_pattern else module_name
        field_name = f"rank_pattern[{key!r}]" if key in cfg.rank_pattern else "r"
        raise InvalidArgument(
            f"{weights}: module {module_name!r} has rank-{rank} tensors but adapter_config.json field "
            f"'{field_name}' says {clip_repr(expected)}; fix the config to match the tensors")


def delta_bound(module: LoraModule) -> float:
    """An upper bound on the spectral norm of the module's weight delta
    |scaling| x ||B @ A||_2 <= |scaling| x ||B||_F x ||A||_F: the most the delta can
    multiply an input's L2 norm by. Float64, so it is exact enough even for weights
    whose square overflows float32; O((in + out) x r), B @ A is never formed."""
    a = torch.linalg.vector_norm(module.lora_a.double()).item()
    b = torch.linalg.vector_norm(module.lora_b.double()).item()
    return abs(module.scaling) * a * b


def delta_limit(dtype: torch.dtype) -> float:
    """Largest `delta_bound` served for `dtype`: the square root of its largest value
    (and of float32's, which the adapter slots use), so an activation would itself
    have to be near overflow before the delta overflows (1.8e19 for float32/bfloat16,
    256 for float16)."""
    return math.sqrt(min(torch.finfo(dtype).max, torch.finfo(torch.float32).max))


def check_delta_range(module: LoraModule, dtype: torch.dtype, what: str) -> None:
    """Refuse a module whose scaled delta (scaling x B x A, not A and B one by one)
    can overflow `dtype`: served, it answers OK with garbage tokens."""
    bound, limit = delta_bound(module), delta_limit(dtype)
    if not bound <= limit:  # also catches inf/nan
        raise InvalidArgument(
            f"{what}: its scaled delta lora_alpha/r x lora_B x lora_A can reach {bound:.3g} x the input, beyond what "
            f"{str(dtype).removeprefix('torch.')} holds (limit {limit:.3g}); the adapter is corrupt or diverged: check "
            f"lora_alpha and the weights, or retrain")


def check_finite_in(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Refuse LoRA weights that overflow `dtype` (finite in fp32, inf once converted)."""
    if not (torch.isfinite(a.to(dtype)).all() and torch.isfinite(b.to(dtype)).all()):
        raise InvalidArgument(
            f"{what} has weights beyond the range of {str(dtype).removeprefix('torch.')}, the dtype this server computes in; "
            "rescale the adapter (e.g. retrain with weight decay) or serve with --compute-dtype float32")


def _targeted(target_modules, name: str) -> bool:
    """PEFT's rule (check_target_module_exists): a regex string must match the whole
    module name; a list entry must be the name or its last dotted parts."""
    if isinstance(target_modules, str):
        return target_modules == "all-linear" or re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith(f".{t}") for t in target_modules)


def check_targets(adapter: LoraAdapter, linear_shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse `target_modules` that names no Linear layer of the base (PEFT refuses
    it) or that leaves out a module the tensors adapt (PEFT would ignore them)."""
    where = adapter.path / CONFIG_FILE
    targets = adapter.config.target_modules
    if targets is None:
        return
    try:
        if not any(_targeted(targets, name) for name in linear_shapes):
            raise InvalidArgument(
                f"{where}: field 'target_modules' {clip_repr(targets)} names no Linear layer of the base model "
                f"(e.g. {sorted({n.rsplit('.', 1)[-1] for n in linear_shapes})[:8]}); the adapter was trained for another architecture")
        missing = next((n for n in sorted(adapter.modules) if not _targeted(targets, n)), None)
    except re.error as exc:
        raise InvalidArgument(f"{where}: field 'target_modules' is not a valid regex: {exc}") from None
    if missing is not None:
        raise InvalidArgument(f"{where}: {WEIGHTS_FILE} adapts module {missing!r}, which field 'target_modules' "
                              f"{clip_repr(targets)} does not name; fix target_modules to match the tensors")


def check_fits_base(adapter: LoraAdapter, linear_shapes: dict[str, tuple[int, int]]) -> None:
    """Refuse an adapter whose modules are not Linear layers of the base or whose
    shapes differ, or whose `target_modules` contradicts the base or the tensors.
    `linear_shapes` maps module name -> (in_features, out_features)."""
    for name, mod in adapter.modules.items():
        if name not in linear_shapes:
            raise InvalidArgument(
                f"{adapter.path / WEIGHTS_FILE}: module {name!r} is not a Linear layer of the base model; "
                f"the adapter was trained for another architecture"
            )
        in_f, out_f = linear_shapes[name]
        if mod.lora_a.shape[1] != in_f or mod.lora_b.shape[0] != out_f:
            raise InvalidArgument(
                f"{adapter.path / WEIGHTS_FILE}: module {name!r} expects a Linear of {mod.lora_a.shape[1]} -> "
                f"{mod.lora_b.shape[0]} features but the base has {in_f} -> {out_f}; the adapter belongs to another base model"
            )
    check_targets(adapter, linear_shapes)
