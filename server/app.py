"""Server assembly and lifecycle: gRPC server, health, reflection, metrics, engine.

Start-up order matters to clients: the port opens first with health
NOT_SERVING (so orchestrators see a live but not-ready server), the base loads,
adapters register, then health turns SERVING. Shutdown is the reverse: health
NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish, then the port closes.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.registry import AdapterRegistry
from qlora_serve.server.auth import AuthInterceptor, Authenticator
from qlora_serve.server.engine.config import EngineConfig
from qlora_serve.server.engine.engine import Engine
from qlora_serve.server.engine.loader import load_base
from qlora_serve.errors import FailedPrecondition
from qlora_serve.server.inference_service import InferenceService, RequestLimits
from qlora_serve.server.interceptors import RequestGuard
from qlora_serve.server.metrics import Metrics
from qlora_serve.server.quotas import QuotaBook
from qlora_serve.server.registry_service import RegistryService
from qlora_serve.server.runtime import Runtime, handle_of
from qlora_serve.server.training_service import TrainingService
from qlora_serve.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc, training_pb2, training_pb2_grpc

log = logging.getLogger("qlora_serve")

SERVICE_NAMES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistry"].full_name,
    training_pb2.DESCRIPTOR.services_by_name["Training"].full_name,
)


def default_data_dir() -> Path:
    """`$QLORA_SERVE_DATA`, else `$XDG_DATA_HOME/qlora-serve`, else `~/.local/share/qlora-serve`."""
    env = os.environ.get("QLORA_SERVE_DATA")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "qlora-serve"


@dataclass
class ServerConfig:
    """Everything `qlora-serve serve` can set. `base=None` = the embedded demo model."""

    base: str | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int | None = 9090
    compute_dtype: str = "bfloat16"
    device: str = "auto"
    data_dir: Path = field(default_factory=default_data_dir)
    adapters: list[tuple[str, str]] = field(default_factory=list)  # (name, path) registered at start
    allowed_roots: list[Path] = field(default_factory=list)
    allow_fingerprint_mismatch: bool = False
    key_file: Path | None = None
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)
    grace_s: float = 30.0
    max_message_bytes: int = 8 << 20
    max_upload_bytes: int = 256 << 20
    max_concurrent_rpcs: int | None = None  # None = max_running + max_waiting + 16

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        for name, _ in self.adapters:
            if not name:
                raise ValueError("--adapter needs NAME=PATH with a non-empty NAME")


class QloraServer:
    """One server process: `start()` opens the port, `load()` brings the model up,
    `stop()` drains. `port` / `metrics_port` hold the bound ports (useful with port 0)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        auth = Authenticator.from_file(config.key_file) if config.key_file else Authenticator.disabled()
        quotas = QuotaBook.from_file(config.key_file) if config.key_file else QuotaBook()
        self.runtime = Runtime(metrics=self.metrics, limits=config.limits, auth=auth, quotas=quotas)
        # One handler thread per in-flight RPC: enough for every running and queued
        # request plus registry/health calls; beyond that gRPC answers RESOURCE_EXHAUSTED.
        workers = config.max_concurrent_rpcs or config.engine.max_running + config.engine.max_waiting + 16
        self.grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
            # The guard is outermost so it parses, counts and logs what auth refuses too.
            interceptors=[RequestGuard(auth, self.metrics), AuthInterceptor(auth)],
            maximum_concurrent_rpcs=workers,
            options=[("grpc.max_receive_message_length", config.max_message_bytes),
                     ("grpc.max_send_message_length", config.max_message_bytes)],
        )
        self.health = health.HealthServicer(experimental_non_blocking=True)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceService(self.runtime), self.grpc)
        registry_pb2_grpc.add_AdapterRegistryServicer_to_server(RegistryService(self.runtime), self.grpc)
        self.training = TrainingService(self.runtime, config.data_dir / "jobs", max_dataset_bytes=config.max_message_bytes)
        training_pb2_grpc.add_TrainingServicer_to_server(self.training, self.grpc)
        reflection.enable_server_reflection(SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc)
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.metrics_port: int | None = None
        self._metrics_http = None

    def _set_health(self, status) -> None:
        for name in ("",) + SERVICE_NAMES:
            self.health.set(name, status)

    def start(self) -> "QloraServer":
        """Bind and serve (health NOT_SERVING until `load` finishes)."""
        address = f"{self.config.host}:{self.config.port}"
        self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"could not bind gRPC port {address}; is another server running there?")
        self.grpc.start()
        if self.config.metrics_port is not None:
            self._metrics_http, _ = self.metrics.serve_http(self.config.metrics_port, self.config.host)
            self.metrics_port = self._metrics_http.server_port
        return self

    def load(self) -> "QloraServer":
        """Load the base (NF4 + double quant), open the registry, register start-up adapters, go SERVING."""
        cfg = self.config
        base_ref, adapters = cfg.base, list(cfg.adapters)
        if base_ref is None:
            from qlora_serve.server.demo import ensure_demo

            demo = ensure_demo()
            base_ref = str(demo.base)
            adapters = adapters or sorted((n, str(p)) for n, p in demo.adapters.items())
            log.info("no --base given: serving the embedded demo model from %s", base_ref)
        base = load_base(base_ref, compute_dtype=cfg.compute_dtype, device=cfg.device)
        fp = base.footprint
        log.info("base %s resident on %s: %d quantized params in %.2f MiB (%.2f bits/param, NF4 + double quant); "
                 "whole model %.2f MiB", base_ref, base.device, fp.quantized_params, fp.quantized_bytes / 2**20,
                 fp.bits_per_param, fp.model_bytes / 2**20)
        engine = Engine(base, cfg.engine, metrics=self.metrics)
        log.info("%s", engine.adapters.report_capacity())
        registry = AdapterRegistry(
            cfg.data_dir, base_fingerprint=base_fingerprint(base_ref, base.model.config),
            linear_shapes=engine.lora.linear_shapes, max_rank=cfg.engine.max_lora_rank,
            allowed_roots=cfg.allowed_roots, allow_fingerprint_mismatch=cfg.allow_fingerprint_mismatch,
            max_upload_bytes=cfg.max_upload_bytes)
        engine.adapter_loader = self._verified_loader(registry, engine, self.runtime.unusable)
        for name, path in adapters:
            record = registry.register_path(name, path, source="startup", trusted=True)
            log.info("adapter %s registered from %s (digest %s)", record.ref, path, record.digest[:12])
        engine.start()
        self.runtime.engine, self.runtime.registry = engine, registry
        self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving on %s:%d (metrics: %s)", cfg.host, self.port,
                 f"http://{cfg.host}:{self.metrics_port}/metrics" if self.metrics_port else "off")
        return self

    @staticmethod
    def _verified_loader(registry: AdapterRegistry, engine: Engine, unusable: dict[str, str]):
        """Re-hash the stored files before parsing: on-disk corruption after
        registration is refused (FAILED_PRECONDITION) instead of served, and the
        digest is marked unusable (``unusable``: digest -> reason) until a load
        verifies again or the version is deleted."""
        def load(handle):
            try:
                registry.verify(registry.get(handle.name, handle.version))
            except FailedPrecondition as exc:
                unusable[handle.key] = str(exc)
                log.error("adapter %s@%d marked unusable: %s", handle.name, handle.version, exc)
                raise
            unusable.pop(handle.key, None)
            return engine.read_adapter(handle)
        return load

    def stop(self, grace_s: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new requests, finish in-flight ones, close."""
        grace = self.config.grace_s if grace_s is None else grace_s
        self.runtime.draining = True
        self.health.enter_graceful_shutdown()
        self.training.shutdown()  # a running training job's process must not outlive the server
        if self.runtime.engine is not None:
            self.runtime.engine.shutdown(grace)
        self.grpc.stop(grace=1.0).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
        if self.runtime.registry is not None:
            self.runtime.registry.close()

    def wait(self) -> None:
        self.grpc.wait_for_termination()


__all__ = ["QloraServer", "ServerConfig", "handle_of"]
