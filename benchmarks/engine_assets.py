"""Model and adapter building for the engine benchmark (bench_engine.py): the CPU tiny base or a
7B-shaped random Llama, and N random PEFT adapters of mixed ranks, each built once and cached."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

ADAPTER_TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapter_rank(i: int) -> int:
    """Mixed ranks: adapters cycle r=8, 16, 64 (alpha = 2r)."""
    return (8, 16, 64)[i % 3]


def _ready(root: Path) -> bool:
    return (root / "READY.json").is_file()


def build_cpu_assets(root: Path, spec_fields: dict, n_adapters: int) -> tuple[Path, list[Path]]:
    """The CPU benchmark base (build_tiny_base) and n_adapters random adapters (build_random_adapter),
    cached under root. Adapters are built incrementally, so asking for more later reuses the first ones."""
    from qlora_serve.server.demo import DemoAdapterSpec, TinyModelSpec, build_random_adapter, build_tiny_base

    spec = TinyModelSpec(**spec_fields)
    base = root / "base"
    if not _ready(base):
        tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=root))
        build_tiny_base(tmp, spec)
        (tmp / "READY.json").write_text(json.dumps(asdict(spec)))
        os.replace(tmp, base)
    dirs = []
    for i in range(n_adapters):
        out = root / "adapters" / f"a{i}"
        if not _ready(out):
            r = adapter_rank(i)
            tmp = Path(tempfile.mkdtemp(prefix=f".a{i}-", dir=root))
            build_random_adapter(base, tmp, DemoAdapterSpec(name=f"a{i}", r=r, alpha=2 * r, target_modules=ADAPTER_TARGETS,
                                                            seed=1000 + i, init_scale=0.5))
            (tmp / "READY.json").write_text("{}")
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
        dirs.append(out)
    return base, dirs


def llama_linear_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every adaptable Linear of a Llama config (no model built)."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_layer = {"self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                 "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, inter), "mlp.up_proj": (h, inter),
                 "mlp.down_proj": (inter, h)}
    return {f"model.layers.{i}.{k}": v for i in range(cfg["num_hidden_layers"]) for k, v in per_layer.items()}


def write_random_adapter(out_dir: Path, shapes: dict[str, tuple[int, int]], *, r: int, alpha: int,
                         targets: tuple[str, ...], seed: int, init_scale: float = 0.5, dtype=None) -> Path:
    """A PEFT LoRA adapter directory written directly (no base model loaded): what build_random_adapter
    produces, but cheap for a 7B-shaped base whose fp32 copy would not be worth loading per adapter."""
    import torch
    from safetensors.torch import save_file

    dtype = dtype or torch.bfloat16
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fin, fout) in shapes.items():
        if name.rsplit(".", 1)[-1] not in targets:
            continue
        tensors[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(r, fin, generator=gen) * init_scale / fin ** 0.5).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(fout, r, generator=gen) * init_scale / r ** 0.5).to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
              "target_modules": sorted(targets), "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "rank_pattern": {},
              "alpha_pattern": {}, "base_model_name_or_path": "qlora-serve-bench-7b-random"}
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return out_dir


def build_7b_assets(root: Path, cfg_fields: dict, n_adapters: int, device: str) -> tuple[Path, list[Path]]:
    """A 7B-shaped Llama with random weights, initialised directly on `device` in bf16, written with
    save_pretrained (~13.5 GB) so that load_base quantizes it to NF4 + double quant through the same
    from_pretrained + BitsAndBytesConfig path as a real checkpoint. Cached under root (build once).

    (A cheaper way, not used: build on the meta device and swap each nn.Linear for a
    bnb.nn.Linear4bit filled with random NF4 codes; it skips the 13.5 GB write but no longer
    exercises the real loading path.)"""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from qlora_serve.server.demo import build_tokenizer

    base = root / "base"
    if not _ready(base):
        tmp = Path(tempfile.mkdtemp(prefix=".base-", dir=root))
        tok = build_tokenizer(tmp, cfg_fields["vocab_size"])  # tiny corpus: far fewer tokens; prompts are ids anyway
        config = LlamaConfig(**cfg_fields, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                   pad_token_id=tok.pad_token_id)
        model.save_pretrained(tmp, max_shard_size="4GB")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        (tmp / "READY.json").write_text(json.dumps(cfg_fields))
        os.replace(tmp, base)
    shapes = llama_linear_shapes(cfg_fields)
    dirs = []
    for i in range(n_adapters):
        out = root / "adapters" / f"a{i}"
        if not _ready(out):
            r = adapter_rank(i)
            tmp = Path(tempfile.mkdtemp(prefix=f".a{i}-", dir=root))
            write_random_adapter(tmp, shapes, r=r, alpha=2 * r, targets=ADAPTER_TARGETS, seed=1000 + i)
            (tmp / "READY.json").write_text("{}")
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
        dirs.append(out)
    return base, dirs
