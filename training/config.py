"""`TrainConfig`: every knob of a QLoRA training run, in one validated dataclass.

The same names are the TOML keys of `--config FILE` and the CLI flags (with `_`
spelled `-` on the command line), so a config file and a command line are
interchangeable. Precedence: dataclass default < config file < explicit flag.
Each field's `metadata["help"]` is the one description used by `--help` and the README.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from qlora_serve.errors import InvalidArgument
from qlora_serve.options import option as _f  # short: every field below uses it
from qlora_serve.server.engine.config import COMPUTE_DTYPES as SERVE_DTYPES

from .data import FORMATS

COMPUTE_DTYPES = SERVE_DTYPES  # float16 trains with loss scaling (trainer.py), fp32 LoRA weights
REPORT_TO = ("none", "tensorboard")
OPTIMIZERS = ("paged_adamw_8bit", "paged_adamw_32bit")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")
# Upper bounds that no real run reaches: a value past them is a typo (lora_r = 1e9,
# batch_size = 1e12) that would otherwise be accepted and fail or hang later.
UPPER_BOUNDS = {"lora_r": 4096, "batch_size": 65536, "grad_accum": 65536, "max_seq_len": 1 << 20,
                "max_steps": 100_000_000, "epochs": 100_000.0}


@dataclass
class TrainConfig:
    """One QLoRA fine-tuning run. Defaults follow the QLoRA paper's recipe where it has one."""

    # --- what to train on, where to write ---
    base: str | None = _f(None, "Base model: a local directory or a hub id. Default: the embedded tiny demo base.")
    # A list type (a TOML array; --data repeated on the CLI) or one path string: a path may hold ',' or ':'.
    data: list[str] | str | None = _f(None, "Training data: JSONL, JSONL.gz, JSON array or CSV of {text} | {prompt, completion} | {messages} | alpaca | sharegpt records. Required. Repeat --data (a TOML array) to mix several files, each in its own format.", action="append")
    data_weights: list[float] | None = _f(None, "Mixing weights, one per data file (comma-separated on the CLI): each file's share of the mixed training set, sampled with --seed. Default: every file once.", metavar="W1,W2,...")
    format: str = _f("auto", "Record format of the data files: auto (detected from the keys), text, prompt_completion, messages, alpaca or sharegpt.")
    chat_template: str | None = _f(None, "Jinja chat template for messages / alpaca / sharegpt records instead of the tokenizer's: a FILE.jinja path, or the template text itself (a value containing {{ or {%). Saved with the adapter as chat_template.jinja.", metavar="FILE.jinja")
    eval_data: str | None = _f(None, "Optional validation data (same file types and formats): reports eval loss and perplexity.")
    val_fraction: float = _f(0.0, "Hold out this fraction of the training examples (seeded shuffle) as validation data, in [0, 0.5]; instead of eval_data.")
    train_on_inputs: bool = _f(False, "Put the loss on prompt / user tokens too, not only on completions / assistant turns.")
    out: str | None = _f(None, "Output directory for the adapter, metadata, metrics and checkpoints. Required.")
    name: str | None = _f(None, "Adapter name recorded in the metadata (and used by --register). Default: the out dir's name.")
    # --- quantization / precision ---
    compute_dtype: str = _f("bfloat16", "Compute dtype of the 4-bit layers: bfloat16, float32, or float16 (GPUs without bf16: fp16 autocast with loss scaling, LoRA weights in fp32; CUDA only).")
    gradient_checkpointing: bool = _f(True, "Non-reentrant activation checkpointing: less memory, ~30% more compute.")
    # --- LoRA ---
    lora_r: int = _f(16, "LoRA rank r (>= 1).")
    lora_alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha / r.")
    lora_dropout: float = _f(0.05, "Dropout on the LoRA input, in [0, 1).")
    target_modules: list[str] = _f([], "Module name suffixes to adapt (comma-separated on the CLI). Empty or all-linear: every Linear layer except the output head (which cannot be served per request).")
    modules_to_save: list[str] = _f([], "Modules trained in full and saved with the adapter (e.g. lm_head). Such adapters can be merged but not served per request.")
    # --- optimization ---
    optim: str = _f("paged_adamw_8bit", "Optimizer: paged_adamw_8bit or paged_adamw_32bit (bitsandbytes; non-paged on CPU).")
    learning_rate: float = _f(2e-4, "Peak learning rate.")
    lr_scheduler: str = _f("cosine", "Learning-rate schedule after warmup: " + ", ".join(SCHEDULERS) + ".")
    warmup_ratio: float = _f(0.03, "Fraction of the total optimizer steps spent in linear warmup, in [0, 1).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float = _f(0.3, "Gradient-norm clip (0 disables).")
    batch_size: int = _f(4, "Examples per micro-batch.")
    grad_accum: int = _f(4, "Micro-batches accumulated per optimizer step (effective batch = batch_size * grad_accum).")
    epochs: float = _f(1.0, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = _f(-1, "Optimizer steps to run; -1 means use epochs.")
    seed: int = _f(42, "Seed for data order, LoRA init and dropout.")
    # --- data ---
    max_seq_len: int = _f(1024, "Examples longer than this many tokens are truncated (the count is reported).")
    packing: bool = _f(True, "Pack each micro-batch into one padding-free row with per-example positions and labels. Switched off (with a warning) if the model's attention would leak across packed examples.")
    # --- feedback / checkpoints ---
    logging_steps: int = _f(10, "Log loss, learning rate, tokens/s and peak memory every N optimizer steps.")
    save_steps: int = _f(200, "Write a resumable checkpoint (weights, optimizer, scheduler, RNG) every N optimizer steps.")
    save_total_limit: int = _f(2, "Keep at most this many checkpoints (oldest deleted).")
    eval_steps: int = _f(0, "Evaluate every N optimizer steps (0: only at the end). Needs eval_data.")
    early_stopping_patience: int = _f(0, "Stop when eval loss has not improved by more than early_stopping_threshold for N evaluations in a row (0: off). Needs validation data and eval_steps.", metavar="N")
    early_stopping_threshold: float = _f(0.0, "Decrease of the best eval loss (nats) an evaluation must exceed to count as an improvement for early stopping.", metavar="NATS")
    keep_best: bool = _f(False, "Write the adapter of the evaluation with the lowest eval loss, not the last step's (a checkpoint is saved at every evaluation: save_steps becomes eval_steps). Needs validation data and eval_steps.")
    report_to: str = _f("none", "Where the Trainer logs too: none or tensorboard (event files in OUT/runs; needs pip install tensorboard).", choices=REPORT_TO)
    resume: bool = _f(False, "Resume from the last checkpoint in OUT/checkpoints, optimizer state included. Refused when the settings or the data differ from the checkpoint's run.")
    resume_allow_changes: bool = _f(False, "With resume: accept changed optimization settings or data (LoRA shape, base and optimizer must still match).")
    progress_bar: bool = _f(True, "Show a tqdm progress bar.")
    register: str | None = _f(None, "gRPC ADDRESS of a running qlora-serve to register the finished adapter with.")

    def __post_init__(self) -> None:
        self._check_scalar_types()
        # TOML/CLI may give a comma-separated string; normalise before validating.
        for key in ("target_modules", "modules_to_save"):
            v = getattr(self, key)
            if isinstance(v, str):
                setattr(self, key, [s.strip() for s in v.split(",") if s.strip()])
            elif not isinstance(v, (list, tuple)) or not all(isinstance(s, str) for s in v):
                raise ValueError(f"{key} must be a list of module names, got {v!r}")
            else:
                setattr(self, key, list(v))
        aliases = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16", "half": "float16"}
        self.compute_dtype = aliases.get(self.compute_dtype, self.compute_dtype)
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.optim not in OPTIMIZERS:
            raise ValueError(f"optim must be one of {OPTIMIZERS}, got {self.optim!r}")
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {SCHEDULERS}, got {self.lr_scheduler!r}")
        for key in ("lora_r", "batch_size", "grad_accum", "max_seq_len", "logging_steps", "save_steps", "save_total_limit"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {v!r}")
        for key, bound in UPPER_BOUNDS.items():
            if getattr(self, key) > bound:
                raise ValueError(f"{key} must be <= {bound}, got {getattr(self, key)!r}")
        if self.max_seq_len < 2:
            raise ValueError(f"max_seq_len must be >= 2 (a prompt token and a label), got {self.max_seq_len}")
        if isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or (self.max_steps < 1 and self.max_steps != -1):
            raise ValueError(f"max_steps must be -1 (use epochs) or an integer >= 1, got {self.max_steps!r}")
        if isinstance(self.eval_steps, bool) or not isinstance(self.eval_steps, int) or self.eval_steps < 0:
            raise ValueError(f"eval_steps must be an integer >= 0, got {self.eval_steps!r}")
        if isinstance(self.early_stopping_patience, bool) or not isinstance(self.early_stopping_patience, int) \
                or self.early_stopping_patience < 0:
            raise ValueError(f"early_stopping_patience must be an integer >= 0 (0: off), got {self.early_stopping_patience!r}")
        if not (0 <= self.early_stopping_threshold < float("inf")):
            raise ValueError(f"early_stopping_threshold must be a finite number >= 0, got {self.early_stopping_threshold!r}")
        if self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}")
        if not (self.learning_rate > 0):
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
        if not (self.lora_alpha > 0):
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not (0 <= self.lora_dropout < 1):
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not (0 <= self.warmup_ratio < 1):
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0 (0 disables clipping), got {self.max_grad_norm!r}")
        self._check_data_files()
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, got {self.format!r}")
        if self.chat_template is not None and not str(self.chat_template).strip():
            raise ValueError("chat_template is empty: give a FILE.jinja path or the template text, or leave it unset")
        if not (0 <= self.val_fraction <= 0.5):
            raise ValueError(f"val_fraction must be in [0, 0.5], got {self.val_fraction!r}")
        if self.val_fraction and self.eval_data:
            raise ValueError("val_fraction and eval_data are exclusive: give held-out data, or a fraction to split off")
        self._check_eval_options()
        if self.max_steps == -1 and not (self.epochs > 0):
            raise ValueError(f"epochs must be > 0 when max_steps is -1, got {self.epochs!r}")
        if self.register and self.modules_to_save:
            raise ValueError(f"modules_to_save={self.modules_to_save} cannot be combined with register: a server "
                             "cannot serve such an adapter per request (merge it with `qlora-serve merge` instead)")

    def _check_eval_options(self) -> None:
        """Early stopping and keep_best compare evaluations: refuse them without any."""
        wanted = [f for f, on in (("early_stopping_patience", self.early_stopping_patience), ("keep_best", self.keep_best)) if on]
        if not wanted:
            return
        if not (self.eval_data or self.val_fraction):
            raise ValueError(f"{' and '.join(wanted)} need validation data: pass --eval-data FILE or --val-fraction F")
        if not self.eval_steps:
            raise ValueError(f"{' and '.join(wanted)} need evaluations during training: pass --eval-steps N")

    @staticmethod
    @functools.cache
    def _scalar_types() -> dict[str, type]:
        """field -> its scalar type (str, int, float, bool) for every non-list field."""
        out = {}
        for name, t in typing.get_type_hints(TrainConfig).items():
            if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:  # X | None
                t = next(a for a in typing.get_args(t) if a is not type(None))
            if t in (str, int, float, bool):
                out[name] = t
        return out

    def _check_scalar_types(self) -> None:
        """TOML and gRPC configs carry any type: refuse a wrong one naming the field
        (e.g. learning_rate = "1e-4", a string) before any comparison raises TypeError."""
        words = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name, t in self._scalar_types().items():
            v = getattr(self, name)
            if v is None and defaults[name] is None:  # optional field left unset
                continue
            accepted = {float: (int, float), str: (str, os.PathLike)}.get(t, (t,))  # 2 is a fine float; a Path a fine path
            if not isinstance(v, accepted) or (t is not bool and isinstance(v, bool)):
                raise ValueError(f"{name} must be {words[t]}, got {v!r} ({type(v).__name__})")

    def _check_data_files(self) -> None:
        """`data`: one path (str) or a list of paths (a one-element list becomes its
        string, so one file is recorded as before); `data_weights`: one number > 0 per file."""
        data = self.data
        if isinstance(data, (list, tuple)):
            if not all(isinstance(p, (str, os.PathLike)) and str(p) for p in data):
                raise ValueError(f"data must be a path or a list of paths, got {data!r}")
            data = [str(p) for p in data]
            dup = next((p for i, p in enumerate(data) if p in data[:i]), None)
            if dup is not None:
                raise ValueError(f"data lists {_shown(dup)} twice; give each file once (data_weights weights it)")
            data = data[0] if len(data) == 1 else (data or None)
        elif isinstance(data, os.PathLike):
            data = str(data)
        elif data is not None and not isinstance(data, str):
            raise ValueError(f"data must be a path or a list of paths, got {data!r} ({type(data).__name__})")
        self.data = data
        weights = self.data_weights
        if weights is None:
            return
        if isinstance(weights, str):  # the CLI's "0.7,0.3"
            try:
                weights = [float(w) for w in weights.split(",") if w.strip()]
            except ValueError:
                raise ValueError(f"data_weights must be comma-separated numbers, got {weights!r}") from None
        if (not isinstance(weights, (list, tuple)) or not weights
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights)):
            raise ValueError(f"data_weights must be a list of numbers, one per data file, got {weights!r}")
        if not all(math.isfinite(w) and w > 0 for w in weights):
            raise ValueError(f"data_weights must all be finite numbers > 0, got {list(weights)!r}")
        self.data_weights = [float(w) for w in weights]
        files = self.data_files
        if files and len(files) != len(weights):
            raise ValueError(f"data_weights has {len(weights)} value(s) but data names {len(files)} file(s); "
                             "give one weight per file, in the same order")

    @property
    def data_files(self) -> list[str]:
        """The training data paths, in order ([] when unset)."""
        if not self.data:
            return []
        return [self.data] if isinstance(self.data, str) else list(self.data)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def check_keys(cls, keys, *, source: str = "config", settable=None, hidden: Iterable[str] = ()) -> None:
        """Refuse a key that is not a field (`-` accepted for `_`), naming the closest
        settable one. `settable`: the fields this source may set (default: all);
        `hidden`: keys the caller sets itself, accepted but not offered in the message."""
        accepted = set(settable if settable is not None else cls.field_names())
        valid = sorted(accepted - set(hidden))
        for key in keys:
            if key.replace("-", "_") in accepted:
                continue
            close = difflib.get_close_matches(key.replace("-", "_"), valid, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InvalidArgument(f"{source}: unknown key {_shown(key)}; {hint}valid keys are: {', '.join(valid)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config", hidden: Iterable[str] = ()) -> "TrainConfig":
        """Build from a dict whose keys are field names (`-` accepted for `_`); unknown keys are an error
        naming the closest valid key. `hidden`: keys the caller sets itself, left out of the valid list."""
        cls.check_keys(values, source=source, hidden=hidden)
        try:
            return cls(**{key.replace("-", "_"): value for key, value in values.items()})
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"{source}: {exc}") from None

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Read a TOML file (flat keys, or under a `[train]` table) and apply `overrides` (non-None values win)."""
        path = Path(path)
        if not path.is_file():
            raise InvalidArgument(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"{path} is not valid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses per nesting level
            raise InvalidArgument(f"{path} is nested too deeply; it holds flat `key = value` lines") from None
        data = train_table(data, str(path))
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _shown(key: str, limit: int = 64) -> str:
    """A caller's key for a message, bounded (a key can be any length)."""
    return repr(key if len(key) <= limit else key[:limit] + "...")


def train_table(data: dict[str, Any], source: str) -> dict[str, Any]:
    """The keys of a parsed TOML config: the `[train]` table if there is one, else the
    top-level keys. A `[train]` table beside other tables or keys is refused naming them."""
    if not isinstance(data.get("train"), dict):
        return data
    extra = [k for k in data if k != "train"]
    if extra:
        shown = ", ".join(f"[{_shown(k)[1:-1]}]" if isinstance(data[k], dict) else f"key {_shown(k)}" for k in extra[:5])
        raise InvalidArgument(f"{source}: has {shown} beside the [train] table; put every setting under [train] "
                              "(or use flat keys and no table at all)")
    return data["train"]
