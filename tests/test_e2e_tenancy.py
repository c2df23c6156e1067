"""Multi-tenancy through a REAL gRPC server on loopback with authentication on
(a key file of SHA-256 hashes, keys from `generate_key`); no mocks.

Tenants: ``alpha`` and ``bravo`` (role client), ``ops`` (role admin), and two
quota-limited client tenants. The demo adapters (pirate, poet) are public;
``bravo`` uploads ``bravo-secret``, which it owns.

Statuses (README "Security model"): a missing/unknown key is UNAUTHENTICATED;
a known key without the right is PERMISSION_DENIED, for every RPC; listing
never shows another tenant's adapter; quotas are RESOURCE_EXHAUSTED naming the
limit, with a retry hint in the message and in the ``retry-after`` trailer.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import status_of, wait_until
from e2e_keys import md, rejections, write_key_file
from qlora_serve.server.client import Client
from qlora_serve.v1 import inference_pb2, inference_pb2_grpc, registry_pb2, registry_pb2_grpc

ROLES = {"alpha": "client", "bravo": "client", "ops": "admin", "one-at-a-time": "client", "tiny-budget": "client",
         "streamer": "client"}
STREAMER_TPM = 80  # 1.33 tokens/s refill: a cancelled 16-token stream must cost visibly more than its prompt
LIMITS = {"one-at-a-time": {"max_concurrent": 1}, "tiny-budget": {"tokens_per_minute": 30},
          "streamer": {"tokens_per_minute": STREAMER_TPM}}


@pytest.fixture(scope="module")
def tenancy(start_server, demo, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_key_file(key_file, ROLES, LIMITS)
    server = start_server(key_file=key_file, engine={"max_new_tokens": 64, "default_max_new_tokens": 4})
    address = f"127.0.0.1:{server.port}"
    clients = {t: Client(address, api_key=k, timeout=60) for t, k in keys.items()}
    info = clients["bravo"].upload("bravo-secret", demo.adapters["poet"])
    assert info.owner == "bravo"
    yield server, clients, keys
    for c in clients.values():
        c.close()




def test_health_needs_no_key_and_bad_keys_are_unauthenticated(tenancy):
    server, clients, _ = tenancy
    channel = clients["alpha"].channel
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    before = rejections(server, "unauthenticated", "")
    inference = inference_pb2_grpc.InferenceStub(channel)
    registry = registry_pb2_grpc.AdapterRegistryStub(channel)
    req = inference_pb2.GenerateRequest(prompt="hello", max_new_tokens=2)
    cases = {
        "no key": (),
        "unknown key": md("qls_not-a-key-anyone-was-given"),
        "wrong scheme": (("authorization", "Basic abc"),),
        "empty bearer": (("authorization", "Bearer "),),
    }
    for what, metadata in cases.items():
        for call, msg in ((inference.Generate, req), (inference.GenerateStream, req),
                          (registry.ListAdapters, registry_pb2.ListAdaptersRequest())):
            code, details = status_of(call, msg, metadata=metadata, timeout=30)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (what, call, code, details)
            assert "qls_" not in details  # never echoes a key
    assert rejections(server, "unauthenticated", "") == before + 3 * len(cases)
    # The same key with x-api-key works.
    ok = inference.Generate(req, metadata=(("x-api-key", tenancy[2]["alpha"]),), timeout=60)
    assert ok.completion_tokens >= 1


def test_a_tenant_cannot_use_list_or_change_another_tenants_adapter(tenancy, demo):
    server, clients, _ = tenancy
    alpha = clients["alpha"]
    before = rejections(server, "permission_denied", "alpha")
    denied = {
        "Generate": lambda: alpha.generate("hello", adapter="bravo-secret", max_new_tokens=2),
        "GenerateStream": lambda: alpha.stream("hello", adapter="bravo-secret", max_new_tokens=2),
        "Generate name@1": lambda: alpha.generate("hello", adapter="bravo-secret@1", max_new_tokens=2),
        "GetAdapter": lambda: alpha.get_adapter("bravo-secret"),
        "LoadAdapter": lambda: alpha.load("bravo-secret"),
        "UnloadAdapter": lambda: alpha.unload("bravo-secret"),
        "SetAlias": lambda: alpha.set_alias("bravo-secret", "mine", 1),
        "DeleteAdapter": lambda: alpha.delete("bravo-secret"),
        "DeleteAdapter v1": lambda: alpha.delete("bravo-secret", 1),
        "UploadAdapter (new version of bravo's name)": lambda: alpha.upload("bravo-secret", demo.adapters["pirate"]),
        "UploadAdapter (owner=bravo)": lambda: alpha.upload("alpha-for-bravo", demo.adapters["pirate"], owner="bravo"),
    }
    for rpc, fn in denied.items():
        code, details = status_of(fn)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
        assert "bravo'" not in details.replace("'bravo-secret'", ""), f"{rpc} names the other tenant: {details}"
    assert rejections(server, "permission_denied", "alpha") == before + len(denied)

    # Listing never shows it, by name or in full; NOT_FOUND-free (an empty list).
    assert "bravo-secret" not in {a.name for a in alpha.list_adapters()}
    assert alpha.list_adapters("bravo-secret") == []
    assert {"pirate", "poet"} <= {a.name for a in alpha.list_adapters()}  # public ones are listed

    # Nothing changed for the owner; the admin sees and uses it too.
    bravo, ops = clients["bravo"], clients["ops"]
    assert [(a.name, a.version, list(a.aliases)) for a in bravo.list_adapters("bravo-secret")] == [
        ("bravo-secret", 1, [])]
    assert bravo.generate("hello", adapter="bravo-secret", max_new_tokens=2).adapter.name == "bravo-secret"
    assert ops.get_adapter("bravo-secret").owner == "bravo"
    assert "bravo-secret" in {a.name for a in ops.list_adapters()}
    assert "bravo-secret" not in {a.name for a in clients["one-at-a-time"].list_adapters()}


def test_clients_use_but_cannot_change_public_adapters(tenancy, demo):
    _, clients, _ = tenancy
    alpha, ops = clients["alpha"], clients["ops"]
    assert alpha.generate("hello", adapter="pirate", max_new_tokens=2).adapter.name == "pirate"
    assert alpha.load("pirate").name == "pirate"  # load needs only read access
    for rpc, fn in {
        "SetAlias": lambda: alpha.set_alias("pirate", "mine", 1),
        "DeleteAdapter": lambda: alpha.delete("pirate"),
        "UnloadAdapter": lambda: alpha.unload("pirate"),
        # A client cannot register (a version of) a public adapter.
        "UploadAdapter": lambda: alpha.upload("pirate", demo.adapters["pirate"]),
    }.items():
        code, details = status_of(fn)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, code, details)
        assert "public" in details and "admin" in details, details
    assert [a.version for a in ops.list_adapters("pirate")] == [1]
    # Its own adapters are a client's to manage; the admin may manage public ones.
    own = alpha.upload("alpha-own", demo.adapters["pirate"])
    assert own.owner == "alpha"
    assert alpha.set_alias("alpha-own", "stable", 1).aliases == ["stable"]
    assert alpha.generate("hi", adapter="alpha-own@stable", max_new_tokens=2).adapter.version == 1
    assert [d.name for d in alpha.delete("alpha-own")] == ["alpha-own"]
    assert ops.set_alias("pirate", "stable", 1).aliases == ["stable"]


def test_only_admins_register_public_adapters(tenancy, demo):
    _, clients, _ = tenancy
    alpha, bravo, ops = clients["alpha"], clients["bravo"], clients["ops"]
    code, details = status_of(alpha.upload, "alpha-public", demo.adapters["poet"], public=True)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "admin" in details, details
    code, details = status_of(ops.upload, "both", demo.adapters["poet"], public=True, owner="alpha")
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "public or owner" in details, details
    assert not ops.list_adapters("alpha-public") and not ops.list_adapters("both")  # refusals left nothing
    info = ops.upload("shared-poet", demo.adapters["poet"], public=True)
    assert info.owner == ""  # public
    # Every tenant sees and uses it; only the admin changes it.
    assert "shared-poet" in {a.name for a in bravo.list_adapters()}
    assert bravo.generate("hi", adapter="shared-poet", max_new_tokens=2).adapter.name == "shared-poet"
    assert status_of(bravo.delete, "shared-poet")[0] == grpc.StatusCode.PERMISSION_DENIED
    assert [d.name for d in ops.delete("shared-poet")] == ["shared-poet"]


def test_quota_max_concurrent_is_resource_exhausted_with_limit_and_retry_hint(tenancy, engine_gate):
    server, clients, _ = tenancy
    c = clients["one-at-a-time"]
    gate = engine_gate(server)
    gate.close()  # the first request is admitted and held before its prefill
    first = c.stream("hello", max_new_tokens=2)
    got: list = []
    t = threading.Thread(target=lambda: got.extend(first))
    t.start()
    wait_until(lambda: server.runtime.quotas.in_flight("one-at-a-time") == 1, what="first request admitted")
    before = rejections(server, "quota", "one-at-a-time")
    with pytest.raises(grpc.RpcError) as e:
        c.inference.Generate(c.request("hello", max_new_tokens=2), metadata=c._metadata, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_concurrent=1" in e.value.details() and "retry in 1 s" in e.value.details()
    assert dict(e.value.trailing_metadata())["retry-after"] == "1"
    assert rejections(server, "quota", "one-at-a-time") == before + 1
    gate.release()
    t.join(60)
    assert got and got[-1].completion_tokens == 2
    wait_until(lambda: server.runtime.quotas.in_flight("one-at-a-time") == 0, what="lease released")
    assert c.generate("hello", max_new_tokens=2).completion_tokens == 2  # the slot is free again


def test_quota_tokens_per_minute_is_resource_exhausted_with_limit_and_retry_hint(tenancy):
    server, clients, _ = tenancy
    c = clients["tiny-budget"]  # 30 tokens/minute: 0.5 tokens/s refill
    first = c.generate("hello", max_new_tokens=20)
    assert first.prompt_tokens + first.completion_tokens <= 30
    before = rejections(server, "quota", "tiny-budget")
    with pytest.raises(grpc.RpcError) as e:
        # Needs a full bucket (min(est, 30) = 30 tokens); the first request used some.
        c.inference.Generate(c.request("hello", max_new_tokens=40), metadata=c._metadata, timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = e.value.details()
    assert "tokens_per_minute=30" in details and "retry in" in details, details
    retry = int(dict(e.value.trailing_metadata())["retry-after"])
    assert 1 <= retry <= 60 and f"retry in {retry} s" in details
    assert rejections(server, "quota", "tiny-budget") == before + 1
    # Other tenants keep their own budgets.
    assert clients["alpha"].generate("hello", max_new_tokens=20).completion_tokens >= 1


def test_quota_charges_the_tokens_a_cancelled_stream_received(tenancy, engine_gate):
    """A client that streams tokens and cancels before the end pays for what it got,
    not only for its prompt (the unused reservation is refunded, the tokens are not)."""
    server, clients, _ = tenancy
    c = clients["streamer"]
    quotas = server.runtime.quotas
    prompt_tokens = len(server.runtime.tokenizer("hello").input_ids)
    t0 = time.monotonic()
    before = quotas.tokens_available("streamer")
    assert before == STREAMER_TPM  # a fresh tenant: a full bucket
    gate = engine_gate(server)
    stream = c.stream("hello", max_new_tokens=64)
    received = 0
    for msg in stream:
        assert not msg.finish_reason, "the stream ended before the test could cancel it"
        received += len(msg.token_ids)
        if received >= 16:
            break
    gate.close()  # hold the engine so the stream cannot finish; then the client cancels
    gate.wait_parked()
    stream.cancel()
    gate.release()
    wait_until(lambda: quotas.in_flight("streamer") == 0, what="the cancelled stream's lease released")
    after = quotas.tokens_available("streamer")
    refill = (time.monotonic() - t0) * STREAMER_TPM / 60.0  # the most the bucket can have refilled since
    assert before - after + refill >= prompt_tokens + received, (before, after, refill, prompt_tokens, received)


def test_admin_trains_a_new_version_of_another_tenants_or_a_public_adapter(tenancy, demo):
    """The new version keeps the name's owner (tenant or public): registration would
    refuse a different owner, so the job must not fail after training."""
    from qlora_serve.v1 import training_pb2

    _, clients, _ = tenancy
    ops, alpha = clients["ops"], clients["alpha"]
    assert ops.upload("alphas-model", demo.adapters["poet"], owner="alpha").owner == "alpha"
    assert ops.upload("public-model", demo.adapters["poet"], public=True).owner == ""
    data = b"".join(b'{"prompt": "one two", "completion": " three"}\n' for _ in range(4))
    config = ('compute_dtype = "float32"\nmax_steps = 1\nbatch_size = 1\ngrad_accum = 1\nlora_r = 4\n'
              "logging_steps = 1\nsave_steps = 1000\n")
    for name, owner in (("alphas-model", "alpha"), ("public-model", "")):
        job = ops.submit_job(name, data, config_toml=config)
        # A training job takes minutes on a loaded 2-core machine: the watch gets its own deadline.
        watch = ops.training.WatchJob(training_pb2.WatchJobRequest(id=job.id), metadata=ops._metadata, timeout=600)
        final = list(watch)[-1].job
        assert final.state == training_pb2.JOB_STATE_SUCCEEDED, (name, final.error)
        assert (final.adapter.name, final.adapter.version) == (name, 2)
        assert [(a.version, a.owner) for a in ops.list_adapters(name)] == [(1, owner), (2, owner)]
    # The owner tenant sees and uses its new version; the job is its to see too.
    assert [a.version for a in alpha.list_adapters("alphas-model")] == [1, 2]
    assert alpha.generate("hi", adapter="alphas-model@2", max_new_tokens=2).adapter.version == 2
    # A client still cannot train a version of a public adapter or another tenant's.
    for name in ("public-model", "alphas-model"):
        client = alpha if name == "public-model" else clients["bravo"]
        code, details = status_of(client.submit_job, name, data, config_toml=config)
        assert code == grpc.StatusCode.PERMISSION_DENIED, (name, code, details)
