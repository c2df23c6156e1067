"""RegistryForwarder (server/registry_forward.py) without Ray: registry writes forwarded,
as a Ray replica forwards them, to a real `--role registry` server in-process (auth on,
real gRPC on loopback, real SQLite, real adapter files). The caller's own key decides
(owner, tenancy); the registry's statuses come back unchanged; the forwarding server's
cache sees its own write at once, with its change stream stopped."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from e2e_keys import md, write_key_file
from qlora_serve.errors import NotFound
from qlora_serve.v1 import registry_pb2

Code = grpc.StatusCode


@pytest.fixture(scope="module")
def writer(demo, tmp_path_factory):
    """A registry server with auth on; RegisterAdapter may read the demo adapters' folder."""
    from qlora_serve.server.app import QloraServer, ServerConfig

    d = tmp_path_factory.mktemp("forward")
    keys = write_key_file(d / "keys.toml", {"ops": "admin", "acme": "client", "rival": "client"})
    server = QloraServer(ServerConfig(role="registry", base=str(demo.base), port=0, metrics_port=None, http_port=None,
                                      data_dir=d / "registry", compute_dtype="float32", key_file=d / "keys.toml",
                                      allowed_roots=[demo.adapters["poet"].parent]))
    server.start().load()
    yield server, keys
    server.stop(0)


def _upload_stream(name: str, directory, owner: str = ""):
    """UploadAdapter's messages as the proxy hands them to a replica: raw bytes, async."""
    async def gen():
        yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(name=name, owner=owner)).SerializeToString()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            chunk = registry_pb2.FileChunk(filename=f, data=(directory / f).read_bytes())
            yield registry_pb2.UploadAdapterRequest(chunk=chunk).SerializeToString()
    return gen()


def _forward(fwd, method, request, metadata=()):
    return asyncio.run(fwd.forward(method, request, (("application", "qlora"),) + tuple(metadata)))


def _status(fwd, method, request, metadata=()):
    from qlora_serve.server.registry_forward import Forwarded

    with pytest.raises(Forwarded) as err:
        _forward(fwd, method, request, metadata)
    return err.value.code, err.value.details


def test_writes_carry_the_callers_key_and_relay_the_registrys_answer(writer, demo):
    from qlora_serve.server.registry_forward import RegistryForwarder

    server, keys = writer
    fwd = RegistryForwarder(f"127.0.0.1:{server.port}")  # holds no key of its own
    try:
        info = _forward(fwd, "UploadAdapter", _upload_stream("fwd", demo.adapters["poet"]), md(keys["acme"]))
        assert (info.name, info.version, info.owner) == ("fwd", 1, "acme")  # acme's key made acme the owner
        req = registry_pb2.RegisterAdapterRequest(name="fwd", path=str(demo.adapters["pirate"]), set_default=True)
        info = _forward(fwd, "RegisterAdapter", req.SerializeToString(), (("x-api-key", keys["acme"]),))
        assert (info.version, info.aliases, info.owner) == (2, ["default"], "acme")
        alias = registry_pb2.SetAliasRequest(name="fwd", alias="stable", version=1).SerializeToString()
        assert _forward(fwd, "SetAlias", alias, md(keys["acme"])).aliases == ["stable"]
        assert server.runtime.registry.resolve("fwd@stable").version == 1

        # The registry's own refusals, unchanged.
        code, details = _status(fwd, "SetAlias", alias, md(keys["rival"]))
        assert code == Code.PERMISSION_DENIED and "rival" in details
        code, details = _status(fwd, "SetAlias", alias)
        assert code == Code.UNAUTHENTICATED and "no API key" in details
        assert _status(fwd, "SetAlias", alias, md("qls_not-a-key"))[0] == Code.UNAUTHENTICATED
        other = registry_pb2.RegisterAdapterRequest(name="theirs", path=str(demo.adapters["poet"]), owner="rival")
        code, details = _status(fwd, "RegisterAdapter", other.SerializeToString(), md(keys["acme"]))
        assert code == Code.PERMISSION_DENIED and "can only register adapters it owns" in details
        code, details = _status(fwd, "RegisterAdapter", registry_pb2.RegisterAdapterRequest(name="x").SerializeToString(),
                                md(keys["acme"]))
        assert code == Code.INVALID_ARGUMENT and "path is empty" in details
        assert _status(fwd, "DeleteAdapter", b"\xff\xff\xff", md(keys["acme"]))[0] == Code.INVALID_ARGUMENT

        deleted = _forward(fwd, "DeleteAdapter", registry_pb2.DeleteAdapterRequest(name="fwd").SerializeToString(),
                           md(keys["ops"]))
        assert sorted(i.version for i in deleted.deleted) == [1, 2]
    finally:
        fwd.close()


def test_an_unreachable_registry_is_unavailable_naming_it():
    from registry_process import _free_port

    from qlora_serve.server.registry_forward import RegistryForwarder

    address = f"127.0.0.1:{_free_port()}"
    fwd = RegistryForwarder(address)
    try:
        code, details = _status(fwd, "SetAlias", registry_pb2.SetAliasRequest(name="a", alias="b", version=1))
        assert code == Code.UNAVAILABLE and address in details and "unreachable" in details
    finally:
        fwd.close()


def test_the_forwarding_server_sees_its_own_write_at_once(writer, demo, tmp_path):
    """Names cached for an hour and no change stream: only the forwarder's invalidation
    can make the next read see the write."""
    from qlora_serve.server.registry_forward import RegistryForwarder
    from qlora_serve.server.remote_registry import RemoteRegistry

    server, keys = writer
    remote = RemoteRegistry(f"127.0.0.1:{server.port}", api_key=keys["ops"], cache_dir=tmp_path / "cache", ttl_s=3600.0,
                            base_fingerprint=server.runtime.registry.base_fingerprint)
    fwd = RegistryForwarder(f"127.0.0.1:{server.port}", registry=remote)
    try:
        assert remote.wait_connected(30)
        remote._closed.set()  # stop following the change stream (the watcher thread ends)
        remote._call.cancel()
        with pytest.raises(NotFound):
            remote.resolve("mine")  # cached: unknown
        _forward(fwd, "UploadAdapter", _upload_stream("mine", demo.adapters["poet"]), md(keys["acme"]))
        assert remote.resolve("mine").version == 1
        alias = registry_pb2.SetAliasRequest(name="mine", alias="stable", version=1)
        _forward(fwd, "SetAlias", alias.SerializeToString(), md(keys["acme"]))
        assert remote.aliases("mine") == {"stable": 1}
        _forward(fwd, "DeleteAdapter", registry_pb2.DeleteAdapterRequest(name="mine").SerializeToString(),
                 md(keys["acme"]))
        with pytest.raises(NotFound):
            remote.resolve("mine")
    finally:
        fwd.close()
        remote.close()


def test_training_refusal_on_replicas_following_a_registry_server_says_how_to_train():
    from qlora_serve.server.ray_services import refusal

    msg = refusal("SubmitJob", "submit training jobs", True, "reg:50052", registry_server=True)
    assert "one owner" in msg and "qlora-serve train ... --register reg:50052" in msg
    assert "at the registry's writer" not in msg  # a --role registry server runs no jobs


def test_a_cancelled_forward_ends_the_registrys_call(writer, demo):
    """The caller leaves mid-upload (Ray cancels the replica's call): the forwarded call
    is cancelled, so the registry's handler stops waiting for the rest of the stream."""
    from conftest import wait_until

    from qlora_serve.server.registry_forward import RegistryForwarder

    server, keys = writer
    fwd = RegistryForwarder(f"127.0.0.1:{server.port}")

    async def stalled():
        yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(name="stalled")).SerializeToString()
        await asyncio.Event().wait()  # the rest never comes

    async def main():
        task = asyncio.create_task(fwd.forward("UploadAdapter", stalled(), md(keys["acme"])))
        await asyncio.to_thread(wait_until, lambda: server.guard.in_flight() == 1, what="the upload to reach the registry")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # While the caller's stream is still open (this loop runs): only the cancel ends it.
        await asyncio.to_thread(wait_until, lambda: server.guard.in_flight() == 0, what="the registry's upload to end")

    try:
        asyncio.run(main())
        assert server.runtime.registry.list(name="stalled") == []
    finally:
        fwd.close()
