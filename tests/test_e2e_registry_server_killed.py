"""Crash safety end to end: a real `qlora-serve serve` process (the CLI, as an
operator runs it) is SIGKILLed while it is in the middle of registering an
adapter; a new process on the same --data-dir must list a consistent registry:
every registration the client saw succeed is there with its digest, the one in
flight is either fully there (files verify, it serves) or absent, nothing is
left in tmp/, and the store holds exactly the listed digests.

"In the middle" is made certain, not hoped for: a watcher polls the server's
data_dir/tmp/ and kills the process the moment a `stage-*` directory (a
registration being written) appears, after at least two registrations landed.
Each registration carries a large README.md so the staging window is wide
(and its own config key, so its own digest). Round 1 uploads over gRPC (client-streamed);
round 2 registers from a server-side path (the server copies the files).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import grpc
import pytest

from qlora_serve.adapters.store import manifest_digest
from qlora_serve.server.client import Client
from server_process import start_serve

PAD_BYTES = 12 << 20  # README.md size: makes the staging window tens of milliseconds wide
MAX_REGISTRATIONS = 30  # per round; the kill normally comes after 3
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ServerProcess:
    """`python -m qlora_serve.server.cli serve ...` on a free port (port 0, read
    back from its "ready on" line)."""

    def __init__(self, base: Path, data_dir: Path, log: Path, *extra: str) -> None:
        self.proc, self.address = start_serve(
            ["--base", str(base), "--port", "0", "--no-metrics", "--no-http", "--data-dir", str(data_dir),
             "--compute-dtype", "float32", "--grace", "0", *extra], log)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def big_adapter(demo, tmp_path_factory):
    """Rank 64 over every Linear module of the demo base (the largest rank the
    server accepts by default)."""
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    return build_random_adapter(demo.base, tmp_path_factory.mktemp("big") / "big",
                                DemoAdapterSpec(name="big", r=64, alpha=64, seed=7, target_modules=ALL_MODULES))


def padded_files(big: Path, i: int) -> dict[str, bytes]:
    readme = f"registration {i}\n".encode()
    # The digest covers only what serving reads, so registration i differs in its config
    # (an extra key, ignored when serving); the README only widens the staging window.
    config = json.loads((big / "adapter_config.json").read_text())
    config["qlora_test_registration"] = i
    return {"adapter_config.json": json.dumps(config).encode(),
            "adapter_model.safetensors": (big / "adapter_model.safetensors").read_bytes(),
            "README.md": readme + b"\0" * (PAD_BYTES - len(readme))}


def digest_of(files: dict[str, bytes]) -> str:
    import hashlib

    return manifest_digest({n: (len(d), hashlib.sha256(d).hexdigest()) for n, d in files.items()})


def kill_mid_registration(server: ServerProcess, data_dir: Path, register, tokens_of) -> tuple[dict, dict, list]:
    """Run `register(client, i)` for i = 0, 1, ... and SIGKILL the server as soon as a
    stage dir appears in tmp/ after >= 2 registrations succeeded.
    Returns ({version: digest} acknowledged, {i: expected digest} attempted, tokens of the first)."""
    acked: dict[int, str] = {}
    attempted: dict[int, str] = {}
    first_tokens: list = []
    killed = threading.Event()
    errors: list = []

    def registrar():
        with Client(server.address, timeout=120) as c:
            for i in range(MAX_REGISTRATIONS):
                if killed.is_set():
                    return
                try:
                    attempted[i], info = register(c, i)
                except grpc.RpcError as exc:
                    if not killed.is_set():
                        errors.append(exc)
                    return
                acked[info.version] = info.digest
                if i == 0:
                    first_tokens.extend(tokens_of(c, f"big@{info.version}"))

    t = threading.Thread(target=registrar, daemon=True)
    t.start()
    tmp = data_dir / "tmp"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and t.is_alive():
        if len(acked) >= 2 and any(e.startswith("stage-") for e in os.listdir(tmp)):
            killed.set()  # first, so the registrar knows its RPC error is the kill's
            server.kill()
            break
        time.sleep(0.0005)
    t.join(30)
    assert not errors, errors
    assert killed.is_set(), "never caught a registration in flight"
    assert server.proc.returncode == -signal.SIGKILL
    return acked, attempted, first_tokens


def check_consistent(server: ServerProcess, data_dir: Path, acked: dict, attempted: dict, first_tokens: list,
                     tokens_of) -> str:
    with Client(server.address, timeout=60) as c:
        listed = {a.version: a.digest for a in c.list_adapters("big")}
        # Every acknowledged registration survived the kill, unchanged.
        for version, digest in acked.items():
            assert listed.get(version) == digest, f"acknowledged big@{version} lost or changed"
        extra = {v: d for v, d in listed.items() if v not in acked}
        # The one in flight: fully there (the next version, its exact files) or absent.
        assert len(extra) <= 1, extra
        for version, digest in extra.items():
            assert version == max(acked) + 1 and digest in attempted.values()
        # Nothing half-written: no staging leftovers, the store holds exactly the listed digests.
        assert os.listdir(data_dir / "tmp") == []
        assert sorted(os.listdir(data_dir / "store")) == sorted(set(listed.values()))
        # Every listed version verifies (LoadAdapter re-hashes the files) and serves the same tokens.
        for version in sorted(listed):
            assert c.load(f"big@{version}").digest == listed[version]
            assert tokens_of(c, f"big@{version}") == first_tokens, f"big@{version} serves other tokens"
    return "present" if extra else "absent"


def test_sigkill_mid_registration_leaves_adapter_whole_or_absent(demo, big_adapter, tmp_path):
    data_dir, src_root, log = tmp_path / "data", tmp_path / "sources", tmp_path / "server.log"

    def tokens_of(client, ref):
        return list(client.generate("hello world", adapter=ref, max_new_tokens=6).token_ids)

    # Round 1: client-streamed uploads.
    def upload(client, i):
        files = padded_files(big_adapter, i)
        src = tmp_path / "up"
        src.mkdir(exist_ok=True)
        for name, data in files.items():
            (src / name).write_bytes(data)
        return digest_of(files), client.upload("big", src)

    server = ServerProcess(demo.base, data_dir, log)
    try:
        acked, attempted, first = kill_mid_registration(server, data_dir, upload, tokens_of)
    finally:
        server.kill()
    assert len(first) == 6
    server = ServerProcess(demo.base, data_dir, log, "--allowed-adapter-root", str(src_root))
    try:
        outcome1 = check_consistent(server, data_dir, acked, attempted, first, tokens_of)
        with Client(server.address, timeout=30) as c:
            known = {a.version: a.digest for a in c.list_adapters("big")}

        # Round 2: registrations from a server-side path (the server copies the files).
        def register_path(client, i):
            files = padded_files(big_adapter, 1000 + i)
            src = src_root / f"r{i}"
            src.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (src / name).write_bytes(data)
            return digest_of(files), client.register_path("big", str(src))

        acked2, attempted2, first2 = kill_mid_registration(server, data_dir, register_path, tokens_of)
        assert first2 == first
    finally:
        server.kill()
    server = ServerProcess(demo.base, data_dir, log, "--allowed-adapter-root", str(src_root))
    try:
        outcome2 = check_consistent(server, data_dir, {**known, **acked2}, attempted2, first, tokens_of)
    finally:
        server.terminate()
    print(f"in-flight registration after SIGKILL: upload round {outcome1}, path round {outcome2}")
