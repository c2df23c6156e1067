"""Ray Serve pieces that need no cluster: the KubeRay example's serve config, the
adapter router's ranking and cold placement, the refusals replicas give. Skipped when
the `ray` extra is not installed."""

from __future__ import annotations

import os
from collections import namedtuple

import pytest

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install -e '.[ray]')")

pytestmark = pytest.mark.ray


def test_kuberay_example_is_a_valid_serve_config():
    """deploy/rayservice.yaml's serveConfigV2 passes Ray's own schema, and its app args
    build the application (nothing started)."""
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from qlora_serve.server.ray_app import build_app

    docs = list(yaml.safe_load_all((Path(__file__).parent.parent / "deploy" / "rayservice.yaml").read_text()))
    service = next(d for d in docs if d["kind"] == "RayService")
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    assert serve_config.grpc_options.grpc_servicer_functions == ["qlora_serve.server.ray_app.add_services_to_proxy"]
    app = serve_config.applications[0]
    config = build_app(app.args)._bound_deployment.init_args[0]
    # Replicas follow the registry Deployment of the same file (adapters are registered there).
    assert config.registry_address == "qlora-registry:50052" and config.adapters == []
    registry = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "qlora-registry")
    assert registry["spec"]["replicas"] == 1
    assert ["--role", "registry"] == registry["spec"]["template"]["spec"]["containers"][0]["args"][:2]
    assert service["spec"]["rayClusterConfig"]["rayVersion"] == __import__("ray").__version__


ReplicaID = namedtuple("ReplicaID", "unique_id")  # hashable, as Serve's


def test_router_ranks_resident_then_cold_placement_then_load():
    """The router's ranking on replica stats as Serve hands them over (no cluster):
    replicas holding the adapter first (least loaded first); a cold adapter to the least
    loaded replica with a free slot, ties broken by rendezvous hash; draining last."""
    from types import SimpleNamespace

    from qlora_serve.server.ray_router import _rendezvous, rank

    def replica(rid, adapters=(), queued=0, free_slots=4, serving=True):
        return SimpleNamespace(replica_id=ReplicaID(rid), routing_stats={
            "adapters": list(adapters), "queued": queued, "running": 0, "free_slots": free_slots, "serving": serving})

    def ids(ranks):
        return [r[0].replica_id.unique_id for r in ranks]

    a, b, c = replica("a", ["poet"], queued=5), replica("b", ["poet"], queued=1), replica("c", queued=0)
    assert ids(rank([a, b, c], "poet@2"))[:2] == ["b", "a"]
    assert ids(rank([a, b, c], "pirate")) == ["c", "b", "a"]  # cold: the least loaded
    assert ids(rank([a, b, c], "")) == ["c", "b", "a"]
    assert rank([], "poet") == []
    # Equal load: the rendezvous hash decides, the same from every proxy.
    x, y, z = replica("x"), replica("y"), replica("z")
    assert rank([x, y, z], "pirate")[0] == [_rendezvous("pirate", [x, y, z])]
    # A full replica (no free adapter slot) is passed over for a cold adapter, even idle.
    full, busy = replica("full", ["poet"], queued=0, free_slots=0), replica("busy", queued=3)
    assert ids(rank([full, busy], "pirate"))[0] == "busy"
    assert ids(rank([full, busy], "poet"))[0] == "full"
    # This router's live in-flight counts, where it has them, beat the last reported load.
    assert ids(rank([a, b, c], "pirate", live={c.replica_id: 9, b.replica_id: 0})) == ["b", "a", "c"]
    # A draining replica is ranked last even when it holds the adapter.
    gone = replica("gone", ["poet"], serving=False)
    assert ids(rank([gone, c], "poet")) == ["c", "gone"]
    assert ids(rank([gone, c], "")) == ["c", "gone"]


def test_refusals_name_the_writer_or_how_to_get_one():
    """Registry writes and Training on replicas: why, and where to go instead."""
    from qlora_serve.server.ray_services import refusal

    shared = refusal("DeleteAdapter", "delete adapters", True, "registry:50051")
    assert "registry:50051" in shared and "one writer" in shared
    train = refusal("SubmitJob", "submit training jobs", True, "")
    assert "one owner" in train and "qlora-serve serve --data-dir" in train
    own = refusal("SetAlias", "set aliases", False, "registry:50051")
    assert "--shared-registry" in own and "one replica only" in own


def test_router_keeps_a_cold_adapter_on_its_replica_while_it_loads():
    """Back-to-back requests for a cold adapter go to the replica the first one went to,
    although its load went up and its stats do not show the adapter yet; the placement
    expires PLACEMENT_TTL_S after the last request that used it."""
    from types import SimpleNamespace

    from qlora_serve.server.ray_router import Placements, rank

    def replica(rid, queued):
        return SimpleNamespace(replica_id=ReplicaID(rid),
                               routing_stats={"adapters": [], "queued": queued, "running": 0, "free_slots": 4})

    placements = Placements(ttl_s=5.0)
    first = rank([replica("a", 0), replica("b", 1)], "pirate", placements, now=100.0)[0][0].replica_id
    assert first.unique_id == "a"
    a_busy, b = replica("a", 3), replica("b", 1)
    a_busy.replica_id = first
    again = rank([a_busy, b], "pirate", placements, now=104.0)
    assert again[0] == [a_busy]  # not b, although b is now less loaded
    assert rank([a_busy, b], "poet", Placements(), now=104.0)[0] == [b]  # a new cold adapter: least loaded
    assert rank([a_busy, b], "pirate", placements, now=108.0)[0] == [a_busy]  # sliding: refreshed at 104
    assert rank([a_busy, b], "pirate", placements, now=120.0)[0] == [b]  # expired: least loaded again
    assert rank([a_busy, b], "poet", placements, now=120.0)[0] == [b]  # other names are not affected


def test_replica_defines_every_rpc_the_proxy_forwards():
    """Ray calls the replica method named like the RPC; a missing one would leak Ray's
    "method does not exist" error instead of a documented status. Streaming RPCs must be
    async generators, unary ones coroutines."""
    import inspect

    from qlora_serve.server.ray_app import QloraReplica
    from qlora_serve.server.ray_services import SERVICES

    for service in SERVICES:
        for m in service.methods:
            fn = getattr(QloraReplica, m.name, None)
            assert fn is not None, f"{service.name}.{m.name} is not defined on the replica"
            want = inspect.isasyncgenfunction if m.server_streaming else inspect.iscoroutinefunction
            assert want(fn), f"{service.name}.{m.name}: streaming={m.server_streaming} but {fn} is not that kind"


def test_shared_registry_and_a_registry_server_are_exclusive():
    from qlora_serve.server.config import ServerConfig
    from qlora_serve.server.ray_app import deployment

    with pytest.raises(ValueError, match="exclusive"):
        deployment(ServerConfig(registry_address="registry:50052"), shared_registry=True)
