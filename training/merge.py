"""`merge(base, adapter, out_dir)`: a standalone model with the adapter folded in.

The adapter is merged into the base loaded unquantized in `dtype` (default bf16 on
GPU, fp32 on CPU where bf16 matmuls are slow), not into the NF4 weights:
`merge_and_unload` on a 4-bit model re-quantizes W + BA into NF4 and loses the
update in rounding. Before saving, the merged model's greedy output on a sample
prompt must equal the unmerged base + adapter in the same dtype; otherwise nothing
is written. The weights are written as safetensors shards of at most
`max_shard_size` each (plus `model.safetensors.index.json` when there are several).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_serve.adapters.layout import CHAT_TEMPLATE_FILE, CONFIG_FILE
from qlora_serve.errors import FailedPrecondition, InvalidArgument

DEFAULT_PROMPT = "hello world"
if TYPE_CHECKING:
    import torch

DTYPES = ("bfloat16", "float16", "float32")  # names of torch dtypes; torch is imported only to merge
DEFAULT_MAX_SHARD_SIZE = "5GB"  # transformers 4's default: hub-friendly files, bounded memory while loading


def shard_size_bytes(size: str | int) -> int:
    """`size` ("5GB", "500MB", "2GiB", "100KB" or a byte count) in bytes; InvalidArgument if unreadable or < 1."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        n = int(size) if isinstance(size, int) or str(size).isdigit() else convert_file_size_to_int(str(size))
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidArgument(f"max_shard_size must be a byte count or a size with a unit (5GB, 500MB, 2GiB), got {size!r}")
    return n


@dataclass
class MergeResult:
    out_dir: Path
    dtype: str
    prompt: str
    generated_ids: list[int]  # greedy continuation, identical for merged and unmerged
    weight_files: list[str]  # the safetensors shard names written, in order


def merge(
    base: str | None,
    adapter: str | Path,
    out_dir: str | Path,
    *,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 16,
    dtype: str | torch.dtype | None = None,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
) -> MergeResult:
    """Merge `adapter` into `base` (None: the demo base) and save model + tokenizer to `out_dir`.

    `dtype`: bfloat16, float16 or float32 (name or torch dtype) of the merged weights;
    None = bf16 on GPU, fp32 on CPU. `max_shard_size`: bytes per safetensors file
    ("5GB", "500MB", or an int). Raises InvalidArgument for a bad argument (before
    loading) and FailedPrecondition if merged and unmerged greedy outputs differ.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from .model import load_tokenizer, resolve_base

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise InvalidArgument(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        dtype = getattr(torch, dtype)
    shard_bytes = shard_size_bytes(max_shard_size)
    base = resolve_base(base)
    adapter = Path(adapter)
    # Not peft_format.read_adapter_config: that refuses modules_to_save, which merging handles fine.
    if not (adapter / CONFIG_FILE).is_file():
        raise InvalidArgument(f"{adapter} has no {CONFIG_FILE}; pass a PEFT adapter directory")
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    dtype = dtype or (torch.bfloat16 if device != "cpu" else torch.float32)
    tokenizer = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype, device_map=device)
    model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()

    inputs = tokenizer(prompt, return_tensors="pt").to(device)
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    with torch.no_grad():
        unmerged = model.generate(**inputs, **gen_kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
        merged_model = model.merge_and_unload()
        merged = merged_model.generate(**inputs, **gen_kwargs)[0, inputs["input_ids"].shape[1]:].tolist()
    if merged != unmerged:
        raise FailedPrecondition(
            f"merged model's greedy output {merged} differs from base+adapter {unmerged} on prompt {prompt!r} "
            f"({dtype}); nothing was written. Try dtype=float32 or report the adapter."
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_model.save_pretrained(out_dir, max_shard_size=shard_bytes)  # safetensors
    if (adapter / CHAT_TEMPLATE_FILE).is_file():  # trained with --chat-template: the merged model chats with it
        tokenizer.chat_template = (adapter / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
    tokenizer.save_pretrained(out_dir)
    files = sorted(p.name for p in out_dir.glob("*.safetensors"))
    return MergeResult(out_dir=out_dir, dtype=str(dtype).removeprefix("torch."), prompt=prompt, generated_ids=merged,
                       weight_files=files)
