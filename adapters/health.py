"""`HealthMarks`: which adapter digests failed verification on this server, and the
`verify` that sets and clears the marks.

One owner per registry object (the local `AdapterRegistry` or an engine's
`RemoteRegistry`): the engine's reader thread marks a digest whose stored files
do not re-hash or fit the base, gRPC threads read the mark to refuse the adapter
at once. Its own lock, so a reader never waits on SQLite or the network.
"""

from __future__ import annotations

import threading

from qlora_serve.errors import FailedPrecondition


class HealthMarks:
    """Mix-in: `verify` and `mark_unusable` / `mark_usable` / `unusable_reason`,
    thread-safe. The registry mixing it in provides `_verify(record)` (its own checks
    of the stored files) and `base_fingerprint` / `allow_fingerprint_mismatch`."""

    base_fingerprint: str
    allow_fingerprint_mismatch: bool

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

    def verify(self, record) -> None:
        """Check a record is servable by this server, before loading it (`_verify`:
        its stored files, `check_base`: its base). FailedPrecondition otherwise, and
        the digest is marked unusable; a pass clears the mark."""
        try:
            self._verify(record)
        except FailedPrecondition as exc:
            self.mark_unusable(record.digest, str(exc))
            raise
        self.mark_usable(record.digest)

    def check_base(self, record) -> None:
        """FailedPrecondition when `record` was registered for another base than the
        running one (unless mismatches are allowed)."""
        if record.base_fingerprint != self.base_fingerprint and not self.allow_fingerprint_mismatch:
            raise FailedPrecondition(
                f"adapter {record.ref} was registered for base {record.base_fingerprint} but this server runs base "
                f"{self.base_fingerprint}; start the matching base, or --allow-fingerprint-mismatch")
