"""The training set of a run: one data file as it is, or several files mixed by
`data_weights`, with the automatic validation split.

Each file is read, checked and tokenized on its own (its own format, detected
unless `format` names one). The mixed training set has `T` = the files' example
count together (after the validation split) examples; file `i` with share
`p_i = w_i / sum(w)` contributes `k_i = max(1, round(p_i * T))` of them: every one
of its `n_i` examples `k_i // n_i` times, plus `k_i % n_i` more drawn without
replacement by a generator seeded with `seed` and `i`. So a share below the file's
natural one subsamples it (no repeats) and a share above repeats its examples
(copies differ by at most one). Without weights every file is taken once, whole.
The Trainer shuffles the mixed set (seeded) as it shuffles one file.

`val_fraction` holds out examples of all files together before mixing (the same
seeded rule as for one file), so no held-out example is repeated into training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Any

from qlora_serve.errors import InvalidArgument

from .config import TrainConfig
from .data import IGNORE_INDEX, Dataset, Example, load_dataset
from .resume import split_validation


def load_training_data(cfg: TrainConfig, tokenizer) -> tuple[Dataset, Dataset | None]:
    """(training set, validation set or None) for `cfg`: every data file checked and
    tokenized, the validation split made, the files mixed. Raises InvalidArgument
    naming the file (and line) of bad data. Loads no weights."""
    files = cfg.data_files
    parts = [load_dataset(p, tokenizer, cfg.max_seq_len, cfg.format, cfg.train_on_inputs) for p in files]
    eval_data = (load_dataset(cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.format, cfg.train_on_inputs)
                 if cfg.eval_data else None)
    union = parts[0] if len(parts) == 1 else _concat(parts)
    kept = [p.examples for p in parts]
    if cfg.val_fraction:
        union, eval_data = split_validation(union, cfg.val_fraction, cfg.seed)
        left = {id(e) for e in union.examples}
        kept = [[e for e in p.examples if id(e) in left] for p in parts]
        for p, k in zip(parts, kept):
            if not k:
                raise InvalidArgument(f"val_fraction={cfg.val_fraction} holds out every example of {p.path} "
                                      f"({len(p)}); lower it or give that file more examples")
    weights = cfg.data_weights
    shares = [w / sum(weights) for w in weights] if weights else [None] * len(parts)
    if weights is None or len(parts) == 1:  # every file once, whole: one file is exactly as before
        taken = kept
        train = union
    else:
        taken = _mix(kept, shares, cfg.seed)
        examples = [e for k in taken for e in k]
        train = dataclasses.replace(union, examples=examples, label_tokens=_label_tokens(examples))
    sources = [{"path": str(p.path), "sha256": p.digest, "format": p.format, "examples": len(p),
                "validation": len(p) - len(k), "weight": share, "taken": len(t)}
               for p, k, t, share in zip(parts, kept, taken, shares)]
    if len(parts) > 1:
        train = dataclasses.replace(train, digest=_mix_digest(parts, shares))
    train.sources = sources
    return train, eval_data


def _concat(parts: list[Dataset]) -> Dataset:
    formats = {p.format for p in parts}
    examples = [e for p in parts for e in p.examples]
    return Dataset(path=parts[0].path, format=formats.pop() if len(formats) == 1 else "mixed", examples=examples,
                   digest=parts[0].digest, truncated_examples=sum(p.truncated_examples for p in parts),
                   truncated_tokens=sum(p.truncated_tokens for p in parts), label_tokens=_label_tokens(examples))


def _mix(kept: list[list[Example]], shares: list[float], seed: int) -> list[list[Example]]:
    """Per file, the examples it contributes: k_i = max(1, round(share_i * total))."""
    total = sum(len(k) for k in kept)
    out = []
    for i, (examples, share) in enumerate(zip(kept, shares)):
        want = max(1, round(share * total))
        full, rest = divmod(want, len(examples))
        extra = sorted(random.Random(f"qlora-serve-mix:{seed}:{i}").sample(range(len(examples)), rest))
        out.append(examples * full + [examples[j] for j in extra])
    return out


def _mix_digest(parts: list[Dataset], shares: list[float | None]) -> str:
    """sha256 over the files' digests and shares, in order: another file, another
    order or another weight is another training set (a data change for resume)."""
    body = json.dumps([[p.digest, s] for p, s in zip(parts, shares)])
    return hashlib.sha256(body.encode()).hexdigest()


def _label_tokens(examples: list[Example]) -> int:
    return sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples)


def dataset_record(ds: Dataset) -> dict[str, Any]:
    """The metadata's `dataset` entry: path (a list for several files), sha256 (of the
    file; of the mix: its files' digests and shares), format ("mixed" when files
    differ), counts, and `files`: per file its path, sha256, format, examples, the
    number held out for validation, its share (null without weights) and the
    examples it contributed to the training set."""
    files = ds.sources
    return {"path": str(ds.path) if len(files) <= 1 else [f["path"] for f in files],
            "sha256": ds.digest, "format": ds.format, "examples": len(ds), "tokens": ds.num_tokens,
            "label_tokens": ds.label_tokens, "truncated_examples": ds.truncated_examples,
            "truncated_tokens": ds.truncated_tokens, "files": files}
