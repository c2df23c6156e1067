"""Exact-match accuracy after training, for the training benchmark (bench_training.py).

The task is the training tests' Caesar shift (tests/caesar_task.py: "abcd=" -> "bcde"
then eos) on a tiny byte-level base (vocab 259, hidden 128, 2 layers: every letter is
one token) that scores 0 before training. Each variant trains the same 2000 words with
the same recipe (caesar_task.RECIPE: lr 1e-2, r 16, batch 16, 300 steps, seed 0), then
the saved adapter is loaded with plain PEFT on the NF4 base and scored by greedy decoding
on held-out words (never trained on) and on a sample of the training words: a hit is
exactly the shifted word followed by eos.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from caesar_task import RECIPE, exact_match, write_caesar_data  # noqa: E402 (tests/caesar_task.py)

TASK_VERSION = 1


def char_base(cache: Path) -> Path:
    """The tests' tiny byte-level base, built once into the benchmark cache."""
    from qlora_serve.server.demo import TinyModelSpec, build_tiny_base

    base = cache / f"bench-train-char-v{TASK_VERSION}" / "base"
    if not (base / "READY").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".char-", dir=cache))
        build_tiny_base(tmp / "base", TinyModelSpec(vocab_size=259))
        (tmp / "base" / "READY").write_text("1")
        base.parent.mkdir(parents=True, exist_ok=True)
        if not base.exists():
            os.replace(tmp / "base", base)
    return base


def task_files(work: Path, held_out: int) -> dict:
    """The Caesar train/held-out files (prompt/completion JSONL) under `work`."""
    d = work / "caesar"
    d.mkdir(parents=True, exist_ok=True)
    files = write_caesar_data(d, held_out)
    words = [json.loads(l)["prompt"][:-1] for l in files["train"].read_text().splitlines()]
    return {"train": str(files["train"]), "held_out": files["held_out"], "train_sample": words[:held_out]}


def recipe(steps: int, learning_rate: float | None = None) -> dict:
    """The shared optimizer recipe of the accuracy runs (caesar_task.RECIPE, `steps` steps)."""
    return dict(learning_rate=learning_rate or RECIPE["learning_rate"], warmup_ratio=RECIPE["warmup_ratio"],
                max_grad_norm=RECIPE["max_grad_norm"], lora_r=RECIPE["lora_r"], lora_alpha=RECIPE["lora_alpha"],
                lora_dropout=RECIPE["lora_dropout"], batch_size=RECIPE["batch_size"], grad_accum=RECIPE["grad_accum"],
                steps=steps)


def score(base: str, adapter_dir: str | None, held_out: list[str], train_sample: list[str]) -> dict:
    """Exact match of base (+ adapter, loaded with plain PEFT) on held-out and training words."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(base)
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=bnb, dtype=torch.float32, device_map="cpu")
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return {"held_out_exact": exact_match(model, tok, held_out), "train_exact": exact_match(model, tok, train_sample)}
