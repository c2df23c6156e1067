"""End-to-end adapter registry through a REAL gRPC server on a loopback port (no mocks).

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

Documented statuses a client may see while adapters churn (asserted below):
- Generate/GenerateStream: OK; NOT_FOUND when the named adapter/version/alias
  does not exist (deleted before it was resolved, or deleted while the request
  waited for its cold load: the loader re-checks the catalogue).
- LoadAdapter: OK; RESOURCE_EXHAUSTED when every device slot is pinned by
  running requests ("retry later or raise --max-resident-adapters").
- Register/Upload, SetAlias, UnloadAdapter, DeleteAdapter, List/Get: OK only
  (the churner is the only writer, so it never races itself).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import urllib.request
from pathlib import Path

import grpc

import pytest
import torch
from safetensors.torch import load_file

from adapter_files import CONFIG, WEIGHTS, corrupt, make_variant
from conftest import stop_server, wait_until
from interleave import RegistryInterleaver
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


# ------------------------------------------------------ (1) operator story
def test_operator_story_register_serve_alias_rollback_delete_while_streaming(reg_server, rc, refs, pool):
    """The issue's "Done when": support@1, serve, support@2, move `default`, roll
    back, delete, with clients streaming throughout: never an error, never a
    wrong adapter, every response names the version that served it and carries
    exactly that version's reference tokens."""
    v1 = rc.upload("support", pool["support1"], set_default=True)
    assert (v1.version, v1.source, list(v1.aliases)) == (1, "upload", ["default"])
    assert v1.digest == refs.digest_of["support1"]
    digests = {1: v1.digest}

    phase = [0]
    expected = {0: 1}  # phase -> the version plain "support" must serve
    results, errors = [], []
    stop = threading.Event()
    streamers = [("support", 0), ("support", 1), ("support", 2), ("support@1", 3)]

    def stream_loop(ref: str, idx: int) -> None:
        n = 0
        while not stop.is_set() and n < 300:
            prompt, p0 = PROMPTS[(idx + n) % 2], phase[0]
            try:
                toks, served = stream_once(rc, ref, prompt)
            except grpc.RpcError as exc:
                errors.append((ref, p0, exc.code(), exc.details()))
            except BaseException as exc:  # a broken stream (assertion in stream_once)
                errors.append((ref, p0, type(exc).__name__, str(exc)))
            else:
                results.append((idx, ref, prompt, p0, phase[0], served, toks))
            n += 1

    def served_in_this_phase(k: int = 2) -> None:
        p = phase[0]
        wait_until(lambda: errors or all(sum(1 for r in results if r[0] == i and r[3] == p and r[4] == p) >= k
                                         for _, i in streamers), timeout=60, what=f"every streamer served in phase {p}")

    def advance(version: int) -> None:
        phase[0] += 1
        expected[phase[0]] = version

    threads = [threading.Thread(target=stream_loop, args=s, daemon=True) for s in streamers]
    for t in threads:
        t.start()
    try:
        served_in_this_phase()
        v2 = rc.upload("support", pool["support2"])  # a new version; `default` still says 1
        assert (v2.version, list(v2.aliases)) == (2, []) and v2.digest == refs.digest_of["support2"]
        digests[2] = v2.digest
        assert rc.get_adapter("support").version == 1 and rc.get_adapter("support@latest").version == 2
        advance(1)
        served_in_this_phase()
        assert list(rc.set_alias("support", "default", 2).aliases) == ["default"]
        advance(2)
        served_in_this_phase()
        rc.set_alias("support", "default", 1)  # roll back
        advance(1)
        served_in_this_phase()
        assert [(d.name, d.version) for d in rc.delete("support", 2)] == [("support", 2)]
        advance(1)
        served_in_this_phase()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:5]
    for idx, ref, prompt, p0, p1, (name, version, digest), toks in results:
        assert name == "support" and digest == digests[version], (ref, name, version, digest)
        allowed = {1} if ref == "support@1" else {expected[p] for p in range(p0, p1 + 1)}
        assert version in allowed, f"{ref} sent in phase {p0}, done in {p1}: served v{version}, allowed {allowed}"
        refs.check(digest, prompt, toks, f"{ref}@v{version}")
    assert any(r[5][1] == 2 for r in results), "support@2 never served"
    # Final state: only v1, with `default`; then the operator deletes the name.
    assert [(a.name, a.version, list(a.aliases)) for a in rc.list_adapters("support")] == [("support", 1, ["default"])]
    rc.delete("support")
    assert rc.list_adapters("support") == []
    with pytest.raises(grpc.RpcError) as err:
        rc.generate("hello", adapter="support", max_new_tokens=2)
    assert err.value.code() == Code.NOT_FOUND
    store = Path(reg_server.config.data_dir) / "store"
    assert not (store / digests[1]).exists() and not (store / digests[2]).exists(), "deleted files left in the store"


# --------------------------------------------------------------- (2) churn
CHURN_ITERATIONS = 24
CHURN_TIME_CAP_S = 45.0
STREAM_ALLOWED = {Code.NOT_FOUND}  # besides OK; see the module docstring
LOAD_ALLOWED = {Code.RESOURCE_EXHAUSTED}


def test_churn_streams_always_get_the_version_they_report(reg_server, rc, refs, pool):
    """8 concurrent streamers over 5+ adapters on a 2-slot server while a churner
    registers, loads, unloads, re-aliases and deletes adapters in a loop. Every
    finished stream's tokens equal the reference of the version it reports; the
    only non-OK statuses are the documented ones."""
    registered: dict[tuple[str, int], str] = {}

    def up(name: str, key: str, **kw):
        info = rc.upload(name, pool[key], **kw)
        registered[(info.name, info.version)] = info.digest
        return info

    up("alpha", "extra-r4")
    up("beta", "extra-r8")
    up("gamma", "pirate", set_default=True)
    up("gamma", "poet")  # gamma@2; `default` moves between 1 and 2 during the churn
    up("delta", "support1")
    latest_tmp = ["alpha", "beta"]  # tmp-N names as the churner creates them
    before = scrape(reg_server)

    stop = threading.Event()
    results, bad, allowed_seen, churn_errors = [], [], [], []
    # None = the newest tmp-N; "prev" = the one before, which the churner deletes on odd iterations.
    refs_cycle = ["alpha", "beta", "gamma", "delta", "gamma@1", None, "prev"]

    def streamer(idx: int) -> None:
        n = 0
        while not stop.is_set() and n < 200:
            ref = refs_cycle[(idx + n) % len(refs_cycle)] or latest_tmp[-1]
            ref = latest_tmp[-2] if ref == "prev" else ref
            prompt = PROMPTS[(idx + n) % 2]
            n += 1
            try:
                toks, served = stream_once(rc, ref, prompt)
            except grpc.RpcError as exc:
                (allowed_seen if exc.code() in STREAM_ALLOWED and ref.startswith(("delta", "tmp-")) else bad).append(
                    (ref, exc.code(), exc.details()))
            except BaseException as exc:
                bad.append((ref, type(exc).__name__, str(exc)))
            else:
                results.append((ref, prompt, served, toks))

    def call(fn, *args, allowed=frozenset()):
        try:
            return fn(*args)
        except grpc.RpcError as exc:
            (allowed_seen if exc.code() in allowed else churn_errors).append((fn.__name__, args, exc.code(), exc.details()))
            return None

    cycle = ["pirate", "poet", "extra-r16", "support2", "support1"]
    deadline = time.monotonic() + CHURN_TIME_CAP_S
    threads = [threading.Thread(target=streamer, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    iterations = 0
    try:
        for i in range(CHURN_ITERATIONS):
            if time.monotonic() > deadline:
                break
            key = cycle[i % len(cycle)]
            call(up, "delta", key)
            call(rc.load, "delta", allowed=LOAD_ALLOWED)
            call(rc.set_alias, "gamma", "default", 1 + i % 2)
            call(rc.unload, "alpha")
            tmp = f"tmp-{i}"
            call(up, tmp, cycle[(i + 2) % len(cycle)])
            latest_tmp.append(tmp)
            call(rc.load, tmp, allowed=LOAD_ALLOWED)
            versions = sorted(a.version for a in rc.list_adapters("delta"))
            for old in versions[:-2]:  # keep the newest two versions of delta
                call(rc.delete, "delta", old)
            call(rc.unload, "gamma@2")
            if i % 2:
                call(rc.delete, f"tmp-{i - 1}")  # the previous tmp, maybe still streamed
            call(rc.load, "beta", allowed=LOAD_ALLOWED)
            time.sleep(0.05)  # let streams run between bursts of changes
            iterations += 1
    finally:
        stop.set()
        for t in threads:
            t.join(90)
    assert not any(t.is_alive() for t in threads), "a streamer hung"
    assert not churn_errors, churn_errors[:5]
    assert not bad, bad[:5]
    assert iterations >= 3, "the churn loop barely ran"
    assert len(results) >= 30, f"only {len(results)} streams finished"
    for ref, prompt, (name, version, digest), toks in results:
        assert registered.get((name, version)) == digest, f"{ref}: reported {name}@{version} {digest[:12]}, registered {registered.get((name, version), '?')[:12]}"
        if "@" in ref:
            assert ref == f"{name}@{version}"
        elif not ref.startswith("tmp-"):
            assert name == ref
        refs.check(digest, prompt, toks, f"{ref} -> {name}@{version}")
    after = scrape(reg_server)
    delta = lambda metric, **lab: sample(after, metric, **lab) - sample(before, metric, **lab)  # noqa: E731
    assert delta("qlora_adapter_evictions_total", tier="device") > 0, "no device eviction happened"
    assert delta("qlora_adapter_loads_total", result="ok") > 0, "no cold load happened"
    print(f"churn: {iterations} iterations, {len(results)} streams OK, {len(allowed_seen)} documented refusals "
          f"({sorted({str(e[-2]) for e in allowed_seen})}), loads ok +{delta('qlora_adapter_loads_total', result='ok'):.0f}, "
          f"device evictions +{delta('qlora_adapter_evictions_total', tier='device'):.0f}, "
          f"host evictions +{delta('qlora_adapter_evictions_total', tier='host'):.0f}")


def test_request_for_a_live_name_survives_deleting_another_name_with_the_same_files(reg_server, rc, pool, refs):
    """Two names share one stored copy (same digest). A request for the deleted
    name may fail with NOT_FOUND, but a request for the live name that is waiting
    on the same cold load must be served, not refused."""
    a = rc.upload("share-a", pool["extra-r16"])
    b = rc.upload("share-b", pool["extra-r16"])
    assert a.digest == b.digest
    rc.unload("share-a")  # nothing resident: the next request is a cold load
    engine = reg_server.runtime.engine
    engine.forget(a.digest).result(10)  # and not in the host cache either
    gate = Gate(reg_server)
    try:
        blocker = rc.inference.Generate.future(rc.request("hello", max_new_tokens=4), timeout=60)
        assert gate.parked.wait(30)
        out: dict[str, object] = {}

        def run(ref):
            try:
                out[ref] = stream_once(rc, ref, PROMPTS[0])
            except grpc.RpcError as exc:
                out[ref] = exc.code()

        ta = threading.Thread(target=run, args=("share-a",))
        ta.start()
        wait_until(lambda: engine.stats()["queued"] == 1, what="share-a queued")
        tb = threading.Thread(target=run, args=("share-b",))
        tb.start()
        wait_until(lambda: engine.stats()["queued"] == 2, what="share-b queued")
        # Delete share-a while both wait in the engine's inbox (rows go at once;
        # the RPC then waits for the engine, which is parked).
        deleter = threading.Thread(target=rc.delete, args=("share-a",))
        deleter.start()
        wait_until(lambda: rc.list_adapters("share-a") == [], what="share-a deleted")
    finally:
        gate.remove()
    for t in (ta, tb, deleter):
        t.join(60)
    blocker.result(60)
    # share-a was deleted before its cold load read the catalogue: documented NOT_FOUND.
    assert out["share-a"] == Code.NOT_FOUND, out["share-a"]
    assert not isinstance(out["share-b"], Code), f"share-b (still registered) was refused with {out['share-b']}"
    toks, served = out["share-b"]
    assert served == ("share-b", 1, b.digest), f"share-b got {served}"
    refs.check(b.digest, PROMPTS[0], toks, "share-b")
    rc.delete("share-b")


def _walk_interleavings(reg_server, setup, operation, racer, check) -> int:
    """For k = 1, 2, ...: setup(), then operation() with racer() run at the k-th point where
    the operation releases the registry lock; check(result, racer's result) each time.
    Stops when the racer no longer fires (every point visited); returns how many there were."""
    hook = RegistryInterleaver(reg_server.runtime.registry)
    try:
        for k in range(1, 64):
            state = setup()
            raced: list = []
            hook.arm(k, lambda: raced.append(racer(state)))
            result = operation(state)
            hook.disarm()
            assert hook.error is None, f"k={k}: the racing call failed: {hook.error!r}"
            check(state, result, raced[0] if raced else None)
            if not hook.fired:
                return k - 1
        raise AssertionError("the operation released the registry lock more than 63 times")
    finally:
        hook.remove()


def test_list_adapters_is_a_snapshot_while_the_name_is_deleted(reg_server, rc, pool):
    """ListAdapters racing a DeleteAdapter of the listed name, at every point the listing
    releases the registry lock: the name is listed whole (versions with their aliases)
    or not at all, never NOT_FOUND (it once read the aliases after the versions)."""
    def setup():
        v1 = rc.upload("snap", pool["support1"], set_default=True)
        v2 = rc.upload("snap", pool["support2"])
        return [(v1.version, ("default",)), (v2.version, ())]

    def check(whole, listed, deleted):
        assert listed in ([], whole), listed
        assert listed == whole or deleted is not None  # empty only because the delete landed first
        for a in rc.list_adapters("snap"):
            rc.delete("snap", a.version)

    points = _walk_interleavings(
        reg_server, setup, lambda _: [(a.version, tuple(a.aliases)) for a in rc.list_adapters("snap")],
        lambda _: rc.delete("snap"), check)
    assert points >= 1


def test_upload_racing_a_delete_of_the_same_name_never_answers_not_found(reg_server, rc, pool):
    """UploadAdapter racing a DeleteAdapter of the same name, at every point the upload
    releases the registry lock: registration is one atomic step, so the delete lands
    before or after it; the answer is the registered version with its aliases, never
    NOT_FOUND (registration has no documented NOT_FOUND)."""
    def setup():
        return rc.upload("race-up", pool["support1"]).version  # a version for the delete to find

    def upload(_):
        return rc.upload("race-up", pool["support2"], set_default=True)  # a grpc.RpcError fails the test

    def check(old, info, deleted):
        assert info.name == "race-up" and info.version > old and list(info.aliases) == ["default"], info
        gone = {d.version for d in deleted or ()}
        assert old in gone or deleted is None
        assert {a.version for a in rc.list_adapters("race-up")} == {old, info.version} - gone
        for a in rc.list_adapters("race-up"):
            rc.delete("race-up", a.version)

    points = _walk_interleavings(reg_server, setup, upload, lambda _: rc.delete("race-up"), check)
    assert points >= 2


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
