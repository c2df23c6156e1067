"""Crash safety: SIGKILL a process in the middle of a registration, at every
step of it, then open the registry and check it is consistent: the adapter is
either fully registered (files intact, digest verifies) or absent, no half
rows, and leftovers in tmp/ and store/ are garbage-collected.

One helper process imports the library once and forks a child per crash
point; each child registers into its own data_dir and is killed either by a
hook patched in at a precise step (deterministic) or by its parent after a
random delay (black box). The library has no test hooks of its own: the
child monkeypatches its private seams.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from qlora_serve.adapters.fingerprint import base_fingerprint
from qlora_serve.adapters.registry import AdapterRegistry
from qlora_serve.server.demo import DemoAdapterSpec, build_random_adapter

# Deterministic points, in the order a registration passes them.
POINTS = {
    "mid_copy": "absent",         # half of adapter_model.safetensors written in tmp/
    "before_rename": "absent",    # stage complete and fsynced, not yet in store/
    "before_insert": "absent",    # in store/<digest>, no row yet
    "mid_transaction": "absent",  # row inserted, transaction not committed
    "after_commit": "present",    # register() returned
}
RANDOM_KILLS = 6

CHILD = textwrap.dedent(
    r"""
    import json, os, random, signal, sys, time
    from qlora_serve.adapters import registry as R, store as S
    import peft.utils.other  # noqa: F401 - warm the lazy import once, not in every forked child

    job = json.loads(open(sys.argv[1]).read())
    shapes = {k: tuple(v) for k, v in job["shapes"].items()}

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def install(point):
        if point == "mid_copy":
            orig = S._copy_stream
            def copy(src, dst, hasher):
                if not dst.name.endswith(".safetensors"):
                    return orig(src, dst, hasher)
                dst.write(src.read(os.fstat(src.fileno()).st_size // 2))
                dst.flush(); os.fsync(dst.fileno())
                die()
            S._copy_stream = copy
        elif point == "before_rename":
            orig_replace = os.replace
            def replace(a, b):
                if "stage-" in str(a):
                    die()
                return orig_replace(a, b)
            os.replace = replace
        elif point == "before_insert":
            R.AdapterRegistry._insert_version = lambda self, conn, rec: die()
        elif point == "mid_transaction":
            orig_insert = R.AdapterRegistry._insert_version
            def insert(self, conn, rec):
                orig_insert(self, conn, rec)
                die()
            R.AdapterRegistry._insert_version = insert

    def child(point, data_dir, ready_w):
        reg = R.AdapterRegistry(data_dir, base_fingerprint=job["fp"], linear_shapes=shapes, max_rank=64,
                                allowed_roots=[job["root"]])
        reg.register_path("keep", job["keep"])
        install(point)
        os.write(ready_w, b"r")
        t0 = time.perf_counter()
        reg.register_path("big", job["big"])
        os.write(ready_w, b"%f" % (time.perf_counter() - t0))
        die()  # "after_commit": killed with the registration done

    def run(point, data_dir, delay=None):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(r)
                child(point, data_dir, w)
            finally:
                os._exit(3)
        os.close(w)
        os.read(r, 1)  # the child is about to start the registration
        if delay is not None:
            time.sleep(delay)
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        took = os.read(r, 64)
        os.close(r)
        return {"killed": os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL,
                "took": float(took) if took else None}

    out = {}
    for point, data_dir in job["points"].items():
        out[point] = run(point, data_dir)
    # Black box: kill at random moments within one registration's duration.
    duration = out["after_commit"]["took"]
    rng = random.Random(job["seed"])
    for i, data_dir in enumerate(job["random"]):
        out[f"random{i}"] = run("random", data_dir, delay=rng.uniform(0, duration * 1.2))
        out[f"random{i}"]["data_dir"] = data_dir
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def setup(demo, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp = base_fingerprint(demo.base, json.loads((demo.base / "config.json").read_text()))
    root = tmp_path_factory.mktemp("crash-root")
    # "Large-ish": rank 64 on every Linear, ~1.5 MB of weights.
    spec = DemoAdapterSpec(name="big", r=64, alpha=64, seed=5,
                           target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    big = build_random_adapter(demo.base, root / "big", spec)
    shutil.copytree(demo.adapters["poet"], root / "keep")
    return {"shapes": shapes, "fp": fp, "root": root, "big": big, "keep": root / "keep"}


def _open(setup, data_dir: Path) -> AdapterRegistry:
    return AdapterRegistry(data_dir, base_fingerprint=setup["fp"], linear_shapes=setup["shapes"], max_rank=64,
                           allowed_roots=[setup["root"]])


def test_sigkill_mid_registration_leaves_registry_consistent(setup, tmp_path):
    points = {p: str(tmp_path / p) for p in POINTS}
    randoms = [str(tmp_path / f"random{i}") for i in range(RANDOM_KILLS)]
    job = {"shapes": setup["shapes"], "fp": setup["fp"], "root": str(setup["root"]), "big": str(setup["big"]),
           "keep": str(setup["keep"]), "points": points, "random": randoms, "seed": 1234}
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", CHILD, str(job_file)], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])

    # The deterministic kills left the debris they should have, before any GC.
    def entries(p: str, sub: str) -> list[str]:
        return os.listdir(Path(p) / sub)

    assert any(entries(points["mid_copy"], "tmp")), "mid_copy should leave a partial stage"
    assert any(entries(points["before_rename"], "tmp"))
    assert len(entries(points["before_insert"], "store")) == 2  # keep's and the unreferenced big's

    outcomes = {}
    for label, result in results.items():
        assert result["killed"], f"{label}: the child was not SIGKILLed: {result}"
        data_dir = Path(points.get(label) or result["data_dir"])
        with _open(setup, data_dir) as reg:
            refs = [r.ref for r in reg.list()]
            assert refs in (["keep@1"], ["big@1", "keep@1"]), f"{label}: {refs}"
            for rec in reg.list():
                reg.verify(rec)  # every listed adapter is whole
            referenced = {r.digest for r in reg.list()}
            assert set(os.listdir(data_dir / "store")) == referenced, f"{label}: store not GC'd"
            assert os.listdir(data_dir / "tmp") == [], f"{label}: tmp not GC'd"
            outcomes[label] = "present" if "big@1" in refs else "absent"
            if outcomes[label] == "absent":
                # No half row or burnt version number: registering again gives big@1.
                assert reg.register_path("big", setup["big"]).ref == "big@1"
        # And the state survives one more reopen unchanged.
        with _open(setup, data_dir) as reg:
            assert [r.ref for r in reg.list()] == ["big@1", "keep@1"]
    print("outcomes:", outcomes)
    for point, expected in POINTS.items():
        assert outcomes[point] == expected, f"{point}: {outcomes[point]} != {expected}"
