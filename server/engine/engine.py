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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from qlora_serve.adapters.peft_format import LoraAdapter, check_fits_base, load_lora_adapter
from qlora_serve.adapters.residency import Residency
from qlora_serve.server.engine.config import EngineConfig
from qlora_serve.server.engine.detokenizer import IncrementalDetokenizer
from qlora_serve.server.engine.kv_batch import PaddedKVBatch
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
from qlora_serve.server.fairness import FairQueue
from qlora_serve.server.errors import (
    Cancelled,
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    NotFound,
    QloraServeError,
    QueueFull,
    ResourceExhausted,
    Unavailable,
)

log = logging.getLogger(__name__)

AdapterLoader = Callable[[AdapterHandle], LoraAdapter]
_IDLE_WAIT_S = 0.05  # how often an idle engine re-checks deadlines


@dataclass
class _Row:
    """A running sequence: one row of the batch."""

    request: Request
    sampler: RowSampler
    detok: IncrementalDetokenizer
    slot: int  # adapter slot, -1 = base
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    done: bool = False  # answered (finished, failed or cancelled); leaves the batch at the next retire

    @property
    def final_len(self) -> int:
        return len(self.request.prompt_ids) + self.request.params.max_new_tokens


class Engine:
    """Owns the model; thread-safe entry points: submit, cancel, call, shutdown, stats."""

    def __init__(self, base: LoadedBase, config: EngineConfig, *, metrics=None,
                 adapter_loader: AdapterLoader | None = None) -> None:
        self.base = base
        self.config = config
        self.metrics = metrics
        self.lora = MultiLoRA(base.model, max_slots=config.max_resident_adapters, max_rank=config.max_lora_rank)
        self.residency = Residency(config.max_resident_adapters, config.host_cache_bytes)
        # Settable before start(): the server wraps it with a digest check against the registry.
        self.adapter_loader: AdapterLoader = adapter_loader or self.read_adapter
        self._pad_id = next(i for i in (base.tokenizer.pad_token_id, base.tokenizer.eos_token_id, 0) if i is not None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # submitted but not yet running: bounded by max_waiting
        self._accepting = True
        self._stopped = threading.Event()
        # Fair across tenants (VTC); never fuller than _queued allows, so push cannot overflow.
        self._waiting: FairQueue[Request] = FairQueue(config.max_waiting)
        self._parked: dict[str, list[Request]] = {}  # adapter key -> requests waiting for its host load
        self._loads: dict[str, Future] = {}
        self._loader_pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-load")
        self._running: list[_Row] = []
        self._kv = PaddedKVBatch()
        # id(request) -> request: cancels match the Request object, never the client-chosen
        # request_id, which need not be unique (a retry, or two clients, may reuse one).
        self._cancelled: dict[int, Request] = {}
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)

    # ------------------------------------------------------------------ API
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def read_adapter(self, handle: AdapterHandle) -> LoraAdapter:
        """Default loader: parse from disk and check it fits this base (runs off the engine thread)."""
        adapter = load_lora_adapter(handle.path, max_rank=self.config.max_lora_rank)
        check_fits_base(adapter, self.lora.linear_shapes)
        return adapter

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
            if not self._accepting:
                raise Unavailable("server is shutting down; retry on another replica")
            if self._queued >= self.config.max_waiting:  # counted in qlora_rejections_total by the RequestGuard
                raise QueueFull(
                    f"waiting queue is full ({self.config.max_waiting} requests, --max-waiting); retry with backoff")
            self._queued += 1
        request.arrival = request.arrival or time.monotonic()
        self._inbox.put(("submit", request))

    def cancel(self, request: Request) -> None:
        """Stop this request (client went away); its row is freed within one step.
        A no-op when it already finished."""
        self._inbox.put(("cancel", request))

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn() on the engine thread between steps; the future holds its result."""
        fut: Future = Future()
        self._inbox.put(("call", (fn, fut)))
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
        while time.monotonic() < deadline and (self._queued or self._running):
            time.sleep(0.02)
        self._inbox.put(("stop", None))
        self._thread.join(timeout=5)
        self._loader_pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------- adapter residency
    def ensure_resident(self, handle: AdapterHandle) -> int:
        """Engine thread: put an adapter in a device slot now (LoadAdapter RPC). Returns the slot."""
        slot = self.residency.slot_of(handle.key)
        if slot is not None:
            self.residency.touch(handle.key)
            return slot
        adapter = self.residency.host_get(handle.key) or self._timed_load(handle)
        choice = self.residency.choose_slot(handle.key)
        if choice is None:
            raise ResourceExhausted(
                f"all {self.config.max_resident_adapters} adapter slots are used by running requests; "
                "retry later or raise --max-resident-adapters")
        return self._install(handle.key, adapter, *choice)

    def unload(self, key: str) -> bool:
        """Engine thread: free the adapter's slot, now if idle, else when its last request ends.
        Returns True when it left the device now."""
        if self.residency.slot_of(key) is None:
            return True
        if self.residency.pins(key):
            self.residency.unload_when_idle(key)
            return False
        self.lora.unload(self.residency.release(key))
        self._set_resident_gauge()
        return True

    def forget(self, key: str) -> None:
        """Engine thread: the adapter was deleted; drop it from host and (when idle) device."""
        self.residency.host_drop(key)
        self.unload(key)

    def _timed_load(self, handle: AdapterHandle) -> LoraAdapter:
        t0 = time.monotonic()
        try:
            adapter = self.adapter_loader(handle)
        except Exception:
            if self.metrics:
                self.metrics.adapter_loaded("error", time.monotonic() - t0)
            raise
        if self.metrics:
            self.metrics.adapter_loaded("ok", time.monotonic() - t0)
        evicted = self.residency.host_put(handle.key, adapter)
        if self.metrics and evicted:
            self.metrics.evicted("host", len(evicted))
        return adapter

    def _install(self, key: str, adapter: LoraAdapter, slot: int, victim: str | None) -> int:
        self.lora.load(slot, adapter)
        self.residency.assign(key, slot)
        if self.metrics and victim:
            self.metrics.evicted("device", 1)
        self._set_resident_gauge()
        return slot

    def _set_resident_gauge(self) -> None:
        if self.metrics:
            self.metrics.set_resident(len(self.residency.resident_keys()))

    # ------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while True:
            idle = not self._running and not len(self._waiting)
            if not self._drain_inbox(block=idle):
                break
            try:
                self._expire()
                self._retire()
                admitted = self._admit()
                if admitted:
                    self._prefill(admitted)
                    self._retire()  # rows done after one token must not cost a decode
                if self._running:
                    self._decode()
                    self._retire()
            except Exception as exc:  # a fault must cost only the rows in flight, never the server
                self._fail_running(exc)
            if self.metrics:
                self.metrics.set_queue(self._queued, len(self._running))
        self._fail_everything(Unavailable("server stopped before this request ran; retry"))
        self._stopped.set()

    def _drain_inbox(self, block: bool) -> bool:
        """Apply pending commands; False when asked to stop."""
        try:
            item = self._inbox.get(timeout=_IDLE_WAIT_S) if block else self._inbox.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, payload = item
            if kind == "stop":
                return False
            if kind == "submit":
                self._enqueue(payload)
            elif kind == "cancel":
                self._cancelled[id(payload)] = payload
            elif kind == "loaded":
                self._on_loaded(*payload)
            elif kind == "call":
                fn, fut = payload
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as exc:
                        fut.set_exception(exc)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True

    def _enqueue(self, req: Request) -> None:
        key = req.adapter_key
        if key is None or self.residency.slot_of(key) is not None or self.residency.in_host(key):
            if self.metrics and key is not None:
                self.metrics.host_cache("hit" if self.residency.slot_of(key) is None else "device")
            self._waiting.push(req, req.tenant, prompt_tokens=len(req.prompt_ids))
            return
        # Cold adapter: read it off the engine thread; all requests for it wait on one load.
        self._parked.setdefault(key, []).append(req)
        if key not in self._loads:
            if self.metrics:
                self.metrics.host_cache("miss")
            fut = self._loader_pool.submit(self._timed_read, req.adapter)
            self._loads[key] = fut
            fut.add_done_callback(lambda f, k=key, h=req.adapter: self._inbox.put(("loaded", (k, f, h))))

    def _timed_read(self, handle: AdapterHandle) -> tuple[LoraAdapter, float]:
        t0 = time.monotonic()
        return self.adapter_loader(handle), time.monotonic() - t0

    def _on_loaded(self, key: str, fut: Future, handle: AdapterHandle | None = None) -> None:
        self._loads.pop(key, None)
        parked = self._parked.pop(key, [])
        exc = fut.exception()
        if exc is None:
            adapter, seconds = fut.result()
            self.residency.host_put(key, adapter)
            if self.metrics:
                self.metrics.adapter_loaded("ok", seconds)
            for req in parked:
                self._waiting.push(req, req.tenant, prompt_tokens=len(req.prompt_ids))
            return
        if self.metrics:
            self.metrics.adapter_loaded("error", 0.0)
        log.warning("adapter %s failed to load: %s", key, exc)
        err = exc if isinstance(exc, QloraServeError) else Internal(f"adapter failed to load: {exc}")
        retry: list[Request] = []
        if isinstance(exc, NotFound) and handle is not None:
            # The key is the files' digest, shared by every name/version registered with
            # the same files: only requests naming the version the loader found deleted
            # fail; the others get a load of their own (each round drops >= 1 handle).
            retry = [r for r in parked if (r.adapter.name, r.adapter.version) != (handle.name, handle.version)]
        for req in parked:
            if not any(req is r for r in retry):
                self._finish_waiting(req, ErrorEvent(err))
        for req in retry:
            self._enqueue(req)

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

        for req in list(self._waiting):
            if (ev := verdict(req)) is not None:
                self._waiting.remove(req)
                self._finish_waiting(req, ev)
        for key, reqs in list(self._parked.items()):
            for req in list(reqs):
                if (ev := verdict(req)) is not None:
                    reqs.remove(req)
                    self._finish_waiting(req, ev)
        for row in self._running:
            if not row.done and (ev := verdict(row.request)) is not None:
                row.request.events.put(ev)
                row.done = True
        self._cancelled.clear()

    def _admit(self) -> list[_Row]:
        """Move waiting requests into the batch while every limit holds."""
        admitted: list[_Row] = []
        prefill_tokens = 0
        worst = max((r.final_len for r in self._running), default=0)
        while len(self._waiting) and len(self._running) + len(admitted) < self.config.max_running:
            req = self._waiting.peek()
            n = len(req.prompt_ids)
            final_len = n + req.params.max_new_tokens
            rows = len(self._running) + len(admitted) + 1
            if rows > 1 and rows * max(worst, final_len) > self.config.max_kv_tokens:
                break  # KV budget full: wait for rows to finish (never over-commit memory)
            if admitted and prefill_tokens + n > self.config.max_prefill_tokens:
                break
            slot = -1
            if req.adapter_key is not None:
                slot = self._slot_for(req)
                if slot is None:
                    break  # every slot pinned by running rows: wait for one to free
                if slot == -2:
                    continue  # evicted from host meanwhile: re-parked for a reload
            self._waiting.pop()
            with self._lock:
                self._queued -= 1
            if req.adapter_key is not None:
                self.residency.pin(req.adapter_key)
            row = _Row(req, RowSampler(req.params, self.base.device),
                       IncrementalDetokenizer(self.base.tokenizer, req.params.stop), slot)
            admitted.append(row)
            prefill_tokens += n
            worst = max(worst, final_len)
        return admitted

    def _slot_for(self, req: Request) -> int | None:
        """Device slot for the request's adapter; None if no slot can be freed now,
        -2 if the parsed adapter left the host cache (the request is re-parked)."""
        key = req.adapter_key
        slot = self.residency.slot_of(key)
        if slot is not None:
            return slot
        choice = self.residency.choose_slot(key)
        if choice is None:
            return None
        adapter = self.residency.host_get(key)
        if adapter is None:
            self._waiting.remove(req)
            self._enqueue(req)
            return -2
        return self._install(key, adapter, *choice)

    @torch.inference_mode()
    def _prefill(self, rows: list[_Row]) -> None:
        """One left-padded forward pass over the new prompts; samples each row's first token."""
        device = self.base.device
        length = max(len(r.request.prompt_ids) for r in rows)
        ids = torch.full((len(rows), length), self._pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            p = r.request.prompt_ids
            ids[i, length - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, length - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.base.model.config)
        with self.lora.row_slots([r.slot for r in rows]):
            out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                                  use_cache=True, logits_to_keep=1)
        self._kv.join(cache, mask)
        self._running.extend(rows)
        self._emit(rows, sample_rows([r.sampler for r in rows], out.logits[:, -1, :]))

    @torch.inference_mode()
    def _decode(self) -> None:
        """One token for every running row, in one forward pass."""
        rows = self._running
        ids = torch.tensor([[r.generated[-1]] for r in rows], dtype=torch.long, device=self.base.device)
        mask = self._kv.decode_mask()
        with self.lora.row_slots([r.slot for r in rows]):
            out = self.base.model(input_ids=ids, attention_mask=mask, position_ids=self._kv.positions(),
                                  cache=self._kv.cache, use_cache=True)
        self._kv.advance(mask)
        self._emit(rows, sample_rows([r.sampler for r in rows], out.logits[:, -1, :]))

    def _emit(self, rows: list[_Row], tokens: list[int]) -> None:
        now = time.monotonic()
        for row, tok in zip(rows, tokens):
            if row.done:
                continue
            row.generated.append(tok)
            text = row.detok.add(tok)
            if row.first_token_at is None:
                row.first_token_at = now
                if self.metrics:
                    self.metrics.observe_ttft(now - row.request.arrival)
            row.request.events.put(TokenEvent([tok], text))
            self._waiting.charge(row.request.tenant, output_tokens=1)
            reason = self._finish_reason(row, tok)
            if reason is not None:
                tail = row.detok.flush()
                if row.detok.stopped:
                    reason = FinishReason.STOP
                row.request.events.put(FinalEvent(reason, list(row.generated), row.detok.text, tail,
                                                  len(row.request.prompt_ids)))
                row.done = True
                if self.metrics:
                    self.metrics.generated(len(row.generated))

    def _finish_reason(self, row: _Row, tok: int) -> FinishReason | None:
        if tok in self.base.eos_token_ids:
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
        self._running = [self._running[i] for i in keep]
        self._kv.keep(keep)

    def _release(self, row: _Row) -> None:
        key = row.request.adapter_key
        if key is not None and self.residency.slot_of(key) is not None and self.residency.unpin(key):
            self.unload(key)

    def _fail_running(self, exc: Exception) -> None:
        log.exception("engine step failed; failing %d running request(s) and continuing", len(self._running))
        for row in self._running:
            if not row.done:
                row.request.events.put(ErrorEvent(Internal(
                    f"internal error while generating request {row.request.request_id}: {type(exc).__name__}; "
                    "the server keeps serving, please report this id")))
            self._release(row)
        self._running = []
        self._kv = PaddedKVBatch()

    def _fail_everything(self, err: QloraServeError) -> None:
        for row in self._running:
            if not row.done:
                row.request.events.put(ErrorEvent(err))
        self._running = []
        for req in list(self._waiting):
            self._waiting.remove(req)
            self._finish_waiting(req, ErrorEvent(err))
        for reqs in self._parked.values():
            for req in reqs:
                self._finish_waiting(req, ErrorEvent(err))
        self._parked.clear()
