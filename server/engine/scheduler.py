"""Scheduling: which requests wait, which run, and when they leave.

Owns the fair waiting queue (VTC across tenants, `fairness.py`), admission into
the batch (row limit, KV budget in pages, prefill token budget, a device slot for
the request's adapter), deadline and cancel expiry, and the queue accounting that
bounds submissions by max_running + max_waiting. It runs no model: the rows it
admits are built by a factory the engine passes in (sampler + detokenizer), and
the KV budget is counted with the KV batch's page rounding (`kv_slots`).

Engine thread only, except `reserve` and the counters (`queued`, `pending`),
which any thread may use (under the lock).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from qlora_serve.errors import Cancelled, DeadlineExceeded, Internal, QloraServeError, QueueFull
from qlora_serve.server.engine.adapter_loading import AdapterSlots
from qlora_serve.server.engine.config import EngineConfig
from qlora_serve.server.engine.detokenizer import IncrementalDetokenizer
from qlora_serve.server.engine.fairness import FairQueue
from qlora_serve.server.engine.kv_batch import KVRow
from qlora_serve.server.engine.request import ErrorEvent, Request
from qlora_serve.server.engine.sampling import RowSampler

log = logging.getLogger(__name__)

BASE_SLOT = -1  # the row runs on the base model alone (no adapter)


class SlotWait(Enum):
    """Why a request got no device slot this step (it stays waiting)."""

    NO_FREE_SLOT = "no free slot"  # every slot is pinned by running rows: passed over, keeps its place
    REPARKED = "reparked"  # its weights left the host cache: it waits for a new read


Placement = int | SlotWait  # a device slot (BASE_SLOT = no adapter), or why it must wait


def internal_error(req: Request, exc: BaseException, during: str) -> Internal:
    """INTERNAL naming the request id and the exception type (never its message)."""
    return Internal(f"internal error while {during} request {req.request_id}: {type(exc).__name__}; "
                    "the server keeps serving, please report this id")


@dataclass
class Row:
    """A running sequence: one row of the batch."""

    request: Request
    sampler: RowSampler  # built by the runner
    detok: IncrementalDetokenizer  # built by the output processor
    slot: int  # adapter slot, BASE_SLOT = base
    kv: KVRow | None = None  # its pages in the KV pool, once prefilled
    generated: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)  # TokenLogprob per generated token, when asked for
    first_token_at: float | None = None
    done: bool = False  # answered (finished, failed or cancelled); leaves the batch at the next retire

    @property
    def final_len(self) -> int:
        """Tokens the row may come to hold: prompt + max_new_tokens."""
        return len(self.request.prompt_ids) + self.request.params.max_new_tokens


RowFactory = Callable[[Request, int], Row]


class Scheduler:
    """Waiting queue, admission and the rows in flight (admitted, then running)."""

    def __init__(self, config: EngineConfig, *, kv_slots: Callable[[int], int], new_row: RowFactory,
                 adapters: AdapterSlots | None = None, metrics=None) -> None:
        """kv_slots(tokens) -> token slots a row of that length holds (whole KV pages);
        new_row(request, slot) builds an admitted row; adapters: None = base model only."""
        self.config = config
        self.kv_slots = kv_slots
        self.new_row = new_row
        self.adapters = adapters
        self.metrics = metrics
        self._lock = threading.Lock()
        self._queued = 0  # submitted but not yet running
        # Admitted or running rows (until released). `reserve` bounds queued + rows by
        # max_running + max_waiting: a request that will run at once is not "waiting",
        # so an idle server accepts a burst of exactly that many.
        self._rows = 0
        # Fair across tenants (VTC); never fuller than _queued allows, so push cannot overflow.
        self.waiting: FairQueue[Request] = FairQueue(config.max_waiting + config.max_running)
        self.admitted: list[Row] = []  # taken from the queue and pinned, not yet prefilled
        self.running: list[Row] = []  # sorted by adapter slot (contiguous LoRA segments)
        # id(request) -> request: cancels match the Request object, never the client-chosen
        # request_id, which need not be unique (a retry, or two clients, may reuse one).
        self._cancelled: dict[int, Request] = {}

    # ------------------------------------------------------ any thread
    def reserve(self) -> None:
        """Take a place for a new request; QueueFull (RESOURCE_EXHAUSTED) beyond the bound."""
        with self._lock:
            if self._queued + self._rows >= self.config.max_running + self.config.max_waiting:
                raise QueueFull(
                    f"waiting queue is full ({self.config.max_waiting} requests, --max-waiting); retry with backoff")
            self._queued += 1

    @property
    def queued(self) -> int:
        """Requests submitted and not yet running (or answered)."""
        return self._queued

    def pending(self) -> bool:
        """Whether any request is queued, admitted or running."""
        return bool(self._queued or self._rows)

    # ------------------------------------------------------ engine thread
    @property
    def idle(self) -> bool:
        return not self.running and not len(self.waiting)

    def cancel(self, req: Request) -> None:
        self._cancelled[id(req)] = req

    def enqueue(self, req: Request) -> None:
        """A submitted request: into the fair queue, or parked on its adapter's read when cold."""
        key = req.adapter_digest
        if key is None or self.adapters.available(key):
            if self.metrics and key is not None:
                self.metrics.host_cache("hit" if self.adapters.residency.slot_of(key) is None else "device")
            self.requeue(req)
        else:  # cold adapter: read off the engine thread; everything for it waits on one read
            self.adapters.park(req)

    def requeue(self, req: Request) -> None:
        """Into the fair queue (its adapter's weights are now on the host)."""
        self.waiting.push(req, req.tenant, prompt_tokens=len(req.prompt_ids))

    def finish_waiting(self, req: Request, event) -> None:
        """Answer a request that never ran (error), giving its place back."""
        with self._lock:
            self._queued -= 1
        req.events.put(event)

    def expire(self, now: float | None = None) -> None:
        """Cancelled or past-deadline requests leave, wherever they are (running rows
        are answered and marked done; `retire` removes them)."""
        now = time.monotonic() if now is None else now

        def verdict(req: Request):
            if self._cancelled.get(id(req)) is req:
                return ErrorEvent(Cancelled(f"request {req.request_id} was cancelled by the client"))
            if req.deadline is not None and now > req.deadline:
                return ErrorEvent(DeadlineExceeded(
                    f"request {req.request_id} passed its deadline; raise the client timeout or lower max_new_tokens"))
            return None

        left = False
        for req in list(self.waiting):
            if (ev := verdict(req)) is not None:
                self.waiting.remove(req)
                self.finish_waiting(req, ev)
                left = True
        for req in self.adapters.parked_requests() if self.adapters else ():
            if (ev := verdict(req)) is not None:
                self.adapters.unpark(req)
                self.finish_waiting(req, ev)
        for row in self.running:
            if not row.done and (ev := verdict(row.request)) is not None:
                row.request.events.put(ev)
                row.done = True
        self._cancelled.clear()
        if left and self.adapters:  # read adapters nobody waits for any more are not kept
            self.adapters.drop_unclaimed({r.adapter_digest for r in self.waiting})

    def admit(self) -> None:
        """Move waiting requests into `admitted`, in fair order, while every limit holds.
        A request whose adapter needs a slot that running rows all pin is passed over
        (it keeps its place) so that base requests and requests for resident adapters
        behind it still run."""
        prefill_tokens = 0
        # KV pages every row may come to hold: paged, so the sum, not rows x longest.
        kv_tokens = sum(self.kv_slots(r.final_len) for r in self.running)
        no_slot: set[int] = set()  # id() of requests passed over
        while len(self.running) + len(self.admitted) < self.config.max_running:
            req = self.waiting.peek(skip=no_slot)
            if req is None:
                break
            n = len(req.prompt_ids)
            final_len = n + req.params.max_new_tokens
            rows = len(self.running) + len(self.admitted) + 1
            if rows > 1 and kv_tokens + self.kv_slots(final_len) > self.config.max_kv_tokens:
                break  # KV budget full: wait for rows to finish (never over-commit memory)
            if self.admitted and prefill_tokens + n > self.config.max_prefill_tokens:
                break
            try:
                slot = self.placement(req)
                if slot is SlotWait.NO_FREE_SLOT:
                    no_slot.add(id(req))
                    continue
                if slot is SlotWait.REPARKED:
                    continue
                row = self.new_row(req, slot)
            except Exception as exc:  # e.g. its weights cannot be installed: only this request fails
                log.warning("request %s could not be admitted: %s", req.request_id, exc)
                self.waiting.remove(req)
                err = exc if isinstance(exc, QloraServeError) else internal_error(req, exc, "admitting")
                self.finish_waiting(req, ErrorEvent(err))
                continue
            self.waiting.take(req)
            with self._lock:  # one step: from queued to a row
                self._queued -= 1
                self._rows += 1
            if req.adapter_digest is not None:
                self.adapters.pin(req.adapter_digest)
            self.admitted.append(row)
            prefill_tokens += n
            kv_tokens += self.kv_slots(final_len)

    def placement(self, req: Request) -> Placement:
        """The device slot for the request's adapter (BASE_SLOT without one), installing
        its weights when needed; or why it must wait (SlotWait)."""
        key = req.adapter_digest
        if key is None:
            return BASE_SLOT
        if not self.adapters.available(key):
            self.waiting.remove(req)
            self.adapters.park(req)
            return SlotWait.REPARKED
        slot = self.adapters.install(key)
        return SlotWait.NO_FREE_SLOT if slot is None else slot

    def segment_order(self, row: Row) -> tuple:
        """Sort key of a row: by LoRA class and adapter, so each adapter's rows are one
        contiguous segment (base rows first); by slot without an adapter manager."""
        return self.adapters.segment_order(row.slot) if self.adapters else (row.slot,)

    def start_running(self, rows: list[Row]) -> None:
        """Prefilled rows join the batch; `admitted` empties."""
        # Stable sort: new rows go after running rows of the same adapter; leaving keeps order.
        self.running = sorted(self.running + rows, key=self.segment_order)
        self.admitted = []

    def charge(self, rows: list[Row]) -> None:
        """Each of these rows generated one token: its tenant's fairness counter grows."""
        for row in rows:
            self.waiting.charge(row.request.tenant, output_tokens=1)

    def retire(self) -> list[Row]:
        """Finished rows leave the batch now, so the next step can admit others.
        Returns them (released), for the runner to free their KV pages."""
        gone = [r for r in self.running if r.done]
        if gone:
            self.running = [r for r in self.running if not r.done]
            for r in gone:
                self.release(r)
        return gone

    def release(self, row: Row) -> None:
        """The row left the batch: its place and its adapter's pin are given back."""
        with self._lock:
            self._rows -= 1
        if row.request.adapter_digest is not None:
            self.adapters.unpin(row.request.adapter_digest)

    def take_rows(self) -> list[Row]:
        """All admitted and running rows, removed (a failed step, or the engine stopping)."""
        rows = self.admitted + self.running
        self.admitted, self.running = [], []
        return rows

    def fail_waiting(self, err: Exception) -> None:
        """The engine stopped: every waiting or parked request gets `err`."""
        for req in list(self.waiting):
            self.waiting.remove(req)
            self.finish_waiting(req, ErrorEvent(err))
        for req in self.adapters.fail_parked(err) if self.adapters else ():
            self.finish_waiting(req, ErrorEvent(err))
