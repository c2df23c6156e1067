"""Server assembly and lifecycle: gRPC server, health, reflection, metrics, engine.

Start-up order matters to clients: the port opens first with health
NOT_SERVING (so orchestrators see a live but not-ready server), the base loads,
adapters register, then health turns SERVING. Shutdown is the reverse: health
NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish, then the port closes.
"""

from __future__ import annotations

import logging
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qlora_serve.server.auth import AuthInterceptor
from qlora_serve.server.build import load_runtime, new_runtime
from qlora_serve.server.config import ServerConfig, default_data_dir  # noqa: F401 (re-export)
from qlora_serve.server.inference_service import InferenceService
from qlora_serve.server.interceptors import RequestGuard
from qlora_serve.server.registry_service import RegistryService
from qlora_serve.server.runtime import handle_of
from qlora_serve.server.training_service import TrainingService
from qlora_serve.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc, training_pb2, training_pb2_grpc

log = logging.getLogger("qlora_serve")

# After the last in-flight call has handed its final message to gRPC, the port stays
# open this long (within the grace) so clients read the tail before the connection
# closes: closing at once can reset it under a client's unread last frames.
_FLUSH_LINGER_S = 0.25

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistry"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["Training"].full_name,
)


class HealthServicer(health.HealthServicer):
    """grpcio-health-checking's servicer plus `List`, which its 1.85 release
    leaves UNIMPLEMENTED although reflection advertises it."""

    def List(self, request, context):
        """Every registered service's status ("" is the server as a whole)."""
        with self._lock:  # the parent's lock over _server_status
            statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in statuses.items()})


DEMO_BASE_NAME = "qlora-serve-demo"


def served_name(base: str | None) -> str:
    """The base model's name in the HTTP API (`model`): a hub id as given, a local
    directory's last component, or DEMO_BASE_NAME for the embedded demo."""
    if base is None:
        return DEMO_BASE_NAME
    return Path(base).name if Path(base).is_dir() else base


class QloraServer:
    """One server process: `start()` opens the port, `load()` brings the model up,
    `stop()` drains. `port` / `metrics_port` hold the bound ports (useful with port 0)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.runtime = new_runtime(config)  # the model loads in load()
        self.metrics = self.runtime.metrics
        auth = self.runtime.auth
        # One handler thread per in-flight RPC: enough for every running and queued
        # request plus registry/health calls; beyond that gRPC answers RESOURCE_EXHAUSTED.
        workers = config.max_concurrent_rpcs or config.engine.max_running + config.engine.max_waiting + 16
        self.guard = RequestGuard(auth, self.metrics)
        self._workers = workers
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            # The guard is outermost so it parses, counts and logs what auth refuses too.
            interceptors=[self.guard, AuthInterceptor(auth)],
            maximum_concurrent_rpcs=workers,
            options=[("grpc.max_receive_message_length", config.max_message_bytes),
                     ("grpc.max_send_message_length", config.max_message_bytes),
                     # grpcio sets SO_REUSEPORT by default: a second server on a busy port
                     # would start and split the traffic with the first one.
                     ("grpc.so_reuseport", 0)],
        )
        self.health = HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        registry_pb2_grpc.add_AdapterRegistryServicer_to_server(RegistryService(self.runtime), self.grpc)
        # A registry server (--role registry) serves the registry only: no base, no inference, no training.
        self.runtime.registry_only = config.role == "registry"
        self.services = SERVICE_NAMES[1:2] if self.runtime.registry_only else SERVICE_NAMES
        self.training = None
        if not self.runtime.registry_only:
            inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(self.runtime), self.grpc)
            self.training = TrainingService(self.runtime, config.data_dir / "jobs", max_dataset_bytes=config.max_dataset_bytes,
                                            store_path=config.data_dir / "jobs.sqlite3")
            training_pb2_grpc.add_TrainingServicer_to_server(self.training, self.grpc)
        reflection.enable_server_reflection(self.services + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_http = None
        self.http_port: int | None = None
        self._http = None

    def _set_health(self, status) -> None:
        for name in ("",) + self.services:
            self.health.set(name, status)

    def start(self) -> "QloraServer":
        """Bind and serve (health NOT_SERVING until `load` finishes)."""
        cfg = self.config
        address = f"{cfg.host}:{cfg.port}"
        try:
            self.port = self.grpc.add_insecure_port(address)
        except RuntimeError:  # grpcio raises "Failed to bind" instead of returning 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"could not bind the gRPC port {cfg.port} on {cfg.host} ({address}): it is in use or not "
                          f"available; is another server running there? Choose another --port (0 = any free port)")
        if cfg.metrics_port is not None:
            try:
                self._metrics_http, _ = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_address)
            except OSError as exc:
                raise OSError(f"could not bind the metrics port {cfg.metrics_port} on {cfg.metrics_address} "
                              f"({exc.strerror or exc}); choose another --metrics-port (0 = any free port) "
                              f"or pass --no-metrics") from None
            self.metrics_port = self._metrics_http.server_port
        if self.config.http_port is not None and not self.runtime.registry_only:
            from qlora_serve.server.http_api import HttpFrontEnd  # ASGI stack only when HTTP is on

            self._http = HttpFrontEnd(self.runtime, self.config.host, self.config.http_port, self._workers,
                                      max_body_bytes=self.config.max_message_bytes).start()
            self.http_port = self._http.port
        self.grpc.start()
        return self

    def load(self) -> "QloraServer":
        """Load the base (NF4 + double quant), open the registry, register start-up adapters, go SERVING."""
        cfg = self.config
        load_runtime(self.runtime, cfg)
        if self.training is not None:  # jobs an earlier run left unfinished resume now
            self.training.start(resume=cfg.resume_interrupted_jobs, resources=cfg.training_resources())
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s:%d (metrics: %s, OpenAI HTTP API: %s)", cfg.host, self.port,
                 f"http://{cfg.metrics_address}:{self.metrics_port}/metrics" if self.metrics_port else "off",
                 f"http://{cfg.host}:{self.http_port}/v1" if self.http_port else "off")
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new requests, finish in-flight ones, close."""
        grace = self.config.grace_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        self.runtime.draining = True
        self.health.enter_graceful_shutdown()
        if self.training is not None:
            self.training.shutdown()  # a running training job's process must not outlive the server
        self.runtime.drain(grace)
        # A row leaves the engine before its handler has sent the stream's last messages
        # (a slow client reads them later): wait for the handlers too, within the grace.
        pending = self.guard.in_flight()
        if pending and deadline > time.monotonic():
            log.info("engine drained; waiting up to %.1f s for %d in-flight call(s) to send their last messages",
                     deadline - time.monotonic(), pending)
            if self.guard.wait_idle(deadline - time.monotonic()):
                time.sleep(max(0.0, min(_FLUSH_LINGER_S, deadline - time.monotonic())))
        self.grpc.stop(grace=max(1.0, deadline - time.monotonic())).wait()
        if self._http is not None:
            self._http.stop()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        self.runtime.close()

    def wait(self) -> None:
        self.grpc.wait_for_termination()


__all__ = ["QloraServer", "ServerConfig", "handle_of"]
