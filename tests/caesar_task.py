"""The Caesar-shift training task shared by the training tests ("abcd=" -> "bcde").

A tiny byte-level base (vocab 259 = 256 bytes + 3 specials: every letter is one
token) cannot shift letters; the QLoRA recipe below learns it in 300 CPU steps,
so "the adapter learned" is checkable on held-out words. Import the fixture with
`from caesar_task import char_base`, like tests do `from conftest import ...`.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest

WORD_LEN = 4
TRAIN_WORDS = 2000
# The recipe (lr 1e-2, r 16, batch 16, 300 steps, seed 0), float32 compute (bf16 matmuls are slow on CPU).
RECIPE = dict(compute_dtype="float32", lora_r=16, lora_alpha=32, lora_dropout=0.0, learning_rate=1e-2,
              warmup_ratio=0.05, max_grad_norm=1.0, batch_size=16, grad_accum=1, max_steps=300,
              logging_steps=50, save_steps=1000, seed=0)


def caesar(word: str) -> str:
    """Shift every lowercase letter by one (z -> a)."""
    return "".join(string.ascii_lowercase[(string.ascii_lowercase.index(c) + 1) % 26] for c in word)


def exact_match(model, tokenizer, words: list[str]) -> float:
    """Fraction of words whose greedy completion of "word=" is exactly caesar(word) then eos."""
    import torch

    hits = 0
    with torch.no_grad():
        for w in words:
            ids = tokenizer(w + "=", return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=WORD_LEN + 2, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[0, ids["input_ids"].shape[1]:]
            hits += tokenizer.decode(out, skip_special_tokens=False) == caesar(w) + tokenizer.eos_token
    return hits / len(words)


def write_caesar_data(d: Path, held_out: int) -> dict:
    """TRAIN_WORDS training words in d/train.jsonl and `held_out` words never trained on
    in d/eval.jsonl (prompt/completion JSONL); returns their paths, the held-out words and d."""
    rng = random.Random(1234)
    words: set[str] = set()
    while len(words) < TRAIN_WORDS + held_out:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(WORD_LEN)))
    ws = sorted(words)
    rng.shuffle(ws)
    for name, part in (("train.jsonl", ws[:TRAIN_WORDS]), ("eval.jsonl", ws[TRAIN_WORDS:])):
        (d / name).write_text("".join(json.dumps({"prompt": w + "=", "completion": caesar(w)}) + "\n" for w in part))
    return {"train": d / "train.jsonl", "eval": d / "eval.jsonl", "held_out": ws[TRAIN_WORDS:], "dir": d}


@pytest.fixture(scope="module")
def char_base(tmp_path_factory) -> Path:
    """The tiny byte-level base (vocab 259), built once per module."""
    from qlora_serve.server.demo import TinyModelSpec, build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("charbase") / "base", TinyModelSpec(vocab_size=259))
