"""Build a serving runtime without any server: base, engine, registry, auth, quotas
and metrics from a `ServerConfig`. The gRPC server (server/app.py) opens its port on
`new_runtime` and loads with `load_runtime`; the Ray Serve replicas
(server/ray_app.py) and tests call `build_runtime` and talk to the `Runtime` directly."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.registry import AdapterRegistry
from qlora_serve.errors import FailedPrecondition
from qlora_serve.server.auth import Authenticator
from qlora_serve.server.engine.engine import Engine
from qlora_serve.server.engine.loader import load_base
from qlora_serve.server.metrics import Metrics
from qlora_serve.server.quotas import QuotaBook
from qlora_serve.server.runtime import Runtime

if TYPE_CHECKING:
    from qlora_serve.server.config import ServerConfig

log = logging.getLogger("qlora_serve")
_REGISTRY_CONNECT_S = 10.0  # start-up wait for a --registry-address server before serving without it


def new_runtime(config: "ServerConfig", metrics: Metrics | None = None) -> Runtime:
    """A runtime with auth, quotas and metrics but no model yet (`health()` is
    NOT_SERVING until `load_runtime`). metrics: a registry to share (None = new)."""
    auth = Authenticator.from_file(config.key_file) if config.key_file else Authenticator.disabled()
    quotas = QuotaBook.from_file(config.key_file) if config.key_file else QuotaBook()
    return Runtime(metrics=metrics or Metrics(), limits=config.limits, auth=auth, quotas=quotas)


def _base_and_adapters(config: "ServerConfig") -> tuple[str, list[tuple[str, str]]]:
    """The base to serve and the start-up adapters: the demo's when `config.base` is None."""
    base_ref, adapters = config.base, list(config.adapters)
    if base_ref is None:
        from qlora_serve.server.demo import ensure_demo

        demo = ensure_demo()
        base_ref = str(demo.base)
        adapters = adapters or sorted((n, str(p)) for n, p in demo.adapters.items())
        log.info("no --base given: serving the embedded demo model from %s", base_ref)
    return base_ref, adapters


def _register_startup(registry: AdapterRegistry, adapters: list[tuple[str, str]]) -> None:
    try:
        for name, path in adapters:
            record = registry.register_path(name, path, source="startup", trusted=True)
            log.info("adapter %s registered from %s (digest %s)", record.ref, path, record.digest[:12])
    except BaseException:
        registry.close()  # release the data_dir lock: a retry in this process may open it again
        raise


def load_registry_role(runtime: Runtime, config: "ServerConfig") -> Runtime:
    """`--role registry`: open the registry and register the start-up adapters, validated
    against the base's config and module shapes (no weights loaded: no engine)."""
    from qlora_serve.server.engine.loader import base_shapes, resolve_dtype

    base_ref, adapters = _base_and_adapters(config)
    hf_config, shapes = base_shapes(base_ref)
    registry = AdapterRegistry(
        config.data_dir, base_fingerprint=base_fingerprint(base_ref, hf_config), linear_shapes=shapes,
        max_rank=config.engine.max_lora_rank, allowed_roots=config.allowed_roots,
        allow_fingerprint_mismatch=config.allow_fingerprint_mismatch, max_upload_bytes=config.max_upload_bytes,
        compute_dtype=resolve_dtype(config.compute_dtype))
    _register_startup(registry, adapters)
    runtime.registry = registry
    log.info("registry server for base %s (fingerprint %s): no engine, adapters stored in %s", base_ref,
             registry.base_fingerprint, config.data_dir)
    return runtime


def registry_key(config: "ServerConfig") -> str | None:
    """The key sent to `config.registry_address`: --registry-key-file's content, else $QLORA_SERVE_REGISTRY_KEY."""
    from qlora_serve.server.remote_registry import KEY_ENV

    if config.registry_key_file is not None:
        try:
            return config.registry_key_file.read_text().strip() or None
        except OSError as exc:
            raise FailedPrecondition(f"--registry-key-file {config.registry_key_file}: {exc.strerror}") from None
    return os.environ.get(KEY_ENV) or None


def load_runtime(runtime: Runtime, config: "ServerConfig", *, registry_reader: bool = False) -> Runtime:
    """Load the base (NF4 + double quant), start the engine, open the registry and
    register the start-up adapters (the demo's when `config.base` is None).
    registry_reader: open `config.data_dir`'s registry read-only beside its one writer
    (another process's `qlora-serve serve`), which registers every adapter; this
    runtime then registers none and serves what the writer has committed.
    `config.registry_address`: follow that `--role registry` server instead
    (server/remote_registry.py); `config.role == "registry"`: `load_registry_role`."""
    from qlora_serve.server.app import served_name  # app.py imports this module

    if config.role == "registry":
        return load_registry_role(runtime, config)
    base_ref, adapters = _base_and_adapters(config)
    runtime.base_name = served_name(config.base)
    base = load_base(base_ref, compute_dtype=config.compute_dtype, device=config.device)
    fp = base.footprint
    log.info("base %s resident on %s: %d quantized params in %.2f MiB (%.2f bits/param, NF4 + double quant); "
             "whole model %.2f MiB", base_ref, base.device, fp.quantized_params, fp.quantized_bytes / 2**20,
             fp.bits_per_param, fp.model_bytes / 2**20)
    engine = Engine(base, config.engine, metrics=runtime.metrics)
    log.info("%s", engine.adapters.report_capacity())
    fingerprint = base_fingerprint(base_ref, base.model.config)
    if config.registry_address:
        from qlora_serve.server.remote_registry import RemoteRegistry

        registry = RemoteRegistry(
            config.registry_address, api_key=registry_key(config), cache_dir=config.data_dir / "registry-cache",
            base_fingerprint=fingerprint, allow_fingerprint_mismatch=config.allow_fingerprint_mismatch,
            ttl_s=config.registry_cache_ttl_s, max_upload_bytes=config.max_upload_bytes,
            max_message_bytes=config.max_message_bytes)
        registry.on_gone = engine.forget  # a deleted digest leaves the engine between steps
        try:
            if not registry.wait_connected(_REGISTRY_CONNECT_S):
                log.warning("adapter registry at %s not reachable yet: adapter requests get UNAVAILABLE until it "
                            "is (base-model requests are served)", config.registry_address)
        except BaseException:
            registry.close()
            raise
        adapters = []  # start-up adapters are the registry server's
    else:
        registry = AdapterRegistry(
            config.data_dir, base_fingerprint=fingerprint,
            linear_shapes=engine.lora.linear_shapes, max_rank=config.engine.max_lora_rank,
            allowed_roots=config.allowed_roots, allow_fingerprint_mismatch=config.allow_fingerprint_mismatch,
            max_upload_bytes=config.max_upload_bytes, compute_dtype=engine.lora.compute_dtype,
            read_only=registry_reader)
    if registry_reader:
        adapters = []
    engine.adapter_reader = verified_reader(registry, engine)
    _register_startup(registry, adapters)
    engine.start()
    runtime.engine, runtime.registry = engine, registry
    return runtime


def build_runtime(config: "ServerConfig", metrics: Metrics | None = None, *, registry_reader: bool = False) -> Runtime:
    """`new_runtime` then `load_runtime`: a ready runtime (close it with `Runtime.close`)."""
    return load_runtime(new_runtime(config, metrics), config, registry_reader=registry_reader)


def verified_reader(registry, engine: Engine):
    """The engine's adapter reader, re-hashing the stored files before parsing:
    on-disk corruption after registration is refused (FAILED_PRECONDITION) instead
    of served, and the registry marks the digest unusable until a load verifies
    again, it is registered again or the version is deleted."""
    def read(handle):
        try:
            registry.verify(registry.get(handle.name, handle.version))
        except FailedPrecondition as exc:
            log.error("adapter %s@%d marked unusable: %s", handle.name, handle.version, exc)
            raise
        return engine.read_adapter(handle)
    return read
