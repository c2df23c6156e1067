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
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import traceback
from typing import Any, Iterator

from .config import TrainConfig

TERMINAL_EVENTS = ("done", "error")


def _child(config: dict[str, Any], events, cancel) -> None:
    """Runs in the job process: train, forwarding events; never raises."""
    try:
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

    def __init__(self, config: TrainConfig):
        ctx = mp.get_context("spawn")  # fork would copy the server's threads and CUDA state
        self.config = config
        self._events = ctx.Queue()
        self._cancel = ctx.Event()
        config.progress_bar = False  # no tty in the job process
        self._proc = ctx.Process(target=_child, args=(config.to_dict(), self._events, self._cancel), daemon=True)
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


def run_job_in_subprocess(config: TrainConfig) -> TrainingJob:
    """Start `config` in a new process; returns the job (an iterator of progress dicts)."""
    return TrainingJob(config)
