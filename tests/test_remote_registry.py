"""RemoteRegistry (server/remote_registry.py) against a real `--role registry` server
in-process (no base weights are loaded): names, files by digest, the change stream
resumed after a broken link, deletes, refusals. Real gRPC on loopback, real SQLite,
real adapter files."""

from __future__ import annotations

import pytest

from conftest import wait_until
from qlora_serve.errors import FailedPrecondition, NotFound


@pytest.fixture
def writer(demo, tmp_path):
    from qlora_serve.server.app import QloraServer, ServerConfig

    server = QloraServer(ServerConfig(role="registry", base=str(demo.base), port=0, metrics_port=None,
                                      http_port=None, data_dir=tmp_path / "registry", compute_dtype="float32"))
    server.start().load()
    yield server
    server.stop(0)


def _remote(writer, tmp_path, **kw):
    from qlora_serve.server.remote_registry import RemoteRegistry

    kw.setdefault("base_fingerprint", writer.runtime.registry.base_fingerprint)
    remote = RemoteRegistry(f"127.0.0.1:{writer.port}", api_key=None, cache_dir=tmp_path / "cache", ttl_s=3600.0, **kw)
    assert remote.wait_connected(30)
    return remote


def test_names_files_and_a_resumed_change_stream(writer, tmp_path, demo):
    reg = writer.runtime.registry
    remote = _remote(writer, tmp_path)
    gone = []
    remote.on_gone = gone.append
    try:
        poet = reg.register_path("a", demo.adapters["poet"], trusted=True)
        rec = remote.resolve("a")
        assert (rec.version, rec.digest, rec.path) == (1, poet.digest, tmp_path / "cache" / "store" / poet.digest)
        assert remote.owner_of("a@1") is None and remote.aliases("a") == {}
        remote.verify(rec)  # downloads by digest, then re-hashes
        assert reg._store.digest_of(rec.path) == poet.digest
        (rec.path / "adapter_model.safetensors").write_bytes(b"corrupt")
        remote.verify(rec)  # a corrupted cached copy is fetched again
        assert reg._store.digest_of(rec.path) == poet.digest

        assert [r.ref for r in remote.list()] == ["a@1"]  # the catalogue, cached until an event
        resets = remote._resets
        remote._call.cancel()  # a broken link: the watcher reconnects and replays what it missed
        reg.register_path("a", demo.adapters["pirate"], trusted=True, set_default=True)
        # Only an event drops the cached catalogue (a name not cached is read afresh at once).
        wait_until(lambda: [r.ref for r in remote.list()] == ["a@1", "a@2"], what="the replayed registration")
        assert remote._resets == resets, "the stream resumed without dropping the cache"
        assert remote.resolve("a").version == 2
        with pytest.raises(NotFound, match="no alias 'stable'"):
            remote.resolve("a@stable")

        reg.delete("a", 1)
        wait_until(lambda: gone == [poet.digest], what="the deleted digest to leave")
        assert not rec.path.exists()
        with pytest.raises(NotFound, match="has no version 1"):
            remote.resolve("a@1")
        with pytest.raises(FailedPrecondition, match="--registry-address"):
            remote.set_alias("a", "stable", 2)
    finally:
        remote.close()


def test_a_record_for_another_base_is_refused_and_marked(writer, tmp_path, demo):
    writer.runtime.registry.register_path("b", demo.adapters["poet"], trusted=True)
    remote = _remote(writer, tmp_path, base_fingerprint="0123456789abcdef")
    try:
        rec = remote.resolve("b")
        with pytest.raises(FailedPrecondition, match="registered for base"):
            remote.verify(rec)
        assert "registered for base" in remote.unusable_reason(rec.digest)
        assert not rec.path.exists()  # nothing fetched for a base this server does not run
    finally:
        remote.close()


def test_cli_flags(capsys):
    """`serve` takes the registry flags into ServerConfig; start-up adapters or --role
    registry beside --registry-address, and --shared-registry beside it on ray-serve,
    are refused before anything loads."""
    from qlora_serve.options import values_from
    from qlora_serve.server.cli import build_parser, main
    from qlora_serve.server.config import ServerConfig

    args = build_parser().parse_args(["serve", "--registry-address", "reg:50052", "--registry-key-file", "/k",
                                      "--registry-cache-ttl", "2.5"])
    config = ServerConfig(**values_from(args, ServerConfig))
    assert (config.role, config.registry_address, str(config.registry_key_file), config.registry_cache_ttl_s) == \
        ("engine", "reg:50052", "/k", 2.5)
    for argv in (["serve", "--registry-address", "reg:1", "--adapter", "a=/x"],
                 ["serve", "--registry-address", "reg:1", "--role", "registry"],
                 ["ray-serve", "--registry-address", "reg:1", "--shared-registry"]):
        assert main(argv) == 2, argv
        assert "registry" in capsys.readouterr().err


def test_a_registry_that_comes_up_later_and_a_refused_key(demo, tmp_path):
    """Started before its registry: adapter names are UNAVAILABLE, then followed once it is
    up. A key the registry refuses fails the start with a message for the operator."""
    from qlora_serve.errors import Unavailable
    from qlora_serve.server.app import QloraServer, ServerConfig
    from qlora_serve.server.remote_registry import RemoteRegistry
    from registry_process import _free_port
    from e2e_keys import write_key_file

    port = _free_port()
    keys = write_key_file(tmp_path / "keys.toml", {"svc": "admin", "acme": "client"})
    early = RemoteRegistry(f"127.0.0.1:{port}", api_key=keys["svc"], cache_dir=tmp_path / "early",
                           base_fingerprint="x", ttl_s=3600.0)
    refused = RemoteRegistry(f"127.0.0.1:{port}", api_key=keys["acme"], cache_dir=tmp_path / "refused",
                             base_fingerprint="x", ttl_s=3600.0)
    server = None
    try:
        assert not early.wait_connected(0.2)
        with pytest.raises(Unavailable, match="unreachable"):
            early.resolve("late")
        server = QloraServer(ServerConfig(role="registry", base=str(demo.base), port=port, metrics_port=None,
                                          http_port=None, data_dir=tmp_path / "registry", compute_dtype="float32",
                                          key_file=tmp_path / "keys.toml")).start().load()
        server.runtime.registry.register_path("late", demo.adapters["poet"], trusted=True)
        assert early.wait_connected(30)  # reconnected with backoff
        assert early.resolve("late").version == 1
        with pytest.raises(FailedPrecondition, match="QLORA_SERVE_REGISTRY_KEY"):
            refused.wait_connected(30)
    finally:
        early.close()
        refused.close()
        if server is not None:
            server.stop(0)


def test_names_sharing_a_digest_with_different_readmes(writer, tmp_path, demo):
    """Same served files under two names, A with a long README and B with none: one
    stored copy (A's), and each record's size is that copy's, so an engine following the
    registry fetches B within its size and A stays usable there."""
    import shutil

    reg = writer.runtime.registry
    with_readme, bare = tmp_path / "with-readme", tmp_path / "bare"
    shutil.copytree(demo.adapters["poet"], with_readme)
    shutil.copytree(demo.adapters["poet"], bare)
    (bare / "README.md").unlink(missing_ok=True)
    (with_readme / "README.md").write_text("# poet\n" + "notes\n" * 4096)
    a = reg.register_path("a", with_readme, trusted=True)
    b = reg.register_path("b", bare, trusted=True)
    assert a.digest == b.digest
    remote = _remote(writer, tmp_path)
    try:
        remote.verify(remote.resolve("b"))  # was: "the registry sent more than N bytes", digest marked unusable
        remote.verify(remote.resolve("a"))
        assert remote.unusable_reason(a.digest) is None
    finally:
        remote.close()
    stored = sum(p.stat().st_size for p in a.path.iterdir())
    assert (a.size_bytes, b.size_bytes) == (stored, stored)
    # A catalogue written before the fix holds B's discarded size: corrected when it opens.
    from qlora_serve.adapters.registry import AdapterRegistry

    args = dict(base_fingerprint=reg.base_fingerprint, linear_shapes=reg.linear_shapes, max_rank=reg.max_rank)
    with AdapterRegistry(tmp_path / "old", **args) as old:
        old.register_path("a", with_readme, trusted=True)
        old.register_path("b", bare, trusted=True)
        with old._tx() as conn:
            conn.execute("UPDATE adapters SET size_bytes=1 WHERE name='b'")
    with AdapterRegistry(tmp_path / "old", **args) as old:
        assert old.get("b").size_bytes == stored
