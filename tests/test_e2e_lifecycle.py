"""Server lifecycle through a REAL gRPC server: health NOT_SERVING while loading,
SERVING after load, NOT_SERVING on shutdown; during the drain new requests get
UNAVAILABLE while an in-flight one completes; after stop the port is closed."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import stop_server
from qlora_serve.server.app import SERVICE_NAMES
from qlora_serve.server.client import Client
from qlora_serve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

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


def test_sigterm_lets_an_in_flight_stream_send_its_last_message(demo, tmp_path):
    """A real `qlora-serve serve` process, a stream in flight, SIGTERM: the client still
    receives every token and the final message (finish_reason set), and the process
    exits 0. The client reads slowly: a small HTTP/2 window (lookahead 1 KiB, no BDP
    growth) keeps the server from sending the stream's tail until the client reads,
    and it reads nothing after the first message until the server says it is draining
    and waiting for that call (or has exited: the tail was dropped, which fails)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_serve.server.cli", "serve", "--base", str(demo.base), "--port", "0",
         "--no-metrics", "--no-http", "--data-dir", str(tmp_path / "data"), "--compute-dtype", "float32", "--grace", "120",
         "--adapter", f"pirate={demo.adapters['pirate']}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)], daemon=True).start()
    seen: list[str] = []

    def read_until(*marks: str) -> str | None:
        """The first output line holding one of `marks`; None when the process ended first."""
        while True:
            line = lines.get(timeout=300)
            if line is None:
                return None
            seen.append(line)
            if any(m in line for m in marks):
                return line

    channel = None
    try:
        ready = read_until("ready on")
        assert ready is not None, "".join(seen)
        port = ready.split("ready on ", 1)[1].split()[0].rsplit(":", 1)[1]
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[
            ("grpc.http2.lookahead_bytes", 1024), ("grpc.http2.bdp_probe", 0)])
        stream = inference_pb2_grpc.InferenceStub(channel).GenerateStream(inference_pb2.GenerateRequest(
            prompt="hello world", adapter="pirate", max_new_tokens=400), timeout=300)
        messages = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        # The engine is done and our tail unsent; the server waits for us (or, if it does
        # not, exits and the tail is lost: reading the rest below then raises).
        waiting = read_until("in-flight call", "Traceback")
        assert waiting is None or "Traceback" not in waiting, "".join(seen)
        try:
            messages += list(stream)
        except grpc.RpcError as exc:
            raise AssertionError(f"the stream lost its tail after {len(messages)} messages: {exc.code()} "
                                 f"{exc.details()}\n{''.join(seen)}") from None
        assert waiting is not None, "".join(seen)
        assert messages[-1].finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        assert sum(len(m.token_ids) for m in messages) == messages[-1].completion_tokens > 1
        assert proc.wait(120) == 0
    finally:
        if channel is not None:
            channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
