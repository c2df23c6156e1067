"""The adapter registry of a `qlora-serve serve --role registry` server, read over gRPC:
what an engine server (`serve --registry-address`) or a Ray replica uses instead of a
local `AdapterRegistry`, with the same reader methods (resolve, owner_of, get, list,
aliases, verify, adapter health) that the runtime, the engine's reader and the
servicers call.

- Names: a name's versions and aliases (one ListAdapters snapshot) are cached for at
  most `ttl_s` seconds, and dropped as soon as the registry's change stream
  (WatchRegistry) reports a change of that name. A delete or an alias move therefore
  reaches new requests once its event arrives (the network's latency), and after at
  most `ttl_s` seconds while the stream is down. A read that raced an event is not cached.
- Files: fetched by digest (DownloadAdapter) into `cache_dir/store/<digest>` on first
  use, on the engine's reader thread, and re-hashed against the digest before every
  load, as the local registry verifies its store.
- Deletes: a DELETED event whose digest no version uses any more calls `on_gone(digest)`
  (the engine drops the weights between steps; running requests keep theirs) and
  removes the cached files.
- The stream reconnects with exponential backoff and resumes after the last change it
  applied; when it cannot (the registry restarted: a new epoch), every cached name is
  dropped and cached files the catalogue no longer names are forgotten.
Writes (register, alias, delete) are refused: they belong to the registry server.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from qlora_serve.adapters.catalogue import not_found, pick_version, version_ref
from qlora_serve.adapters.health import HealthMarks
from qlora_serve.adapters.layout import ADAPTER_FILES
from qlora_serve.adapters.records import AdapterRecord, parse_ref, validate_name
from qlora_serve.adapters.store import DIGEST_RE, ContentStore, manifest_digest
from qlora_serve.errors import FailedPrecondition, InvalidArgument, NotFound, QloraServeError, Unavailable
from qlora_serve.v1 import registry_pb2, registry_pb2_grpc

log = logging.getLogger(__name__)

KEY_ENV = "QLORA_SERVE_REGISTRY_KEY"  # the service key replicas send to the registry
_CALL_TIMEOUT_S = 10.0  # one catalogue read
_DOWNLOAD_TIMEOUT_S = 600.0  # one adapter's files
_BACKOFF_S = (0.1, 5.0)  # reconnect delay: first, most (doubling, with jitter)
_STALL_S = 15.0  # no message (not even a heartbeat, sent every few seconds) for this long: reconnect
_MAX_NAMES = 10_000  # cached names, oldest dropped first (unknown names are cached too)
_Kind = registry_pb2.RegistryEventKind


class RemoteRegistry(HealthMarks):
    """Reads the registry at `address` with `api_key` (an admin key of the registry's key
    file; None when its auth is off). cache_dir: where fetched adapter files live.
    base_fingerprint / allow_fingerprint_mismatch: as AdapterRegistry (checked in verify).
    ttl_s: seconds a cached name is trusted without news. max_upload_bytes: reported to
    the servicer (uploads are refused here anyway)."""

    read_only = True

    def __init__(self, address: str, *, api_key: str | None, cache_dir: str | os.PathLike, base_fingerprint: str,
                 allow_fingerprint_mismatch: bool = False, ttl_s: float = 5.0, max_upload_bytes: int = 0,
                 max_message_bytes: int = 8 << 20) -> None:
        self.address = address
        self.data_dir = Path(cache_dir)
        self.base_fingerprint = base_fingerprint
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self.ttl_s = ttl_s
        self.max_upload_bytes = max_upload_bytes
        self.on_gone: Callable[[str], object] = lambda digest: None  # set to the engine's forget
        self._md = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", max_message_bytes)])
        self._stub = registry_pb2_grpc.AdapterRegistryStub(self._channel)
        self._files = ContentStore(self.data_dir)
        self._files.gc({p.name for p in self._files.root.iterdir()})  # empty tmp/, keep fetched files
        self._lock = threading.Lock()
        self._names: dict[str, tuple[float, tuple[AdapterRecord, ...]]] = {}  # name -> (fetched at, its versions)
        self._changed: dict[str, int] = {}  # name -> events seen for it (a read that raced one is not cached)
        self._resets = 0
        self._catalogue: tuple[float, list[AdapterRecord]] | None = None  # (fetched at, every record)
        self._events = 0  # every change and reset seen (the catalogue read that raced one is not cached)
        self._fetch_lock = threading.Lock()  # one download at a time
        HealthMarks.__init__(self)
        self._epoch, self._seq = "", 0  # the last change applied
        self._closed = threading.Event()
        self._synced = threading.Event()  # the change stream is connected (its first message came)
        self._refused: str | None = None
        self._call = None
        self._heard = time.monotonic()
        self._watcher = threading.Thread(target=self._watch, name="registry-watch", daemon=True)
        self._watcher.start()

    # ------------------------------------------------------------ lifecycle
    def wait_connected(self, timeout_s: float) -> bool:
        """Wait for the change stream; FailedPrecondition when the registry refuses our key."""
        end = time.monotonic() + timeout_s
        while not self._synced.wait(0.05):
            if self._refused is not None:
                raise FailedPrecondition(self._refused)
            if time.monotonic() > end:
                return False
        return True

    def close(self) -> None:
        """Stop following the registry. Idempotent."""
        self._closed.set()
        call = self._call
        if call is not None:
            call.cancel()
        self._channel.close()

    # ---------------------------------------------------------------- names
    def _rpc_error(self, exc: grpc.RpcError) -> QloraServeError:
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.NOT_FOUND:
            return NotFound(details)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(details)
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.error("the adapter registry at %s refused this server's key: %s", self.address, details)
            return FailedPrecondition("this server's key for the adapter registry is refused; the operator must set "
                                      f"--registry-key-file or ${KEY_ENV} to an admin key of the registry's key file")
        log.warning("adapter registry at %s: %s %s", self.address, code.name, details)
        return Unavailable("the adapter registry is unreachable; retry in a few seconds")

    def _record(self, info: registry_pb2.AdapterInfo) -> AdapterRecord:
        if not DIGEST_RE.match(info.digest):  # it names a directory here: never a path
            raise Unavailable("the adapter registry sent a malformed digest; check that it runs this qlora-serve version")
        return AdapterRecord(
            name=info.name, version=info.version, digest=info.digest, source=info.source,
            base_fingerprint=info.base_fingerprint, rank=info.rank, alpha=info.alpha,
            target_modules=tuple(info.target_modules), size_bytes=info.size_bytes, created_at=info.created_at,
            owner=info.owner or None, labels=dict(info.labels), path=self._files.path(info.digest),
            aliases=tuple(sorted(info.aliases)))

    def _fetch(self, name: str = "") -> list[AdapterRecord]:
        try:
            resp = self._stub.ListAdapters(registry_pb2.ListAdaptersRequest(name=name), metadata=self._md,
                                           timeout=_CALL_TIMEOUT_S)
        except grpc.RpcError as exc:
            raise self._rpc_error(exc) from None
        return [self._record(i) for i in resp.adapters]

    def _versions_of(self, name: str) -> tuple[AdapterRecord, ...]:
        """The name's versions (ascending), cached for ttl_s unless an event drops them."""
        now = time.monotonic()
        with self._lock:
            hit = self._names.get(name)
            if hit is not None and now - hit[0] < self.ttl_s:
                return hit[1]
            seen = (self._resets, self._changed.get(name, 0))
        records = tuple(self._fetch(name))
        with self._lock:
            if seen == (self._resets, self._changed.get(name, 0)):  # no event since the read began
                self._names.pop(name, None)
                self._names[name] = (now, records)
                if len(self._names) > _MAX_NAMES:
                    self._names.pop(next(iter(self._names)))
        return records

    def resolve(self, ref: str) -> AdapterRecord:
        """As AdapterRegistry.resolve: "name", "name@3", "name@latest" or "name@<alias>"."""
        name, selector = parse_ref(ref)
        records = self._versions_of(name)
        if not records:
            raise not_found(name)
        aliases = {a: r.version for r in records for a in r.aliases}
        version = pick_version(name, selector, [r.version for r in records], aliases)
        return next(r for r in records if r.version == version)

    def owner_of(self, ref: str) -> str | None:
        """The owner of the name a ref names (None = public); NotFound naming only the name."""
        name, _ = parse_ref(ref)
        records = self._versions_of(name)
        if not records:
            raise not_found(name)
        return records[0].owner

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """`name@version`, or what plain `name` resolves to when version is None."""
        return self.resolve(version_ref(name, version))

    def aliases(self, name: str) -> dict[str, int]:
        """{alias: version} of `name`; NotFound for an unknown name."""
        records = self._versions_of(validate_name(name))
        if not records:
            raise not_found(name)
        return dict(sorted((a, r.version) for r in records for a in r.aliases))

    def list(self, *, name: str | None = None, owner: str | None = None, include_public: bool = True) -> list[AdapterRecord]:
        """As AdapterRegistry.list. The whole catalogue is cached as a name is (ttl_s, dropped
        by any event): replicas read it every second for their routing stats."""
        if name is not None:
            records = list(self._versions_of(validate_name(name)))
        else:
            now = time.monotonic()
            with self._lock:
                hit = self._catalogue
                seen = self._events
            if hit is not None and now - hit[0] < self.ttl_s:
                records = hit[1]
            else:
                records = self._fetch()
                with self._lock:
                    if seen == self._events:
                        self._catalogue = (now, records)
        return [r for r in records if owner is None or r.owner == owner or (include_public and r.owner is None)]

    def invalidate(self, name: str) -> None:
        """Drop `name` (and the catalogue) from the cache now, as its change event will:
        a write this server forwarded to the registry is seen by its next request."""
        with self._lock:
            self._names.pop(name, None)
            self._changed[name] = self._changed.get(name, 0) + 1  # a read racing this one is not cached
            self._events += 1
            self._catalogue = None

    def _refuse_write(self, *_, **__):
        raise FailedPrecondition("this server follows the adapter registry of another server (--registry-address): "
                                 "register, alias and delete adapters there")

    register_path = register_files = set_alias = delete_alias = delete = _refuse_write

    # ---------------------------------------------------------------- files
    def _verify(self, record: AdapterRecord) -> None:
        """For `verify`: fetch the record's files when not cached here, and check them
        as AdapterRegistry does."""
        self.check_base(record)
        with self._fetch_lock:
            for attempt in (1, 2):
                if not record.path.is_dir():
                    self._download(record)
                try:
                    actual = self._files.digest_of(record.path)
                    if actual == record.digest or self._files.digest_of(record.path, every_file=True) == record.digest:
                        return
                except OSError:
                    pass
                log.warning("cached files of %s do not match digest %s: fetching them again", record.ref, record.digest[:12])
                self._files.remove(record.digest)
            raise FailedPrecondition(f"adapter {record.ref}: the files the registry sent do not match digest "
                                     f"{record.digest[:12]}...; delete this version and register it again")

    def _download(self, record: AdapterRecord) -> None:
        """Fetch a digest's files into the cache (atomic rename); they are checked after."""
        staged = self._files.new_stage()
        try:
            sizes: dict[str, int] = {}
            hashers: dict[str, "hashlib._Hash"] = {}
            handles = {}
            try:
                for chunk in self._stub.DownloadAdapter(registry_pb2.DownloadAdapterRequest(digest=record.digest),
                                                        metadata=self._md, timeout=_DOWNLOAD_TIMEOUT_S):
                    if chunk.filename not in ADAPTER_FILES:  # never a path: only the names a store holds
                        raise FailedPrecondition(f"the registry sent file {chunk.filename[:64]!r}, not an adapter file")
                    if chunk.filename not in handles:
                        handles[chunk.filename] = open(staged.dir / chunk.filename, "wb")
                        hashers[chunk.filename], sizes[chunk.filename] = hashlib.sha256(), 0
                    sizes[chunk.filename] += len(chunk.data)
                    if sum(sizes.values()) > record.size_bytes:
                        raise FailedPrecondition(f"the registry sent more than {record.size_bytes} bytes for {record.ref}")
                    hashers[chunk.filename].update(chunk.data)
                    handles[chunk.filename].write(chunk.data)
            except grpc.RpcError as exc:
                raise self._rpc_error(exc) from None
            finally:
                for f in handles.values():
                    f.close()
            files = {n: (sizes[n], hashers[n].hexdigest()) for n in sizes}
            if record.digest not in (manifest_digest(files), manifest_digest(files, every_file=True)):
                raise FailedPrecondition(f"adapter {record.ref}: the files the registry sent do not match digest "
                                         f"{record.digest[:12]}...; delete this version and register it again")
            try:
                os.replace(staged.dir, record.path)
            except OSError:  # another process sharing this cache put them there first: checked after
                if not record.path.is_dir():
                    raise
        finally:
            self._files.discard(staged)

    def _forget_files(self, digest: str) -> None:
        """A digest no registered version uses: the engine drops it, then its cached files go."""
        self.on_gone(digest)
        # Not under _fetch_lock: a long download must not hold up the events. A download of
        # this digest racing the removal gets NOT_FOUND from the registry, or re-creates
        # files that a later reset's reconcile removes.
        self._files.remove(digest)
        self.mark_usable(digest)

    # --------------------------------------------------------------- events
    def _watch(self) -> None:
        """Follow WatchRegistry until closed: apply events, reconnect with backoff."""
        delay = _BACKOFF_S[0]
        threading.Thread(target=self._watchdog, name="registry-watchdog", daemon=True).start()
        while not self._closed.is_set():
            try:
                self._call = self._stub.WatchRegistry(
                    registry_pb2.WatchRegistryRequest(after_sequence=self._seq, epoch=self._epoch), metadata=self._md)
                for event in self._call:
                    self._heard = time.monotonic()
                    self._apply(event)
                    delay = _BACKOFF_S[0]
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    self._refused = str(self._rpc_error(exc))
                elif not self._closed.is_set() and self._synced.is_set():
                    log.warning("change stream of the adapter registry at %s broke (%s); reconnecting",
                                self.address, exc.code().name)
            except QloraServeError as exc:  # the reconcile after a reset could not read the catalogue
                log.warning("adapter registry at %s: %s; reconnecting", self.address, exc)
            except Exception:  # never let the follower die (a closed channel, a file that would not go)
                if not self._closed.is_set():
                    log.exception("following the adapter registry at %s failed; reconnecting", self.address)
            self._synced.clear()
            self._closed.wait(delay * random.uniform(1.0, 1.5))
            delay = min(delay * 2, _BACKOFF_S[1])

    def _watchdog(self) -> None:
        """A link that died without a reset (no heartbeat for _STALL_S): cancel, so `_watch` reconnects."""
        while not self._closed.wait(_STALL_S / 3):
            call = self._call
            if self._synced.is_set() and call is not None and time.monotonic() - self._heard > _STALL_S:
                log.warning("no news from the adapter registry at %s for %.0f s; reconnecting", self.address, _STALL_S)
                call.cancel()

    def _apply(self, event: registry_pb2.RegistryEvent) -> None:
        if event.kind == _Kind.REGISTRY_EVENT_KIND_SYNC:
            if event.reset:
                with self._lock:
                    self._names.clear()
                    self._resets += 1
                    self._events += 1
                    self._catalogue = None
                self._reconcile()
                self._epoch, self._seq = event.epoch, event.sequence
            self._synced.set()
            self._refused = None
            log.info("following the adapter registry at %s (change %d%s)", self.address, self._seq,
                     ", caches dropped" if event.reset else "")
        elif event.kind != _Kind.REGISTRY_EVENT_KIND_HEARTBEAT:
            self.invalidate(event.name)
            if event.kind == _Kind.REGISTRY_EVENT_KIND_DELETED and event.digest_gone and DIGEST_RE.match(event.digest):
                self._forget_files(event.digest)
            elif event.kind == _Kind.REGISTRY_EVENT_KIND_REGISTERED:
                self.mark_usable(event.digest)  # registered again: its next load verifies it again
            self._seq = event.sequence

    def _reconcile(self) -> None:
        """After a reset: forget cached files whose digest no registered version uses."""
        registered = {r.digest for r in self._fetch()}
        for entry in list(self._files.root.iterdir()):
            if DIGEST_RE.match(entry.name) and entry.name not in registered:
                self._forget_files(entry.name)


__all__ = ["KEY_ENV", "RemoteRegistry"]
