"""The registry's change log: every committed change of the catalogue, numbered, for
watchers (engine replicas that cache names, see server/remote_registry.py).

In memory, per process: `epoch` is a new random id each time a registry opens, and
`sequence` counts changes from 1 within it. A watcher resumes with (epoch, sequence);
a different epoch (the registry restarted) or a sequence older than the retained tail
means it cannot replay and must drop what it cached (`since` returns None). That is
all a watcher needs: the catalogue itself is durable; the log only says what to forget.
"""

from __future__ import annotations

import secrets
import threading
from collections import deque
from dataclasses import dataclass

RETAINED_CHANGES = 10_000  # changes kept for replay; an older resume point means "reset"

REGISTERED, DELETED, ALIAS_SET, ALIAS_DELETED = "registered", "deleted", "alias_set", "alias_deleted"


@dataclass(frozen=True)
class Change:
    """One committed change. kind: REGISTERED, DELETED, ALIAS_SET or ALIAS_DELETED.
    digest_gone (DELETED): no registered version uses `digest` any more."""

    sequence: int
    kind: str
    name: str
    version: int = 0
    alias: str = ""
    digest: str = ""
    digest_gone: bool = False


class ChangeLog:
    """Append-only, bounded, thread-safe; `wait` blocks until a change after a sequence."""

    def __init__(self, retained: int = RETAINED_CHANGES) -> None:
        self.epoch = secrets.token_hex(8)
        self._changes: deque[Change] = deque(maxlen=retained)
        self._last = 0
        self._cond = threading.Condition()

    @property
    def last(self) -> int:
        """The sequence of the last change (0 = none yet)."""
        with self._cond:
            return self._last

    def append(self, kind: str, name: str, **fields) -> Change:
        """Record a change that has just committed (call in commit order)."""
        with self._cond:
            self._last += 1
            change = Change(self._last, kind, name, **fields)
            self._changes.append(change)
            self._cond.notify_all()
            return change

    def since(self, epoch: str, sequence: int) -> list[Change] | None:
        """The changes after `sequence` of `epoch`, or None when they cannot be replayed
        (another epoch, or older than the retained tail): the watcher must reset."""
        with self._cond:
            if epoch != self.epoch or sequence > self._last:
                return None
            if sequence < self._last and (not self._changes or self._changes[0].sequence > sequence + 1):
                return None
            return [c for c in self._changes if c.sequence > sequence]

    def wait(self, sequence: int, timeout_s: float) -> list[Change]:
        """The changes after `sequence` (this epoch), waiting up to `timeout_s` seconds for one."""
        with self._cond:
            self._cond.wait_for(lambda: self._last > sequence, timeout=timeout_s)
            return [c for c in self._changes if c.sequence > sequence]
