"""What a run tells its user while it trains: log lines, the JSON metrics file,
progress events (for the gRPC Training service), and cooperative cancellation."""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from .collate import TokenCounter

EventSink = Callable[[dict[str, Any]], None]


def peak_memory_mb() -> float:
    """Peak memory of this process in MiB: CUDA allocator peak on GPU, max RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class MetricsFile:
    """`metrics.json`: {"summary": {...}, "log": [one dict per logging step / eval]}; rewritten atomically."""

    path: Path
    log: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"summary": self.summary, "log": self.log}, indent=2))
        tmp.replace(self.path)


class QuietProgressCallback(ProgressCallback):
    """HF's tqdm bar without its raw dict printing (our log line replaces it)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class FeedbackCallback(TrainerCallback):
    """One log line per logging step (loss, lr, tokens/s, peak memory), the metrics
    file, and progress events to `sink` (if given)."""

    def __init__(self, counter: TokenCounter, metrics: MetricsFile, sink: EventSink | None = None, stream=None):
        self.counter = counter
        self.metrics = metrics
        self.sink = sink
        self.stream = stream or sys.stderr
        self._t = time.perf_counter()
        self._tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()
        self._tokens = self.counter.tokens

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        now = time.perf_counter()
        entry: dict[str, Any] = {"step": state.global_step, "max_steps": state.max_steps, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            dt = max(now - self._t, 1e-9)
            entry.update(
                event="log",
                loss=float(logs["loss"]),
                learning_rate=float(logs.get("learning_rate", 0.0)),
                grad_norm=float(logs["grad_norm"]) if logs.get("grad_norm") is not None else None,
                tokens_per_s=(self.counter.tokens - self._tokens) / dt,
                peak_memory_mb=peak_memory_mb(),
            )
            self._t, self._tokens = now, self.counter.tokens
            line = (
                f"step {state.global_step}/{state.max_steps}  loss {entry['loss']:.4f}  lr {entry['learning_rate']:.3e}  "
                f"tok/s {entry['tokens_per_s']:.0f}  peak mem {entry['peak_memory_mb']:.0f} MiB"
            )
        elif "eval_loss" in logs:
            loss = float(logs["eval_loss"])
            entry.update(event="eval", eval_loss=loss, eval_perplexity=_ppl(loss))
            line = f"step {state.global_step}/{state.max_steps}  eval loss {loss:.4f}  eval ppl {entry['eval_perplexity']:.2f}"
        else:
            return  # the end-of-train summary dict; the trainer writes its own summary
        print(line, file=self.stream, flush=True)
        self.metrics.log.append(entry)
        self.metrics.write()
        if self.sink:
            self.sink(entry)


class StopCallback(TrainerCallback):
    """Stops cleanly (checkpoint written) once `should_stop()` turns true or after
    `after_steps` optimizer steps. Used for cancellation and to test resume."""

    def __init__(self, should_stop: Callable[[], bool] | None = None, after_steps: int | None = None):
        self.should_stop = should_stop
        self.after_steps = after_steps
        self.stopped = False

    def on_step_end(self, args, state, control, **kwargs):
        if (self.after_steps is not None and state.global_step >= self.after_steps) or (self.should_stop and self.should_stop()):
            self.stopped = True
            control.should_training_stop = True
            control.should_save = True  # so `resume` continues exactly from here
        return control


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
