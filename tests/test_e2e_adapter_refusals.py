"""End-to-end registry refusals on a REAL gRPC server (the `reg_server` of
registry_server.py): every kind of bad registration, reference or call gets its
documented status and message, and leaves the registry unchanged."""

from __future__ import annotations

import re

import grpc

import pytest

from adapter_files import CONFIG, WEIGHTS
from qlora_serve.v1 import registry_pb2
from registry_server import (MAX_RANK, UPLOAD_LIMIT, Code, files_of, outside_of, registry_state,
                             upload_files)
from registry_server import pool, rc, reg_server, refs, root  # noqa: F401, F811 (module-scoped fixtures: one server per module)


# -------------------------------------------------------- (5) bad input
def _path(sub: str):
    return lambda c, r: c.register_path("x", str(r / sub))


BAD_INPUT = {
    # id: (action(client, root), status, message regex)
    "upload-pickle": (lambda c, r: c.upload("x", r / "pickled"), Code.INVALID_ARGUMENT,
                      r"pickle.*convert it.*safe_serialization=True"),
    "path-pickle": (_path("pickled"), Code.INVALID_ARGUMENT, r"pickle.*convert it.*safe_serialization=True"),
    "upload-missing-weights": (lambda c, r: upload_files(c, "x", files_of(r / "poet", CONFIG)),
                               Code.INVALID_ARGUMENT, "missing adapter_model.safetensors"),
    "upload-missing-config": (lambda c, r: upload_files(c, "x", files_of(r / "poet", WEIGHTS)),
                              Code.INVALID_ARGUMENT, "missing adapter_config.json"),
    "path-missing-config": (_path("noconf"), Code.INVALID_ARGUMENT, "adapter_config.json is missing"),
    "path-missing-weights": (_path("noweights"), Code.INVALID_ARGUMENT, "adapter_model.safetensors is missing"),
    "upload-nan": (lambda c, r: c.upload("x", r / "nan"), Code.INVALID_ARGUMENT, "NaN or Inf"),
    "path-nan": (_path("nan"), Code.INVALID_ARGUMENT, "NaN or Inf"),
    "upload-wrong-shape": (lambda c, r: c.upload("x", r / "narrow"), Code.INVALID_ARGUMENT, "another base model"),
    "upload-unknown-module": (lambda c, r: c.upload("x", r / "unknown-module"), Code.INVALID_ARGUMENT,
                              "not a Linear layer"),
    "rank-too-big": (lambda c, r: c.upload("x", r / "bigrank"), Code.FAILED_PRECONDITION,
                     rf"rank {2 * MAX_RANK} > the server's max_lora_rank {MAX_RANK}.*--max-lora-rank"),
    "bad-name-at": (lambda c, r: c.upload("a@b", r / "poet"), Code.INVALID_ARGUMENT, "name 'a@b' is invalid"),
    "bad-name-dotdot": (lambda c, r: c.upload("../etc", r / "poet"), Code.INVALID_ARGUMENT, "is invalid"),
    "bad-name-empty": (lambda c, r: c.upload("", r / "poet"), Code.INVALID_ARGUMENT, "is invalid"),
    "bad-name-path": (lambda c, r: c.register_path("a/b", str(r / "poet")), Code.INVALID_ARGUMENT, "is invalid"),
    "upload-too-large": (lambda c, r: upload_files(c, "x", {**files_of(r / "poet"), "README.md": b"x" * UPLOAD_LIMIT}),
                         Code.RESOURCE_EXHAUSTED, "exceeds"),
    "upload-unknown-file": (lambda c, r: upload_files(c, "x", {**files_of(r / "poet"), "../evil.py": b"x"}),
                            Code.INVALID_ARGUMENT, "not accepted"),
    "upload-no-header": (lambda c, r: c.registry.UploadAdapter(iter([registry_pb2.UploadAdapterRequest(
        chunk=registry_pb2.FileChunk(filename=CONFIG, data=b"{}"))]), timeout=30), Code.INVALID_ARGUMENT, "header"),
    "path-empty": (lambda c, r: c.register_path("x", ""), Code.INVALID_ARGUMENT, "path is empty"),
    "path-relative": (lambda c, r: c.register_path("x", "poet"), Code.INVALID_ARGUMENT, "is relative"),
    "path-outside-roots": (lambda c, r: c.register_path("x", str(outside_of(r))), Code.PERMISSION_DENIED,
                           "outside the allowed adapter roots"),
    "path-dotdot": (lambda c, r: c.register_path("x", f"{r}/../{r.name}/poet"), Code.PERMISSION_DENIED,
                    r"contains '\.\.'"),
    "path-symlink-dir-escape": (_path("escape"), Code.PERMISSION_DENIED, "outside the allowed adapter roots"),
    "path-symlink-file-escape": (_path("evil"), Code.PERMISSION_DENIED, "is a symlink to"),
    "get-unknown-adapter": (lambda c, r: c.get_adapter("nobody"), Code.NOT_FOUND, "'nobody' is not registered"),
    "get-unknown-version": (lambda c, r: c.get_adapter("bi-pub@9"), Code.NOT_FOUND, "no version 9"),
    "get-unknown-alias": (lambda c, r: c.get_adapter("bi-pub@prod"), Code.NOT_FOUND, "no alias 'prod'"),
    "get-bad-ref": (lambda c, r: c.get_adapter("bi-pub@@1"), Code.INVALID_ARGUMENT, "invalid"),
    "generate-unknown": (lambda c, r: c.generate("hi", adapter="nobody", max_new_tokens=2), Code.NOT_FOUND,
                         "not registered"),
    "stream-unknown-alias": (lambda c, r: list(c.stream("hi", adapter="bi-pub@prod", max_new_tokens=2)),
                             Code.NOT_FOUND, "no alias 'prod'"),
    "load-unknown": (lambda c, r: c.load("nobody"), Code.NOT_FOUND, "not registered"),
    "unload-unknown-version": (lambda c, r: c.unload("bi-pub@9"), Code.NOT_FOUND, "no version 9"),
    "alias-unknown-version": (lambda c, r: c.set_alias("bi-pub", "prod", 9), Code.NOT_FOUND, "no version 9"),
    "alias-unknown-name": (lambda c, r: c.set_alias("nobody", "prod", 1), Code.NOT_FOUND, "not registered"),
    "alias-latest-reserved": (lambda c, r: c.set_alias("bi-pub", "latest", 1), Code.INVALID_ARGUMENT, "reserved"),
    "delete-unknown": (lambda c, r: c.delete("nobody"), Code.NOT_FOUND, "not registered"),
    "delete-unknown-version": (lambda c, r: c.delete("bi-pub", 9), Code.NOT_FOUND, "no version 9"),
    # adapters/registry.py documents it: a name belongs to the owner of its versions -> AlreadyExists.
    "owner-conflict": (lambda c, r: c.upload("bi-pub", r / "pirate", owner="mallory"), Code.ALREADY_EXISTS,
                       "belongs to the public namespace"),
    "fingerprint-mismatch": (lambda c, r: c.upload("x", r / "fp-mismatch"), Code.FAILED_PRECONDITION,
                             "trained on base ffffffffffffffff.*--allow-fingerprint-mismatch"),
}


@pytest.fixture(scope="module")
def bad_input_baseline(rc, root, refs):
    """A public adapter with an alias, so "unchanged" is about something."""
    info = rc.upload("bi-pub", root / "poet", set_default=True)
    rc.set_alias("bi-pub", "stable", info.version)
    return info


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_its_status_and_leaves_the_registry_unchanged(case, reg_server, rc, root, bad_input_baseline):
    action, code, message = BAD_INPUT[case]
    before = registry_state(rc, reg_server)
    with pytest.raises(grpc.RpcError) as err:
        action(rc, root)
    assert err.value.code() == code, f"{case}: {err.value.code()} {err.value.details()}"
    assert re.search(message, err.value.details() or "", re.S), f"{case}: {err.value.details()!r}"
    assert registry_state(rc, reg_server) == before
    # Still serving the existing adapter afterwards.
    assert rc.generate("hi", adapter="bi-pub@stable", max_new_tokens=2).adapter.version == bad_input_baseline.version
