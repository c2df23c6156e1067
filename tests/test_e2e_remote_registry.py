"""One registry for many engine servers, end to end: a real `qlora-serve serve --role
registry` process (the CLI, no base weights loaded) and two engine servers that follow
it (`--registry-address`), all on loopback with authentication on.

Register once on the registry, both engines serve it with the same tokens as a local
registration; a delete and an alias move reach both; a running request keeps its
weights; the registry is killed and restarted on its port and both engines follow it
again. The engines cache names for an hour here (`registry_cache_ttl_s`), so only the
registry's change stream can make them see a change: these tests fail without it.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from conftest import status_of, wait_until
from e2e_keys import md, write_key_file
from registry_process import RegistryProcess
from qlora_serve.server.client import Client
from qlora_serve.v1 import registry_pb2

N_TOKENS = 8
PROMPT = "hello world"
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote-registry-keys")
    keys = write_key_file(d / "keys.toml", {"svc": "admin", "ops": "admin", "acme": "client"})
    (d / "svc.key").write_text(keys["svc"] + "\n")
    keys["file"], keys["svc_file"] = d / "keys.toml", d / "svc.key"
    return keys


@pytest.fixture(scope="module")
def registry(demo, keys, tmp_path_factory):
    d = tmp_path_factory.mktemp("remote-registry")
    proc = RegistryProcess(demo.base, d / "data", keys["file"], d / "registry.log").start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def engines(start_server, registry, keys):
    """Two engine servers following the registry, names cached for an hour."""
    return [start_server(adapters=[], registry_address=registry.address, registry_key_file=keys["svc_file"],
                         registry_cache_ttl_s=3600.0, key_file=keys["file"], metrics_port=None, http_port=None)
            for _ in range(2)]


@pytest.fixture(scope="module")
def ops(registry, keys):
    with Client(registry.address, api_key=keys["ops"], timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def reference(start_server, demo):
    """Greedy tokens of each demo adapter on a server with its own (local) registry."""
    server = start_server(adapters=demo.adapters, metrics_port=None, http_port=None)
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        return {name: list(c.generate(PROMPT, adapter=name, max_new_tokens=N_TOKENS).token_ids) for name in demo.adapters}


def _generate(server, key, adapter, **kw):
    with Client(f"127.0.0.1:{server.port}", api_key=key, timeout=60) as c:
        return c.generate(PROMPT, adapter=adapter, max_new_tokens=N_TOKENS, **kw)


def _code(server, key, adapter) -> Code:
    return status_of(_generate, server, key, adapter)[0]


def test_register_once_both_engines_serve_it(engines, ops, keys, demo, reference):
    info = ops.upload("shared-poet", demo.adapters["poet"], owner="acme")
    for server in engines:
        resp = _generate(server, keys["acme"], "shared-poet")
        assert list(resp.token_ids) == reference["poet"]
        assert (resp.adapter.name, resp.adapter.version, resp.adapter.digest) == ("shared-poet", 1, info.digest)
        # The engine fetched the files by digest into its own cache.
        assert (Path(server.config.data_dir) / "registry-cache" / "store" / info.digest).is_dir()
        # The engine's registry service lists what the registry holds, and refuses writes.
        with Client(f"127.0.0.1:{server.port}", api_key=keys["ops"], timeout=60) as c:
            assert [a.digest for a in c.list_adapters("shared-poet")] == [info.digest]
            code, details = status_of(c.set_alias, "shared-poet", "stable", 1)
            assert code == Code.FAILED_PRECONDITION and "--registry-address" in details
            assert status_of(c.submit_job, "trained", b'{"text": "hi"}\n')[0] == Code.FAILED_PRECONDITION
    # Each engine checks the caller's key against its own key file.
    assert status_of(_generate, engines[0], "", "shared-poet")[0] == Code.UNAUTHENTICATED
    ops.delete("shared-poet")


def test_an_adapters_chat_template_renders_its_first_chat_on_both_engines(engines, ops, keys, demo, tmp_path):
    """An engine read the adapter's chat_template.jinja from its cache before the files were
    fetched, and kept that miss: chats rendered with the base's template for good."""
    from transformers import AutoTokenizer

    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    adapter = tmp_path / "templated"
    shutil.copytree(demo.adapters["poet"], adapter)
    (adapter / "chat_template.jinja").write_text(template)
    ops.upload("templated-poet", adapter, owner="acme")
    msgs = [{"role": "user", "content": "hello there"}]
    tok = AutoTokenizer.from_pretrained(demo.base)
    own = tok.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert len(own) != len(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False))
    for server in engines:
        with Client(f"127.0.0.1:{server.port}", api_key=keys["acme"], timeout=60) as c:
            for _ in range(2):  # the first chat, and the one after
                assert c.chat(msgs, adapter="templated-poet", max_new_tokens=2).prompt_tokens == len(own)
    ops.delete("templated-poet")


def test_alias_move_reaches_both_engines(engines, ops, keys, demo, reference):
    ops.upload("mover", demo.adapters["poet"], owner="acme")
    ops.upload("mover", demo.adapters["pirate"], owner="acme")
    ops.set_alias("mover", "default", 1)
    for server in engines:  # cached for an hour from here on
        assert list(_generate(server, keys["acme"], "mover").token_ids) == reference["poet"]
    ops.set_alias("mover", "default", 2)
    for server in engines:
        wait_until(lambda s=server: _generate(s, keys["acme"], "mover").adapter.version == 2,
                   what="the alias move to reach the engine")
        assert list(_generate(server, keys["acme"], "mover").token_ids) == reference["pirate"]
    ops.delete("mover")


def test_delete_reaches_both_engines_and_a_running_request_keeps_its_weights(engines, ops, keys, demo, reference,
                                                                               engine_gate):
    ops.upload("doomed", demo.adapters["poet"], owner="acme")
    for server in engines:
        assert list(_generate(server, keys["acme"], "doomed").token_ids) == reference["poet"]
    gate = engine_gate(engines[0])
    gate.close()  # the next forward pass on engine 0 parks: the request below is admitted, its weights pinned
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(_generate, engines[0], keys["acme"], "doomed")
        gate.wait_parked()
        ops.delete("doomed")
        for server in engines:  # new requests see the delete on both engines
            wait_until(lambda s=server: _code(s, keys["acme"], "doomed") == Code.NOT_FOUND,
                       what="the delete to reach the engine")
        gate.release()
        resp = running.result(60)
    assert list(resp.token_ids) == reference["poet"]
    digest = resp.adapter.digest
    for server in engines:  # the files of a digest no version uses leave the engines' caches
        wait_until(lambda s=server: not (Path(s.config.data_dir) / "registry-cache" / "store" / digest).exists(),
                   what="the cached files to go")


def test_engines_follow_a_restarted_registry(engines, ops, registry, keys, demo, reference):
    ops.upload("phoenix", demo.adapters["pirate"], owner="acme")
    for server in engines:
        assert list(_generate(server, keys["acme"], "phoenix").token_ids) == reference["pirate"]
    registry.kill()
    for server in engines:  # while it is down: cached names and the base serve, other names are UNAVAILABLE
        assert list(_generate(server, keys["acme"], "phoenix").token_ids) == reference["pirate"]
        assert _code(server, keys["acme"], "") == Code.OK
        assert _code(server, keys["acme"], "never-registered") == Code.UNAVAILABLE
    registry.start()  # same port, same data dir: a new change log (epoch)
    with Client(registry.address, api_key=keys["ops"], timeout=60) as admin:
        admin.delete("phoenix")  # made while the engines may still be reconnecting
        admin.upload("risen", demo.adapters["poet"], owner="acme")
    for server in engines:
        wait_until(lambda s=server: _code(s, keys["acme"], "phoenix") == Code.NOT_FOUND, timeout=60,
                   what="the engine to follow the restarted registry")
        assert list(_generate(server, keys["acme"], "risen").token_ids) == reference["poet"]


def test_registry_role_serves_the_registry_only(registry, ops, keys, demo):
    """No engine: inference is UNIMPLEMENTED, LoadAdapter FAILED_PRECONDITION; the
    engines' RPCs (download by digest, watch) need an admin key."""
    info = ops.upload("idle", demo.adapters["poet"], owner="acme")
    assert info.residency == registry_pb2.RESIDENCY_DISK
    assert status_of(ops.load, "idle")[0] == Code.FAILED_PRECONDITION
    with Client(registry.address, api_key=keys["acme"], timeout=30) as acme:
        assert status_of(acme.generate, PROMPT)[0] == Code.UNIMPLEMENTED
        download = registry_pb2.DownloadAdapterRequest(digest=info.digest)
        assert status_of(acme.registry.DownloadAdapter, download, metadata=md(keys["acme"]))[0] == Code.PERMISSION_DENIED
        assert status_of(acme.registry.WatchRegistry, registry_pb2.WatchRegistryRequest(),
                         metadata=md(keys["acme"]))[0] == Code.PERMISSION_DENIED
    chunks = list(ops.registry.DownloadAdapter(download, metadata=md(keys["ops"]), timeout=30))
    assert b"".join(c.data for c in chunks if c.filename == "adapter_model.safetensors") == \
        (demo.adapters["poet"] / "adapter_model.safetensors").read_bytes()
    for digest, code in (("0" * 64, Code.NOT_FOUND), ("../etc", Code.INVALID_ARGUMENT)):
        assert status_of(ops.registry.DownloadAdapter, registry_pb2.DownloadAdapterRequest(digest=digest),
                         metadata=md(keys["ops"]), timeout=30)[0] == code
    ops.delete("idle")
