"""The engine: one thread owns the model and runs continuous batching.

Every step it (1) applies the typed commands (`commands.py`) that other threads
put in its inbox, (2) lets the scheduler (`scheduler.py`) expire, retire and admit
requests, (3) has the runner (`runner.py`) prefill the admitted rows in one padded
pass and decode one token for every running row in one pass, each row through its
own adapter (batched multi-LoRA), and (4) has the output processor (`output.py`)
turn the sampled tokens into events. Finished rows leave at once; new ones join
next step. Because only this thread touches the model and the adapter slots,
adapter changes can never race with a forward pass. Other threads read the state
through `snapshot()`, which the engine republishes after every phase.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from functools import partial
from typing import Callable

from qlora_serve.adapters.peft_format import LoraAdapter
from qlora_serve.errors import InvalidArgument, QloraServeError, Unavailable
from qlora_serve.server.engine.adapter_loading import AdapterReader, AdapterSlots, LoadWaiter, build_lora
from qlora_serve.server.engine.commands import Call, Cancel, Command, EngineSnapshot, Load, Loaded, Stop, Submit
from qlora_serve.server.engine.config import EngineConfig
from qlora_serve.server.engine.kv_batch import PagedKVBatch
from qlora_serve.server.engine.loader import LoadedBase
from qlora_serve.server.engine.output import OutputProcessor
from qlora_serve.server.engine.request import AdapterHandle, ErrorEvent, Request
from qlora_serve.server.engine.runner import ModelRunner, PrefillFailed
from qlora_serve.server.engine.scheduler import Row, Scheduler, internal_error

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how often an idle engine re-checks deadlines
_STOPPED = "the engine has stopped (server shutting down); retry on another replica"


class Engine:
    """Owns the model. Every public method is safe from any thread: those that act on
    engine state post a command and return a Future (see `commands.py`)."""

    def __init__(self, base: LoadedBase, config: EngineConfig, *, metrics=None,
                 adapter_reader: AdapterReader | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.lora, self.residency = build_lora(base.model, config)
        self.adapters = AdapterSlots(self.lora, self.residency, metrics=metrics,
                                     on_done=lambda key, fut, handle: self._post(Loaded(key, fut, handle)))
        if adapter_reader is not None:
            self.adapter_reader = adapter_reader
        self.runner = ModelRunner(base, self.lora, PagedKVBatch(max_tokens=config.max_kv_tokens))
        self.output = OutputProcessor(base, metrics)
        self.scheduler = Scheduler(config, kv_slots=self.runner.kv.slots_for, new_row=self._new_row,
                                   adapters=self.adapters, metrics=metrics)
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _accepting, _closed and the inbox put with them
        self._accepting = True
        self._closed = False  # the loop has ended: the inbox takes nothing more
        self._snapshot = EngineSnapshot()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ------------------------------------------------------------------ API
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def base(self) -> LoadedBase:
        """The loaded base model (tokenizer, eos ids, device)."""
        return self.runner.base

    @base.setter
    def base(self, base: LoadedBase) -> None:  # tests and benchmarks swap eos ids while idle
        self.runner.base = self.output.base = base

    @property
    def adapter_reader(self) -> AdapterReader:
        """Reads an adapter (reader thread). Settable before start(): the server wraps
        `read_adapter` with a digest check against the registry."""
        return self.adapters.reader

    @adapter_reader.setter
    def adapter_reader(self, loader: AdapterReader) -> None:
        self.adapters.reader = loader

    def read_adapter(self, handle: AdapterHandle) -> LoraAdapter:
        """Default reader: parse from disk, check it fits this base and its slots' dtype."""
        return self.adapters.read_adapter(handle)

    def validate_lengths(self, prompt_len: int, max_new_tokens: int) -> None:
        """Refuse at once what could never run (INVALID_ARGUMENT names the numbers)."""
        if prompt_len + max_new_tokens > self.base.max_context:
            raise InvalidArgument(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
                f"{self.base.max_context} tokens; shorten the prompt or lower max_new_tokens")
        if prompt_len + max_new_tokens > self.config.max_kv_tokens:
            raise InvalidArgument(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the server's KV budget of "
                f"{self.config.max_kv_tokens} tokens (--max-kv-tokens)")

    def submit(self, request: Request) -> None:
        """Queue a request; its answers arrive on request.events. Raises Unavailable
        while draining and ResourceExhausted when the waiting queue is full."""
        self.validate_lengths(len(request.prompt_ids), request.params.max_new_tokens)
        with self._lock:
            if not self._accepting or self._closed:
                raise Unavailable("server is shutting down; retry on another replica")
            self.scheduler.reserve()  # counted by the RequestGuard
            request.arrival = request.arrival or time.monotonic()
            self._inbox.put(Submit(request))

    def cancel(self, request: Request) -> None:
        """Stop this request (client went away); its row is freed within one step.
        A no-op when it already finished."""
        self._post(Cancel(request))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between steps; the future holds its result
        (Unavailable once the engine has stopped)."""
        fut: Future = Future()
        if not self._post(Call(fn, fut)):
            fut.set_exception(Unavailable(_STOPPED))
        return fut

    def load_adapter(self, handle: AdapterHandle) -> Future:
        """Put an adapter in a device slot (LoadAdapter RPC); the future holds the slot.
        The read runs on the reader thread, shared with requests waiting for the same
        adapter; only the copy into the slot runs on the engine thread."""
        fut: Future = Future()
        inner: Future = Future()  # set on the engine thread: publish, then answer the caller
        inner.add_done_callback(partial(self._answer_after_publish, fut))
        if not self._post(Load(LoadWaiter(handle, inner))):
            fut.set_exception(Unavailable(_STOPPED))
        return fut

    def unload(self, key: str) -> Future:
        """Free the adapter's slot, now if idle, else when its last request ends.
        The future holds True when it left the device now."""
        return self.call(partial(self.adapters.unload, key))

    def forget(self, key: str) -> Future:
        """The adapter was deleted: drop it from host and (when idle) device, discard a
        read of it in flight, and answer what waits for that read with NOT_FOUND."""
        return self.call(partial(self._forget, key))

    def snapshot(self) -> EngineSnapshot:
        """The engine's state as of its last publish (after each phase of a step, and
        before a command's future is answered)."""
        return self._snapshot

    def stats(self) -> dict:
        """The snapshot as a dict, for health and metrics; `queued` is the live count
        (it moves on submit, before the engine thread sees the request)."""
        s = self._snapshot
        return {"running": s.running, "queued": self.scheduler.queued,
                "resident_adapters": len(s.device_adapters), "kv_bytes": s.kv_bytes, "lora_bytes": s.lora_bytes}

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to grace_s), then stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.scheduler.pending():  # admitted rows too
            time.sleep(0.02)
        self._post(Stop())
        self._thread.join(timeout=5)
        self.adapters.shutdown()

    def _post(self, command: Command) -> bool:
        """Put a command in the inbox; False once the loop has ended (nobody would read it)."""
        with self._lock:
            if self._closed:
                return False
            self._inbox.put(command)
            return True

    # ------------------------------------------------------ engine thread
    def _new_row(self, req: Request, slot: int) -> Row:
        return Row(req, self.runner.sampler(req), self.output.detokenizer(req), slot)

    def _forget(self, key: str) -> None:
        for req, err in self.adapters.forget(key):
            self.scheduler.finish_waiting(req, ErrorEvent(err))

    def _publish(self) -> None:
        """Replace the snapshot other threads read (one reference assignment)."""
        self._snapshot = EngineSnapshot(
            running=len(self.scheduler.running), queued=self.scheduler.queued,
            device_adapters=frozenset(self.residency.resident_keys()),
            host_adapters=frozenset(self.residency.host_keys()), kv_bytes=self.runner.kv.nbytes(),
            lora_bytes=self.residency.device_used())

    def _answer_after_publish(self, outer: Future, inner: Future) -> None:
        """A command's result is final: publish first, so its caller reads the new state."""
        self._publish()
        if inner.cancelled():
            outer.cancel()
        elif (exc := inner.exception()) is not None:
            outer.set_exception(exc)
        else:
            outer.set_result(inner.result())

    def _loop(self) -> None:
        while True:
            if not self._drain_inbox(block=self.scheduler.idle):
                break
            try:
                self._step()
            except Exception as exc:  # a fault must cost only the rows in flight, never the server
                self._fail_step(exc)
            self._publish()
            if self.metrics:
                self.metrics.set_queue(self.scheduler.queued, len(self.scheduler.running))
        with self._lock:
            self._closed = True
        self._drain_inbox(block=False, stopping=True)
        self._fail_everything(Unavailable("server stopped before this request ran; retry"))
        self._publish()

    def _step(self) -> None:
        sched = self.scheduler
        sched.expire()
        self.runner.free(sched.retire())
        sched.admit()
        self._publish()  # adapters just installed are visible before any of their tokens
        if sched.admitted:
            self._prefill()
            self.runner.free(sched.retire())  # rows done after one token must not cost a decode
        if sched.running:
            sched.charge(self.output.emit(sched.running, self.runner.decode(sched.running)))
            self.runner.free(sched.retire())

    def _prefill(self) -> None:
        # Rows sorted by LoRA segment: each adapter's rows form one contiguous segment.
        rows = sorted(self.scheduler.admitted, key=self.scheduler.segment_order)
        try:
            picked = self.runner.prefill(rows)
        except PrefillFailed as failed:  # the running rows' KV is untouched: they go on
            log.error("prefill failed; failing %d new request(s) and continuing", len(rows), exc_info=failed.cause)
            self.scheduler.admitted = []
            self._fail_rows(rows, failed.cause)
            return
        self.scheduler.start_running(rows)
        self.scheduler.charge(self.output.emit(rows, picked))

    def _drain_inbox(self, block: bool, stopping: bool = False) -> bool:
        """Apply pending commands; False when asked to stop. A command that fails
        answers its own caller; it never stops the loop. `stopping`: refuse them all."""
        try:
            cmd = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            if isinstance(cmd, Stop) and not stopping:
                return False
            try:
                (self._refuse if stopping else self._apply)(cmd)
            except Exception:
                log.exception("engine command %s failed; continuing", type(cmd).__name__)
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, cmd: Command) -> None:
        match cmd:
            case Submit(request=req):
                try:
                    self.scheduler.enqueue(req)
                except Exception as exc:
                    self.scheduler.finish_waiting(req, ErrorEvent(internal_error(req, exc, "queueing")))
                    raise
            case Cancel(request=req):
                self.scheduler.cancel(req)
            case Loaded(key=key, future=fut, handle=handle):
                ready, failed = self.adapters.finish_load(key, fut, handle)
                for req in ready:
                    self.scheduler.requeue(req)
                for req, err in failed:
                    self.scheduler.finish_waiting(req, ErrorEvent(err))
            case Load(waiter=waiter):
                try:
                    self.adapters.load(waiter)
                except Exception as exc:
                    waiter.future.set_exception(exc)
                    raise
            case Call(fn=fn, future=fut):
                if fut.set_running_or_notify_cancel():
                    try:
                        result = fn()
                    except BaseException as exc:
                        self._publish()
                        fut.set_exception(exc)
                    else:
                        self._publish()
                        fut.set_result(result)

    def _refuse(self, cmd: Command) -> None:
        """The engine stopped: answer a command it will never run."""
        err = Unavailable("server stopped before this request ran; retry")
        match cmd:
            case Submit(request=req):
                self.scheduler.finish_waiting(req, ErrorEvent(err))
            case Load(waiter=waiter):
                waiter.future.set_exception(err)
            case Call(future=fut) if fut.set_running_or_notify_cancel():
                fut.set_exception(err)

    def _fail_rows(self, rows: list[Row], exc: Exception) -> None:
        """Answer INTERNAL (naming the request id) to each row not yet answered; unpin all."""
        for row in rows:
            self.output.fail(row, internal_error(row.request, exc, "generating"))
            self.scheduler.release(row)

    def _fail_step(self, exc: Exception) -> None:
        """A step raised outside the per-row paths: fail the rows it held, keep serving."""
        rows = self.scheduler.take_rows()
        log.exception("engine step failed; failing %d request(s) and continuing", len(rows))
        self.runner.kv.clear()
        self._fail_rows(rows, exc)

    def _fail_everything(self, err: QloraServeError) -> None:
        for row in self.scheduler.take_rows():
            self.output.fail(row, err)
        self.scheduler.fail_waiting(err)
