"""`ServerConfig`: everything `qlora-serve serve` can set, each default stated once.

The serve command's flags are generated from these fields (and from EngineConfig and
RequestLimits) by `qlora_serve.options.add_flags`; a field's help is its --help line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.adapters.registry import DEFAULT_MAX_UPLOAD_BYTES
from qlora_serve.options import option
from qlora_serve.server.client import DEFAULT_PORT
from qlora_serve.server.engine.config import COMPUTE_DTYPES, EngineConfig
from qlora_serve.server.requests import RequestLimits


ROLES = ("engine", "registry")


def default_data_dir() -> Path:
    """`$QLORA_SERVE_DATA`, else `$XDG_DATA_HOME/qlora-serve`, else `~/.local/share/qlora-serve`."""
    env = os.environ.get("QLORA_SERVE_DATA")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "qlora-serve"


def _adapter_flag(value: str) -> tuple[str, str]:
    import argparse

    name, sep, path = value.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--adapter needs NAME=PATH, got {value!r}")
    return name, path


@dataclass
class ServerConfig:
    """Everything `qlora-serve serve` can set. `base=None` = the embedded demo model."""

    base: str | None = option(None, "hub id or local directory of the base model; default: the embedded demo "
                                    "(tiny Llama + demo adapters 'pirate' and 'poet', built offline on first start)")
    host: str = option("127.0.0.1", "address to bind; 0.0.0.0 to accept remote clients")
    port: int = option(DEFAULT_PORT, "gRPC port (0 = any free port)")
    metrics_port: int | None = option(9090, "Prometheus /metrics port (0 = any free port)",
                                      off_flag="no-metrics", off_help="do not serve /metrics", off_after="metrics_address")
    # /metrics names adapters and tenants: loopback only unless the operator opens it.
    metrics_address: str = option("127.0.0.1", "address /metrics binds to; it names adapters and tenants, so open "
                                               "it (0.0.0.0) only to trusted networks")
    http_port: int | None = option(8000, "OpenAI-compatible HTTP API port (/v1/models, /v1/completions, "
                                         "/v1/chat/completions; 0 = any free port)",
                                   off_flag="no-http", off_help="do not serve the OpenAI-compatible HTTP API")
    compute_dtype: str = option("bfloat16", "dtype the NF4 weights are dequantized to for matmuls",
                                choices=list(COMPUTE_DTYPES))
    device: str = option("auto", "auto (CUDA if present, else CPU), cpu, cuda, cuda:N")
    data_dir: Path = field(default_factory=default_data_dir, metadata={
        "help": "registry database and adapter store (default: $QLORA_SERVE_DATA or ~/.local/share/qlora-serve)"})
    adapters: list[tuple[str, str]] = option([], "register a PEFT adapter directory at start-up (repeatable)",
                                             flag="adapter", action="append", metavar="NAME=PATH", type=_adapter_flag)
    allowed_roots: list[Path] = option([], "directory RegisterAdapter may read server-side paths from "
                                           "(repeatable; none = off)",
                                       flag="allowed-adapter-root", action="append", metavar="DIR")
    allow_fingerprint_mismatch: bool = option(False, "accept adapters that declare a different base model")
    key_file: Path | None = option(None, "TOML file of hashed API keys, tenants and quotas; none = auth off")
    grace_s: float = option(30.0, "seconds in-flight requests get to finish on SIGTERM", flag="grace")
    max_message_bytes: int = option(8 << 20, "largest gRPC message, bytes")
    max_upload_bytes: int = option(DEFAULT_MAX_UPLOAD_BYTES, "largest adapter upload, bytes")
    max_dataset_bytes: int = option(256 << 20, "largest training job's data (train + eval), bytes, uploaded in chunks")
    resume_interrupted_jobs: bool = option(True, "a training job interrupted by a server stop or crash resumes from "
                                                 "its last checkpoint at the next start (without one: FAILED with "
                                                 "the reason); --no-resume-interrupted-jobs marks it FAILED")
    training_threads: int | None = option(None, "torch intra-op threads of a training job's process on CPU "
                                                "(default: max(1, cores // 2), so inference keeps a core)")
    training_nice: int = option(10, "niceness added to a training job's process (0-19): the OS runs the "
                                    "server's inference threads first")
    training_gpu_memory_fraction: float | None = option(
        None, "cap on a training job's CUDA caching allocator, as a fraction of the device's memory, in (0, 1] "
              "(torch.cuda.set_per_process_memory_fraction; default: no cap)")
    max_concurrent_rpcs: int | None = option(None, "RPCs in flight at once, server-wide; more get RESOURCE_EXHAUSTED "
                                                   "(default: max-running + max-waiting + 16)")
    role: str = option("engine", "engine: load the base and serve inference; registry: serve only the "
                                 "AdapterRegistry service, the one writer of the catalogue and store that engine "
                                 "servers follow with --registry-address (loads no weights; validates adapters "
                                 "against --base's config and --max-lora-rank)", choices=list(ROLES))
    registry_address: str | None = option(None, "HOST:PORT of a --role registry server to follow instead of a "
                                                "local registry: names resolved there (cached, dropped on its "
                                                "change events), adapter files fetched by digest into "
                                                "DATA_DIR/registry-cache and verified; register there")
    registry_key_file: Path | None = option(None, "file holding the API key (an admin key of the registry "
                                                  "server's key file) sent to --registry-address "
                                                  "(default: $QLORA_SERVE_REGISTRY_KEY)")
    registry_cache_ttl_s: float = option(5.0, "seconds a name resolved through --registry-address is reused "
                                              "without news from the registry: how stale it may be while the "
                                              "change stream is down", flag="registry-cache-ttl")
    engine: EngineConfig = field(default_factory=EngineConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {self.metrics_port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
        if self.grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be >= 1, got {self.max_concurrent_rpcs}")
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {list(ROLES)}, got {self.role!r}")
        if self.registry_address is not None and (self.role == "registry" or self.adapters):
            raise ValueError("--registry-address follows another server's registry: register adapters there "
                             "(no --adapter, no --role registry)")
        if self.registry_cache_ttl_s <= 0:
            raise ValueError(f"registry_cache_ttl_s must be > 0, got {self.registry_cache_ttl_s}")
        for name, _ in self.adapters:
            if not name:
                raise ValueError("--adapter needs NAME=PATH with a non-empty NAME")
        self.training_resources()  # raises ValueError naming a bad training share

    def training_resources(self):
        """The training job's share of the machine (qlora_serve.training.jobs.JobResources)."""
        from qlora_serve.training.jobs import JobResources

        return JobResources(threads=self.training_threads, nice=self.training_nice,
                            gpu_memory_fraction=self.training_gpu_memory_fraction)

