"""`--register ADDRESS`: hand a finished adapter to a running server's registry.

The adapter directory (with its qlora_serve_metadata.json) is uploaded over
gRPC; the API key comes from $QLORA_SERVE_API_KEY, read by the client.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def register_adapter(address: str, adapter_dir: Path, name: str) -> Any:
    """Upload `adapter_dir` (its metadata file included) as a new version of `name`
    to the server at `address`; returns its AdapterInfo."""
    from qlora_serve.server.client import register_adapter_dir

    return register_adapter_dir(address, name, Path(adapter_dir))


def check_server_ready(address: str, timeout_s: float = 5.0) -> None:
    """Fail before training, not after it, when the server to register with is not
    reachable and SERVING (FailedPrecondition naming the address)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from qlora_serve.errors import FailedPrecondition

    with grpc.insecure_channel(address) as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout_s).status
        except grpc.RpcError as exc:
            raise FailedPrecondition(f"--register {address}: no qlora-serve server answers there ({exc.code().name}); "
                                     "start one (qlora-serve serve) or fix the address") from None
    if status != health_pb2.HealthCheckResponse.SERVING:
        raise FailedPrecondition(f"--register {address}: the server is not SERVING yet; wait for it to load")
