"""End-to-end adapter loading and residency on a REAL gRPC server (the `reg_server`
of registry_server.py): one cold load for many requests, idempotent load/unload,
recovery of corrupted files, and a restart that keeps the catalogue."""

from __future__ import annotations

import os
import threading

import grpc

import pytest

from adapter_files import corrupt, make_variant
from conftest import stop_server, wait_until
from qlora_serve.v1 import registry_pb2
from registry_server import (PROMPTS, SERVER_ENGINE, Code, Gate, catalogue, disable_avx512_bf16, sample, scrape,
                             stream_once)
from registry_server import pool, rc, reg_server, refs, root  # noqa: F401, F811 (module-scoped fixtures: one server per module)


# ----------------------------------------------------- (3) one cold load
def test_many_concurrent_requests_for_one_cold_adapter_trigger_one_load(reg_server, rc, root, refs):
    info = rc.upload("cold-one", make_variant(root / "poet", root / "cold-variant", scale=0.9))
    assert info.residency == registry_pb2.RESIDENCY_DISK
    engine = reg_server.runtime.engine
    before = scrape(reg_server)
    n = 8
    gate = Gate(reg_server)
    out, errs = [], []
    try:
        blocker = rc.inference.Generate.future(rc.request("hello", max_new_tokens=4), timeout=60)
        assert gate.parked.wait(30)

        def run():
            try:
                out.append(stream_once(rc, "cold-one", PROMPTS[1]))
            except BaseException as exc:
                errs.append(exc)

        threads = [threading.Thread(target=run) for _ in range(n)]
        for t in threads:
            t.start()
        # All n are submitted (in the engine's inbox) before it takes the next command.
        wait_until(lambda: engine.stats()["queued"] == n, what="all requests queued")
    finally:
        gate.remove()
    for t in threads:
        t.join(60)
    blocker.result(60)
    assert not errs, errs
    assert len(out) == n and len({(tuple(t), s) for t, s in out}) == 1
    assert out[0][1] == ("cold-one", 1, info.digest)
    after = scrape(reg_server)
    assert sample(after, "qlora_adapter_loads_total", result="ok") - sample(before, "qlora_adapter_loads_total", result="ok") == 1
    assert sample(after, "qlora_adapter_host_cache_total", result="miss") - sample(before, "qlora_adapter_host_cache_total", result="miss") == 1
    rc.delete("cold-one")


# --------------------------------------------------- (4) load / unload
def test_load_and_unload_are_idempotent(reg_server, rc, root, refs):
    # Files no other test registers (a shared digest could already be cached).
    info = rc.upload("idem", make_variant(root / "poet", root / "idem-variant", scale=0.8))
    assert info.residency == registry_pb2.RESIDENCY_DISK
    assert rc.unload("idem").residency == registry_pb2.RESIDENCY_DISK  # never loaded: still fine
    assert rc.load("idem").residency == registry_pb2.RESIDENCY_DEVICE
    assert rc.load("idem@1").residency == registry_pb2.RESIDENCY_DEVICE
    assert rc.get_adapter("idem").residency == registry_pb2.RESIDENCY_DEVICE
    resident = stream_once(rc, "idem", PROMPTS[0])
    assert resident[1] == ("idem", 1, info.digest)
    assert rc.unload("idem").residency == registry_pb2.RESIDENCY_HOST  # evicted to the host cache
    assert rc.unload("idem").residency == registry_pb2.RESIDENCY_HOST
    assert stream_once(rc, "idem", PROMPTS[0]) == resident  # transparently back on the device
    assert rc.get_adapter("idem").residency == registry_pb2.RESIDENCY_DEVICE
    rc.delete("idem")


def test_registering_the_files_again_recovers_a_corrupted_adapter_another_name_shares(reg_server, rc, root):
    """README recovery ("delete the version and register it again") when another name
    still references the same files: the new registration repairs the store files, so
    the "unusable" mark of their digest must go too."""
    src = make_variant(root / "poet", root / "shared-variant", scale=0.6)
    a, b = rc.upload("shared-a", src), rc.upload("shared-b", src)
    try:
        assert a.digest == b.digest
        record = reg_server.runtime.registry.get("shared-a")
        assert rc.get_adapter("shared-a").residency == registry_pb2.RESIDENCY_DISK  # the next use reads the files
        corrupt(record.path)
        with pytest.raises(grpc.RpcError) as e:
            rc.generate("hello", adapter="shared-a", max_new_tokens=2)
        assert e.value.code() == Code.FAILED_PRECONDITION and "register it again" in e.value.details()
        assert "corrupt" in rc.get_adapter("shared-b").unusable_reason  # the same files

        rc.delete("shared-a")
        again = rc.upload("shared-a", src)
        assert again.digest == a.digest and not again.unusable_reason
        assert not rc.get_adapter("shared-b").unusable_reason
        for name in ("shared-a", "shared-b"):
            assert rc.generate("hello", adapter=name, max_new_tokens=3).completion_tokens == 3
    finally:
        for name in ("shared-a", "shared-b"):
            rc.delete(name)


# ------------------------------------------------------------ (6) restart
def test_restart_keeps_versions_digests_aliases_and_tokens(start_server, pool, root, refs, tmp_path):
    from qlora_serve.server.client import Client

    data_dir = tmp_path / "data"
    kw = dict(adapters={}, engine=SERVER_ENGINE, allowed_roots=[root], data_dir=data_dir)
    first = start_server(**kw)
    disable_avx512_bf16(first)
    asks = ["rs-a", "rs-a@1", "rs-a@2", "rs-a@canary", "rs-b", "rs-c"]
    with Client(f"127.0.0.1:{first.port}", timeout=60) as c:
        c.upload("rs-a", pool["pirate"], set_default=True, labels={"team": "support"})
        c.upload("rs-a", pool["poet"])
        c.set_alias("rs-a", "canary", 2)
        c.upload("rs-b", pool["extra-r4"])
        c.upload("rs-b", pool["extra-r8"])
        c.delete("rs-b", 2)  # versions are never reused, even across a restart
        c.register_path("rs-c", str(root / "pirate"), owner="acme")
        listed = catalogue(c)
        served = {ref: stream_once(c, ref, p) for ref in asks for p in PROMPTS[:1]}
    stop_server(first)

    second = start_server(**kw)
    disable_avx512_bf16(second)
    with Client(f"127.0.0.1:{second.port}", timeout=60) as c:
        assert catalogue(c) == listed
        assert {a.name: a.residency for a in c.list_adapters()} == {
            "rs-a": registry_pb2.RESIDENCY_DISK, "rs-b": registry_pb2.RESIDENCY_DISK, "rs-c": registry_pb2.RESIDENCY_DISK}
        for ref in asks:
            toks, who = stream_once(c, ref, PROMPTS[0])
            assert (toks, who) == served[ref], ref
            refs.check(who[2], PROMPTS[0], toks, f"{ref} after restart")
        assert c.upload("rs-b", pool["extra-r16"]).version == 3
    stop_server(second)
    assert os.listdir(data_dir / "tmp") == []
