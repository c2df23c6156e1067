"""gRPC AdapterRegistry service: the registry (SQLite + store) plus device residency.

Access rules (auth on): a client tenant sees and uses its own adapters and
public ones (no owner); it registers adapters it will own; alias, delete and
unload need ownership or the admin role; load needs read access; DownloadAdapter and
WatchRegistry (what engine servers following this registry call) need the admin role.
With auth off every caller is an admin. A `--role registry` server has no engine:
residency is "disk" and load/unload are FAILED_PRECONDITION.
"""

from __future__ import annotations

import time
from concurrent.futures import CancelledError, Future

from qlora_serve.adapters import changes
from qlora_serve.adapters.records import AdapterRecord
from qlora_serve.server.auth import Principal, can_read_adapter, check_adapter_access, require_admin
from qlora_serve.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable
from qlora_serve.server.runtime import handle_of, streaming_rpc, unary_rpc
from qlora_serve.v1 import registry_pb2, registry_pb2_grpc

DOWNLOAD_CHUNK_BYTES = 1 << 20  # well under the default 8 MiB message limit
WATCH_POLL_S = 0.25  # a watch notices shutdown within this
WATCH_HEARTBEAT_S = 5.0  # an idle watch sends a heartbeat this often (watchers reconnect after 15 s of silence)
_SYNC = registry_pb2.REGISTRY_EVENT_KIND_SYNC
_HEARTBEAT = registry_pb2.REGISTRY_EVENT_KIND_HEARTBEAT
_KINDS = {changes.REGISTERED: registry_pb2.REGISTRY_EVENT_KIND_REGISTERED,
          changes.DELETED: registry_pb2.REGISTRY_EVENT_KIND_DELETED,
          changes.ALIAS_SET: registry_pb2.REGISTRY_EVENT_KIND_ALIAS_SET,
          changes.ALIAS_DELETED: registry_pb2.REGISTRY_EVENT_KIND_ALIAS_DELETED}
_ENGINE_CALL_TIMEOUT_S = 120.0  # a device load waits for the current step and a disk read
_RESIDENCY = {"device": registry_pb2.RESIDENCY_DEVICE, "host": registry_pb2.RESIDENCY_HOST,
              "disk": registry_pb2.RESIDENCY_DISK}


class RegistryService(registry_pb2_grpc.AdapterRegistryServicer):
    """Implements qlora_serve.v1.AdapterRegistry."""

    def __init__(self, runtime) -> None:
        self._rt = runtime

    # ------------------------------------------------------------ helpers
    def _info(self, rec: AdapterRecord) -> registry_pb2.AdapterInfo:
        """The record as the API shows it. Its aliases come with the record (read in the
        same transaction), never from a second read that a concurrent delete could fail."""
        # The engine's published snapshot: residency is engine-thread state, never read live here.
        # A registry server (no engine) holds every adapter on disk only.
        engine = self._rt.engine
        residency = _RESIDENCY[engine.snapshot().residency(rec.digest) if engine is not None else "disk"]
        return registry_pb2.AdapterInfo(
            name=rec.name, version=rec.version, digest=rec.digest, source=rec.source,
            base_fingerprint=rec.base_fingerprint, rank=rec.rank, alpha=rec.alpha,
            target_modules=list(rec.target_modules), size_bytes=rec.size_bytes, created_at=rec.created_at,
            owner=rec.owner or "", labels=rec.labels, aliases=list(rec.aliases), residency=residency,
            unusable_reason=self._rt.registry.unusable_reason(rec.digest) or "")

    def _owner_for_new(self, principal: Principal, name: str, requested: str, public: bool) -> str | None:
        """Who will own a new version (None = public): the name's existing owner
        must match; a client tenant can only register for itself; only an admin
        registers public adapters."""
        if public:
            if requested:
                raise InvalidArgument("set either public or owner, not both")
            require_admin(principal, "registering a public adapter")
            owner = None
        else:
            owner = requested or (principal.tenant if self._rt.auth.enabled else None)
        if not principal.is_admin and owner != principal.tenant:
            raise PermissionDenied(f"tenant {principal.tenant!r} can only register adapters it owns; "
                                   f"leave owner empty or set it to {principal.tenant!r}")
        existing = self._rt.registry.list(name=name) if name else []
        if existing:
            check_adapter_access(principal, existing[0].owner, write=True, adapter=f"adapter {name!r}")
        return owner

    def _writable(self, principal: Principal, name: str) -> list[AdapterRecord]:
        records = self._rt.registry.list(name=name)
        if not records:
            self._rt.registry.get(name)  # raises the registry's NOT_FOUND message
        check_adapter_access(principal, records[0].owner, write=True, adapter=f"adapter {name!r}")
        return records

    def _engine(self):
        if self._rt.engine is None:
            raise FailedPrecondition("this is a registry server (--role registry): it has no engine; load and "
                                     "unload adapters on the engine servers that follow it")
        return self._rt.engine

    def _store(self):
        """The local registry whose change log and files engine servers follow."""
        registry = self._rt.registry
        if getattr(registry, "changes", None) is None:
            raise FailedPrecondition("this server follows another server's adapter registry (--registry-address): "
                                     "watch and download there")
        return registry

    @staticmethod
    def _wait(fut: Future, what: str):
        """The engine's answer; UNAVAILABLE (not INTERNAL) when it is stuck or stopping."""
        try:
            return fut.result(timeout=_ENGINE_CALL_TIMEOUT_S)
        except (TimeoutError, CancelledError):
            raise Unavailable(f"{what}: the engine did not answer within {_ENGINE_CALL_TIMEOUT_S:.0f} s "
                              "(overloaded or shutting down); retry later") from None

    # --------------------------------------------------------------- RPCs
    @unary_rpc
    def RegisterAdapter(self, request, context, principal):
        if not request.path:
            raise InvalidArgument("path is empty: give a directory on the server inside an --allowed-adapter-root")
        owner = self._owner_for_new(principal, request.name, request.owner, request.public)
        rec = self._rt.registry.register_path(request.name, request.path, owner=owner, labels=dict(request.labels),
                                              set_default=request.set_default)
        return self._info(rec)

    @unary_rpc
    def UploadAdapter(self, request_iterator, context, principal):
        limit = self._rt.registry.max_upload_bytes
        header, files, total = None, {}, 0
        for msg in request_iterator:
            part = msg.WhichOneof("part")
            if part == "header":
                if header is not None:
                    raise InvalidArgument("upload has two headers; send one header, then file chunks")
                header = msg.header
            elif part == "chunk":
                if header is None:
                    raise InvalidArgument("upload must start with a header message (name, owner, labels)")
                total += len(msg.chunk.data)
                if total > limit:  # stop reading at the limit, not after buffering it all
                    raise ResourceExhausted(f"upload exceeds {limit} bytes (--max-upload-bytes)")
                files.setdefault(msg.chunk.filename, bytearray()).extend(msg.chunk.data)
            else:
                raise InvalidArgument("empty upload message: set header or chunk")
        if header is None:
            raise InvalidArgument("empty upload: send a header, then the adapter's files")
        owner = self._owner_for_new(principal, header.name, header.owner, header.public)
        rec = self._rt.registry.register_files(header.name, {k: bytes(v) for k, v in files.items()}, owner=owner,
                                               labels=dict(header.labels), set_default=header.set_default)
        return self._info(rec)

    @unary_rpc
    def ListAdapters(self, request, context, principal):
        # One snapshot of the catalogue, aliases included: a name deleted meanwhile is listed whole or not at all.
        records = [r for r in self._rt.registry.list(name=request.name or None) if can_read_adapter(principal, r.owner)]
        return registry_pb2.ListAdaptersResponse(adapters=[self._info(r) for r in records])

    @unary_rpc
    def GetAdapter(self, request, context, principal):
        return self._info(self._rt.resolve_record(request.adapter, principal))

    @unary_rpc
    def SetAlias(self, request, context, principal):
        self._writable(principal, request.name)
        return self._info(self._rt.registry.set_alias(request.name, request.alias, request.version))

    @unary_rpc
    def DeleteAdapter(self, request, context, principal):
        self._writable(principal, request.name)
        deleted = self._rt.registry.delete(request.name, request.version or None)
        still_used = {r.digest for r in self._rt.registry.list()}
        gone = [r.digest for r in deleted if r.digest not in still_used]
        # Committed: the engine drops the weights between steps (idempotent; running
        # requests keep theirs until they finish). Not awaited: the delete is done.
        for d in gone:
            if self._rt.engine is not None:  # engine servers following this registry hear it as an event
                self._rt.engine.forget(d)
        return registry_pb2.DeleteAdapterResponse(deleted=[
            registry_pb2.AdapterInfo(name=r.name, version=r.version, digest=r.digest, owner=r.owner or "")
            for r in deleted])

    @unary_rpc
    def LoadAdapter(self, request, context, principal):
        rec = self._rt.resolve_record(request.adapter, principal)
        # Read on the engine's reader thread (shared with requests waiting for it); only
        # the copy into a slot runs between engine steps.
        self._wait(self._engine().load_adapter(handle_of(rec)), f"loading adapter {request.adapter!r}")
        return self._info(rec)

    @unary_rpc
    def UnloadAdapter(self, request, context, principal):
        rec = self._rt.resolve_record(request.adapter, principal)
        check_adapter_access(principal, rec.owner, write=True, adapter=f"adapter {request.adapter!r}")
        self._wait(self._engine().unload(rec.digest), f"unloading adapter {request.adapter!r}")
        return self._info(rec)

    # ------------------------------------------------- engine servers' RPCs
    @streaming_rpc
    def DownloadAdapter(self, request, context, principal):
        require_admin(principal, "downloading adapter files by digest")
        directory = self._store().stored_path(request.digest)
        try:
            for path in sorted(directory.iterdir()):
                with open(path, "rb") as f:
                    data = f.read(DOWNLOAD_CHUNK_BYTES)
                    yield registry_pb2.FileChunk(filename=path.name, data=data)  # an empty file: one empty chunk
                    while data := f.read(DOWNLOAD_CHUNK_BYTES):
                        yield registry_pb2.FileChunk(filename=path.name, data=data)
        except FileNotFoundError:  # deleted while streaming
            raise NotFound(f"adapter files {request.digest[:12]}... were deleted meanwhile; resolve the name again") from None

    @streaming_rpc
    def WatchRegistry(self, request, context, principal):
        require_admin(principal, "watching the registry's changes")
        changes = self._store().changes
        last = changes.last
        replay = changes.since(request.epoch, request.after_sequence) if request.epoch else None
        seq = request.after_sequence if replay is not None else last
        yield registry_pb2.RegistryEvent(sequence=last, epoch=changes.epoch, kind=_SYNC, reset=replay is None)
        beat = time.monotonic()
        while not self._rt.draining and context.is_active():
            batch = changes.wait(seq, WATCH_POLL_S)
            if batch and batch[0].sequence != seq + 1:
                return  # fell behind the retained log: the watcher reconnects and resets
            for c in batch:
                yield registry_pb2.RegistryEvent(
                    sequence=c.sequence, epoch=changes.epoch, kind=_KINDS[c.kind], name=c.name, version=c.version,
                    alias=c.alias, digest=c.digest, digest_gone=c.digest_gone)
                seq = c.sequence
            if batch or time.monotonic() - beat >= WATCH_HEARTBEAT_S:
                if not batch:
                    yield registry_pb2.RegistryEvent(sequence=seq, epoch=changes.epoch, kind=_HEARTBEAT)
                beat = time.monotonic()
