"""Ray Serve replicas following one registry server (`build_app(registry_address=...)`):
a real `qlora-serve serve --role registry` process and a local Ray head on loopback with
two demo replicas; register once on the registry, both replicas serve it, a delete
reaches both; registry writes sent to Ray's proxy are forwarded to the registry with the
caller's key and its answer. Replicas cache names for an hour here, so only the
registry's change stream (or, on the replica that forwarded a write, its own
invalidation) can make them see a change. Skipped without the `ray` extra."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import Counter
from dataclasses import replace

import grpc
import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on loopback (see test_ray_serve.py)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")

from conftest import wait_until  # noqa: E402
from e2e_keys import md, write_key_file  # noqa: E402
from registry_process import RegistryProcess, _free_port  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

PROMPT = "hello world, this is"


@pytest.fixture(scope="module")
def cluster(demo, tmp_path_factory):
    """(grpc channel to Ray's proxy, keys, the registry process, the replicas' ServerConfig)."""
    import ray
    from ray import serve

    from qlora_serve.server.ray_app import build_app, grpc_options

    d = tmp_path_factory.mktemp("ray-remote-registry")
    keys = write_key_file(d / "keys.toml", {"svc": "admin", "ops": "admin", "acme": "client", "rival": "client"})
    (d / "svc.key").write_text(keys["svc"])
    (d / "adapters").mkdir()  # RegisterAdapter through the proxy reads adapters there, on the registry's disk
    registry = RegistryProcess(demo.base, d / "registry", d / "keys.toml", d / "registry.log",
                               allowed_root=d / "adapters").start()
    ray_tmp = tempfile.mkdtemp(prefix="qray", dir="/tmp")  # short: Ray's socket paths live here
    try:
        ray.init(_node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
                 object_store_memory=80 << 20, log_to_driver=False, _temp_dir=ray_tmp)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _free_port()}, grpc_options=grpc_options(port))
        app = build_app({"base": str(demo.base), "data_dir": str(d / "replicas"), "key_file": str(d / "keys.toml"),
                         "replicas": "2", "num_cpus": "0.5", "registry_address": registry.address,
                         "registry_key_file": str(d / "svc.key"), "registry_cache_ttl": "3600"})
        serve.run(app, name="qlora")
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        yield channel, keys, registry, app._bound_deployment.init_args[0], port
        channel.close()
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(ray_tmp, ignore_errors=True)
            registry.kill()


def _reference_tokens(config, adapter_dir) -> list[int]:
    """Greedy tokens of the adapter registered locally, in-process, with the replicas' config."""
    from qlora_serve.server.build import build_runtime
    from qlora_serve.server.engine.request import FinalEvent
    from qlora_serve.server.requests import GenerateInput, InferenceCore

    rt = build_runtime(replace(config, registry_address=None, key_file=None, adapters=[("ref", str(adapter_dir))],
                               data_dir=config.data_dir.parent / "reference"))
    try:
        core = InferenceCore(rt)
        req = core.start(GenerateInput(adapter="ref", prompt=PROMPT, max_new_tokens=4), rt.authenticate_metadata(()))
        final = [ev for ev in core.events(req, lambda: True) if isinstance(ev, FinalEvent)][0]
        core.record("Generate", req, "OK", 0.0, final)
        return list(final.token_ids)
    finally:
        rt.close(grace_s=1.0)


def test_register_once_on_the_registry_both_replicas_serve_it_delete_reaches_both(cluster, demo):
    from qlora_serve.server.client import Client
    from qlora_serve.v1 import inference_pb2, inference_pb2_grpc

    channel, keys, registry, config, _ = cluster
    want = _reference_tokens(config, demo.adapters["poet"])
    stub = inference_pb2_grpc.InferenceStub(channel)

    def generate(name):
        return stub.Generate.with_call(inference_pb2.GenerateRequest(adapter=name, prompt=PROMPT, max_new_tokens=4),
                                       metadata=md(keys["acme"]) + (("multiplexed_model_id", name),), timeout=120)

    names = [f"remote-{i}" for i in range(12)]  # hashed over both replicas: all on one has p = 2**-11
    with Client(registry.address, api_key=keys["ops"], timeout=60) as ops:
        digest = {ops.upload(name, demo.adapters["poet"], owner="acme").digest for name in names}.pop()
        served = Counter()
        for name in names:
            resp, call = generate(name)
            assert list(resp.token_ids) == want, name
            assert resp.adapter.digest == digest
            served[dict(call.trailing_metadata()).get("qlora-replica", "")] += 1
        assert len(served) == 2 and "" not in served, f"expected both replicas to serve: {served}"
        for name in names:
            ops.delete(name)

    def refused(name) -> bool:
        try:
            generate(name)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc.details()
            return True
        return False

    for name in names:
        wait_until(lambda n=name: refused(n), what=f"the delete of {name} to reach its replica")


def test_writes_through_the_proxy_are_forwarded_with_the_callers_key_and_reach_both_replicas(cluster, demo):
    """Register (by path and by upload), alias and delete through Ray's proxy: the replica
    that takes the call forwards it to the registry with the caller's key; both replicas
    serve the change; the registry's own refusals come back unchanged."""
    from qlora_serve.server.client import Client
    from qlora_serve.v1 import inference_pb2, inference_pb2_grpc, registry_pb2

    channel, keys, registry, config, port = cluster
    stub = inference_pb2_grpc.InferenceStub(channel)
    acme = md(keys["acme"])
    Code = grpc.StatusCode

    def generate(ref):
        """(status code, the replica that answered)."""
        try:
            _, call = stub.Generate.with_call(inference_pb2.GenerateRequest(adapter=ref, prompt=PROMPT, max_new_tokens=4),
                                              metadata=acme + (("multiplexed_model_id", ref),), timeout=120)
        except grpc.RpcError as exc:
            call = exc
        return call.code(), dict(call.trailing_metadata() or ()).get("qlora-replica", "")

    def status(fn, *args, **kw):
        with pytest.raises(grpc.RpcError) as err:
            fn(*args, **kw)
        assert "Traceback" not in err.value.details() and "ray" not in err.value.details().lower()
        return err.value.code(), err.value.details()

    names = [f"via-proxy-{i}" for i in range(12)]  # hashed over both replicas, as above
    # One digest per name (the config file's bytes differ), so each name sticks to the replica holding it.
    root = config.data_dir.parent / "adapters"
    for i, name in enumerate(names):
        shutil.copytree(demo.adapters["poet"], root / name)
        with open(root / name / "adapter_config.json", "a") as f:
            f.write("\n" * (i + 1))
    with Client(f"127.0.0.1:{port}", api_key=keys["acme"], timeout=60) as c:
        digests = set()
        for i, name in enumerate(names):  # half by a path on the registry's disk, half uploaded through the proxy
            info = c.register_path(name, str(root / name)) if i % 2 else c.upload(name, root / name)
            assert (info.name, info.version, info.owner) == (name, 1, "acme")  # acme's own key reached the registry
            digests.add(info.digest)
        assert len(digests) == len(names)
        with Client(registry.address, api_key=keys["ops"], timeout=60) as ops:
            assert set(names) <= {a.name for a in ops.list_adapters()}
        served = Counter()
        for name in names:
            code, replica = generate(name)
            assert code == Code.OK, name
            served[replica] += 1
        assert len(served) == 2 and "" not in served, f"expected both replicas to serve: {served}"

        # The registry's answers, unchanged: its tenancy and auth checks, its INVALID_ARGUMENT.
        with Client(f"127.0.0.1:{port}", api_key=keys["rival"], timeout=60) as rival:
            code, details = status(rival.set_alias, names[0], "mine", 1)
            assert code == Code.PERMISSION_DENIED and "rival" in details
        code, details = status(c.register_path, "theirs", str(demo.adapters["poet"]), owner="rival")
        assert code == Code.PERMISSION_DENIED and "can only register adapters it owns" in details
        with Client(f"127.0.0.1:{port}", timeout=60) as nobody:
            assert status(nobody.delete, names[0])[0] == Code.UNAUTHENTICATED
        code, details = status(c.registry.RegisterAdapter, registry_pb2.RegisterAdapterRequest(name="x"), metadata=acme,
                               timeout=60)
        assert code == Code.INVALID_ARGUMENT and "path is empty" in details
        raw = channel.unary_unary("/qlora_serve.v1.AdapterRegistry/SetAlias", request_serializer=None,
                                  response_deserializer=None)
        assert status(raw, b"\xff\xff\xff", metadata=acme, timeout=60)[0] == Code.INVALID_ARGUMENT
        code, details = status(c.submit_job, "trained", b'{"text": "hi"}\n')
        assert code == Code.FAILED_PRECONDITION and f"--register {registry.address}" in details

        for name in names:  # an alias set through the proxy reaches the replica serving the name
            assert generate(f"{name}@stable")[0] == Code.NOT_FOUND
            c.set_alias(name, "stable", 1)
        served = Counter()
        for name in names:
            answers = []
            wait_until(lambda n=name: answers.append(generate(f"{n}@stable")) or answers[-1][0] == Code.OK,
                       what=f"the alias of {name} to arrive")
            served[answers[-1][1]] += 1
        assert len(served) == 2, f"expected both replicas to serve the alias: {served}"

        for name in names:
            assert [i.name for i in c.delete(name)] == [name]
        # Ray's proxy drops trailing metadata on errors (no replica named), but the replica
        # holding a name keeps getting its requests until it hears of the delete.
        for name in names:
            wait_until(lambda n=name: generate(n)[0] == Code.NOT_FOUND, what=f"the delete of {name} to arrive")


def test_replicas_remove_their_cache_when_stopped(cluster):
    """Last in the module: each replica's fetched files live under DATA_DIR/replicas/<id>;
    a replica's id never comes back, so a stopped replica removes its directory."""
    import time

    from ray import serve

    config = cluster[3]
    own = config.data_dir / "replicas"
    assert len([p for p in own.iterdir() if p.is_dir()]) == 2  # one per running replica
    serve.delete("qlora")
    deadline = time.monotonic() + 120  # a bound on waiting, not a speed assertion
    while any(p.is_dir() for p in own.iterdir()):
        assert time.monotonic() < deadline, f"left behind: {sorted(p.name for p in own.iterdir())}"
        time.sleep(1)
