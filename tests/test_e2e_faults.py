"""Faults through a REAL gRPC server on loopback (no mocks; faults are injected
for real: bytes flipped in the adapter store on disk, a forward hook on the
in-process server's model that raises once).

* An adapter corrupted on disk after registration: the digest check at load
  answers FAILED_PRECONDITION, the adapter is marked unusable (ListAdapters
  ``unusable_reason``), later requests for it are refused at once, and every
  other adapter keeps serving. Deleting and registering it again recovers.
* The engine raising mid-step: the requests in that step get INTERNAL naming
  their request id; the server keeps serving.
"""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from conftest import wait_until
from e2e_keys import rejections
from qlora_serve.server.client import Client
from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter


@pytest.fixture(scope="module")
def fault_server(start_server, demo, tmp_path_factory):
    fragile = build_random_adapter(demo.base, tmp_path_factory.mktemp("fragile") / "fragile",
                                   DemoAdapterSpec(name="fragile", r=4, alpha=8, seed=777))
    server = start_server(adapters={**demo.adapters, "fragile": fragile})
    server.fragile_dir = fragile
    return server


@pytest.fixture(scope="module")
def client(fault_server):
    with Client(f"127.0.0.1:{fault_server.port}", timeout=60) as c:
        yield c


def corrupt(directory) -> None:
    """Flip bytes in the middle of the stored weights file, as a bad disk would."""
    path = os.path.join(directory, "adapter_model.safetensors")
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(16)
        f.seek(-len(chunk), os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in chunk))


def test_adapter_corrupted_on_disk_is_failed_precondition_and_marked_unusable(fault_server, client):
    server = fault_server
    record = server.runtime.registry.get("fragile")
    assert server.runtime.engine.residency.slot_of(record.digest) is None  # cold: next use reads the disk
    corrupt(record.path)

    before = rejections(server, "failed_precondition", "anonymous")
    with pytest.raises(grpc.RpcError) as e:
        client.generate("hello", adapter="fragile", max_new_tokens=2)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "corrupt" in e.value.details() and "register it again" in e.value.details()

    (info,) = client.list_adapters("fragile")
    assert "corrupt" in info.unusable_reason
    assert all(not a.unusable_reason for a in client.list_adapters() if a.name != "fragile")
    assert "corrupt" in client.get_adapter("fragile").unusable_reason
    # Marked: refused at once, streaming and unary alike, and on an explicit load.
    for call in (lambda: client.generate("hi", adapter="fragile", max_new_tokens=2),
                 lambda: list(client.stream("hi", adapter="fragile@1", max_new_tokens=2)),
                 lambda: client.load("fragile")):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
    assert rejections(server, "failed_precondition", "anonymous") == before + 4

    # Everything else keeps serving, concurrently with refusals for the broken one.
    outs = [client.generate("hello", adapter=a, max_new_tokens=3) for a in ("pirate", "poet", "")]
    assert [o.completion_tokens for o in outs] == [3, 3, 3]
    wait_until(lambda: server.runtime.engine.stats()["running"] == 0, what="rows retired")

    # Recovery as the message says: delete this version, register it again.
    client.delete("fragile")
    assert server.runtime.registry.unusable_reason(record.digest) is None
    info = client.upload("fragile", server.fragile_dir)
    assert not info.unusable_reason
    assert client.generate("hello", adapter="fragile", max_new_tokens=3).completion_tokens == 3


class FailOnce:
    """A forward-pre-hook on the server's model that raises on the next forward after `arm()`."""

    def __init__(self, model) -> None:
        self.armed = threading.Event()
        self.fired = threading.Event()
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if self.armed.is_set() and not self.fired.is_set():
            self.fired.set()
            raise RuntimeError("injected fault: simulated device error in a forward pass")

    def arm(self) -> None:
        self.armed.set()

    def remove(self) -> None:
        self._handle.remove()


def test_engine_raising_mid_step_fails_those_requests_with_internal_and_keeps_serving(
        fault_server, client, engine_gate):
    server = fault_server
    gate = engine_gate(server)  # registered first: its hook runs before the fault's
    fault = FailOnce(server.runtime.engine.base.model)
    try:
        streams = {rid: client.stream("The quick brown fox", adapter=a, max_new_tokens=200, request_id=rid)
                   for rid, a in (("victim-1", "pirate"), ("victim-2", ""))}
        for s in streams.values():
            assert next(s).token_ids  # both rows are running (each has its first token)
        gate.close()
        gate.wait_parked()  # the engine waits at the start of a decode step with both rows in it
        fault.arm()
        gate.release()
        for rid, s in streams.items():
            with pytest.raises(grpc.RpcError) as e:
                list(s)
            assert e.value.code() == grpc.StatusCode.INTERNAL
            assert rid in e.value.details() and "keeps serving" in e.value.details(), e.value.details()
        assert fault.fired.is_set()
    finally:
        fault.remove()
    wait_until(lambda: server.runtime.engine.stats()["running"] == 0 and server.runtime.quotas.in_flight("anonymous") == 0,
               what="failed rows freed and leases released")
    assert server.metrics.registry.get_sample_value(
        "qlora_requests_total", {"method": "GenerateStream", "adapter": "pirate", "tenant": "anonymous",
                                 "code": "INTERNAL"}) == 1
    # The server keeps serving: same adapters, same prompt, to the end.
    out = client.generate("The quick brown fox", adapter="pirate", max_new_tokens=5)
    assert out.completion_tokens == 5
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    health = health_pb2_grpc.HealthStub(client.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
