"""The services beside Inference on Ray Serve replicas (server/ray_app.py): AdapterRegistry,
Training and grpc.health.v1.Health, through Ray's gRPC proxy with raw-bytes requests.

- AdapterRegistry reads (ListAdapters, GetAdapter) and the engine's residency (LoadAdapter,
  UnloadAdapter) are answered by the replica Ray routes the call to, with the gRPC
  server's own handlers (server/registry_service.py): the same checks, messages and
  statuses; residency and Load/Unload are that replica's (trailer `qlora-replica`).
- Registry writes (RegisterAdapter, UploadAdapter, SetAlias, DeleteAdapter): with
  `config.registry_address` they are forwarded to that registry server with the caller's
  own credentials, and its answer is relayed unchanged (server/registry_forward.py).
  Otherwise (`--shared-registry`, or a registry per replica) they are FAILED_PRECONDITION
  with a message naming the registry's writer: the catalogue has one writer, and
  replicas only read it. Every replica serves what the writer registers.
- Every Training RPC is FAILED_PRECONDITION: a training job has one owner (which
  registers its adapter), and a replica is not one.
- Health.Check / Watch / List answer the runtime of the replica that takes the call:
  Serve's router prefers serving replicas, so through the proxy SERVING means "a replica
  can take requests". Training reports NOT_SERVING (never served here).
Readiness and the API key are checked first, as on the gRPC server (Check and Watch need
no key there either).
"""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2

from qlora_serve.errors import FailedPrecondition, InvalidArgument, NotFound
from qlora_serve.server.auth import DEFAULT_EXEMPT_METHODS
from qlora_serve.server.registry_forward import Forwarded, raw_bytes
from qlora_serve.server.registry_service import RegistryService
from qlora_serve.v1 import inference_pb2, registry_pb2, training_pb2

SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["Inference"],
            registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistry"],
            training_pb2.DESCRIPTOR.services_by_name["Training"],
            health_pb2.DESCRIPTOR.services_by_name["Health"])
_METHODS = {m.name: m for s in SERVICES for m in s.methods}
# Ray calls the replica method named like the RPC, whatever the service: names must not clash.
assert len(_METHODS) == sum(len(s.methods) for s in SERVICES), "RPC names clash across services"
_HANDLER = {(False, False): grpc.unary_unary_rpc_method_handler, (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler, (True, True): grpc.stream_stream_rpc_method_handler}
_TRAINING_METHODS = {m.name for m in SERVICES[2].methods}
_HEALTH_POLL_S = 0.5  # how often Watch re-reads the replica's health
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def add_services_to_proxy(servicer, server) -> None:
    """`grpc_servicer_functions` entry for Ray's gRPC proxy: Inference, AdapterRegistry,
    Training and Health with raw-bytes requests, so the replica (not the proxy) parses
    them and answers a malformed one with INVALID_ARGUMENT. Ray replaces the handlers'
    behaviour; its reflection (on by default) then lists these services."""
    for service in SERVICES:
        handlers = {m.name: _HANDLER[(m.client_streaming, m.server_streaming)](getattr(servicer, m.name))
                    for m in service.methods}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def parse(method: str, raw):
    """The request message of RPC `method` from the proxy's raw bytes (INVALID_ARGUMENT if malformed)."""
    m = _METHODS[method]
    msg = GetMessageClass(m.input_type)()
    try:
        msg.ParseFromString(raw_bytes(raw))
    except (DecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"malformed {m.input_type.name}: {type(exc).__name__}; send a valid "
                              f"{m.input_type.full_name}") from None
    return msg


def refusal(method: str, action: str, shared: bool, writer: str, registry_server: bool = False) -> str:
    """The FAILED_PRECONDITION message for a registry write or Training call on a replica:
    why, and where to `action` instead (writer: its host:port, "" = described).
    registry_server: the writer is a `--role registry` server (it runs no training)."""
    if registry_server and method in _TRAINING_METHODS:
        return (f"{method} is not served by this deployment (a training job has one owner, which registers its "
                f"adapter; neither a replica nor the registry server {writer} runs jobs): train with `qlora-serve "
                f"train ... --register {writer}`, and the adapter it registers there reaches every replica")
    if not shared:  # no writer at all: each replica has its own registry
        return (f"{method} is not served by this deployment's replicas (each keeps its own registry of its "
                f"start-up adapters, so a change would reach one replica only): run `qlora-serve serve --data-dir "
                f"DIR` as the registry's writer, start the deployment with --shared-registry on DIR, and "
                f"{action} at that writer")
    reason = ("a training job has one owner, which registers its adapter" if method in _TRAINING_METHODS
              else "the registry has one writer; replicas only read it")
    where = writer or "the `qlora-serve serve --data-dir` server whose data dir the replicas read"
    # (with a `--role registry` server to follow, `writer` is its address)
    return (f"{method} is not served by this deployment's replicas ({reason}): {action} at the registry's "
            f"writer, {where}")


class ReplicaServices:
    """AdapterRegistry, Training and Health methods of `QloraReplica`. Uses its `_rt`
    (Runtime), `replica_id`, `shared_registry`, `registry_writer`, `_forwarder` (a
    RegistryForwarder when the replicas follow a registry server, else None) and `_fail`."""

    _forwarder = None

    # ------------------------------------------------------------ helpers
    def _answer(self, method: str, raw, ctx, fn):
        """Readiness, key (unless exempt), parse, then fn(msg, principal); the documented
        status on error, the replica in the trailer either way. Runs on a worker thread."""
        from qlora_serve.server.ray_app import REPLICA_TRAILER

        try:
            exempt = f"/{_METHODS[method].containing_service.full_name}/{method}" in DEFAULT_EXEMPT_METHODS
            if not exempt:
                self._rt.require_ready()
            principal = None if exempt else self._rt.authenticate_metadata(ctx.invocation_metadata())
            out = fn(parse(method, raw), principal)
            ctx.set_trailing_metadata([(REPLICA_TRAILER, self.replica_id)])
            return out
        except Exception as exc:
            raise self._fail(ctx, exc, "") from None

    def _refuse(self, method: str, ctx, action: str):
        """FAILED_PRECONDITION naming the writer, after readiness and the key."""
        def refuse(_msg, _principal):
            raise FailedPrecondition(refusal(method, action, self.shared_registry, self.registry_writer,
                                             registry_server=self._forwarder is not None))

        return self._answer(method, b"", ctx, refuse)

    async def _write(self, method: str, request, ctx, action: str):
        """A registry write: forwarded to the registry server the replicas follow (its
        answer relayed, the replica in the trailer), else refused naming the writer."""
        from qlora_serve.server.ray_app import REPLICA_TRAILER, _Failed

        if self._forwarder is None:
            return self._refuse(method, ctx, action)
        try:
            response = await self._forwarder.forward(method, request, ctx.invocation_metadata())
        except Forwarded as exc:
            ctx.set_trailing_metadata([*exc.trailers, (REPLICA_TRAILER, self.replica_id)])
            ctx.set_code(exc.code)
            ctx.set_details(exc.details)
            raise _Failed(exc.details) from None
        except Exception as exc:
            raise self._fail(ctx, exc, "") from None
        ctx.set_trailing_metadata([(REPLICA_TRAILER, self.replica_id)])
        return response

    def _registry(self, method: str, raw, ctx):
        svc = RegistryService(self._rt)
        # The gRPC servicer's own handler, without its gRPC-server wrapper (unary_rpc).
        handler = getattr(RegistryService, method).__wrapped__
        return self._answer(method, raw, ctx, lambda msg, principal: handler(svc, msg, ctx, principal))

    def _health(self, service: str, unknown_raises: bool = True) -> int:
        """This replica's status for `service` ("" = all); unknown: NOT_FOUND (Check, List)
        or SERVICE_UNKNOWN (Watch), as grpcio's health servicer answers."""
        names = {""} | {s.full_name for s in SERVICES if s.name != "Health"}
        if service not in names:
            if not unknown_raises:
                return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            raise NotFound(f"unknown service {service!r}; known: {sorted(names)}")
        if service == training_pb2.DESCRIPTOR.services_by_name["Training"].full_name:
            return _NOT_SERVING
        return _SERVING if self._rt.health() == "SERVING" else _NOT_SERVING

    # ---------------------------------------------------- AdapterRegistry
    async def ListAdapters(self, request, grpc_context):
        return await asyncio.to_thread(self._registry, "ListAdapters", request, grpc_context)

    async def GetAdapter(self, request, grpc_context):
        return await asyncio.to_thread(self._registry, "GetAdapter", request, grpc_context)

    async def LoadAdapter(self, request, grpc_context):
        return await asyncio.to_thread(self._registry, "LoadAdapter", request, grpc_context)

    async def UnloadAdapter(self, request, grpc_context):
        return await asyncio.to_thread(self._registry, "UnloadAdapter", request, grpc_context)

    async def RegisterAdapter(self, request, grpc_context):
        return await self._write("RegisterAdapter", request, grpc_context, "register adapters")

    async def UploadAdapter(self, request, grpc_context):  # refused: the upload stream is not read
        return await self._write("UploadAdapter", request, grpc_context, "upload adapters")

    async def SetAlias(self, request, grpc_context):
        return await self._write("SetAlias", request, grpc_context, "set aliases")

    async def DeleteAdapter(self, request, grpc_context):
        return await self._write("DeleteAdapter", request, grpc_context, "delete adapters")

    # Engines follow the registry server itself (--registry-address), never a deployment.
    _FOLLOW = "follow the registry (engines connect to the registry server with --registry-address)"

    async def DownloadAdapter(self, request, grpc_context):
        self._refuse("DownloadAdapter", grpc_context, self._FOLLOW)
        yield  # pragma: no cover (never reached: a generator for a streaming RPC)

    async def WatchRegistry(self, request, grpc_context):
        self._refuse("WatchRegistry", grpc_context, self._FOLLOW)
        yield  # pragma: no cover (never reached: a generator for a streaming RPC)

    # ----------------------------------------------------------- Training
    _TRAINING = "submit, watch and cancel training jobs"

    async def SubmitJob(self, request, grpc_context):
        return self._refuse("SubmitJob", grpc_context, self._TRAINING)

    async def SubmitJobStream(self, request, grpc_context):  # the dataset stream is not read
        return self._refuse("SubmitJobStream", grpc_context, self._TRAINING)

    async def WatchJob(self, request, grpc_context):
        self._refuse("WatchJob", grpc_context, self._TRAINING)
        yield  # pragma: no cover (never reached: a generator for a streaming RPC)

    async def ListJobs(self, request, grpc_context):
        return self._refuse("ListJobs", grpc_context, self._TRAINING)

    async def GetJob(self, request, grpc_context):
        return self._refuse("GetJob", grpc_context, self._TRAINING)

    async def CancelJob(self, request, grpc_context):
        return self._refuse("CancelJob", grpc_context, self._TRAINING)

    async def GetJobArtifact(self, request, grpc_context):
        return self._refuse("GetJobArtifact", grpc_context, self._TRAINING)

    # ------------------------------------------------------------- Health
    async def Check(self, request, grpc_context):
        return self._answer("Check", request, grpc_context,
                            lambda msg, _: health_pb2.HealthCheckResponse(status=self._health(msg.service)))

    async def List(self, request, grpc_context):
        def statuses(_msg, _principal):
            names = [""] + [s.full_name for s in SERVICES if s.name != "Health"]
            return health_pb2.HealthListResponse(
                statuses={n: health_pb2.HealthCheckResponse(status=self._health(n)) for n in names})

        return self._answer("List", request, grpc_context, statuses)

    async def Watch(self, request, grpc_context):
        """The status now, then each change until the client leaves (or the replica stops)."""
        service, last = self._answer("Watch", request, grpc_context,
                                     lambda msg, _: (msg.service, self._health(msg.service, False)))
        yield health_pb2.HealthCheckResponse(status=last)
        while True:
            await asyncio.sleep(_HEALTH_POLL_S)
            now = self._health(service, False)
            if now != last:
                last = now
                yield health_pb2.HealthCheckResponse(status=now)
