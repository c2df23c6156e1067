"""Shared fixtures: the tiny demo model, built once per test session through the
real save_pretrained/from_pretrained path."""

from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep torch from oversubscribing when gRPC threads also run.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """DemoPaths of the tiny base and its demo adapters (pirate r=8, poet r=4)."""
    from qlora_serve.server.demo import ensure_demo

    return ensure_demo(tmp_path_factory.mktemp("demo-cache"))


# ---------------------------------------------------------------- e2e servers
# Real gRPC servers on loopback ports (port 0 = any free port), no mocks.

E2E_EXTRA_ADAPTERS = (  # (name, rank, seed): mixed ranks for the multi-adapter tests
    ("extra-r4", 4, 101),
    ("extra-r8", 8, 102),
    ("extra-r16", 16, 103),
)


@pytest.fixture(scope="session")
def extra_adapters(demo, tmp_path_factory):
    """{name: dir} of three more random adapters for the demo base (ranks 4, 8, 16)."""
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    root = tmp_path_factory.mktemp("extra-adapters")
    return {name: build_random_adapter(demo.base, root / name, DemoAdapterSpec(name=name, r=r, alpha=2 * r, seed=seed))
            for name, r, seed in E2E_EXTRA_ADAPTERS}


def stop_server(server, grace_s: float = 0.0) -> None:
    """Stop a test server once (a second call is a no-op)."""
    if not getattr(server, "_test_stopped", False):
        server._test_stopped = True
        server.stop(grace_s)


@pytest.fixture(scope="module")
def start_server(demo, tmp_path_factory):
    """Factory: `start_server(**overrides)` starts and loads a real server (gRPC, the
    OpenAI HTTP API and metrics on free loopback ports, float32 compute, the demo adapters, a fresh
    data dir); `engine=` / `limits=` take dicts of EngineConfig / RequestLimits
    fields. Every server it started is stopped when the module ends."""
    from qlora_serve.server.app import QloraServer, ServerConfig
    from qlora_serve.server.engine.config import EngineConfig
    from qlora_serve.server.inference_service import RequestLimits

    servers = []

    def start(*, adapters=None, engine=None, limits=None, load=True, **overrides):
        if adapters is None:
            adapters = demo.adapters
        if isinstance(adapters, dict):
            adapters = sorted((n, str(p)) for n, p in adapters.items())
        cfg = ServerConfig(**{
            "base": str(demo.base), "port": 0, "metrics_port": 0, "http_port": 0, "compute_dtype": "float32",
            "data_dir": tmp_path_factory.mktemp("server-data"), "adapters": list(adapters),
            "engine": EngineConfig(**(engine or {})), "limits": RequestLimits(**(limits or {})), **overrides})
        server = QloraServer(cfg)
        servers.append(server)
        server.start()
        if load:
            server.load()
        return server

    yield start
    for server in servers:
        stop_server(server)


@pytest.fixture(scope="module")
def server(start_server, demo, extra_adapters):
    """One shared server per module with pirate, poet and the extra adapters."""
    return start_server(adapters={**demo.adapters, **extra_adapters})


@pytest.fixture(scope="module")
def client(server):
    from qlora_serve.server.client import Client

    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


class EngineGate:
    """Parks the engine thread at the start of its next forward pass (a
    forward-pre-hook on the base model) until `release()`: lets a test line up
    requests deterministically (all queued before a step, a row held running)
    without sleeping. Also counts forward passes."""

    def __init__(self, server) -> None:
        import threading

        self.model = server.runtime.engine.base.model
        self.forwards = 0
        self.batch_sizes: list[int] = []  # rows of each forward pass, in order
        self.parked = threading.Event()  # set while the engine waits at the gate
        self._open = threading.Event()
        self._open.set()
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.forwards += 1
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.batch_sizes.append(int(ids.shape[0]))
        if not self._open.is_set():
            self.parked.set()
            if not self._open.wait(timeout=60):
                raise RuntimeError("EngineGate was never released")
            self.parked.clear()

    def close(self) -> None:
        """Block the next forward pass (the engine parks there)."""
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def wait_parked(self, timeout: float = 30.0) -> None:
        assert self.parked.wait(timeout), "the engine never reached the gate"

    def remove(self) -> None:
        self.release()
        self._handle.remove()


@pytest.fixture
def engine_gate():
    """Factory `engine_gate(server) -> EngineGate`; removed after the test."""
    gates = []

    def make(server) -> EngineGate:
        gate = EngineGate(server)
        gates.append(gate)
        return gate

    yield make
    for gate in gates:
        gate.remove()


def wait_until(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a cheap predicate (for state that has no event to wait on, e.g. a queue count)."""
    import time

    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def watch_until(client, job_id: str, stop=lambda ev: False) -> list:
    """WatchJob events until the stream ends (the job ended) or `stop(event)` is true
    (then the call is cancelled)."""
    events = []
    call = client.watch_job(job_id)
    for ev in call:
        events.append(ev)
        if stop(ev):
            call.cancel()
            break
    return events


def run_in_one_step(server, client, gate, calls: list[tuple[str, dict]]) -> list:
    """Run `calls` [(prompt, kwargs)] so that all are admitted in one step and decoded
    in the same forward passes; returns their unary responses in order."""
    engine = server.runtime.engine
    gate.close()
    blocker = client.inference.Generate.future(client.request("blocker", max_new_tokens=16))
    gate.wait_parked()
    futures = [client.inference.Generate.future(client.request(p, **kw)) for p, kw in calls]
    wait_until(lambda: engine.stats()["queued"] == len(calls), what="all requests queued")
    gate.release()
    out = [f.result(60) for f in futures]
    blocker.result(60)
    # All were admitted in one step: one prefill pass over every one of them (the
    # blocker may already have left, e.g. after an early eos).
    assert max(gate.batch_sizes) >= len(calls), gate.batch_sizes
    return out


def status_of(fn, *args, **kw):
    """(grpc.StatusCode, details) of calling fn; a stream is read to its end (its status
    comes with the first message). OK and "" when it succeeds."""
    import grpc

    try:
        result = fn(*args, **kw)
        if hasattr(result, "__next__"):
            list(result)
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""
