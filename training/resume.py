"""What a resumed run must share with the run that wrote its checkpoints, the
metrics history it keeps, and the automatic validation split.

`OUT/checkpoints/run_settings.json` records the settings and the data digest of the
run; `--resume` compares them and refuses a difference, naming it, before the model
loads (a changed LoRA shape would otherwise fail deep in torch with a size mismatch,
and a changed dataset or learning rate would be accepted silently).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path
from typing import Any

from qlora_serve.errors import FailedPrecondition

from .config import TrainConfig
from .data import IGNORE_INDEX, Dataset

SETTINGS_FILE = "run_settings.json"
# Settings a checkpoint's tensors depend on: never accepted changed (they cannot load).
STRUCTURAL = ("base_fingerprint", "lora_r", "target_modules", "modules_to_save", "optim")
# Free to change between a run and its resume: bookkeeping, and how long to train.
VOLATILE = ("data", "eval_data", "out", "name", "register", "resume", "resume_allow_changes", "progress_bar",
            "logging_steps", "save_steps", "save_total_limit", "eval_steps", "max_steps", "epochs", "base",
            "early_stopping_patience", "early_stopping_threshold", "keep_best", "report_to")

# A chat template is compared by its text's digest (chat_template_sha256), as data is by data_sha256.
VOLATILE += ("chat_template",)


def run_settings(cfg: TrainConfig, base: str, model_config, train_data: Dataset, target_modules: list[str]) -> dict[str, Any]:
    """The settings a resume compares: config fields (less VOLATILE), resolved target
    modules, base fingerprint, the training data's sha256 (of a mix: its files' digests
    and shares, training/mixing.py) and the chat template's sha256 when one is set."""
    from .chat_template import read_chat_template, template_digest
    from .export import fingerprint_of

    out = {k: v for k, v in cfg.to_dict().items() if k not in VOLATILE}
    out.update(target_modules=list(target_modules), data_sha256=train_data.digest,
               base_fingerprint=fingerprint_of(base, model_config)["base_fingerprint"])
    if cfg.chat_template:  # absent otherwise, so settings written before this key still match
        out["chat_template_sha256"] = template_digest(read_chat_template(cfg.chat_template)[0])
    return out


def write_run_settings(ckpt_dir: Path, settings: dict[str, Any]) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_dir / (SETTINGS_FILE + ".tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True, default=str))
    tmp.replace(ckpt_dir / SETTINGS_FILE)


def check_resume_settings(ckpt_dir: Path, now: dict[str, Any], allow_changes: bool) -> None:
    """FailedPrecondition naming every setting that differs from the checkpoint's run
    (structural ones always; the others unless `allow_changes`). Checkpoints written
    before this file existed are not checked."""
    path = ckpt_dir / SETTINGS_FILE
    if not path.is_file():
        return
    before = json.loads(path.read_text())
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if not changed:
        return
    shown = "; ".join(f"{k}: {_short(before.get(k))} -> {_short(now.get(k))}" for k in changed)
    structural = [k for k in changed if k in STRUCTURAL]
    if structural:
        raise FailedPrecondition(f"cannot resume: {shown}. The checkpoint's weights and optimizer state have "
                                 f"another shape ({', '.join(structural)}); start a fresh run in another --out")
    if not allow_changes:
        raise FailedPrecondition(f"cannot resume: the run's settings differ from the checkpoint's ({shown}); "
                                 "restore them, or pass --resume-allow-changes to continue with the new ones")


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def metrics_before(path: Path, resume_from: str | None) -> list[dict[str, Any]]:
    """metrics.json's log entries up to the checkpoint a run resumes from ([] for a fresh run)."""
    if resume_from is None or not path.is_file():
        return []
    m = re.search(r"checkpoint-(\d+)$", str(resume_from))
    step = int(m.group(1)) if m else 0
    try:
        log = json.loads(path.read_text()).get("log", [])
    except (json.JSONDecodeError, AttributeError):
        return []  # an unreadable history is not worth failing the run for
    return [e for e in log if isinstance(e, dict) and e.get("step", 0) <= step]


def split_validation(data: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation): a seeded shuffle holds out round(len * fraction) >= 1 examples."""
    from qlora_serve.errors import InvalidArgument

    n_val = max(1, round(len(data) * fraction))
    if len(data) - n_val < 1:
        raise InvalidArgument(f"val_fraction={fraction} leaves no training example out of {len(data)}")
    order = list(range(len(data)))
    random.Random(seed).shuffle(order)
    val_ids = set(order[:n_val])

    def part(keep: bool) -> Dataset:
        examples = [e for i, e in enumerate(data.examples) if (i in val_ids) != keep]
        return dataclasses.replace(data, examples=examples, truncated_examples=0, truncated_tokens=0,
                                   label_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples))

    return dataclasses.replace(part(True), truncated_examples=data.truncated_examples,
                               truncated_tokens=data.truncated_tokens), part(False)
