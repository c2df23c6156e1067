"""Loading the base model once, in 4-bit NormalFloat with double quantization."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qlora_serve.errors import FailedPrecondition, InvalidArgument
from qlora_serve.server.engine.config import COMPUTE_DTYPES

log = logging.getLogger(__name__)

_DTYPES = {name: getattr(torch, name) for name in COMPUTE_DTYPES}


@dataclass(frozen=True)
class Footprint:
    """Resident size of the quantized weights. bits_per_param counts the packed
    4-bit codes plus the (double-quantized) absmax scales of every Linear4bit."""

    quantized_params: int
    quantized_bytes: int
    model_bytes: int  # everything: quantized linears + embeddings, norms, lm_head

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.quantized_bytes / max(1, self.quantized_params)


@dataclass
class LoadedBase:
    """The resident base: model (eval mode, NF4 Linear4bit layers), tokenizer and facts about it."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    compute_dtype: torch.dtype
    footprint: Footprint
    eos_token_ids: frozenset[int]
    max_context: int

    def info(self) -> dict:
        """Facts for clients (GetModelInfo): base_name, context_length and vocab_size
        (tokens), compute_dtype, resident_bytes and quantized_bytes (bytes),
        bits_per_param, chat_template (bool), device."""
        return {"base_name": self.name, "context_length": self.max_context,
                "vocab_size": int(self.model.config.vocab_size),
                "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
                "resident_bytes": self.footprint.model_bytes, "quantized_bytes": self.footprint.quantized_bytes,
                "bits_per_param": self.footprint.bits_per_param,
                "chat_template": bool(getattr(self.tokenizer, "chat_template", None)), "device": str(self.device)}


def resolve_dtype(name: str) -> torch.dtype:
    """'bfloat16' | 'float32' | 'float16' -> torch dtype; anything else is refused."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidArgument(f"compute dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


def pick_device(requested: str = "auto") -> torch.device:
    """'auto' = CUDA when present, else CPU. Asking for CUDA without one is an error, not a fallback."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FailedPrecondition(f"--device {requested} asked for CUDA but torch sees no CUDA device; use --device cpu or auto")
    return device


def quantized_footprint(model: torch.nn.Module) -> Footprint:
    """Measure the bytes held by every bitsandbytes Linear4bit (codes + quant state)."""
    import bitsandbytes as bnb

    params = nbytes = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = module.weight
            params += module.in_features * module.out_features
            nbytes += w.numel() * w.element_size()
            qs = w.quant_state
            nbytes += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested and qs.state2 is not None:
                nbytes += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + qs.state2.code.numel() * 4
    return Footprint(quantized_params=params, quantized_bytes=nbytes, model_bytes=int(model.get_memory_footprint()))


def disable_cpu_bf16_repack(model: torch.nn.Module) -> int:
    """Keep bitsandbytes' CPU 4-bit layers on their plain (float32-capable, autograd) path.

    On CPUs with AVX512-BF16, `Linear4bit.forward` in eval mode without grad repacks
    its weight *in place* into a CPU-only layout and from then on multiplies in
    bfloat16 whatever the compute dtype, through a kernel with no autograd. Serving
    keeps that default (it is what plain PEFT does on the same CPU, and it is fast);
    training must turn it off (gradients would silently stop flowing: measured loss
    stuck at 3.4 instead of 0.02), and so must tests that compare float32 arithmetic
    across batch shapes. Call before the first forward; returns the layers switched.
    """
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_base(name_or_path: str, *, compute_dtype: str = "bfloat16", device: str = "auto") -> LoadedBase:
    """Load a causal LM (hub id or local directory) with NF4 + double quantization.

    Raises FailedPrecondition with a message saying what to fix when the model
    cannot be found or loaded; never a bare traceback.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    dtype = resolve_dtype(compute_dtype)
    dev = pick_device(device)
    looks_local = name_or_path.startswith((".", "/", "~")) or Path(name_or_path).exists()
    if looks_local and not (Path(name_or_path).expanduser() / "config.json").is_file():
        raise FailedPrecondition(f"base model directory {name_or_path} has no config.json; pass a directory written by save_pretrained or a hub id")
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            quantization_config=quant,
            dtype=dtype,
            device_map={"": dev.index or 0} if dev.type == "cuda" else "cpu",
        )
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"could not load base model {name_or_path!r}: {exc}") from None
    model.eval()
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos_ids.add(tokenizer.eos_token_id)
    footprint = quantized_footprint(model)
    return LoadedBase(
        model=model,
        tokenizer=tokenizer,
        name=name_or_path,
        device=dev,
        compute_dtype=dtype,
        footprint=footprint,
        eos_token_ids=frozenset(eos_ids),
        max_context=int(getattr(model.config, "max_position_embeddings", 2048)),
    )


def base_shapes(name_or_path: str) -> tuple[dict, dict[str, tuple[int, int]]]:
    """The base's config (as a dict) and its adaptable Linear layers {module name:
    (in_features, out_features)}, the modules the engine wraps, without loading any
    weights: the model is built on the meta device. For a registry-only server."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name_or_path)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError) as exc:
        raise FailedPrecondition(f"could not read base model {name_or_path!r}: {exc}") from None
    head = model.get_output_embeddings()
    shapes = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and m is not head}
    return config.to_dict(), shapes
