"""gRPC AdapterRegistry service: the registry (SQLite + store) plus device residency.

Access rules (auth on): a client tenant sees and uses its own adapters and
public ones (no owner); it registers adapters it will own; alias, delete and
unload need ownership or the admin role; load needs read access. With auth off
every caller is an admin.
"""

from __future__ import annotations

from concurrent.futures import CancelledError, Future

from qlora_serve.adapters.records import AdapterRecord
from qlora_serve.server.auth import Principal, can_read_adapter, check_adapter_access, require_admin
from qlora_serve.errors import InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from qlora_serve.server.runtime import handle_of, unary_rpc
from qlora_serve.v1 import registry_pb2, registry_pb2_grpc

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
        residency = _RESIDENCY[self._rt.engine.snapshot().residency(rec.digest)]
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
            self._rt.engine.forget(d)
        return registry_pb2.DeleteAdapterResponse(deleted=[
            registry_pb2.AdapterInfo(name=r.name, version=r.version, digest=r.digest, owner=r.owner or "")
            for r in deleted])

    @unary_rpc
    def LoadAdapter(self, request, context, principal):
        rec = self._rt.resolve_record(request.adapter, principal)
        # Read on the engine's reader thread (shared with requests waiting for it); only
        # the copy into a slot runs between engine steps.
        self._wait(self._rt.engine.load_adapter(handle_of(rec)), f"loading adapter {request.adapter!r}")
        return self._info(rec)

    @unary_rpc
    def UnloadAdapter(self, request, context, principal):
        rec = self._rt.resolve_record(request.adapter, principal)
        check_adapter_access(principal, rec.owner, write=True, adapter=f"adapter {request.adapter!r}")
        self._wait(self._rt.engine.unload(rec.digest), f"unloading adapter {request.adapter!r}")
        return self._info(rec)
