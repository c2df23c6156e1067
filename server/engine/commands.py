"""What crosses between threads and the engine thread, typed.

Commands: handler threads (and the adapter reader thread) put one of these in the
engine's inbox; the engine thread applies them between steps, dispatching on the
type. Each is a small frozen dataclass; a command that answers carries its Future.

EngineSnapshot: what other threads read of the engine's state. The engine thread
builds a new one after each phase of a step (and before it answers a command) and
replaces the reference in one assignment, so a reader never sees a half-updated
table and never touches engine-thread state (the residency table, the batch).
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Union

from qlora_serve.server.engine.adapter_loading import LoadWaiter
from qlora_serve.server.engine.request import AdapterHandle, Request


@dataclass(frozen=True)
class Submit:
    """Queue a request (its place in the bound was taken by `Engine.submit`)."""

    request: Request


@dataclass(frozen=True)
class Cancel:
    """The client went away: the request leaves within one step, wherever it is."""

    request: Request


@dataclass(frozen=True)
class Call:
    """Run `fn()` on the engine thread between steps; `future` gets its result."""

    fn: Callable[[], object]
    future: Future


@dataclass(frozen=True)
class Load:
    """LoadAdapter: put an adapter in a device slot (the waiter's future gets the slot)."""

    waiter: LoadWaiter


@dataclass(frozen=True)
class Loaded:
    """The reader thread finished reading an adapter (`future` holds the read)."""

    key: str
    future: Future
    handle: AdapterHandle


@dataclass(frozen=True)
class Stop:
    """End the loop; commands still in the inbox are refused (UNAVAILABLE)."""


Command = Union[Submit, Cancel, Call, Load, Loaded, Stop]


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state as of its last publish (read from any thread).

    running: rows in the batch.  queued: requests submitted, not yet running.
    device_adapters / host_adapters: digests with weights in a device slot / in the
    host cache.  kv_bytes: bytes of the KV pool (capacity, all layers).
    lora_bytes: device bytes held by resident adapters' LoRA weights.
    """

    running: int = 0
    queued: int = 0
    device_adapters: frozenset[str] = frozenset()
    host_adapters: frozenset[str] = frozenset()
    kv_bytes: int = 0
    lora_bytes: int = 0

    def residency(self, digest: str) -> str:
        """Where an adapter's weights are: "device", "host" or "disk"."""
        if digest in self.device_adapters:
            return "device"
        return "host" if digest in self.host_adapters else "disk"
