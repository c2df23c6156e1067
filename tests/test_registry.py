"""Adapter registry library: real files, real SQLite, the real demo base and
PEFT adapters (no mocks). Crash safety lives in test_registry_crash_points.py."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter_files import CONFIG, WEIGHTS, make_variant
from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.peft_format import load_lora_adapter
from qlora_serve.adapters.registry import FINGERPRINT_KEY, AdapterRegistry
from qlora_serve.adapters.store import manifest_digest
from qlora_serve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)


@pytest.fixture(scope="module")
def base_info(demo):
    """(linear_shapes, fingerprint) of the demo base, as the server computes them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    config = json.loads((demo.base / "config.json").read_text())
    return shapes, base_fingerprint(demo.base, config)


@pytest.fixture
def root(tmp_path, demo):
    """An allowed root holding copies of the demo adapters plus a variant."""
    r = tmp_path / "adapters"
    for name, path in demo.adapters.items():
        shutil.copytree(path, r / name)
    make_variant(demo.adapters["pirate"], r / "pirate2", scale=0.5)
    return r


@pytest.fixture
def make_registry(tmp_path, base_info, root):
    shapes, fp = base_info
    opened: list[AdapterRegistry] = []

    def make(data_dir: Path | None = None, **kw) -> AdapterRegistry:
        args = dict(base_fingerprint=fp, linear_shapes=shapes, max_rank=16, allowed_roots=[root])
        args.update(kw)
        reg = AdapterRegistry(data_dir or tmp_path / "data", **args)
        opened.append(reg)
        return reg

    yield make
    for reg in opened:
        reg.close()


@pytest.fixture
def reg(make_registry, root):
    """A registry already holding pirate@1 and poet@1 (so 'unchanged' means something)."""
    r = make_registry()
    r.register_path("pirate", root / "pirate")
    r.register_path("poet", root / "poet")
    return r


def snapshot(reg: AdapterRegistry) -> tuple:
    """Everything observable: records, aliases, store and tmp contents."""
    records = reg.list()
    aliases = {name: reg.aliases(name) for name in sorted({r.name for r in records})}
    return (
        [(r.ref, r.digest, r.owner) for r in records],
        aliases,
        sorted(os.listdir(reg.data_dir / "store")),
        sorted(os.listdir(reg.data_dir / "tmp")),
    )


# -- happy paths -------------------------------------------------------------


def test_register_records_metadata_and_copies_files(reg, root, base_info):
    rec = reg.resolve("pirate")
    assert rec.ref == "pirate@1" and rec.source == "local" and rec.owner is None and rec.labels == {}
    assert rec.rank == 8 and rec.alpha == 16.0
    assert rec.target_modules == ("down_proj", "gate_proj", "o_proj", "q_proj", "up_proj", "v_proj")
    assert rec.base_fingerprint == base_info[1]
    assert rec.path == reg.data_dir / "store" / rec.digest
    assert sorted(os.listdir(rec.path)) == ["README.md", CONFIG, WEIGHTS]  # PEFT writes a README.md
    assert rec.size_bytes == sum((rec.path / f).stat().st_size for f in os.listdir(rec.path))
    import hashlib

    files = {f: ((rec.path / f).stat().st_size, hashlib.sha256((rec.path / f).read_bytes()).hexdigest()) for f in os.listdir(rec.path)}
    assert rec.digest == manifest_digest(files)
    # The catalogue is SQLite in WAL mode under data_dir.
    with sqlite3.connect(reg.data_dir / "registry.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_versions_aliases_rollback(reg, root):
    v2 = reg.register_path("pirate", root / "pirate2", labels={"stage": "canary"})
    assert v2.ref == "pirate@2" and v2.labels == {"stage": "canary"}
    assert reg.resolve("pirate").version == 2  # no "default": the highest version
    assert reg.resolve("pirate@1").version == 1 and reg.resolve("pirate@latest").version == 2
    assert reg.get("pirate", 1).digest != reg.get("pirate", 2).digest
    # Roll back: move "default" to 1; plain name follows it, latest does not.
    assert reg.set_alias("pirate", "default", 1).ref == "pirate@1"
    assert reg.resolve("pirate").version == 1 and reg.get("pirate").version == 1
    assert reg.resolve("pirate@latest").version == 2
    reg.set_alias("pirate", "canary", 2)
    assert reg.resolve("pirate@canary").version == 2
    assert reg.aliases("pirate") == {"canary": 2, "default": 1}
    # Roll forward again, and a register with set_default moves it atomically.
    reg.set_alias("pirate", "default", 2)
    assert reg.resolve("pirate").version == 2
    v3 = reg.register_path("pirate", make_variant(root / "pirate", root / "pirate3", scale=0.25), set_default=False)
    assert reg.resolve("pirate").version == 2 and v3.version == 3
    reg.delete_alias("pirate", "default")
    assert reg.resolve("pirate").version == 3


def test_records_carry_the_aliases_read_with_them(reg, root):
    """Every record comes with the aliases pointing at it, read in the same transaction
    (what the servicers answer, so no second read can meet a concurrent delete)."""
    files = {f: (root / "pirate2" / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    assert reg.register_files("pirate", files, set_default=True).aliases == ("default",)
    assert reg.register_files("pirate", files, set_default=True).aliases == ("default",)  # same digest again
    assert reg.set_alias("pirate", "canary", 2).aliases == ("canary", "default")
    assert reg.set_alias("pirate", "stable", 1).aliases == ("stable",)
    assert [(r.ref, r.aliases) for r in reg.list()] == [
        ("pirate@1", ("stable",)), ("pirate@2", ("canary", "default")), ("poet@1", ())]
    assert reg.resolve("pirate").aliases == ("canary", "default") and reg.resolve("pirate@1").aliases == ("stable",)
    assert reg.list(name="poet")[0].aliases == ()


def test_same_content_same_name_is_idempotent(reg, root):
    first = reg.resolve("pirate@1")
    reg.register_path("pirate", root / "pirate2")
    again = reg.register_path("pirate", root / "pirate", labels={"ignored": "yes"})
    assert again == first and again.labels == {}  # the existing record, unchanged
    # An upload of the same bytes is the same content too.
    upload = {f: (root / "pirate" / f).read_bytes() for f in ("README.md", CONFIG, WEIGHTS)}
    assert reg.register_files("pirate", upload) == first
    # ... and set_default on a retry still points "default" at it.
    reg.register_files("pirate", upload, set_default=True)
    assert reg.aliases("pirate") == {"default": 1}
    assert [r.ref for r in reg.list(name="pirate")] == ["pirate@1", "pirate@2"]


def test_upload_registers_a_copy(reg, root):
    files = {f: (root / "pirate2" / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    files["README.md"] = b"# pirate, smaller\n"
    rec = reg.register_files("uploaded", files, owner="alice", set_default=True)
    assert rec.ref == "uploaded@1" and rec.source == "upload" and rec.owner == "alice"
    assert sorted(os.listdir(rec.path)) == ["README.md", CONFIG, WEIGHTS]
    assert reg.aliases("uploaded") == {"default": 1}
    reg.verify(rec)


def test_same_files_under_two_names_share_the_store_and_gc(reg, root):
    a = reg.resolve("pirate")
    b = reg.register_path("copy", root / "pirate")
    assert b.digest == a.digest and b.ref == "copy@1"
    assert reg.delete("pirate") == [a]
    assert b.path.is_dir()  # still used by copy@1
    reg.delete("copy")
    assert not b.path.exists()
    assert sorted(os.listdir(reg.data_dir / "store")) == [reg.resolve("poet").digest]


def test_delete_versions_aliases_and_no_version_reuse(reg, root):
    reg.register_path("pirate", root / "pirate2")
    reg.set_alias("pirate", "default", 1)
    reg.set_alias("pirate", "stable", 1)
    gone = reg.delete("pirate", 1)
    assert [r.ref for r in gone] == ["pirate@1"] and not gone[0].path.exists()
    assert reg.aliases("pirate") == {}  # aliases pointing at v1 went with it
    assert reg.resolve("pirate").version == 2  # falls back to the highest
    with pytest.raises(NotFound, match="qlora-serve adapters list"):
        reg.resolve("pirate@1")
    v3 = reg.register_path("pirate", root / "pirate")  # old content, new version: numbers never reused
    assert v3.version == 3
    assert {r.ref for r in reg.delete("pirate")} == {"pirate@2", "pirate@3"}
    with pytest.raises(NotFound, match="qlora-serve adapters list"):
        reg.resolve("pirate")
    assert [r.ref for r in reg.list()] == ["poet@1"]


def test_source_deleted_still_serves_and_verify_detects_corruption(reg, root):
    rec = reg.register_path("temp", root / "pirate2")
    shutil.rmtree(root / "pirate2")
    reg.verify(rec)
    adapter = load_lora_adapter(rec.path, max_rank=16)
    assert adapter.rank == 8
    data = bytearray((rec.path / WEIGHTS).read_bytes())
    data[-1] ^= 0xFF
    (rec.path / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(FailedPrecondition, match="corrupt.*register it again"):
        reg.verify(rec)
    (rec.path / WEIGHTS).unlink()
    with pytest.raises(FailedPrecondition, match="register it again"):
        reg.verify(rec)


def test_adapter_health_is_owned_by_the_registry(reg, root):
    """A failed verify marks the digest unusable; registering the files again (which
    re-commits them) clears the mark, and so does deleting the last version."""
    rec = reg.register_path("temp", root / "pirate2")
    good = (rec.path / WEIGHTS).read_bytes()
    assert reg.unusable_reason(rec.digest) is None
    (rec.path / WEIGHTS).write_bytes(good[:-1] + bytes([good[-1] ^ 0xFF]))
    with pytest.raises(FailedPrecondition):
        reg.verify(rec)
    assert "corrupt" in reg.unusable_reason(rec.digest)
    assert reg.unusable_reason(reg.get("pirate").digest) is None  # other adapters unaffected
    (rec.path / WEIGHTS).write_bytes(good)
    assert reg.register_path("temp", root / "pirate2").digest == rec.digest
    assert reg.unusable_reason(rec.digest) is None
    reg.mark_unusable(rec.digest, "bad")
    reg.delete("temp")
    assert reg.unusable_reason(rec.digest) is None


def test_restart_sees_same_state(make_registry, root, tmp_path):
    reg = make_registry()
    reg.register_path("pirate", root / "pirate")
    reg.register_path("pirate", root / "pirate2", owner=None, labels={"k": "v"})
    reg.register_path("poet", root / "poet", owner="bob")
    reg.set_alias("pirate", "default", 1)
    before = snapshot(reg)
    records = reg.list()
    with pytest.raises(FailedPrecondition, match="open in another process"):
        make_registry()  # one registry per data_dir at a time
    reg.close()
    reg2 = make_registry()
    assert snapshot(reg2) == before
    assert reg2.list() == records  # every field, created_at and labels included
    assert reg2.resolve("pirate").ref == "pirate@1"
    for rec in reg2.list():
        reg2.verify(rec)
    assert reg2.register_path("pirate", make_variant(root / "pirate", tmp_path / "adapters" / "p4", scale=2.0)).version == 3


def test_list_by_owner(reg, root):
    reg.register_path("alices", root / "pirate2", owner="alice")
    assert [r.ref for r in reg.list(owner="alice")] == ["alices@1", "pirate@1", "poet@1"]
    assert [r.ref for r in reg.list(owner="alice", include_public=False)] == ["alices@1"]
    assert [r.ref for r in reg.list(owner="bob", include_public=False)] == []
    assert len(reg.list()) == 3
    assert [r.ref for r in reg.list(name="poet")] == ["poet@1"]


def test_concurrent_registrations_from_threads(make_registry, root):
    reg = make_registry()
    dirs = [make_variant(root / "poet", root / f"poet-v{i}", scale=1.0 + i / 8) for i in range(6)]
    errors: list[BaseException] = []
    results = []

    def work(path: Path) -> None:
        try:
            results.append(reg.register_path("multi", path))
            reg.list()
            reg.resolve("multi")
        except BaseException as exc:  # noqa: BLE001 - surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(d,)) for d in dirs + dirs[:2]]  # two exact retries
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(r.version for r in reg.list(name="multi")) == [1, 2, 3, 4, 5, 6]
    assert len({r.digest for r in reg.list(name="multi")}) == 6
    assert len(results) == 8 and {r.ref for r in results} == {r.ref for r in reg.list(name="multi")}


def test_symlinks_inside_a_root_are_fine(make_registry, root):
    """HF-cache style: the file is a symlink to a blob in the same root."""
    blob_dir = root / "blobs"
    blob_dir.mkdir()
    linked = root / "snapshot"
    linked.mkdir()
    shutil.copy(root / "poet" / WEIGHTS, blob_dir / "abc123")
    (linked / WEIGHTS).symlink_to(blob_dir / "abc123")
    shutil.copy(root / "poet" / CONFIG, linked / CONFIG)
    shutil.copy(root / "poet" / "README.md", linked / "README.md")
    reg = make_registry()
    rec = reg.register_path("linked", linked)
    assert not (rec.path / WEIGHTS).is_symlink()  # the store holds a real copy
    assert rec.digest == reg.register_path("poet", root / "poet").digest


def test_trusted_startup_path_skips_roots(make_registry, demo):
    reg = make_registry(allowed_roots=())
    with pytest.raises(PermissionDenied, match="no allowed adapter roots"):
        reg.register_path("pirate", demo.adapters["pirate"])
    rec = reg.register_path("pirate", demo.adapters["pirate"], trusted=True, source="startup")
    assert rec.source == "startup"


def test_fingerprint_allowed_mismatch_is_recorded_and_checked_by_verify(make_registry, root, base_info):
    other = make_variant(root / "pirate", root / "other-base", config={FINGERPRINT_KEY: "0123456789abcdef"})
    reg = make_registry(allow_fingerprint_mismatch=True)
    rec = reg.register_path("other", other)
    assert rec.base_fingerprint == "0123456789abcdef"
    reg.verify(rec)
    reg.close()
    strict = make_registry()
    with pytest.raises(FailedPrecondition, match="registered for base 0123456789abcdef"):
        strict.verify(strict.resolve("other"))
    same = make_variant(root / "pirate", root / "same-base", config={FINGERPRINT_KEY: base_info[1]})
    assert strict.register_path("same", same).base_fingerprint == base_info[1]


def test_fingerprint_is_stable_and_sensitive(demo, tmp_path):
    config = json.loads((demo.base / "config.json").read_text())
    fp = base_fingerprint(demo.base, config)
    assert len(fp) == 16 and fp == base_fingerprint(str(demo.base), dict(config))
    assert base_fingerprint(demo.base, {**config, "num_hidden_layers": 3}) != fp
    assert base_fingerprint(demo.base, {**config, "torch_dtype": "bfloat16", "_name_or_path": "/x"}) == fp
    copy = tmp_path / "base-copy"
    shutil.copytree(demo.base, copy)
    assert base_fingerprint(copy, config) == fp  # path does not matter
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, same header, last bytes differ (the end sample)
    weights.write_bytes(bytes(data))
    assert base_fingerprint(copy, config) != fp
    assert base_fingerprint("org/some-model", config) != fp
    assert base_fingerprint("org/some-model", config) == base_fingerprint("org/some-model", config)


# -- refusals: right error, helpful message, state unchanged --------------------


def _pickle_dir(root: Path) -> Path:
    d = root / "pickled"
    d.mkdir()
    shutil.copy(root / "poet" / CONFIG, d / CONFIG)
    torch.save(load_file(str(root / "poet" / WEIGHTS)), d / "adapter_model.bin")
    return d


def _only(root: Path, name: str, keep: str) -> Path:
    d = root / name
    d.mkdir()
    shutil.copy(root / "poet" / keep, d / keep)
    return d


def _nan(state):
    key = sorted(state)[0]
    state[key] = state[key].clone()
    state[key][0, 0] = float("nan")
    return state


def _narrow(state):
    """q_proj of layer 0 expects 64 input features: built for another base."""
    out = dict(state)
    for key in list(out):
        if "layers.0.self_attn.q_proj.lora_A" in key:
            out[key] = out[key][:, :64].contiguous()
    return out


def _unknown_module(state):
    return {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}


def _escape_dir(root: Path, outside: Path) -> Path:
    (root / "escape").symlink_to(outside, target_is_directory=True)
    return root / "escape"


def _escape_file(root: Path, outside: Path) -> Path:
    d = root / "evil"
    d.mkdir()
    shutil.copy(root / "poet" / CONFIG, d / CONFIG)
    (d / WEIGHTS).symlink_to(outside / WEIGHTS)
    return d


def _upload(root: Path, **extra) -> dict:
    files = {f: (root / "pirate2" / f).read_bytes() for f in (CONFIG, WEIGHTS)}
    files.update(extra)
    return files


REFUSALS = {
    # id: (action(reg, root, outside), error type, message fragment)
    "pickle-bin": (lambda reg, root, out: reg.register_path("x", _pickle_dir(root)), InvalidArgument, "pickle.*safe_serialization=True"),
    "missing-config": (lambda reg, root, out: reg.register_path("x", _only(root, "noconf", WEIGHTS)), InvalidArgument, "adapter_config.json is missing"),
    "missing-weights": (lambda reg, root, out: reg.register_path("x", _only(root, "noweights", CONFIG)), InvalidArgument, "adapter_model.safetensors is missing"),
    "nan-weights": (lambda reg, root, out: reg.register_path("x", make_variant(root / "poet", root / "nan", tensors=_nan)), InvalidArgument, "NaN or Inf"),
    "wrong-shape": (lambda reg, root, out: reg.register_path("x", make_variant(root / "poet", root / "narrow", tensors=_narrow)), InvalidArgument, "another base model"),
    "unknown-module": (lambda reg, root, out: reg.register_path("x", make_variant(root / "poet", root / "unk", tensors=_unknown_module)), InvalidArgument, "not a Linear layer"),
    # pirate has r=8; the registry in this case serves max rank 4 (see the test).
    "rank-too-big": (lambda reg, root, out: reg.register_path("x", root / "pirate"), FailedPrecondition, "rank 8 > the server's max_lora_rank 4.*--max-lora-rank"),
    "bad-name-at": (lambda reg, root, out: reg.register_path("a@b", root / "poet"), InvalidArgument, "name 'a@b' is invalid"),
    "bad-name-slash": (lambda reg, root, out: reg.register_path("a/b", root / "poet"), InvalidArgument, "is invalid"),
    "bad-name-dots": (lambda reg, root, out: reg.register_path("../etc", root / "poet"), InvalidArgument, "is invalid"),
    "bad-name-empty": (lambda reg, root, out: reg.register_files("", _upload(root)), InvalidArgument, "is invalid"),
    "bad-name-long": (lambda reg, root, out: reg.register_path("x" * 65, root / "poet"), InvalidArgument, "is invalid"),
    "outside-roots": (lambda reg, root, out: reg.register_path("x", out), PermissionDenied, "outside the allowed adapter roots"),
    "dotdot": (lambda reg, root, out: reg.register_path("x", f"{root}/poet/../poet"), PermissionDenied, r"contains '\.\.'"),
    "dotdot-escape": (lambda reg, root, out: reg.register_path("x", f"{root}/../outside"), PermissionDenied, r"contains '\.\.'"),
    "relative": (lambda reg, root, out: reg.register_path("x", "adapters/poet"), InvalidArgument, "is relative"),
    "symlink-dir-escape": (lambda reg, root, out: reg.register_path("x", _escape_dir(root, out)), PermissionDenied, "outside the allowed adapter roots"),
    "symlink-file-escape": (lambda reg, root, out: reg.register_path("x", _escape_file(root, out)), PermissionDenied, "is a symlink to"),
    "upload-too-large": (lambda reg, root, out: reg.register_files("x", _upload(root, **{"README.md": b"x" * 300_000})), ResourceExhausted, "exceeds the server's limit"),
    "upload-pickle": (lambda reg, root, out: reg.register_files("x", {CONFIG: b"{}", "adapter_model.bin": b"\x80"}), InvalidArgument, "pickle"),
    "upload-unknown-file": (lambda reg, root, out: reg.register_files("x", _upload(root, **{"../x.json": b"{}"})), InvalidArgument, "not accepted"),
    "upload-missing": (lambda reg, root, out: reg.register_files("x", {CONFIG: b"{}"}), InvalidArgument, "missing adapter_model.safetensors"),
    "upload-bad-json": (lambda reg, root, out: reg.register_files("x", _upload(root, **{CONFIG: b"{not json"})), InvalidArgument, "upload:x/adapter_config.json is not valid JSON"),
    "fingerprint-mismatch": (
        lambda reg, root, out: reg.register_path("x", make_variant(root / "poet", root / "fp", config={FINGERPRINT_KEY: "ffffffffffffffff"})),
        FailedPrecondition, "trained on base ffffffffffffffff.*--allow-fingerprint-mismatch",
    ),
    "owner-conflict": (lambda reg, root, out: reg.register_path("pirate", root / "pirate2", owner="mallory"), AlreadyExists, "belongs to the public namespace"),
    "resolve-unknown": (lambda reg, root, out: reg.resolve("nobody"), NotFound, "'nobody' is not registered; list adapters with `qlora-serve adapters list`"),
    "resolve-version": (lambda reg, root, out: reg.resolve("pirate@9"), NotFound, "no version 9 .versions: 1.*qlora-serve adapters list"),
    "resolve-alias": (lambda reg, root, out: reg.resolve("pirate@prod"), NotFound, "no alias 'prod'.*qlora-serve adapters list"),
    "resolve-bad-ref": (lambda reg, root, out: reg.resolve("pirate@@1"), InvalidArgument, "invalid"),
    "alias-latest": (lambda reg, root, out: reg.set_alias("pirate", "latest", 1), InvalidArgument, "reserved"),
    "alias-numeric": (lambda reg, root, out: reg.set_alias("pirate", "2", 1), InvalidArgument, "starting with a letter"),
    "alias-missing-version": (lambda reg, root, out: reg.set_alias("pirate", "prod", 5), NotFound, "no version 5"),
    "delete-unknown": (lambda reg, root, out: reg.delete("nobody"), NotFound, "qlora-serve adapters list"),
    "delete-unknown-version": (lambda reg, root, out: reg.delete("poet", 2), NotFound, "no version 2"),
    "bad-labels": (lambda reg, root, out: reg.register_path("x", root / "poet", labels={"k": 3}), InvalidArgument, "label"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_leaves_registry_unchanged(case, make_registry, root, tmp_path, demo):
    action, error, message = REFUSALS[case]
    outside = tmp_path / "outside"
    shutil.copytree(demo.adapters["poet"], outside)
    if case == "rank-too-big":
        reg = make_registry(max_rank=8)
        reg.register_path("poet", root / "poet")
        reg.close()
        reg = make_registry(max_rank=4)  # poet (r=4) still listed; new r=8 refused
    else:
        reg = make_registry(max_upload_bytes=200_000)
        reg.register_path("pirate", root / "pirate")
        reg.register_path("poet", root / "poet")
        reg.set_alias("pirate", "default", 1)
    before = snapshot(reg)
    with pytest.raises(error, match=message):
        action(reg, root, outside)
    assert snapshot(reg) == before
    # Nothing half-written survives a reopen either.
    reg.close()
    assert snapshot(make_registry(max_rank=16)) == before


def test_fingerprint_samples_large_weights_without_reading_them_all(tmp_path):
    """Files over 2 MiB of data are identified by header + 1 MiB from each end."""
    from safetensors.torch import save_file as save

    base = tmp_path / "big-base"
    base.mkdir()
    save({"w": torch.zeros(1024, 1024)}, str(base / "model.safetensors"))  # 4 MiB of data
    config = {"model_type": "llama", "hidden_size": 1024}
    fp = base_fingerprint(base, config)
    path = base / "model.safetensors"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle] ^= 0xFF
    path.write_bytes(bytes(data))
    assert base_fingerprint(base, config) == fp  # the middle is not read (documented)
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert base_fingerprint(base, config) != fp
