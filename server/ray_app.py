"""qlora-serve on Ray Serve: N replicas, each one runtime (base + engine + registry)
built by `build_runtime`, behind Ray's gRPC proxy, speaking `qlora_serve.v1.Inference`.

    pip install -c .ci/constraints-cpu.txt -e ".[ray]"
    qlora-serve ray-serve --replicas 2            # or: serve run qlora_serve.server.ray_app:build_app

Routing: a client names its adapter in the `multiplexed_model_id` request header (the
same reference as the request's `adapter` field; a mismatch is INVALID_ARGUMENT).
`AdapterRouter` sends it to a replica whose engine reports that adapter resident
(`record_routing_stats`: the engine's own residency, no second cache), the least
loaded of those; a cold adapter goes to the least loaded replica with a free adapter
slot, ties broken by rendezvous hash, and stays there while it loads (server/ray_router.py).
No header: the least loaded replica. Draining replicas come last.

The contract through the proxy: Ray's proxy would parse requests itself (a malformed
one became UNKNOWN); `add_inference_to_proxy` registers the service with raw-bytes
requests, so the replica parses them and answers INVALID_ARGUMENT; `add_services_to_proxy`
adds AdapterRegistry, Training and Health the same way (server/ray_services.py; registry
writes are forwarded to the registry server the replicas follow, if any). Every error leaves
the replica as the status and bounded message the README documents (server/status.py),
never a Ray traceback; API keys and quotas are checked in the replica (quotas per
replica). Registry: with `config.registry_address`, every replica follows the one
`qlora-serve serve --role registry` server there (any node: names over gRPC with a short
cache and its change stream, files fetched by digest into data_dir/replicas/<id>); with
`shared_registry`, every replica reads the one catalogue and store that a `qlora-serve
serve --data-dir` process writes (same machine: SQLite WAL); else each replica keeps its
own under data_dir/replicas/<id> with the start-up adapters.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from ray import serve
from ray.serve.config import RequestRouterConfig

from qlora_serve.errors import InvalidArgument
from qlora_serve.server.build import build_runtime
from qlora_serve.server.engine.request import FinalEvent
from qlora_serve.server.inference_service import input_of, response_of, stream_message
from qlora_serve.server.ray_router import ROUTING_STATS_PERIOD_S, AdapterRouter
from qlora_serve.server.ray_services import ReplicaServices, add_services_to_proxy, parse  # noqa: F401 (re-export)
from qlora_serve.server.registry_forward import RegistryForwarder
from qlora_serve.server.requests import CallLog, InferenceCore
from qlora_serve.server.status import code_for, public_message
from qlora_serve.v1 import inference_pb2

log = logging.getLogger("qlora_serve.ray")

SERVICE = "qlora_serve.v1.Inference"
MODEL_ID_HEADER = "multiplexed_model_id"  # Ray's proxy routes on this request header
REPLICA_TRAILER = "qlora-replica"  # trailing metadata: the replica that served the call


def add_inference_to_proxy(servicer, server) -> None:
    """`grpc_servicer_functions` entry for Ray's gRPC proxy: the Inference service alone
    (configs written before `add_services_to_proxy`, which adds the other services too)."""
    handlers = {
        "Generate": grpc.unary_unary_rpc_method_handler(servicer.Generate),
        "GenerateStream": grpc.unary_stream_rpc_method_handler(servicer.GenerateStream),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(servicer.GetModelInfo),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


class _Failed(Exception):
    """Raised after the status is set on the Ray gRPC context (message already sent)."""


class QloraReplica(ReplicaServices):
    """One replica: a runtime of its own, the Inference RPCs over `InferenceCore`, and
    AdapterRegistry, Training and Health from ReplicaServices."""

    def __init__(self, config, shared_registry: bool = False, registry_writer: str = "") -> None:
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.replica_id = replica_id
        # A replica following a registry server has a writer too: that server.
        self.shared_registry = shared_registry or bool(config.registry_address)
        self.registry_writer = registry_writer or (config.registry_address or "")
        # This replica's own files (a registry of its start-up adapters, or the files it
        # fetched from the registry server): rebuilt by any replica, removed at shutdown.
        self._own_dir = None if shared_registry else Path(config.data_dir) / "replicas" / replica_id
        if shared_registry:  # read the registry a `qlora-serve serve` on config.data_dir writes
            self._rt = build_runtime(config, registry_reader=True)
        else:  # config.registry_address: follow it (cache here); else a registry per replica (start-up adapters)
            self._rt = build_runtime(replace(config, data_dir=self._own_dir))
        self._core = InferenceCore(self._rt)
        # Registry writes reaching this replica go to the registry server it follows.
        self._forwarder = None
        if config.registry_address and not shared_registry:
            self._forwarder = RegistryForwarder(config.registry_address, registry=self._rt.registry,
                                                max_message_bytes=config.max_message_bytes)

    # ------------------------------------------------------- Serve hooks
    def check_health(self) -> None:
        """Serve restarts a replica whose runtime is not SERVING."""
        if self._rt.health() != "SERVING":
            raise RuntimeError(f"replica {self.replica_id} is {self._rt.health()}")

    def record_routing_stats(self) -> dict[str, Any]:
        """What `AdapterRouter` reads: the engine's resident adapters (by name), load, free
        adapter slots, and whether the runtime is serving (a draining one is ranked last)."""
        stats = self._rt.load_stats()
        resident = set(stats.get("resident_digests", ()))
        serving = self._rt.health() == "SERVING"
        names = []  # a draining replica advertises none: new requests should go elsewhere
        if resident and serving:
            names = sorted({r.name for r in self._rt.registry.list() if r.digest in resident})
        free = self._rt.engine.config.max_resident_adapters - len(resident) if self._rt.engine is not None else 0
        return {"adapters": names, "queued": stats.get("queued", 0), "running": stats.get("running", 0),
                "free_slots": max(0, free), "serving": serving}

    async def drain(self, grace_s: float = 30.0) -> str:
        """Take this replica out of service (through a Serve handle, e.g. before moving it):
        new requests get UNAVAILABLE, in-flight ones finish within grace_s seconds, then
        `check_health` fails and Serve replaces the replica. Returns the replica id."""
        await asyncio.to_thread(self._rt.drain, grace_s)
        return self.replica_id

    def __del__(self) -> None:  # Serve's replica shutdown hook
        rt = getattr(self, "_rt", None)
        if rt is not None:
            rt.close(grace_s=5.0)
        if getattr(self, "_forwarder", None) is not None:
            self._forwarder.close()
        if getattr(self, "_own_dir", None) is not None:  # a replaced replica's id never comes back
            shutil.rmtree(self._own_dir, ignore_errors=True)

    # ------------------------------------------------------------ helpers
    def _parse(self, raw, ctx):
        """The GenerateRequest and caller: INVALID_ARGUMENT for bad bytes or an adapter
        field that disagrees with the routing header, UNAUTHENTICATED for a bad key."""
        self._rt.require_ready()
        principal = self._rt.authenticate_metadata(ctx.invocation_metadata())
        msg = parse("Generate", raw)  # GenerateStream takes the same GenerateRequest
        header = dict(ctx.invocation_metadata()).get(MODEL_ID_HEADER, "")
        if header and not msg.adapter:
            msg.adapter = header
        elif header and msg.adapter != header:
            raise InvalidArgument(f"adapter {msg.adapter!r} differs from the {MODEL_ID_HEADER} header "
                                  f"{header!r}; send the same reference in both (or only one)")
        return msg, principal

    def _fail(self, ctx, exc: BaseException, request_id: str) -> _Failed:
        """Set the documented status on the context; the caller raises what this returns."""
        message = public_message(exc, request_id)
        trailers = [(REPLICA_TRAILER, self.replica_id)]
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:
            trailers.append(("retry-after", str(retry_after)))
        ctx.set_trailing_metadata(trailers)
        ctx.set_code(code_for(exc))
        ctx.set_details(message)
        return _Failed(message)

    def _run(self, method: str, raw, ctx, active: threading.Event, emit):
        """One generation on a worker thread: parse, start, relay events to `emit`
        (a callable taking TokenEvent/FinalEvent), record; errors set the status."""
        started, req, call, rid = time.monotonic(), None, CallLog(method, "", self._rt.metrics), ""
        try:
            msg, principal = self._parse(raw, ctx)
            rid, call.tenant, call.adapter = msg.request_id, principal.tenant, msg.adapter
            req = self._core.start(input_of(msg), principal, is_active=active.is_set)
            call.request_id = rid = req.request_id
            final = None
            for ev in self._core.events(req, active.is_set):
                emit(req, ev)
                if isinstance(ev, FinalEvent):
                    final = ev
            usage = self._core.record(method, req, "OK", started, final)
            call.prompt_tokens, call.completion_tokens = usage or (0, 0)
            call.finish("OK")
            ctx.set_trailing_metadata([(REPLICA_TRAILER, self.replica_id)])
        except Exception as exc:
            exc = self._core.outcome(exc, req)
            code = code_for(exc).name
            self._core.record(method, req, code, started, tenant=call.tenant)
            call.finish(code, exc)
            raise self._fail(ctx, exc, rid) from None

    # --------------------------------------------------------------- RPCs
    async def Generate(self, request, grpc_context):
        out: dict = {}

        def emit(req, ev):
            if isinstance(ev, FinalEvent):
                out["resp"] = response_of(self._rt.tokenizer, req, ev)

        active = threading.Event()
        active.set()
        try:
            await asyncio.to_thread(self._run, "Generate", request, grpc_context, active, emit)
        except asyncio.CancelledError:
            active.clear()  # the client left: the engine frees the row within one step
            raise
        return out["resp"]

    async def GenerateStream(self, request, grpc_context):
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        active = threading.Event()
        active.set()

        def emit(req, ev):
            loop.call_soon_threadsafe(q.put_nowait, stream_message(self._rt.tokenizer, req, ev))

        def work():
            try:
                self._run("GenerateStream", request, grpc_context, active, emit)
                loop.call_soon_threadsafe(q.put_nowait, None)
            except BaseException as exc:
                loop.call_soon_threadsafe(q.put_nowait, exc)

        task = loop.run_in_executor(None, work)
        try:
            while True:
                item = await q.get()
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            active.clear()  # a client that left (or an error) cancels the engine row
            await asyncio.shield(task)

    async def GetModelInfo(self, request, grpc_context):
        try:
            self._rt.require_ready()
            self._rt.authenticate_metadata(grpc_context.invocation_metadata())
            return inference_pb2.ModelInfo(**self._rt.model_info())
        except Exception as exc:
            raise self._fail(grpc_context, exc, "") from None


def deployment(config, *, replicas: int = 2, num_cpus: float = 1.0, num_gpus: float = 0.0,
               shared_registry: bool = False, registry_writer: str = ""):
    """The Serve application: `replicas` copies of QloraReplica at the given resources
    per replica. config: a ServerConfig (its host/ports are the proxy's business, unused).
    shared_registry: every replica reads the registry in config.data_dir, written by
    one `qlora-serve serve --data-dir` (same machine); else each follows
    config.registry_address (a `--role registry` server), or has its own.
    registry_writer: the writer's address (host:port), named in the FAILED_PRECONDITION
    that registry writes (unless forwarded to config.registry_address) and Training get
    through the deployment (default: config.registry_address; "" = described)."""
    if shared_registry and config.registry_address:
        raise ValueError("shared_registry and registry_address are exclusive: read the registry of a "
                         "`qlora-serve serve --data-dir` on this machine, or follow a `--role registry` server")
    dep = serve.deployment(
        QloraReplica, name="qlora", num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus},
        max_ongoing_requests=config.engine.max_running + config.engine.max_waiting,
        health_check_period_s=5.0,
        request_router_config=RequestRouterConfig(request_router_class=AdapterRouter,
                                                  request_routing_stats_period_s=ROUTING_STATS_PERIOD_S))
    return dep.bind(config, shared_registry, registry_writer)


def build_app(args: dict[str, str]):
    """`serve run qlora_serve.server.ray_app:build_app replicas=2 base=... data_dir=...`
    (and in a RayService's serveConfigV2 `args`). Keys, all optional: base, data_dir,
    device, key_file, adapters ("name=path,..."), replicas, num_cpus, num_gpus,
    shared_registry ("true": read the registry a `qlora-serve serve` writes in data_dir),
    registry_writer (that server's host:port, named to clients that try to write),
    registry_address ("host:port" of a `qlora-serve serve --role registry` to follow; any
    node), registry_key_file (its service key; default $QLORA_SERVE_REGISTRY_KEY),
    registry_cache_ttl (seconds)."""
    from qlora_serve.server.app import ServerConfig

    kw: dict[str, Any] = {}
    if args.get("base"):
        kw["base"] = args["base"]
    if args.get("data_dir"):
        kw["data_dir"] = Path(args["data_dir"])
    if args.get("device"):
        kw["device"] = args["device"]
    if args.get("key_file"):
        kw["key_file"] = Path(args["key_file"])
    if args.get("registry_address"):
        kw["registry_address"] = str(args["registry_address"])
    if args.get("registry_key_file"):
        kw["registry_key_file"] = Path(args["registry_key_file"])
    if args.get("registry_cache_ttl"):
        kw["registry_cache_ttl_s"] = float(args["registry_cache_ttl"])
    if args.get("adapters"):  # "name=path,name=path": registered at start on every replica
        kw["adapters"] = [tuple(item.split("=", 1)) for item in str(args["adapters"]).split(",") if item]
    config = ServerConfig(metrics_port=None, http_port=None, **kw)
    return deployment(config, replicas=int(args.get("replicas", 2)), num_cpus=float(args.get("num_cpus", 1)),
                      num_gpus=float(args.get("num_gpus", 0)),
                      shared_registry=str(args.get("shared_registry", "")).lower() in ("1", "true", "yes"),
                      registry_writer=str(args.get("registry_writer", "")))


def grpc_options(port: int):
    """The proxy's gRPC options: our services with raw-bytes requests, reflection on."""
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=port, grpc_servicer_functions=[f"{__name__}.add_services_to_proxy"], enable_reflection=True)
