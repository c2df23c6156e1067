"""The engine: one thread owns the model and runs continuous batching.

Every step it (1) applies commands (submit, cancel, adapter load/unload) that
handler threads put in its inbox, (2) admits waiting requests up to the
limits and prefills them in one padded forward pass, and (3) decodes one token
for every running row in one forward pass, each row through its own adapter
(batched multi-LoRA). Finished rows leave at once; new ones join next step.
Because only this thread touches the model and the adapter slots, adapter
changes can never race with a forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from qlora_serve.adapters.peft_format import LoraAdapter
from qlora_serve.adapters.residency import Residency
from qlora_serve.server.engine.adapter_loading import AdapterReader, AdapterSlots, LoadWaiter
from qlora_serve.server.engine.config import EngineConfig
from qlora_serve.server.engine.detokenizer import IncrementalDetokenizer
from qlora_serve.server.engine.kv_batch import KVRow, PagedKVBatch
from qlora_serve.server.engine.loader import LoadedBase
from qlora_serve.server.engine.multi_lora import MultiLoRA
from qlora_serve.server.engine.request import (
    AdapterHandle,
    ErrorEvent,
    FinalEvent,
    FinishReason,
    Request,
    TokenEvent,
)
from qlora_serve.server.engine.sampling import RowSampler, sample_rows
from qlora_serve.server.engine.fairness import FairQueue
from qlora_serve.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    QloraServeError,
    QueueFull,
    Unavailable,
)

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how often an idle engine re-checks deadlines
_REPARKED = -2  # _slot_for: the adapter's weights left the host; the request waits for a new read


@dataclass
class _Row:
    """A running sequence: one row of the batch."""

    request: Request
    sampler: RowSampler
    detok: IncrementalDetokenizer
    slot: int  # adapter slot, -1 = base
    kv: KVRow | None = None  # its pages in the KV pool, once prefilled
    generated: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token, when asked for
    first_token_at: float | None = None
    done: bool = False  # answered (finished, failed or cancelled); leaves the batch at the next retire

    @property
    def final_len(self) -> int:
        return len(self.request.prompt_ids) + self.request.params.max_new_tokens


def _internal(req: Request, exc: BaseException, during: str) -> Internal:
    return Internal(f"internal error while {during} request {req.request_id}: {type(exc).__name__}; "
                    "the server keeps serving, please report this id")


class Engine:
    """Owns the model; thread-safe entry points: submit, cancel, call, load_adapter, shutdown, stats."""

    def __init__(self, base: LoadedBase, config: EngineConfig, *, metrics=None,
                 adapter_reader: AdapterReader | None = None) -> None:
        self.base = base
        self.config = config
        self.metrics = metrics
        self.lora = MultiLoRA(base.model, max_slots=config.max_resident_adapters, max_rank=config.max_lora_rank)
        self.residency = Residency(config.max_resident_adapters, config.host_cache_bytes)
        self.adapters = AdapterSlots(self.lora, self.residency, metrics=metrics,
                                     on_done=lambda key, fut, handle: self._post("loaded", (key, fut, handle)))
        if adapter_reader is not None:
            self.adapter_reader = adapter_reader
        self._pad_id = next(i for i in (base.tokenizer.pad_token_id, base.tokenizer.eos_token_id, 0) if i is not None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted but not yet running
        # Admitted or running rows (until released). Submit bounds queued + rows by
        # max_running + max_waiting: a request that will run at once is not "waiting",
        # so an idle server accepts a burst of exactly that many.
        self._rows = 0
        self._accepting = True
        self._closed = False  # the loop has ended: the inbox takes nothing more
        # Fair across tenants (VTC); never fuller than _queued allows, so push cannot overflow.
        self._waiting: FairQueue[Request] = FairQueue(config.max_waiting + config.max_running)
        self._admitted: list[_Row] = []  # taken from the queue and pinned, not yet prefilled
        self._running: list[_Row] = []  # sorted by adapter slot (contiguous LoRA segments)
        self._kv = PagedKVBatch(max_tokens=config.max_kv_tokens)
        # id(request) -> request: cancels match the Request object, never the client-chosen
        # request_id, which need not be unique (a retry, or two clients, may reuse one).
        self._cancelled: dict[int, Request] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ------------------------------------------------------------------ API
    def start(self) -> "Engine":
        self._thread.start()
        return self

    @property
    def adapter_reader(self) -> AdapterReader:
        """Reads an adapter (reader thread). Settable before start(): the server wraps
        `read_adapter` with a digest check against the registry."""
        return self.adapters.reader

    @adapter_reader.setter
    def adapter_reader(self, reader: AdapterReader) -> None:
        self.adapters.reader = reader

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
            if self._queued + self._rows >= self.config.max_running + self.config.max_waiting:  # counted by the RequestGuard
                raise QueueFull(
                    f"waiting queue is full ({self.config.max_waiting} requests, --max-waiting); retry with backoff")
            self._queued += 1
            request.arrival = request.arrival or time.monotonic()
            self._inbox.put(("submit", request))

    def cancel(self, request: Request) -> None:
        """Stop this request (client went away); its row is freed within one step.
        A no-op when it already finished."""
        self._post("cancel", request)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between steps; the future holds its result
        (Unavailable once the engine has stopped)."""
        fut: Future = Future()
        if not self._post("call", (fn, fut)):
            fut.set_exception(Unavailable("the engine has stopped (server shutting down); retry on another replica"))
        return fut

    def load_adapter(self, handle: AdapterHandle) -> Future:
        """Put an adapter in a device slot (LoadAdapter RPC); the future holds the slot.
        The read runs on the reader thread, shared with requests waiting for the same
        adapter; only the copy into the slot runs on the engine thread."""
        fut: Future = Future()
        if not self._post("load", LoadWaiter(handle, fut)):
            fut.set_exception(Unavailable("the engine has stopped (server shutting down); retry on another replica"))
        return fut

    def stats(self) -> dict:
        """A cheap, racy snapshot for health and metrics."""
        return {"running": len(self._running), "queued": self._queued,
                "resident_adapters": len(self.residency.resident_keys()), "kv_bytes": self._kv.nbytes()}

    def shutdown(self, grace_s: float = 30.0) -> None:
        """Refuse new requests, let in-flight ones finish (up to grace_s), then stop."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and (self._queued or self._rows):  # rows: admitted ones too
            time.sleep(0.02)
        self._post("stop", None)
        self._thread.join(timeout=5)
        self.adapters.shutdown()

    def _post(self, kind: str, payload) -> bool:
        """Put a command in the inbox; False once the loop has ended (nobody would read it)."""
        with self._lock:
            if self._closed:
                return False
            self._inbox.put((kind, payload))
            return True

    # ------------------------------------------- adapter residency (engine thread)
    def unload(self, key: str) -> bool:
        """Free the adapter's slot, now if idle, else when its last request ends.
        Returns True when it left the device now."""
        return self.adapters.unload(key)

    def forget(self, key: str) -> None:
        """The adapter was deleted: drop it from host and (when idle) device, discard a
        read of it in flight, and answer what waits for that read with NOT_FOUND."""
        for req, err in self.adapters.forget(key):
            self._finish_waiting(req, ErrorEvent(err))

    def _on_loaded(self, key: str, fut: Future, handle: AdapterHandle) -> None:
        ready, failed = self.adapters.finish_load(key, fut, handle)
        for req in ready:
            self._waiting.push(req, req.tenant, prompt_tokens=len(req.prompt_ids))
        for req, err in failed:
            self._finish_waiting(req, ErrorEvent(err))

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            idle = not self._running and not len(self._waiting)
            if not self._drain_inbox(block=idle):
                break
            try:
                self._expire()
                self._retire()
                self._admit()
                if self._admitted:
                    self._prefill()
                    self._retire()  # rows done after one token must not cost a decode
                if self._running:
                    self._decode()
                    self._retire()
            except Exception as exc:  # a fault must cost only the rows in flight, never the server
                self._fail_step(exc)
            if self.metrics:
                self.metrics.set_queue(self._queued, len(self._running))
        with self._lock:
            self._closed = True
        self._drain_inbox(block=False, stopping=True)
        self._fail_everything(Unavailable("server stopped before this request ran; retry"))

    def _drain_inbox(self, block: bool, stopping: bool = False) -> bool:
        """Apply pending commands; False when asked to stop. A command that fails
        answers its own caller; it never stops the loop. `stopping`: refuse them all."""
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload = item
            if kind == "stop" and not stopping:
                return False
            try:
                if stopping:
                    self._refuse(kind, payload)
                else:
                    self._apply(kind, payload)
            except Exception:
                log.exception("engine command %r failed; continuing", kind)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, kind: str, payload) -> None:
        if kind == "submit":
            try:
                self._enqueue(payload)
            except Exception as exc:
                self._finish_waiting(payload, ErrorEvent(_internal(payload, exc, "queueing")))
                raise
        elif kind == "cancel":
            self._cancelled[id(payload)] = payload
        elif kind == "loaded":
            self._on_loaded(*payload)
        elif kind == "load":
            try:
                self.adapters.load(payload)
            except Exception as exc:
                payload.future.set_exception(exc)
                raise
        elif kind == "call":
            fn, fut = payload
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)

    def _refuse(self, kind: str, payload) -> None:
        """The engine stopped: answer a command it will never run."""
        err = Unavailable("server stopped before this request ran; retry")
        if kind == "submit":
            self._finish_waiting(payload, ErrorEvent(err))
        elif kind == "load":
            payload.future.set_exception(err)
        elif kind == "call" and payload[1].set_running_or_notify_cancel():
            payload[1].set_exception(err)

    def _enqueue(self, req: Request) -> None:
        key = req.adapter_digest
        if key is None or self.adapters.available(key):
            if self.metrics and key is not None:
                self.metrics.host_cache("hit" if self.residency.slot_of(key) is None else "device")
            self._waiting.push(req, req.tenant, prompt_tokens=len(req.prompt_ids))
        else:  # cold adapter: read off the engine thread; everything for it waits on one read
            self.adapters.park(req)

    def _finish_waiting(self, req: Request, event) -> None:
        with self._lock:
            self._queued -= 1
        req.events.put(event)

    def _expire(self) -> None:
        """Cancelled or past-deadline requests leave, wherever they are."""
        now = time.monotonic()

        def verdict(req: Request):
            if self._cancelled.get(id(req)) is req:
                return ErrorEvent(Cancelled(f"request {req.request_id} was cancelled by the client"))
            if req.deadline is not None and now > req.deadline:
                return ErrorEvent(DeadlineExceeded(
                    f"request {req.request_id} passed its deadline; raise the client timeout or lower max_new_tokens"))
            return None

        left = False
        for req in list(self._waiting):
            if (ev := verdict(req)) is not None:
                self._waiting.remove(req)
                self._finish_waiting(req, ev)
                left = True
        for req in self.adapters.parked_requests():
            if (ev := verdict(req)) is not None:
                self.adapters.unpark(req)
                self._finish_waiting(req, ev)
        for row in self._running:
            if not row.done and (ev := verdict(row.request)) is not None:
                row.request.events.put(ev)
                row.done = True
        self._cancelled.clear()
        if left:  # read adapters nobody waits for any more are not kept
            self.adapters.drop_unclaimed({r.adapter_digest for r in self._waiting})

    def _admit(self) -> None:
        """Move waiting requests into `_admitted`, in fair order, while every limit holds.
        A request whose adapter needs a slot that running rows all pin is passed over
        (it keeps its place) so that base requests and requests for resident adapters
        behind it still run."""
        prefill_tokens = 0
        # KV pages every row may come to hold: paged, so the sum, not rows x longest.
        kv_tokens = sum(self._kv.slots_for(r.final_len) for r in self._running)
        no_slot: set[int] = set()  # id() of requests passed over
        while len(self._running) + len(self._admitted) < self.config.max_running:
            req = self._waiting.peek(skip=no_slot)
            if req is None:
                break
            n = len(req.prompt_ids)
            final_len = n + req.params.max_new_tokens
            rows = len(self._running) + len(self._admitted) + 1
            if rows > 1 and kv_tokens + self._kv.slots_for(final_len) > self.config.max_kv_tokens:
                break  # KV budget full: wait for rows to finish (never over-commit memory)
            if self._admitted and prefill_tokens + n > self.config.max_prefill_tokens:
                break
            try:
                slot = self._slot_for(req)
                if slot is None:
                    no_slot.add(id(req))
                    continue
                if slot == _REPARKED:
                    continue
                row = _Row(req, RowSampler(req.params, self.base.device, req.prompt_ids, self.base.eos_token_ids),
                           IncrementalDetokenizer(self.base.tokenizer, req.params.stop), slot)
            except Exception as exc:  # e.g. its weights cannot be installed: only this request fails
                log.warning("request %s could not be admitted: %s", req.request_id, exc)
                self._waiting.remove(req)
                err = exc if isinstance(exc, QloraServeError) else _internal(req, exc, "admitting")
                self._finish_waiting(req, ErrorEvent(err))
                continue
            self._waiting.take(req)
            with self._lock:  # one step: from queued to a row
                self._queued -= 1
                self._rows += 1
            if req.adapter_digest is not None:
                self.adapters.pin(req.adapter_digest)
            self._admitted.append(row)
            prefill_tokens += n
            kv_tokens += self._kv.slots_for(final_len)

    def _slot_for(self, req: Request) -> int | None:
        """Device slot for the request's adapter (-1 = base); None if no slot can be
        freed now, _REPARKED if its weights left the host (it waits for a new read)."""
        key = req.adapter_digest
        if key is None:
            return -1
        if not self.adapters.available(key):
            self._waiting.remove(req)
            self.adapters.park(req)
            return _REPARKED
        return self.adapters.install(key)

    @torch.inference_mode()
    def _prefill(self) -> None:
        """One left-padded forward pass over the admitted prompts; samples each row's
        first token. If the forward fails, only these rows fail."""
        # Rows sorted by adapter slot: each adapter's rows form one contiguous segment.
        rows, device = sorted(self._admitted, key=lambda r: r.slot), self.base.device
        length = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.request.prompt_ids
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache()  # every layer keeps all tokens: join copies them into the pool
        try:
            with self.lora.row_slots([r.slot for r in rows]):
                out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                      use_cache=True, logits_to_keep=1)
        except Exception as exc:  # the running rows' KV is untouched: they go on
            log.exception("prefill failed; failing %d new request(s) and continuing", len(rows))
            self._admitted = []
            self._fail_rows(rows, exc)
            return
        for row, kv in zip(rows, self._kv.join(cache, mask)):
            row.kv = kv
        # Stable sort: new rows go after running rows of the same adapter; leaving keeps order.
        self._running = sorted(self._running + rows, key=lambda r: r.slot)
        self._admitted = []
        self._emit(rows, sample_rows([r.sampler for r in rows], out.logits[:, -1, :]))

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every running row, in one forward pass."""
        rows = self._running
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self.base.device)
        kv = [r.kv for r in rows]
        cache, mask, positions = self._kv.decode(kv)
        with self.lora.row_slots([r.slot for r in rows]):
            out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                  cache=cache, use_cache=True)
        self._kv.advance(kv)
        self._emit(rows, sample_rows([r.sampler for r in rows], out.logits[:, -1, :]))

    def _emit(self, rows: list[_Row], picked: tuple[list[int | Exception], list]) -> None:
        now = time.monotonic()
        for row, tok, lp in zip(rows, *picked):
            if row.done:
                continue
            if isinstance(tok, Exception):  # this row's sampling failed; the others go on
                log.error("sampling failed for request %s: %r", row.request.request_id, tok)
                row.request.events.put(ErrorEvent(_internal(row.request, tok, "sampling")))
                row.done = True
                continue
            row.generated.append(tok)
            # A stop token ends the text as a stop string does: its own text is not returned.
            text = "" if tok in row.request.params.stop_token_ids else row.detok.add(tok)
            if row.first_token_at is None:
                row.first_token_at = now
                if self.metrics:
                    self.metrics.observe_ttft(now - row.request.arrival)
            if lp is not None:
                row.logprobs.append(lp)
            row.request.events.put(TokenEvent([tok], text, None if lp is None else [lp]))
            self._waiting.charge(row.request.tenant, output_tokens=1)
            reason = self._finish_reason(row, tok)
            if reason is not None:
                tail = row.detok.flush()
                if row.detok.stopped:
                    reason = FinishReason.STOP
                row.request.events.put(FinalEvent(reason, list(row.generated), row.detok.text, tail,
                                                  len(row.request.prompt_ids), row.logprobs or None))
                row.done = True

    def _finish_reason(self, row: _Row, tok: int) -> FinishReason | None:
        if tok in row.request.params.stop_token_ids:
            return FinishReason.STOP
        if tok in self.base.eos_token_ids and not row.request.params.ignore_eos:
            return FinishReason.EOS
        if row.detok.stopped:
            return FinishReason.STOP
        if len(row.generated) >= row.request.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def _retire(self) -> None:
        """Finished rows leave the batch now, so the next step can admit others."""
        keep = [i for i, r in enumerate(self._running) if not r.done]
        if len(keep) == len(self._running):
            return
        for r in self._running:
            if r.done:
                self._release(r)
                if r.kv is not None:
                    self._kv.leave(r.kv)  # frees its pages; no other row's KV moves
        self._running = [self._running[i] for i in keep]

    def _release(self, row: _Row) -> None:
        with self._lock:
            self._rows -= 1
        if row.request.adapter_digest is not None:
            self.adapters.unpin(row.request.adapter_digest)

    def _fail_rows(self, rows: list[_Row], exc: Exception) -> None:
        """Answer INTERNAL (naming the request id) to each row not yet answered; unpin all."""
        for row in rows:
            if not row.done:
                row.request.events.put(ErrorEvent(_internal(row.request, exc, "generating")))
                row.done = True
            self._release(row)

    def _fail_step(self, exc: Exception) -> None:
        """A step raised outside the per-row paths: fail the rows it held, keep serving."""
        rows = self._admitted + self._running
        log.exception("engine step failed; failing %d request(s) and continuing", len(rows))
        self._admitted, self._running = [], []
        self._kv.clear()
        self._fail_rows(rows, exc)

    def _fail_everything(self, err: QloraServeError) -> None:
        for row in self._admitted + self._running:
            if not row.done:
                row.request.events.put(ErrorEvent(err))
        self._admitted, self._running = [], []
        for req in list(self._waiting):
            self._waiting.remove(req)
            self._finish_waiting(req, ErrorEvent(err))
        for req in self.adapters.fail_parked(err):
            self._finish_waiting(req, ErrorEvent(err))
