"""Server lifecycle through a REAL gRPC server: health NOT_SERVING while loading,
SERVING after load, NOT_SERVING on shutdown; during the drain new requests get
UNAVAILABLE while an in-flight one completes; after stop the port is closed."""

from __future__ import annotations

import queue
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import stop_server
from qlora_serve.server.app import SERVICE_NAMES
from qlora_serve.server.client import Client
from qlora_serve.v1 import common_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
INFERENCE = "qlora_serve.v1.Inference"


def test_health_and_graceful_drain(start_server, engine_gate):
    server = start_server(load=False)  # port open, base not loaded yet
    address = f"127.0.0.1:{server.port}"
    channel = grpc.insecure_channel(address)
    health = health_pb2_grpc.HealthStub(channel)
    client = Client(address, timeout=60)
    try:
        assert INFERENCE in SERVICE_NAMES
        watched: queue.Queue = queue.Queue()
        watch = health.Watch(health_pb2.HealthCheckRequest(service=INFERENCE))

        def watcher():
            try:
                for resp in watch:
                    watched.put(resp.status)
            except grpc.RpcError as exc:  # the stream ends when the server closes
                watched.put(exc.code())

        threading.Thread(target=watcher, daemon=True).start()
        assert watched.get(timeout=30) == NOT_SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service="")).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:  # loading: refused, not queued
            client.generate("hello", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "loading" in err.value.details()

        server.load()
        assert watched.get(timeout=30) == SERVING
        for service in ("",) + SERVICE_NAMES:
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == SERVING

        # An in-flight stream, held mid-generation by the gate while shutdown starts.
        gate = engine_gate(server)
        in_flight = client.stream("hello world", adapter="pirate", max_new_tokens=16)
        first = next(in_flight)
        gate.close()
        gate.wait_parked()
        stopper = threading.Thread(target=stop_server, args=(server, 30.0))
        stopper.start()
        assert watched.get(timeout=30) == NOT_SERVING  # health flips first ...
        for call in (lambda: client.generate("hello", max_new_tokens=2),
                     lambda: list(client.stream("hello", max_new_tokens=2))):
            with pytest.raises(grpc.RpcError) as err:  # ... and new requests are refused
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in err.value.details()
        assert stopper.is_alive()  # still draining: the in-flight request holds it
        gate.release()
        rest = list(in_flight)  # ... while the in-flight one completes normally
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert len(first.token_ids) + sum(len(ch.token_ids) for ch in rest) == 16
        stopper.join(60)
        assert not stopper.is_alive()

        with pytest.raises(grpc.RpcError) as err:  # after stop: nobody is listening
            Client(address, timeout=5).generate("hello", max_new_tokens=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        client.close()
        channel.close()
