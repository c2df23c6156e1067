"""`train(config)`: the QLoRA run, from JSONL to a PEFT adapter directory.

Order of work (every check that can fail on bad input runs before the model loads):
  1. config fields (TrainConfig.__post_init__), base path, tokenizer, base config;
  2. data files: JSON per line, formats, tokenization, truncation counts;
  3. LoRA target modules against the architecture (on the meta device);
  4. `resume` has a checkpoint; `register` has a client;
  5. only then: load the NF4 base, attach LoRA, train with HF `Trainer`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from qlora_serve.errors import InvalidArgument

from .collate import make_collator, packing_is_isolated
from .config import TrainConfig
from .chat_template import save_chat_template, template_record, use_chat_template
from .data import Dataset
from .mixing import dataset_record, load_training_data
from .resume import check_resume_settings, metrics_before, run_settings, write_run_settings
from .export import fingerprint_of, save_adapter
from .feedback import EventSink, FeedbackCallback, MetricsFile, QuietProgressCallback, peak_memory_mb
from .reporting import LOSS_CURVE_FILE, check_report_to, report_callbacks, write_loss_curve
from .model import (
    attach_lora,
    check_compute_device,
    check_modules_to_save,
    load_base_config,
    load_quantized_base,
    load_tokenizer,
    resolve_base,
    resolve_target_modules,
)

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.json"


@dataclass
class PreparedRun:
    """Everything checked and tokenized, nothing loaded yet (cheap to build)."""

    config: TrainConfig
    base: str
    out: Path
    name: str
    tokenizer: Any
    model_config: Any
    train_data: Dataset
    eval_data: Dataset | None
    target_modules: list[str]
    resume_from: str | None


@dataclass
class TrainResult:
    """What a finished (or cleanly stopped) run produced. Losses are mean token
    cross-entropy in nats; times in seconds."""

    adapter_dir: Path
    metadata: dict[str, Any]
    trainable_params: int
    global_step: int
    stopped_early: bool
    train_loss: float | None
    eval_loss: float | None
    wall_time_s: float
    log: list[dict[str, Any]] = field(default_factory=list)
    registered: Any = None


def check_environment(cfg: TrainConfig) -> None:
    """What `cfg` needs of this machine: the --report-to package, a GPU for float16.
    InvalidArgument naming the fix; cheap (nothing loads)."""
    check_report_to(cfg.report_to)
    check_compute_device(cfg)


def prepare(cfg: TrainConfig) -> PreparedRun:
    """Run every input check and tokenize the data; loads no weights."""
    if not cfg.data:
        raise InvalidArgument("data is required: pass --data FILE.jsonl (or data = \"...\" in the config file)")
    if not cfg.out:
        raise InvalidArgument("out is required: pass --out DIR for the adapter")
    check_environment(cfg)
    base = resolve_base(cfg.base)
    tokenizer = load_tokenizer(base)
    model_config = load_base_config(base)
    use_chat_template(cfg.chat_template, tokenizer)  # before tokenizing: the data is rendered with it
    train_data, eval_data = load_training_data(cfg, tokenizer)  # one file, or several mixed by data_weights
    if cfg.eval_steps and eval_data is None:
        raise InvalidArgument("eval_steps is set but there is no validation data; pass --eval-data FILE.jsonl or --val-fraction")
    target_modules = resolve_target_modules(cfg, model_config)
    check_modules_to_save(cfg, model_config)
    out = Path(cfg.out)
    resume_from = None
    if cfg.resume:
        from transformers.trainer_utils import get_last_checkpoint

        ckpts = out / CHECKPOINT_DIR
        resume_from = get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None
        if resume_from is None:
            raise InvalidArgument(f"resume is set but {ckpts} holds no checkpoint-N directory; run without --resume to start fresh")
        check_resume_settings(ckpts, run_settings(cfg, base, model_config, train_data, target_modules), cfg.resume_allow_changes)
    if cfg.register:
        from .register import check_server_ready

        check_server_ready(cfg.register)
    return PreparedRun(
        config=cfg, base=base, out=out, name=cfg.name or out.resolve().name, tokenizer=tokenizer,
        model_config=model_config, train_data=train_data, eval_data=eval_data,
        target_modules=target_modules, resume_from=resume_from,
    )


def _training_arguments(cfg: TrainConfig, out: Path, has_eval: bool):
    import torch
    from transformers import TrainingArguments

    evaluating = has_eval and cfg.eval_steps > 0
    track_best = evaluating and (cfg.keep_best or cfg.early_stopping_patience > 0)
    return TrainingArguments(
        output_dir=str(out / CHECKPOINT_DIR),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float in [0, 1) is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        seed=cfg.seed,
        data_seed=cfg.seed,
        optim=cfg.optim,
        bf16=cfg.compute_dtype == "bfloat16",
        fp16=cfg.compute_dtype == "float16",  # autocast + GradScaler loss scaling; LoRA weights stay fp32
        # prepare_model_for_kbit_training already enabled (non-reentrant) checkpointing.
        gradient_checkpointing=False,
        logging_steps=cfg.logging_steps,
        save_strategy="steps",
        # keep_best: a checkpoint at every evaluation, so the best one always has weights to load.
        save_steps=cfg.eval_steps if (cfg.keep_best and evaluating) else cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if evaluating else "no",
        eval_steps=cfg.eval_steps or None,
        metric_for_best_model="eval_loss" if track_best else None,
        greater_is_better=False if track_best else None,
        load_best_model_at_end=cfg.keep_best and evaluating,
        report_to="none",  # --report-to adds its callback itself (reporting.report_callbacks)
        disable_tqdm=not cfg.progress_bar,
        remove_unused_columns=False,  # our dataset yields exactly the model's inputs
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,  # the token counter lives in this process
    )


def train(
    cfg: TrainConfig,
    *,
    callbacks: Sequence[Any] = (),
    on_event: EventSink | None = None,
    stream=None,
) -> TrainResult:
    """Train a QLoRA adapter as `cfg` says and write it to `cfg.out`.

    `callbacks`: extra `transformers.TrainerCallback`s (e.g. `StopCallback`).
    `on_event`: receives progress dicts ({"event": "start"|"log"|"eval"|"done", ...}).
    Raises InvalidArgument / FailedPrecondition for bad input, before any weights load.
    """
    from transformers import EarlyStoppingCallback, Trainer, set_seed

    stream = stream or sys.stderr
    t0 = time.perf_counter()
    run = prepare(cfg)
    emit = on_event or (lambda e: None)
    run.out.mkdir(parents=True, exist_ok=True)
    # A resumed run keeps the history up to its checkpoint; the steps after it are re-run.
    metrics = MetricsFile(run.out / METRICS_FILE, log=metrics_before(run.out / METRICS_FILE, run.resume_from))
    write_run_settings(run.out / CHECKPOINT_DIR, run_settings(cfg, run.base, run.model_config, run.train_data,
                                                                run.target_modules))
    if run.train_data.truncated_examples:
        print(f"truncated {run.train_data.truncated_examples} example(s) to max_seq_len={cfg.max_seq_len}, "
              f"dropping {run.train_data.truncated_tokens} token(s)", file=stream)

    set_seed(cfg.seed)  # LoRA init (kaiming A) and dropout draw from this
    model = attach_lora(load_quantized_base(run.base, cfg), cfg, run.target_modules)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"trainable params: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%); "
          f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha} on {', '.join(run.target_modules)}", file=stream)

    packing = cfg.packing
    if packing and not packing_is_isolated(model, run.model_config.vocab_size):
        print("packing disabled: this model's attention does not separate packed examples "
              "(position_ids restarts are ignored); padding instead", file=stream)
        packing = False
    collator = make_collator(run.tokenizer, packing)
    emit({"event": "start", "trainable_params": trainable, "total_params": total,
          "train_examples": len(run.train_data), "packing": packing, "resume_from": run.resume_from})

    args = _training_arguments(cfg, run.out, run.eval_data is not None)
    if cfg.keep_best and cfg.save_steps != cfg.eval_steps:
        print(f"keep_best: saving a checkpoint at every evaluation (save_steps {cfg.save_steps} -> {cfg.eval_steps})",
              file=stream)
    feedback = FeedbackCallback(collator.counter, metrics, sink=on_event, stream=stream)
    early = (EarlyStoppingCallback(cfg.early_stopping_patience, cfg.early_stopping_threshold)
             if cfg.early_stopping_patience else None)
    trainer = Trainer(
        model=model, args=args, train_dataset=run.train_data, eval_dataset=run.eval_data,
        data_collator=collator,
        callbacks=[feedback, *([early] if early else []), *report_callbacks(cfg.report_to, run.out), *callbacks],
    )
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # Our FeedbackCallback prints one formatted line per log; HF's would print the raw dict too.
    trainer.pop_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(QuietProgressCallback)

    try:
        out = trainer.train(resume_from_checkpoint=run.resume_from)
    except BaseException:
        # A failed run (NaN guard, OOM, a callback's error) still shows how far it got.
        with contextlib.suppress(Exception):
            write_loss_curve(metrics.log, run.out / LOSS_CURVE_FILE,
                             title=f"{run.name} (failed at step {trainer.state.global_step})")
        raise
    state = trainer.state
    stopped_early = state.global_step < state.max_steps
    early_stopped = early is not None and early.early_stopping_patience_counter >= early.early_stopping_patience
    losses = [e["loss"] for e in metrics.log if "loss" in e]
    train_loss = losses[-1] if losses else float(out.training_loss)
    eval_loss = None
    kept_best = cfg.keep_best and state.best_model_checkpoint is not None
    if kept_best:  # the Trainer loaded the best checkpoint's weights: that is the adapter written
        eval_loss = float(state.best_metric)
    elif run.eval_data is not None:
        # When eval_steps divides the last step, the Trainer has just evaluated: don't run it twice.
        last = [e for e in metrics.log if e.get("event") == "eval" and e["step"] == state.global_step]
        eval_loss = last[-1]["eval_loss"] if last else float(trainer.evaluate()["eval_loss"])
    wall = time.perf_counter() - t0

    metadata = {
        "name": run.name,
        "base_model": cfg.base or "qlora-serve-demo-tiny-llama",
        **fingerprint_of(run.base, run.model_config),
        "dataset": dataset_record(run.train_data),
        "chat_template": template_record(cfg.chat_template, run.tokenizer),  # {source, sha256} or None
        "eval_dataset": None if run.eval_data is None else {
            "path": str(run.eval_data.path), "sha256": run.eval_data.digest, "examples": len(run.eval_data)},
        "hyperparameters": {**cfg.to_dict(), "target_modules": run.target_modules, "packing": packing},
        "trainable_params": trainable,
        "global_step": state.global_step,
        "stopped_early": stopped_early,
        "stopped_by_early_stopping": early_stopped,
        "best_step": state.best_global_step if args.metric_for_best_model else None,
        "best_eval_loss": float(state.best_metric) if args.metric_for_best_model and state.best_metric is not None else None,
        "adapter_step": state.best_global_step if kept_best else state.global_step,
        "final_train_loss": train_loss,
        "final_eval_loss": eval_loss,
        "final_eval_perplexity": None if eval_loss is None else (math.exp(eval_loss) if eval_loss < 700 else float("inf")),
        "wall_time_s": wall,
        "peak_memory_mb": peak_memory_mb(),
    }
    # Serving must render chats exactly as training did (no template: the base's own).
    save_chat_template(run.out, run.tokenizer.chat_template if cfg.chat_template else None)
    save_adapter(model, run.out, metadata)
    metrics.summary = {k: metadata[k] for k in (
        "global_step", "stopped_early", "stopped_by_early_stopping", "best_step", "best_eval_loss", "adapter_step",
        "final_train_loss", "final_eval_loss", "final_eval_perplexity", "wall_time_s", "peak_memory_mb", "trainable_params")}
    metrics.write()
    write_loss_curve(metrics.log, run.out / LOSS_CURVE_FILE, title=f"{run.name} (step {state.global_step})",
                     best_step=metadata["adapter_step"] if kept_best else None)
    print(f"adapter written to {run.out} (step {state.global_step}, train loss {train_loss:.4f}"
          + (f", eval loss {eval_loss:.4f}" if eval_loss is not None else "") + f", {wall:.1f} s)", file=stream)

    registered = None
    if cfg.register and (not stopped_early or early_stopped):  # early stopping is a finished run
        from .register import register_adapter

        registered = register_adapter(cfg.register, run.out, run.name)
    emit({"event": "done", "adapter_dir": str(run.out), **metrics.summary})
    return TrainResult(
        adapter_dir=run.out, metadata=metadata, trainable_params=trainable, global_step=state.global_step,
        stopped_early=stopped_early, train_loss=train_loss, eval_loss=eval_loss, wall_time_s=wall,
        log=list(metrics.log), registered=registered,
    )
