"""Training jobs in a separate process, for the gRPC Training service.

A crashing job (OOM, CUDA fault, segfault in a kernel) kills only its own
process; the server process only reads progress events from a queue, so it
stays responsive while the job trains.

    job = run_job_in_subprocess(TrainConfig(data=..., out=...))
    for event in job:            # dicts, see below; ends when the job ends
        ...
    job.cancel()                 # from any thread: stop at the next step, keep a checkpoint

Events (plain dicts, JSON-serialisable), in order:
    {"event": "start", "trainable_params", "total_params", "train_examples", "packing", "resume_from"}
    {"event": "log", "step", "max_steps", "epoch", "loss", "learning_rate", "grad_norm", "tokens_per_s", "peak_memory_mb"}
    {"event": "eval", "step", "max_steps", "epoch", "eval_loss", "eval_perplexity"}
    {"event": "done", "adapter_dir", "global_step", "stopped_early", "cancelled", "final_train_loss", ...}  (terminal)
    {"event": "error", "kind", "message"}                                                                (terminal)
`kind` is the qlora_serve.errors class name (InvalidArgument, ...) or "Internal".
A job cancelled mid-run writes its adapter and a checkpoint; `resume=True` continues it.

`JobResources` bounds the job's share of the machine, so training beside a server does
not starve inference: torch intra-op threads (CPU), a nice increment, and a cap on the
CUDA caching allocator (GPU). The job process also exits when its parent dies (a
SIGKILLed server), so a restarted server never finds the old job still training.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import re
import shutil
import threading
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .config import TrainConfig

TERMINAL_EVENTS = ("done", "error")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def default_training_threads() -> int:
    """Half the cores, at least one: the server keeps at least one core for inference."""
    return max(1, cpu_cores() // 2)


@dataclass(frozen=True)
class JobResources:
    """The job process's share of the machine.

    threads: torch intra-op threads on CPU (None = `default_training_threads()`).
    nice: added to the job process's niceness (0-19; the OS then runs the server first).
    gpu_memory_fraction: cap on the job's CUDA caching allocator, as a fraction of the
    device's memory (torch.cuda.set_per_process_memory_fraction); None = no cap.
    CUDA stream priority is not set: priorities order streams within one process's
    context only, and the job's default stream already has the lowest priority."""

    threads: int | None = None
    nice: int = 10
    gpu_memory_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and not 1 <= self.threads <= 4096:
            raise ValueError(f"training threads (--training-threads) must be in [1, 4096], got {self.threads}")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"training nice (--training-nice) must be in [0, 19], got {self.nice}")
        if self.gpu_memory_fraction is not None and not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError("training GPU memory fraction (--training-gpu-memory-fraction) must be in (0, 1], "
                             f"got {self.gpu_memory_fraction}")

    def apply(self) -> None:
        """In the job process, before torch runs anything."""
        threads = self.threads or default_training_threads()
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS"):  # RAYON: HF tokenizers' pool
            os.environ[var] = str(threads)
        if self.nice:
            os.nice(self.nice)
        import torch

        torch.set_num_threads(threads)
        if self.gpu_memory_fraction is not None and torch.cuda.is_available():
            torch.cuda.set_per_process_memory_fraction(self.gpu_memory_fraction, torch.cuda.current_device())


def _exit_with_parent() -> None:
    """Exit this job process as soon as its parent (the server) is gone, even if it was
    SIGKILLed: an orphan would go on writing the checkpoints a restarted server resumes."""
    parent = mp.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()  # returns when the parent's end of the sentinel pipe closes
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def resumable_checkpoint(out: str | Path, *, discard_incomplete: bool = False) -> tuple[Path, int] | None:
    """The newest complete `checkpoint-N` in OUT/checkpoints and its step N, or None.
    Complete = its trainer_state.json (the Trainer writes it last) parses; a newer,
    incomplete one (the process died while saving) is deleted when discard_incomplete."""
    ckpts = Path(out) / "checkpoints"
    found = sorted(((int(m.group(1)), p) for p in (ckpts.iterdir() if ckpts.is_dir() else ())
                    if p.is_dir() and (m := _CHECKPOINT.match(p.name))), reverse=True)
    for step, path in found:
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            if discard_incomplete:
                shutil.rmtree(path, ignore_errors=True)
            continue
        return path, step
    return None


def _child(config: dict[str, Any], events, cancel, resources: JobResources | None = None) -> None:
    """Runs in the job process: train, forwarding events; never raises."""
    try:
        _exit_with_parent()
        (resources or JobResources()).apply()
        from qlora_serve.errors import QloraServeError

        from .feedback import StopCallback
        from .trainer import train

        def sink(event: dict[str, Any]) -> None:
            if event.get("event") == "done":
                event = {**event, "cancelled": cancel.is_set()}
            events.put(event)

        try:
            with open(os.devnull, "w") as quiet:
                train(TrainConfig(**config), callbacks=[StopCallback(should_stop=cancel.is_set)], on_event=sink, stream=quiet)
        except QloraServeError as exc:
            events.put({"event": "error", "kind": type(exc).__name__, "message": str(exc)})
        except ValueError as exc:  # TrainConfig validation
            events.put({"event": "error", "kind": "InvalidArgument", "message": str(exc)})
    except BaseException as exc:  # noqa: BLE001 - report, don't crash silently
        events.put({"event": "error", "kind": "Internal", "message": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"})


class TrainingJob:
    """A running job: iterate for progress events; `cancel()` to stop it."""

    def __init__(self, config: TrainConfig, resources: JobResources | None = None):
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and CUDA state
        self.config = config
        self._events = ctx.Queue()
        self._cancel = ctx.Event()
        config.progress_bar = False  # no tty in the job process
        self._proc = ctx.Process(target=_child, args=(config.to_dict(), self._events, self._cancel, resources),
                                 daemon=True)
        self._proc.start()
        self.finished = False

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while not self.finished:
            try:
                event = self._events.get(timeout=0.5)
            except queue.Empty:
                if self._proc.is_alive():
                    continue
                try:  # it may have sent its last events just before exiting: drain them first
                    event = self._events.get(timeout=1.0)
                except queue.Empty:
                    self.finished = True
                    code = self._proc.exitcode
                    yield {"event": "error", "kind": "Internal",
                           "message": f"the training process exited with code {code} without a result (killed or crashed)"}
                    continue
            if event.get("event") in TERMINAL_EVENTS:
                self.finished = True
            yield event
        self._proc.join(timeout=30)

    def cancel(self, grace_s: float = 60.0) -> None:
        """Ask the job to stop after the current optimizer step (checkpoint + adapter
        are written, a terminal "done" event with cancelled=True follows); kill it
        if it has not stopped within `grace_s` seconds. Returns at once."""
        self._cancel.set()
        # Don't join here: the child may block flushing events until the reader drains them.
        timer = threading.Timer(grace_s, lambda: self._proc.is_alive() and self._proc.kill())
        timer.daemon = True
        timer.start()

    def kill(self) -> None:
        """Stop the process now (SIGKILL); the iterator then ends with an error event."""
        if self._proc.is_alive():
            self._proc.kill()

    def is_alive(self) -> bool:
        return self._proc.is_alive()


def run_job_in_subprocess(config: TrainConfig, resources: JobResources | None = None) -> TrainingJob:
    """Start `config` in a new process bounded by `resources` (default: JobResources());
    returns the job (an iterator of progress dicts)."""
    return TrainingJob(config, resources)
