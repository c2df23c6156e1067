"""QLoRA fine-tuning: JSONL data -> NF4 base + LoRA -> PEFT adapter directory (see README.md).

`merge` is not re-exported: the submodule of that name would shadow it; use
`from qlora_serve.training.merge import merge`. Names are imported lazily so that `qlora_serve.training.cli` (hooked into the
`qlora-serve` parser) does not pull in transformers' Trainer at startup.
"""

from importlib import import_module

_EXPORTS = {
    "TrainConfig": "config", "TrainResult": "trainer", "prepare": "trainer", "train": "trainer",
    "MergeResult": "merge", "TrainingJob": "jobs", "run_job_in_subprocess": "jobs",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
