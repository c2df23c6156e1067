"""Base-model resolution, checks that need only the config, and the NF4 + LoRA model.

The order matters: `resolve_base` and `resolve_target_modules` run on the config
alone (the architecture is instantiated on the `meta` device, zero bytes), so a
missing base or a typo in target_modules fails before any weight is read.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from qlora_serve.server.engine.loader import disable_cpu_bf16_repack
from qlora_serve.errors import InvalidArgument

from .config import TrainConfig


def resolve_base(base: str | None) -> str:
    """The base as `from_pretrained` takes it. None -> the embedded demo base.

    A string that looks like a path (exists, starts with `.`, `/`, `~`, or has more
    than one `/`) must be a directory holding config.json; anything else is a hub id.
    """
    if base is None:
        from qlora_serve.server.demo import ensure_demo

        return str(ensure_demo().base)
    p = Path(base).expanduser()
    looks_like_path = p.exists() or base.startswith((".", "/", "~")) or base.count("/") > 1 or "\\" in base
    if looks_like_path:
        if not p.is_dir():
            raise InvalidArgument(f"base model path {base} does not exist or is not a directory; pass a model directory or a hub id like org/name")
        if not (p / "config.json").is_file():
            raise InvalidArgument(f"base model directory {base} has no config.json; it is not a transformers model (save one with save_pretrained)")
        return str(p)
    return base


def load_tokenizer(base: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot load a tokenizer for base {base!r}: {exc}") from None


def load_base_config(base: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot load the config of base {base!r}: {exc}") from None


def linear_module_names(model_config) -> tuple[list[str], str | None]:
    """(names of every nn.Linear in the architecture, name of the output head),
    found on a `meta`-device instance so no memory is used."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    head_name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    return names, head_name


def resolve_target_modules(cfg: TrainConfig, model_config) -> list[str]:
    """The LoRA target suffixes: cfg.target_modules checked against the model, or
    (when empty or ["all-linear"], PEFT's preset) every Linear suffix except the output
    head's (the QLoRA paper's choice). The head is refused: the server applies LoRA
    only to the base's quantized Linear layers, so such an adapter could not be served."""
    names, head = linear_module_names(model_config)
    return check_target_modules(cfg.target_modules, names, head)


def check_target_modules(targets: list[str], names: list[str], head: str | None) -> list[str]:
    """`targets` checked against the Linear module `names` of a base whose output
    head is `head` (see resolve_target_modules); InvalidArgument on a bad one."""
    suffixes = sorted({n.rsplit(".", 1)[-1] for n in names if n != head})
    if not targets or targets == ["all-linear"]:
        if not suffixes:
            raise InvalidArgument("the base model has no Linear layers besides the output head; nothing for LoRA to adapt")
        return suffixes
    if "all-linear" in targets:
        raise InvalidArgument("target_modules 'all-linear' is PEFT's preset for every Linear layer; give it alone, not with names")
    head_suffix = head.rsplit(".", 1)[-1] if head else None
    on_head = [t for t in targets if head and t in (head, head_suffix) and t not in suffixes]
    if on_head:
        raise InvalidArgument(
            f"target_modules {on_head} is the output head ({head}): the server cannot serve LoRA on it per request "
            f"(only the base's quantized Linear layers); adapt the others ({', '.join(suffixes)})"
        )
    all_suffixes = {n.rsplit(".", 1)[-1] for n in names}
    unknown = [t for t in targets if t not in all_suffixes and t not in names]
    if unknown:
        close = {t: difflib.get_close_matches(t, suffixes, n=1) for t in unknown}
        hint = "; ".join(f"{t!r}: did you mean {c[0]!r}?" for t, c in close.items() if c)
        raise InvalidArgument(
            f"target_modules {unknown} match no Linear layer of the base model; "
            f"available: {', '.join(suffixes)}" + (f" (output head: {head})" if head else "") + (f" ({hint})" if hint else "")
        )
    return list(targets)


def check_modules_to_save(cfg: TrainConfig, model_config) -> None:
    if not cfg.modules_to_save:
        return
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    suffixes = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules() if n}
    unknown = [m for m in cfg.modules_to_save if m not in suffixes]
    if unknown:
        raise InvalidArgument(f"modules_to_save {unknown} match no module of the base model")


def check_compute_device(cfg: TrainConfig) -> None:
    """float16 training is the fp16 autocast + GradScaler recipe, which accelerate applies
    only on an accelerator: on CPU it would silently train without loss scaling."""
    if cfg.compute_dtype == "float16" and not torch.cuda.is_available():
        raise InvalidArgument("compute_dtype = float16 needs a CUDA GPU (fp16 autocast with loss scaling); on CPU "
                              "the Trainer applies neither, so use float32 (the fastest on CPU) or bfloat16")


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    return {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[cfg.compute_dtype]


def device_map() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def load_quantized_base(base: str, cfg: TrainConfig):
    """The base in NF4 with double quantization, prepared for k-bit training
    (norms/embeddings upcast to fp32, input grads on, non-reentrant checkpointing)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype(cfg),
    )
    model = AutoModelForCausalLM.from_pretrained(
        base, quantization_config=bnb, dtype=compute_dtype(cfg), device_map=device_map()
    )
    # Reentrant checkpointing + frozen inputs gives "element 0 of tensors does not
    # require grad"; non-reentrant does not need the input-grad hack to be correct.
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    model.config.use_cache = False  # the KV cache is useless in training and breaks with checkpointing
    # Gradients must flow through the frozen 4-bit layers (see disable_cpu_bf16_repack).
    disable_cpu_bf16_repack(model)
    return model


def attach_lora(model, cfg: TrainConfig, target_modules: list[str]):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        modules_to_save=cfg.modules_to_save or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # LoRA weights in fp32 whatever the compute dtype: fp16 loss scaling (GradScaler)
    # cannot unscale fp16 gradients, and bf16 weights lose small updates.
    return get_peft_model(model, lora, autocast_adapter_dtype=True)
