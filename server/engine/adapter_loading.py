"""Adapter weights for the engine: read off the engine thread, installed on it.

Reading an adapter (disk, digest check, safetensors parse, dtype check) runs on
one reader thread; the engine thread only copies parsed weights into a device
slot between steps, so a cold load never stalls the running batch. A finished
read is held in `_ready` until its weights are installed: requests waiting for
it are served even when it does not fit the host cache, which only saves the
re-read of an adapter evicted from the device later.

Requests (and LoadAdapter calls) for an adapter that must be read first are
*parked* here, all on one read; when it ends, the engine queues the requests and
the LoadAdapter calls get their slot.

Owned by the engine thread (not thread-safe), except `read_adapter` and the
reader, which run on the reader thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from qlora_serve.adapters.peft_format import LoraAdapter, check_fits_base, load_lora_adapter
from qlora_serve.adapters.residency import Residency
from qlora_serve.server.engine.multi_lora import MultiLoRA
from qlora_serve.server.engine.request import AdapterHandle, Request
from qlora_serve.errors import Internal, NotFound, QloraServeError, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

AdapterReader = Callable[[AdapterHandle], LoraAdapter]
# Called (on the reader thread) when a read ends: (key, future, handle).
LoadDone = Callable[[str, Future, AdapterHandle], None]


@dataclass
class LoadWaiter:
    """A LoadAdapter call: parked like a request until its adapter's read ends."""

    adapter: AdapterHandle
    future: Future  # its result: the device slot


def build_lora(model, config) -> tuple[MultiLoRA, Residency]:
    """The engine's MultiLoRA and Residency from its EngineConfig: slot dtype, byte budget
    (lora_memory_bytes, or auto: a fraction of free GPU memory / a fixed CPU amount)."""
    import torch

    from qlora_serve.server.engine.config import AUTO_LORA_CPU_BYTES, AUTO_LORA_GPU_FRACTION

    lora = MultiLoRA(model, max_slots=config.max_resident_adapters, max_rank=config.max_lora_rank,
                     dtype="compute" if config.lora_dtype == "compute" else torch.float32)
    budget = config.lora_memory_bytes
    if budget == 0:
        if lora.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(lora.device)[0] * AUTO_LORA_GPU_FRACTION)
        else:
            budget = AUTO_LORA_CPU_BYTES
    return lora, Residency(config.max_resident_adapters, config.host_cache_bytes, device_bytes=budget)


class AdapterSlots:
    """Device slots (MultiLoRA + Residency), the host cache and the reads in flight."""

    def __init__(self, lora: MultiLoRA, residency: Residency, *, on_done: LoadDone, metrics=None) -> None:
        self.lora = lora
        self.residency = residency
        self.metrics = metrics
        # Settable before the engine starts: the server wraps it with a digest check.
        self.reader: AdapterReader = self.read_adapter
        self._on_done = on_done
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="adapter-load")
        self._loads: dict[str, Future] = {}  # key -> its read in flight
        self._ready: dict[str, LoraAdapter] = {}  # key -> read, not yet installed
        self._parked: dict[str, list[Request | LoadWaiter]] = {}  # key -> what waits for its read

    def read_adapter(self, handle: AdapterHandle) -> LoraAdapter:
        """Default reader (reader thread): parse from disk, check it fits this base and
        stays finite in the base's compute dtype, so a bad adapter is refused before it queues."""
        adapter = load_lora_adapter(handle.path, max_rank=self.lora.max_rank, dtype=self.lora.compute_dtype)
        check_fits_base(adapter, self.lora.linear_shapes)
        return adapter

    # -------------------------------------------------------------- reads
    def segment_order(self, slot: int) -> tuple:
        """Sort key that makes a batch's LoRA segments contiguous (MultiLoRA.segment_order)."""
        return self.lora.segment_order(slot)

    def available(self, key: str) -> bool:
        """Installable now, without a read: on the device, just read, or in the host cache."""
        return self.residency.slot_of(key) is not None or key in self._ready or self.residency.in_host(key)

    def park(self, item: Request | LoadWaiter) -> None:
        """Wait for the adapter's read (started unless one is in flight). Raises when
        the loader has shut down (nothing is parked then)."""
        handle = item.adapter
        if handle.digest not in self._loads:
            fut = self._pool.submit(self._timed_read, handle)
            self._loads[handle.digest] = fut
            if self.metrics:
                self.metrics.host_cache("miss")
            fut.add_done_callback(lambda f, k=handle.digest: self._on_done(k, f, handle))
        self._parked.setdefault(handle.digest, []).append(item)

    def parked_requests(self) -> list[Request]:
        return [r for items in self._parked.values() for r in items if isinstance(r, Request)]

    def unpark(self, req: Request) -> None:
        """The request left (cancelled, expired) before its adapter's read ended."""
        items = self._parked[req.adapter_digest]
        items[:] = [p for p in items if p is not req]

    def _timed_read(self, handle: AdapterHandle) -> tuple[LoraAdapter, float]:
        t0 = time.monotonic()
        return self.reader(handle), time.monotonic() - t0

    def finish_load(self, key: str, fut: Future, handle: AdapterHandle) -> tuple[list[Request], list[tuple[Request, Exception]]]:
        """Engine thread: a read ended. Parked LoadAdapter calls get their slot (or
        error) here; returns the parked requests to queue and those to fail, with
        their error. A read of an adapter forgotten meanwhile is dropped."""
        if self._loads.get(key) is not fut:
            return [], []  # forgotten (deleted) while reading: `forget` answered its waiters
        del self._loads[key]
        parked = self._parked.pop(key, [])
        if fut.cancelled():  # by `shutdown`, should the loop still run
            exc: BaseException | None = Unavailable("the adapter load was cancelled: the server is stopping; retry")
        else:
            exc = fut.exception()
        if exc is None:
            adapter, seconds = fut.result()
            if parked:  # else all its waiters left: only the host cache may keep it
                self._ready[key] = adapter
            evicted = self.residency.host_put(key, adapter)  # may keep nothing: _ready holds it until installed
            if self.metrics:
                self.metrics.adapter_loaded("ok", seconds)
                if evicted:
                    self.metrics.evicted("host", len(evicted))
            return self._answer(parked, None)
        if self.metrics:
            self.metrics.adapter_loaded("error", 0.0)
        log.warning("adapter %s failed to load: %s", handle.ref, exc)
        if isinstance(exc, NotFound):
            # The key is the files' digest, shared by every name/version registered with
            # the same files: only what names the version the loader found deleted
            # fails; the others get a read of their own (each round drops >= 1 handle).
            same = (handle.name, handle.version)
            retry = [p for p in parked if (p.adapter.name, p.adapter.version) != same]
            parked = [p for p in parked if (p.adapter.name, p.adapter.version) == same]
            for item in retry:
                self.park(item)
        return self._answer(parked, exc if isinstance(exc, QloraServeError) else Internal(f"adapter failed to load: {exc}"))

    def _answer(self, items: list[Request | LoadWaiter], err: Exception | None):
        """LoadAdapter calls are answered here (installed when err is None); requests go back to the engine."""
        ok, failed = [], []
        for item in items:
            if isinstance(item, LoadWaiter):
                if err is None:
                    self._install_for(item)
                else:
                    item.future.set_exception(err)
            elif err is None:
                ok.append(item)
            else:
                failed.append((item, err))
        return ok, failed

    def load(self, waiter: LoadWaiter) -> None:
        """A LoadAdapter call: install now when the weights are on the host, else park it.
        An explicit load also cancels an unload that waits for the adapter to go idle."""
        key = waiter.adapter.digest
        if self.residency.slot_of(key) is not None:
            self.residency.unload_when_idle(key, False)
        if self.available(key):
            self._install_for(waiter)
        else:
            self.park(waiter)

    def _install_for(self, waiter: LoadWaiter) -> None:
        try:
            slot = self.install(waiter.adapter.digest)
            if slot is None:
                raise ResourceExhausted(
                    f"the device's adapter slots ({self.lora.max_slots}) or LoRA memory ({self.residency.device_bytes} "
                    "bytes) are held by adapters of running requests; retry later or raise --max-resident-adapters "
                    "or --lora-memory-bytes")
        except Exception as exc:
            waiter.future.set_exception(exc)
        else:
            waiter.future.set_result(slot)

    def drop_unclaimed(self, wanted: set[str]) -> None:
        """Forget ready reads no waiting request needs any more (they all expired)."""
        for key in [k for k in self._ready if k not in wanted]:
            del self._ready[key]

    # -------------------------------------------------------------- slots
    def install(self, key: str) -> int | None:
        """The device slot holding `key`, installing its read weights when needed.
        None when every slot is pinned by running rows. The caller checked `available`.
        Raises when the weights cannot be installed (the slot then keeps its old contents)."""
        slot = self.residency.slot_of(key)
        if slot is not None:
            self.residency.touch(key)
            return slot
        adapter = self._ready.get(key) or self.residency.host_get(key)
        nbytes = self.lora.footprint(adapter)
        if not self.residency.fits_ever(nbytes):
            raise ResourceExhausted(
                f"adapter needs {nbytes} bytes of device memory, more than the whole LoRA budget of "
                f"{self.residency.device_bytes} bytes; raise --lora-memory-bytes")
        victims = self.residency.make_room(key, nbytes)
        if victims is None:
            return None
        for victim in victims:
            self.lora.unload(self.residency.release(victim))
        slot = self.residency.free_slot()
        self._ready.pop(key, None)
        self.lora.load(slot, adapter)  # raises before writing anything when the adapter is refused
        self.residency.assign(key, slot, nbytes)
        if self.metrics and victims:
            self.metrics.evicted("device", len(victims))
        self._set_resident_gauge()
        return slot

    def pin(self, key: str) -> None:
        self.residency.pin(key)

    def unpin(self, key: str) -> None:
        """A row using `key` left the batch; the adapter leaves the device if it was asked to."""
        if self.residency.slot_of(key) is not None and self.residency.unpin(key):
            self.unload(key)

    def unload(self, key: str) -> bool:
        """Free the adapter's slot, now if idle, else when its last row ends. True when it left now."""
        if self.residency.slot_of(key) is None:
            return True
        if self.residency.pins(key):
            self.residency.unload_when_idle(key)
            return False
        self.lora.unload(self.residency.release(key))
        self._set_resident_gauge()
        return True

    def forget(self, key: str) -> list[tuple[Request, Exception]]:
        """The adapter was deleted: drop its weights everywhere (device: once idle) and
        the result of a read of it in flight. What waited for that read gets NOT_FOUND
        (LoadAdapter calls here; the requests are returned, with their error)."""
        self._loads.pop(key, None)
        self._ready.pop(key, None)
        self.residency.host_drop(key)
        self.unload(key)
        failed = []
        for item in self._parked.pop(key, []):
            err = NotFound(f"adapter {item.adapter.ref} was deleted before it could be loaded; register it again")
            failed += self._answer([item], err)[1]
        return failed

    def fail_parked(self, err: Exception) -> list[Request]:
        """The engine stopped: parked LoadAdapter calls get `err`; returns the parked requests."""
        parked = [item for items in self._parked.values() for item in items]
        self._parked.clear()
        return [req for req, _ in self._answer(parked, err)[1]]

    def shutdown(self) -> None:
        """Cancel reads not started (their waiters were answered by `fail_parked`)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _set_resident_gauge(self) -> None:
        if self.metrics:
            self.metrics.set_resident(len(self.residency.resident_keys()))
            self.metrics.set_lora_bytes(self.lora.nbytes())

    def report_capacity(self) -> str:
        """Start-up report (log line and /metrics gauges): the LoRA budget and how many
        adapters of typical ranks (targeting every Linear) fit it."""
        budget = self.residency.device_bytes
        fit = {r: min(self.lora.max_slots, budget // self.lora.full_footprint(r)) for r in (8, 16, 64) if r <= self.lora.max_rank}
        if self.metrics:
            self.metrics.set_lora_capacity(budget, fit)
            self.metrics.set_lora_bytes(self.lora.nbytes())
        return (f"LoRA device memory: budget {budget / 2**20:.0f} MiB in {self.lora.dtype}, up to {self.lora.max_slots} "
                "adapters; all-linear adapters that fit: " + ", ".join(f"r={r}: {n}" for r, n in fit.items()))
