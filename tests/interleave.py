"""Deterministic interleavings at the adapter registry's lock boundaries.

`RegistryInterleaver` wraps a live registry's lock (every catalogue read and
write takes it) and, once armed with (k, fn), runs fn in another thread to
completion at the k-th point where a registry call of the armed operation
releases the lock (outermost release only), before that call goes on. Walking
k = 1, 2, ... until fn no longer fires visits every place where a concurrent
operation could land between two steps of the one under test: no sleeps, no
luck. The registry itself is not replaced; only the moment other work runs is
chosen.
"""

from __future__ import annotations

import threading
from typing import Callable


class RegistryInterleaver:
    """Install with `RegistryInterleaver(registry)`, undo with `remove()`."""

    def __init__(self, registry) -> None:
        self._registry = registry
        self._inner = registry._lock
        self._depth = threading.local()
        self._guard = threading.Lock()
        self._countdown = 0
        self._between: Callable[[], None] | None = None
        self.fired = False
        self.error: BaseException | None = None
        registry._lock = self

    def arm(self, k: int, between: Callable[[], None]) -> None:
        """Run `between` at the k-th outermost lock release from now (k >= 1)."""
        with self._guard:
            self._countdown, self._between, self.fired, self.error = k, between, False, None

    def disarm(self) -> None:
        with self._guard:
            self._between = None

    def __enter__(self) -> "RegistryInterleaver":
        self._inner.acquire()
        self._depth.n = getattr(self._depth, "n", 0) + 1
        return self

    def __exit__(self, *exc) -> bool:
        self._depth.n -= 1
        self._inner.release()
        if self._depth.n:
            return False
        with self._guard:
            if self._between is None:
                return False
            self._countdown -= 1
            if self._countdown > 0:
                return False
            fn, self._between = self._between, None  # disarmed: fn's own releases do not count
        thread = threading.Thread(target=self._run, args=(fn,))
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the interleaved operation did not finish"
        self.fired = True
        return False

    def _run(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except BaseException as exc:  # reported to the test through `error`
            self.error = exc

    def remove(self) -> None:
        self.disarm()
        self._registry._lock = self._inner
