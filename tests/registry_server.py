"""Shared server, fixtures and helpers of the end-to-end registry tests (test_e2e_adapter_*.py).

A REAL gRPC server on a loopback port (no mocks), one per test module (the
fixtures are module-scoped; each test module imports them).

One module server (`reg_server`): the tiny demo base in NF4 + double quant,
float32 compute, **max_resident_adapters=2** and a host cache of ~2 adapters (so
device evictions, host evictions, disk reloads and cold loads really happen),
max_lora_rank=16, an allowed adapter root, a 1 MB upload limit.

Reference tokens: the same server's own greedy output, recorded one request at a
time before any other traffic (the `refs` fixture uploads every adapter of the
pool, generates, then deletes them again), keyed by the adapter's content digest.
Why not plain PEFT: what these tests check is *which* adapter version served a
request, not the arithmetic; test_e2e_inference.py already proves the engine
equals PEFT token for token. A quiet-moment recording on the same server isolates
the question "did the right weights serve this?" from any numeric concern.
(AVX512-BF16 is switched off on every server here, as in test_e2e_inference, so
batch composition cannot flip a greedy token.)
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import urllib.request
from pathlib import Path

import grpc

import pytest
import torch
from safetensors.torch import load_file

from adapter_files import CONFIG, WEIGHTS, make_variant
from qlora_serve.adapters.registry import FINGERPRINT_KEY
from qlora_serve.server.engine.loader import disable_cpu_bf16_repack
from qlora_serve.v1 import registry_pb2

N_TOKENS = 8
PROMPTS = ("hello world", "The quick brown fox")
MAX_RANK = 16
UPLOAD_LIMIT = 1_000_000
HOST_CACHE_BYTES = 300_000  # ~2 r=8 adapters (119 kB each): host evictions + disk reloads happen
SERVER_ENGINE = dict(max_resident_adapters=2, max_lora_rank=MAX_RANK, host_cache_bytes=HOST_CACHE_BYTES)
Code = grpc.StatusCode


# ------------------------------------------------------------------ helpers
def disable_avx512_bf16(server) -> None:
    """Keep bitsandbytes' CPU 4-bit matmuls in float32 (see disable_cpu_bf16_repack);
    must run before the server's first forward pass."""
    assert server.runtime.engine.stats()["running"] == 0
    assert disable_cpu_bf16_repack(server.runtime.engine.base.model) > 0


def files_of(directory: Path, *names: str) -> dict[str, bytes]:
    return {n: (directory / n).read_bytes() for n in (names or (CONFIG, WEIGHTS))}


def upload_files(client, name: str, files: dict[str, bytes], *, owner: str = "", set_default: bool = False,
                 chunk: int = 256 << 10):
    """A raw client-streamed upload (Client.upload insists on a local config file)."""
    def messages():
        yield registry_pb2.UploadAdapterRequest(header=registry_pb2.UploadHeader(
            name=name, owner=owner, set_default=set_default))
        for fname, data in files.items():
            for i in range(0, max(len(data), 1), chunk):
                yield registry_pb2.UploadAdapterRequest(
                    chunk=registry_pb2.FileChunk(filename=fname, data=data[i:i + chunk]))
    return client.registry.UploadAdapter(messages(), timeout=60)


def stream_once(client, ref: str, prompt: str) -> tuple[list[int], tuple[str, int, str]]:
    """One greedy stream: (token ids, (name, version, digest) it reports)."""
    chunks = list(client.stream(prompt, adapter=ref, max_new_tokens=N_TOKENS))
    served = {(c.adapter.name, c.adapter.version, c.adapter.digest) for c in chunks}
    assert len(served) == 1, f"one stream reported several adapters: {served}"
    assert chunks[-1].finish_reason != 0, "stream ended without a final message"
    return [t for c in chunks for t in c.token_ids], served.pop()


def scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def sample(text: str, name: str, **labels) -> float:
    """One Prometheus sample's value (0 when absent)."""
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")) == labels:
            return float(m.group(2))
    return 0.0


def catalogue(client) -> list[tuple]:
    """Everything ListAdapters says that must survive a restart (not residency)."""
    return [(a.name, a.version, a.digest, a.source, a.base_fingerprint, a.rank, round(a.alpha, 6),
             tuple(a.target_modules), a.size_bytes, a.created_at, a.owner, dict(a.labels), tuple(a.aliases))
            for a in client.list_adapters()]


def registry_state(client, server) -> tuple:
    """The observable registry: catalogue plus the store and tmp directories."""
    d = Path(server.config.data_dir)
    return catalogue(client), sorted(os.listdir(d / "store")), sorted(os.listdir(d / "tmp"))


class Gate:
    """Parks the engine thread at its next forward pass until `release()`
    (a forward-pre-hook on the base model), to line requests up without sleeps."""

    def __init__(self, server) -> None:
        self._open = threading.Event()
        self.parked = threading.Event()
        self._handle = server.runtime.engine.base.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        if not self._open.is_set():
            self.parked.set()
            if not self._open.wait(60):
                raise RuntimeError("gate never released")

    def release(self) -> None:
        self._open.set()

    def remove(self) -> None:
        self._open.set()
        self._handle.remove()


def outside_of(root: Path) -> Path:
    """A good adapter directory beside (outside) the allowed root."""
    return root.parent / f"{root.name}-outside"


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def pool(demo, extra_adapters, tmp_path_factory):
    """Real PEFT adapters for the demo base: {key: dir}."""
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    root = tmp_path_factory.mktemp("e2e-registry-pool")
    built = {key: build_random_adapter(demo.base, root / key, DemoAdapterSpec(name=key, r=8, alpha=16, seed=seed))
             for key, seed in (("support1", 301), ("support2", 302))}
    return {**demo.adapters, **extra_adapters, **built}


@pytest.fixture(scope="module")
def root(pool, demo, tmp_path_factory):
    """The server's allowed adapter root: good copies plus every kind of bad adapter."""
    from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

    r = tmp_path_factory.mktemp("allowed-root")
    shutil.copytree(pool["poet"], r / "poet")
    shutil.copytree(pool["pirate"], r / "pirate")
    pickled = r / "pickled"
    pickled.mkdir()
    shutil.copy(pool["poet"] / CONFIG, pickled / CONFIG)
    torch.save(load_file(str(pool["poet"] / WEIGHTS)), pickled / "adapter_model.bin")
    for name, keep in (("noconf", WEIGHTS), ("noweights", CONFIG)):
        (r / name).mkdir()
        shutil.copy(pool["poet"] / keep, r / name / keep)

    def nan(state):
        key = sorted(state)[0]
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
        return state

    def narrow(state):  # layer 0 q_proj built for a 64-wide base
        return {k: (v[:, :64].contiguous() if "layers.0.self_attn.q_proj.lora_A" in k else v) for k, v in state.items()}

    make_variant(pool["poet"], r / "nan", tensors=nan)
    make_variant(pool["poet"], r / "narrow", tensors=narrow)
    make_variant(pool["poet"], r / "unknown-module",
                 tensors=lambda s: {k.replace("layers.1.", "layers.7."): v for k, v in s.items()})
    make_variant(pool["poet"], r / "fp-mismatch", config={FINGERPRINT_KEY: "ffffffffffffffff"})
    build_random_adapter(demo.base, r / "bigrank", DemoAdapterSpec(name="bigrank", r=2 * MAX_RANK, alpha=8, seed=5))
    outside = outside_of(r)
    shutil.copytree(pool["poet"], outside)
    (r / "escape").symlink_to(outside, target_is_directory=True)
    (r / "evil").mkdir()
    shutil.copy(pool["poet"] / CONFIG, r / "evil" / CONFIG)
    (r / "evil" / WEIGHTS).symlink_to(outside / WEIGHTS)
    return r


@pytest.fixture(scope="module")
def reg_server(start_server, root):
    server = start_server(adapters={}, engine=SERVER_ENGINE, allowed_roots=[root], max_upload_bytes=UPLOAD_LIMIT)
    disable_avx512_bf16(server)
    return server


@pytest.fixture(scope="module")
def rc(reg_server):
    from qlora_serve.server.client import Client

    with Client(f"127.0.0.1:{reg_server.port}", timeout=60) as c:
        yield c


class Refs:
    def __init__(self) -> None:
        self.by_digest: dict[str, dict[str, list[int]]] = {}
        self.digest_of: dict[str, str] = {}

    def check(self, digest: str, prompt: str, tokens: list[int], what: str) -> None:
        assert digest in self.by_digest, f"{what}: served digest {digest[:12]} is not an adapter of the pool"
        assert tokens == self.by_digest[digest][prompt], f"{what}: tokens differ from the reference of {digest[:12]}"


@pytest.fixture(scope="module")
def refs(reg_server, rc, pool):
    """Reference greedy tokens of every pool adapter, by digest, recorded on the
    module server one request at a time before any other traffic."""
    out = Refs()
    for key, path in sorted(pool.items()):
        info = rc.upload(f"ref-{key}", path)
        out.digest_of[key] = info.digest
        out.by_digest[info.digest] = {p: list(rc.generate(p, adapter=f"ref-{key}@{info.version}",
                                                         max_new_tokens=N_TOKENS).token_ids) for p in PROMPTS}
    for key in pool:
        rc.delete(f"ref-{key}")
    assert rc.list_adapters() == []
    # The adapters really differ from each other and from the base, else "right adapter" proves nothing.
    base = tuple(rc.generate(PROMPTS[0], max_new_tokens=N_TOKENS).token_ids)
    firsts = {tuple(v[PROMPTS[0]]) for v in out.by_digest.values()} | {base}
    assert len(firsts) == len(pool) + 1, "two pool adapters (or one and the base) give the same tokens"
    return out


