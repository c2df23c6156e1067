"""`qlora-serve ray-serve`: the demo (or --base) on N Ray Serve replicas behind Ray's
gRPC proxy (server/ray_app.py). Needs the extra: pip install "qlora-serve[ray]"."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

from qlora_serve.options import add_flags, values_from
from qlora_serve.server.cli import _DefaultsHelp
from qlora_serve.server.config import ServerConfig


def add_ray_serve_parser(sub) -> None:
    """Register the `ray-serve` verb."""
    from qlora_serve.server.engine.config import EngineConfig
    from qlora_serve.server.requests import RequestLimits

    p = sub.add_parser("ray-serve", formatter_class=_DefaultsHelp,
                       help="serve on N Ray Serve replicas behind Ray's gRPC proxy (needs qlora-serve[ray])")
    p.add_argument("--replicas", type=int, default=2, help="engine replicas, each with its own base and engine")
    p.add_argument("--port", type=int, default=9000, help="Ray's gRPC proxy port (Inference service)")
    p.add_argument("--ray-http-port", type=int, default=8001,
                   help="Ray Serve's own HTTP proxy (loopback; nothing of ours is served there)")
    p.add_argument("--ray-address", default=None,
                   help="existing Ray cluster (e.g. auto); default: start a local one on 127.0.0.1")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (fractions allowed)")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per replica (fractions allowed)")
    # The replica's own settings: ServerConfig's flags (defaults stated there), with the
    # help a replica needs; ports and the HTTP/metrics front ends are the proxy's business.
    add_flags(p, ServerConfig, only=("base", "compute_dtype", "device", "adapters", "key_file", "registry_address",
                                     "registry_key_file", "registry_cache_ttl_s"), help_overrides={
        "device": "auto, cpu, cuda, cuda:N (per replica)",
        "adapters": "register a PEFT adapter directory on every replica at start-up (repeatable)",
        "key_file": "TOML file of hashed API keys; checked in every replica"})
    p.add_argument("--data-dir", type=Path, default=None,
                   help="each replica keeps its registry (or, with --registry-address, its cache of adapter "
                        "files) under DATA_DIR/replicas/<replica id>")
    p.add_argument("--shared-registry", action="store_true",
                   help="replicas read the one registry that `qlora-serve serve --data-dir DATA_DIR` (started "
                        "first, same machine) writes: register there once, every replica serves it")
    p.add_argument("--registry-writer", default="", metavar="HOST:PORT",
                   help="that writer's gRPC address, named to clients whose registry writes or Training "
                        "calls reach the replicas (FAILED_PRECONDITION; with --registry-address, writes are "
                        "forwarded there instead)")
    add_flags(p.add_argument_group("engine (per replica)"), EngineConfig)
    add_flags(p.add_argument_group("request limits"), RequestLimits)
    p.set_defaults(func=_ray_serve)


def _ray_serve(args) -> int:
    from qlora_serve.server.config import default_data_dir
    from qlora_serve.server.engine.config import EngineConfig
    from qlora_serve.server.requests import RequestLimits

    if args.replicas < 1:
        print(f"qlora-serve: error: --replicas must be >= 1, got {args.replicas}", file=sys.stderr)
        return 2
    if args.shared_registry and args.registry_address:
        print("qlora-serve: error: choose --shared-registry (one machine) or --registry-address (any node), not both",
              file=sys.stderr)
        return 2
    if args.ray_address is None:
        # A local cluster stays on loopback; Ray reads this when it is imported.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
        from ray import serve

        from qlora_serve.server.ray_app import deployment, grpc_options
    except ImportError:
        print('qlora-serve: error: ray-serve needs Ray Serve: pip install "qlora-serve[ray]"', file=sys.stderr)
        return 2
    try:
        config = ServerConfig(base=args.base, metrics_port=None, http_port=None, compute_dtype=args.compute_dtype,
                              device=args.device, data_dir=(args.data_dir or default_data_dir()).resolve(),
                              adapters=args.adapters, key_file=args.key_file and args.key_file.resolve(),
                              registry_address=args.registry_address, registry_cache_ttl_s=args.registry_cache_ttl_s,
                              registry_key_file=args.registry_key_file and args.registry_key_file.resolve(),
                              engine=EngineConfig(**values_from(args, EngineConfig)),
                              limits=RequestLimits(**values_from(args, RequestLimits)))
    except ValueError as exc:
        print(f"qlora-serve: error: {exc}", file=sys.stderr)
        return 2
    if args.ray_address:
        ray.init(address=args.ray_address)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False)
    stop = threading.Event()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.ray_http_port}, grpc_options=grpc_options(args.port))
        serve.run(deployment(config, replicas=args.replicas, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                             shared_registry=args.shared_registry, registry_writer=args.registry_writer),
                  name="qlora")
        print(f"qlora-serve ready on Ray Serve: {args.replicas} replica(s), gRPC on port {args.port}; route an "
              f"adapter with the multiplexed_model_id header, e.g.\n  qlora-serve generate --address "
              f"localhost:{args.port} --adapter pirate \"hello\"", flush=True)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
