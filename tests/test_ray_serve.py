"""qlora-serve on Ray Serve (server/ray_app.py): a real local Ray head on loopback, two
demo replicas at fractional CPUs behind Ray's gRPC proxy, clients with our own stubs.
Skipped when the `ray` extra is not installed. The Ray processes this module starts
are stopped when it ends (ray.shutdown stops the head it started)."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections import Counter

import grpc
import pytest

# Keep every Ray process on loopback (the node IP alone is not enough here); Ray reads
# these when it is imported.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

PROMPT = "hello world, this is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_verb_serves_the_demo_on_two_replicas(demo, tmp_path):
    """`qlora-serve ray-serve` as the README runs it (its own local cluster, stopped on
    SIGTERM); first in the module, before the shared cluster starts."""
    import signal
    import subprocess
    import sys

    from qlora_serve.server.client import Client

    port = _free_port()
    env = dict(os.environ, QLORA_SERVE_DATA=str(tmp_path / "data"), RAY_TMPDIR=tempfile.mkdtemp(prefix="qray", dir="/tmp"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "qlora_serve.server.cli", "ray-serve", "--replicas", "2", "--num-cpus", "0.5",
         "--port", str(port), "--ray-http-port", str(_free_port()), "--base", str(demo.base), "--compute-dtype", "float32",
         *[f"--adapter={n}={p}" for n, p in sorted(demo.adapters.items())]],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "ready on Ray Serve" in line:
                break
        else:
            pytest.fail("ray-serve exited before it was ready:\n" + "".join(seen[-30:]))
        with Client(f"127.0.0.1:{port}", timeout=120) as client:
            assert client.generate(PROMPT, adapter="pirate", max_new_tokens=4).completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    assert proc.returncode == 0


@pytest.fixture(scope="module")
def cluster(demo, tmp_path_factory):
    """(grpc channel to the proxy, key for tenant `acme`, ServerConfig the replicas use,
    proxy port, the registry writer: a QloraServer whose key `ops` is an admin's).
    Two replicas read the one registry the writer keeps (shared_registry)."""
    import ray
    from ray import serve

    from qlora_serve.server.app import QloraServer, ServerConfig
    from qlora_serve.server.ray_app import deployment, grpc_options
    from e2e_keys import write_key_file

    data = tmp_path_factory.mktemp("ray-data")
    keys = write_key_file(data / "keys.toml", {"acme": "client", "ops": "admin"})
    config = ServerConfig(base=str(demo.base), compute_dtype="float32", data_dir=data / "store",
                          adapters=sorted((n, str(p)) for n, p in demo.adapters.items()),
                          key_file=data / "keys.toml", metrics_port=None, http_port=None, port=0, grace_s=1.0)
    writer = QloraServer(config).start().load()  # the registry's one writer
    writer.ops_key = keys["ops"]
    ray_tmp = tempfile.mkdtemp(prefix="qray", dir="/tmp")  # short: Ray's socket paths live here
    try:
        ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
                 object_store_memory=80 << 20, log_to_driver=False, _temp_dir=ray_tmp)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, grpc_options=grpc_options(port))
        serve.run(deployment(config, replicas=2, num_cpus=0.5, shared_registry=True), name="qlora")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield channel, keys["acme"], config, port, writer
        channel.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()  # stops the head and workers this module started (`ray stop` for this cluster)
            shutil.rmtree(ray_tmp, ignore_errors=True)
            writer.stop(0)


@pytest.fixture(scope="module")
def distinct_adapters(demo, tmp_path_factory):
    """name -> directory of random adapters with distinct weights (digests): names that
    share a digest share residency, so routing would rightly send them to one replica."""
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    root = tmp_path_factory.mktemp("distinct")
    names = [f"shared-{i}" for i in range(12)] + [f"burst-{i}" for i in range(3)]
    return {n: build_random_adapter(demo.base, root / n, DemoAdapterSpec(name=n, r=4, alpha=8, seed=500 + i))
            for i, n in enumerate(names)}


def _stub(channel):
    from qlora_serve.v1 import inference_pb2_grpc

    return inference_pb2_grpc.InferenceStub(channel)


def _md(key: str, adapter: str = "") -> list[tuple[str, str]]:
    md = [("authorization", f"Bearer {key}")]
    return md + [("multiplexed_model_id", adapter)] if adapter else md


def _replica(call) -> str:
    return dict(call.trailing_metadata() or ()).get("qlora-replica", "")


def _reference_tokens(config, adapter: str) -> list[int]:
    """Greedy tokens from the same config, built in-process with build_runtime."""
    from dataclasses import replace

    from qlora_serve.server.build import build_runtime
    from qlora_serve.server.engine.request import FinalEvent
    from qlora_serve.server.requests import GenerateInput, InferenceCore

    rt = build_runtime(replace(config, key_file=None, data_dir=config.data_dir.parent / "reference"))  # own registry
    try:
        core = InferenceCore(rt)
        admin = rt.authenticate_metadata(())
        req = core.start(GenerateInput(adapter=adapter, prompt=PROMPT, max_new_tokens=8), admin)
        final = [ev for ev in core.events(req, lambda: True) if isinstance(ev, FinalEvent)][0]
        core.record("Generate", req, "OK", 0.0, final)
        return list(final.token_ids)
    finally:
        rt.close(grace_s=1.0)


def test_same_tokens_as_in_process_engine_and_sticky_replica(cluster):
    from qlora_serve.v1 import inference_pb2

    channel, key, config, _, _ = cluster
    want = _reference_tokens(config, "pirate")
    stub = _stub(channel)
    replicas = Counter()
    for _ in range(4):
        resp, call = stub.Generate.with_call(
            inference_pb2.GenerateRequest(adapter="pirate", prompt=PROMPT, max_new_tokens=8),
            metadata=_md(key, "pirate"), timeout=120)
        assert list(resp.token_ids) == want
        assert resp.adapter.name == "pirate"
        replicas[_replica(call)] += 1
    assert len(replicas) == 1 and "" not in replicas, f"pirate went to several replicas: {replicas}"


def test_stream_matches_unary(cluster):
    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, _ = cluster
    stub = _stub(channel)
    req = inference_pb2.GenerateRequest(adapter="poet", prompt=PROMPT, max_new_tokens=8)
    unary = stub.Generate(req, metadata=_md(key, "poet"), timeout=120)
    parts = list(stub.GenerateStream(req, metadata=_md(key, "poet"), timeout=120))
    assert [t for p in parts for t in p.token_ids] == list(unary.token_ids)
    assert parts[-1].finish_reason == unary.finish_reason
    assert "".join(p.text for p in parts) == unary.text


def test_cancelled_stream_leaves_replicas_serving(cluster):
    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, _ = cluster
    stub = _stub(channel)
    stream = stub.GenerateStream(inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=200, ignore_eos=True),
                                 metadata=_md(key), timeout=120)
    next(stream)
    stream.cancel()
    with pytest.raises(grpc.RpcError) as err:
        list(stream)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert stub.Generate(inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=2),
                         metadata=_md(key), timeout=120).completion_tokens == 2


def _assert_clean(err: grpc.RpcError) -> None:
    details = err.details() or ""
    for leak in ("Traceback", "ray", "Ray", "actor", "pid="):
        assert leak not in details, f"{leak!r} leaked into {details!r}"


def test_error_codes_and_auth_through_the_proxy(cluster):
    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, _ = cluster
    stub = _stub(channel)
    cases = [
        # (request, metadata, code)
        (inference_pb2.GenerateRequest(prompt=PROMPT), [], grpc.StatusCode.UNAUTHENTICATED),
        (inference_pb2.GenerateRequest(prompt=PROMPT), _md("qls_not-a-key"), grpc.StatusCode.UNAUTHENTICATED),
        (inference_pb2.GenerateRequest(prompt=""), _md(key), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=10**6), _md(key), grpc.StatusCode.INVALID_ARGUMENT),
        (inference_pb2.GenerateRequest(adapter="nope", prompt=PROMPT), _md(key, "nope"), grpc.StatusCode.NOT_FOUND),
        (inference_pb2.GenerateRequest(adapter="poet", prompt=PROMPT), _md(key, "pirate"), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for msg, md, code in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(msg, metadata=md, timeout=60)
        assert err.value.code() == code, (msg, md, err.value.details())
        _assert_clean(err.value)
    # Not a GenerateRequest at all: the replica parses it, INVALID_ARGUMENT (not UNKNOWN).
    raw = channel.unary_unary("/qlora_serve.v1.Inference/Generate", request_serializer=None,
                              response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\xff", metadata=_md(key), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    _assert_clean(err.value)
    # A stream refused before its first token gets the same code.
    with pytest.raises(grpc.RpcError) as err:
        list(stub.GenerateStream(inference_pb2.GenerateRequest(prompt=""), metadata=_md(key), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    _assert_clean(err.value)


def test_model_info_through_the_proxy(cluster):
    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, _ = cluster
    info = _stub(channel).GetModelInfo(inference_pb2.GetModelInfoRequest(), metadata=_md(key), timeout=60)
    assert info.max_new_tokens > 0


def test_client_sends_the_routing_header(cluster):
    """`Client` names the adapter in multiplexed_model_id too: the same replica each time."""
    from qlora_serve.server.client import Client

    _, key, _, port, _ = cluster
    with Client(f"127.0.0.1:{port}", api_key=key, timeout=120) as client:
        replicas = set()
        for _ in range(3):
            msg = client.request(PROMPT, adapter="poet", max_new_tokens=2)
            _, call = client.inference.Generate.with_call(msg, **client._gen_kw(msg))
            replicas.add(_replica(call))
    assert len(replicas) == 1 and "" not in replicas


def test_register_once_serve_from_both_replicas_delete_reaches_both(cluster, distinct_adapters):
    """Adapters registered on the writer are served by every replica; deleting them
    there refuses them on every replica (NOT_FOUND), with no restart."""
    from qlora_serve.server.client import Client
    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, writer = cluster
    # Cold adapters go to the least loaded replica, ties (idle) broken by a hash of the
    # name: 12 names all on one replica has p = 2**-11.
    names = [f"shared-{i}" for i in range(12)]
    with Client(f"127.0.0.1:{writer.port}", api_key=writer.ops_key, timeout=60) as admin:
        want = {}
        for name in names:
            admin.upload(name, distinct_adapters[name], owner="acme")
            want[name] = list(admin.inference.Generate(
                inference_pb2.GenerateRequest(adapter=name, prompt=PROMPT, max_new_tokens=4),
                metadata=(("authorization", f"Bearer {writer.ops_key}"),)).token_ids)
        stub = _stub(channel)
        served = Counter()
        for name in names:
            resp, call = stub.Generate.with_call(
                inference_pb2.GenerateRequest(adapter=name, prompt=PROMPT, max_new_tokens=4),
                metadata=_md(key, name), timeout=120)
            assert list(resp.token_ids) == want[name], name
            served[_replica(call)] += 1
        assert len(served) == 2, f"expected both replicas to serve: {served}"
        for name in names:
            admin.delete(name)
    for name in names:
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(inference_pb2.GenerateRequest(adapter=name, prompt=PROMPT, max_new_tokens=4),
                          metadata=_md(key, name), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (name, err.value.details())


def test_burst_for_a_cold_adapter_loads_it_on_one_replica(cluster, distinct_adapters):
    """Concurrent requests for adapters no replica holds yet: each adapter is served by
    one replica (placed once, kept there while it loads), not loaded on both."""
    from concurrent.futures import ThreadPoolExecutor

    from qlora_serve.server.client import Client
    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, writer = cluster
    names = [f"burst-{i}" for i in range(3)]
    stub = _stub(channel)

    def call(name):
        _, c = stub.Generate.with_call(inference_pb2.GenerateRequest(adapter=name, prompt=PROMPT, max_new_tokens=2),
                                       metadata=_md(key, name), timeout=120)
        return name, _replica(c)

    with Client(f"127.0.0.1:{writer.port}", api_key=writer.ops_key, timeout=60) as admin:
        for name in names:
            admin.upload(name, distinct_adapters[name], owner="acme")
        try:
            with ThreadPoolExecutor(12) as pool:
                served = Counter(pool.map(call, [n for n in names for _ in range(4)]))
        finally:
            for name in names:
                admin.delete(name)
    by_name = {n: {r for (m, r), _ in served.items() if m == n} for n in names}
    assert all(len(r) == 1 and "" not in r for r in by_name.values()), by_name


def _registry_stub(channel):
    from qlora_serve.v1 import registry_pb2_grpc

    return registry_pb2_grpc.AdapterRegistryStub(channel)


def test_registry_reads_served_writes_refused_through_the_proxy(cluster, demo):
    """AdapterRegistry through Ray's proxy: List/Get/Load answered by a replica with the
    gRPC server's checks; writes are FAILED_PRECONDITION pointing at the writer."""
    from qlora_serve.v1 import registry_pb2

    channel, key, _, _, _ = cluster
    reg = _registry_stub(channel)
    listed, call = reg.ListAdapters.with_call(registry_pb2.ListAdaptersRequest(), metadata=_md(key), timeout=60)
    assert {"pirate", "poet"} <= {a.name for a in listed.adapters} and _replica(call)
    info = reg.GetAdapter(registry_pb2.GetAdapterRequest(adapter="poet"), metadata=_md(key), timeout=60)
    assert info.name == "poet" and info.digest
    loaded, call = reg.LoadAdapter.with_call(registry_pb2.LoadAdapterRequest(adapter="poet"),
                                             metadata=_md(key, "poet"), timeout=120)
    assert loaded.residency == registry_pb2.RESIDENCY_DEVICE and _replica(call)
    refused = [
        (reg.GetAdapter, registry_pb2.GetAdapterRequest(adapter="nope"), _md(key), grpc.StatusCode.NOT_FOUND),
        (reg.ListAdapters, registry_pb2.ListAdaptersRequest(), [], grpc.StatusCode.UNAUTHENTICATED),
        (reg.RegisterAdapter, registry_pb2.RegisterAdapterRequest(name="x", path=str(demo.adapters["poet"])), _md(key),
         grpc.StatusCode.FAILED_PRECONDITION),
        (reg.SetAlias, registry_pb2.SetAliasRequest(name="poet", alias="prod", version=1), _md(key),
         grpc.StatusCode.FAILED_PRECONDITION),
        (reg.DeleteAdapter, registry_pb2.DeleteAdapterRequest(name="poet"), _md(key),
         grpc.StatusCode.FAILED_PRECONDITION),
        (reg.RegisterAdapter, registry_pb2.RegisterAdapterRequest(name="x", path="/x"), [],
         grpc.StatusCode.UNAUTHENTICATED),
    ]
    for method, msg, md, code in refused:
        with pytest.raises(grpc.RpcError) as err:
            method(msg, metadata=md, timeout=60)
        assert err.value.code() == code, (msg, err.value.details())
        _assert_clean(err.value)
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            assert "writer" in err.value.details(), err.value.details()
    # A client-streamed upload is refused the same way (its stream is not read).
    with pytest.raises(grpc.RpcError) as err:
        reg.UploadAdapter(iter([registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(name="x"))]),
                          metadata=_md(key), timeout=60)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
    # Not a GetAdapterRequest at all: INVALID_ARGUMENT from the replica.
    raw = channel.unary_unary("/qlora_serve.v1.AdapterRegistry/GetAdapter", request_serializer=None,
                              response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xff\xff\xff", metadata=_md(key), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


def test_training_refused_through_the_proxy_naming_the_writer(cluster):
    from qlora_serve.v1 import training_pb2, training_pb2_grpc

    channel, key, _, _, _ = cluster
    train = training_pb2_grpc.TrainingStub(channel)
    calls = [
        lambda md: train.SubmitJob(training_pb2.SubmitJobRequest(adapter_name="t", train_jsonl=b"{}"), metadata=md,
                                   timeout=60),
        lambda md: train.ListJobs(training_pb2.ListJobsRequest(), metadata=md, timeout=60),
        lambda md: list(train.WatchJob(training_pb2.WatchJobRequest(id="x"), metadata=md, timeout=60)),
        lambda md: train.SubmitJobStream(iter([training_pb2.SubmitJobStreamRequest(
            header=training_pb2.SubmitJobRequest(adapter_name="t"))]), metadata=md, timeout=60),
    ]
    for fn in calls:
        with pytest.raises(grpc.RpcError) as err:
            fn(_md(key))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "writer" in err.value.details()
        _assert_clean(err.value)
    with pytest.raises(grpc.RpcError) as err:
        calls[1]([])
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_and_reflection_through_the_proxy(cluster):
    """grpc.health.v1 answered by a replica (no key for Check/Watch, as on the server);
    reflection on Ray's proxy lists and describes our services."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    channel, key, _, _, _ = cluster
    health = health_pb2_grpc.HealthStub(channel)
    resp, call = health.Check.with_call(health_pb2.HealthCheckRequest(), timeout=60)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING and _replica(call)
    inference = health.Check(health_pb2.HealthCheckRequest(service="qlora_serve.v1.Inference"), timeout=60)
    assert inference.status == health_pb2.HealthCheckResponse.SERVING
    training = health.Check(health_pb2.HealthCheckRequest(service="qlora_serve.v1.Training"), timeout=60)
    assert training.status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=60)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    statuses = health.List(health_pb2.HealthListRequest(), metadata=_md(key), timeout=60).statuses
    assert statuses[""].status == health_pb2.HealthCheckResponse.SERVING and len(statuses) == 4
    watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()

    db = ProtoReflectionDescriptorDatabase(channel)
    assert {"qlora_serve.v1.Inference", "qlora_serve.v1.AdapterRegistry", "qlora_serve.v1.Training",
            "grpc.health.v1.Health"} <= set(db.get_services())
    fd = db.FindFileContainingSymbol("qlora_serve.v1.AdapterRegistry")
    assert "RegisterAdapter" in [m.name for s in fd.service for m in s.method]


def test_drained_replica_fails_check_health_and_is_replaced(cluster):
    """Last in the module: a replica drained through a Serve handle (its runtime goes
    NOT_SERVING) fails Serve's check_health, is stopped, and Serve starts a new one;
    the deployment serves again on two replicas."""
    import time

    import ray
    from ray import serve

    from qlora_serve.v1 import inference_pb2

    channel, key, _, _, _ = cluster
    handle = serve.get_deployment_handle("qlora", app_name="qlora")
    drained = handle.options(method_name="drain").remote(1.0).result(timeout_s=120)
    actor = f"SERVE_REPLICA::qlora#qlora#{drained}"
    deadline = time.monotonic() + 300  # a bound on waiting, not a speed assertion
    while True:  # Serve's health check fails, the replica actor is stopped
        try:
            ray.get_actor(actor, namespace="serve")
        except ValueError:
            break
        assert time.monotonic() < deadline, f"drained replica {drained} still alive"
        time.sleep(2)
    while True:  # and replaced
        dep = serve.status().applications["qlora"].deployments["qlora"]
        if dep.replica_states.get("RUNNING", 0) == 2 and str(dep.status).endswith("HEALTHY"):
            break
        assert time.monotonic() < deadline, f"not replaced: {dep}"
        time.sleep(2)
    served = set()
    for _ in range(4):
        _, call = _stub(channel).Generate.with_call(inference_pb2.GenerateRequest(prompt=PROMPT, max_new_tokens=2),
                                                    metadata=_md(key), timeout=120)
        served.add(_replica(call))
    assert drained not in served and "" not in served
