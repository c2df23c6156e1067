"""`HealthMarks`: which adapter digests failed verification on this server.

One owner per registry object (the local `AdapterRegistry` or an engine's
`RemoteRegistry`): the engine's reader thread marks a digest whose stored files
do not re-hash or fit the base, gRPC threads read the mark to refuse the adapter
at once. Its own lock, so a reader never waits on SQLite or the network.
"""

from __future__ import annotations

import threading


class HealthMarks:
    """Mix-in: `mark_unusable` / `mark_usable` / `unusable_reason`, thread-safe."""

    def __init__(self) -> None:
        self._unusable: dict[str, str] = {}  # digest -> why its files cannot be served
        self._health_lock = threading.Lock()

    def mark_unusable(self, digest: str, reason: str) -> None:
        """Record that `digest`'s stored files cannot be served (`reason` says why);
        inference refuses it at once until it verifies again, is registered again
        (which re-commits its files) or is deleted."""
        with self._health_lock:
            self._unusable[digest] = reason

    def mark_usable(self, digest: str) -> None:
        """Clear `digest`'s unusable mark, if any."""
        with self._health_lock:
            self._unusable.pop(digest, None)

    def unusable_reason(self, digest: str) -> str | None:
        """Why `digest` is marked unusable, or None when it is not."""
        with self._health_lock:
            return self._unusable.get(digest)
