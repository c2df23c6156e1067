"""Training jobs persist in SQLite: a new JobManager on the same file (a restarted
server) lists every job with its result. A job that was queued or running is FAILED
with the reason (--no-resume-interrupted-jobs), or, by default, resumes from its newest
complete checkpoint, unless it cannot (then FAILED saying why). Real SQLite file, the
real JobManager, real job processes."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from qlora_serve.server.job_store import JobStore
from qlora_serve.server.job_manager import Job, JobManager
from qlora_serve.v1 import common_pb2
from qlora_serve.v1 import training_pb2 as T


def _job(tmp_path, job_id: str, state: int, **kw) -> Job:
    return Job(id=job_id, adapter_name="a", owner="tenant-1", set_default=True, config={"lora_r": 8},
               workdir=tmp_path / job_id, state=state, created_at=time.time(), **kw)


def test_restart_lists_every_job_and_fails_interrupted_ones(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    done = _job(tmp_path, "done", T.JOB_STATE_SUCCEEDED, step=300, max_steps=300, loss=0.25,
                adapter=common_pb2.AdapterRef(name="a", version=2, digest="d" * 64))
    running = _job(tmp_path, "running", T.JOB_STATE_RUNNING, step=40, max_steps=300)
    queued = _job(tmp_path, "queued", T.JOB_STATE_QUEUED)
    for job in (done, running, queued):
        store.save(job)
    store.close()

    manager = JobManager(runtime=None, store=JobStore(tmp_path / "jobs.sqlite3"))  # the restarted server
    try:
        jobs = {j.id: j for j in manager.all()}
        assert list(jobs) == ["done", "running", "queued"]
        assert jobs["done"].proto() == done.proto()
        assert jobs["running"].state == T.JOB_STATE_FAILED and "RUNNING at step 40" in jobs["running"].error
        assert jobs["queued"].state == T.JOB_STATE_FAILED and "while the job was QUEUED" in jobs["queued"].error
        assert jobs["running"].finished_at > 0 and jobs["running"].config == {"lora_r": 8}
        # Watching an ended job from an earlier run ends with its final state.
        events = list(manager.watch(jobs["done"], lambda: True))
        assert [e.event for e in events] == ["registered"] and events[-1].job.state == T.JOB_STATE_SUCCEEDED
    finally:
        manager.shutdown()
    # The FAILED verdict itself was persisted.
    rows = {r["id"]: r for r in JobStore(tmp_path / "jobs.sqlite3").load()}
    assert rows["running"]["state"] == T.JOB_STATE_FAILED and rows["done"]["result_version"] == 2


# ------------------------------------------------- resume_interrupted_jobs (the server's default)
def _interrupted(tmp_path, job_id: str, state: int, base: str, *, step: int = 0, checkpoints=(), partial=(),
                 data: str | None = '{"text": "hello"}\n', cancel_requested: bool = False, **config) -> Job:
    """A job as an earlier server left it: its work dir with the uploaded dataset and
    `checkpoints` (complete: trainer_state.json written last) / `partial` (died mid-save)."""
    workdir = tmp_path / "jobs" / job_id
    ckpts = workdir / "out" / "checkpoints"
    ckpts.mkdir(parents=True)
    for n in checkpoints:
        (ckpts / f"checkpoint-{n}").mkdir()
        (ckpts / f"checkpoint-{n}" / "trainer_state.json").write_text(json.dumps({"global_step": n}))
    for n in partial:
        (ckpts / f"checkpoint-{n}").mkdir()
        (ckpts / f"checkpoint-{n}" / "adapter_model.safetensors").write_bytes(b"\0" * 8)
    if data is not None:
        (workdir / "train.jsonl").write_text(data)
    cfg = {"base": base, "name": job_id, "data": str(workdir / "train.jsonl"), "out": str(workdir / "out"),
           "progress_bar": False, "save_steps": 2, "max_steps": 20, **config}
    return Job(id=job_id, adapter_name=job_id, owner=None, set_default=False, config=cfg, workdir=workdir,
               state=state, step=step, max_steps=20, created_at=time.time(), cancel_requested=cancel_requested)


def test_restart_resumes_interrupted_jobs_or_says_why_not(tmp_path, demo):
    base = str(demo.base)
    R, Q = T.JOB_STATE_RUNNING, T.JOB_STATE_QUEUED
    jobs = [
        # Resumes from checkpoint-4, the newest complete one; checkpoint-6 died mid-save. Its recorded
        # run settings differ (lora_r 4 -> 8), so the real job process then refuses to resume, naming it.
        _interrupted(tmp_path, "resumable", R, base, step=7, checkpoints=(2, 4), partial=(6,), lora_r=8),
        _interrupted(tmp_path, "no-checkpoint", R, base, step=1),
        _interrupted(tmp_path, "data-gone", R, base, step=5, checkpoints=(4,), data=None),
        _interrupted(tmp_path, "other-base", R, "/elsewhere/base", step=5, checkpoints=(4,)),
        _interrupted(tmp_path, "cancelled", R, base, step=5, checkpoints=(4,), cancel_requested=True),
        # Queued: runs again, from the start; its data does not parse, so it fails in its process.
        _interrupted(tmp_path, "queued", Q, base, data="not json\n"),
    ]
    (tmp_path / "jobs" / "resumable" / "out" / "checkpoints" / "run_settings.json").write_text(json.dumps({"lora_r": 4}))
    store = JobStore(tmp_path / "jobs.sqlite3")
    for job in jobs:
        store.save(job)
    store.close()

    manager = JobManager(runtime=None, store=JobStore(tmp_path / "jobs.sqlite3"), resume=True, base_name=base)
    try:
        got = {j.id: j for j in manager.all()}
        first = {i: got[i].events[0] for i in got}
        resumed = json.loads(first["resumable"].details_json)
        assert first["resumable"].event == "resumed" and first["resumable"].job.state == T.JOB_STATE_QUEUED
        assert (resumed["from_step"], resumed["interrupted_at_step"]) == (4, 7)
        assert resumed["checkpoint"].endswith("checkpoint-4") and first["resumable"].job.step == 4
        assert got["resumable"].config["resume"] is True
        ckpts = tmp_path / "jobs" / "resumable" / "out" / "checkpoints"
        assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4", "run_settings.json"]
        assert first["queued"].event == "requeued" and first["queued"].job.state == T.JOB_STATE_QUEUED

        def failed(job_id: str) -> str:
            assert got[job_id].state == T.JOB_STATE_FAILED, (job_id, got[job_id].state)
            assert got[job_id].error.startswith("interrupted: the server stopped while the job was RUNNING at step")
            return got[job_id].error

        assert "it had written no checkpoint yet (one every save_steps = 2 steps)" in failed("no-checkpoint")
        assert "its uploaded dataset" in failed("data-gone") and "is gone" in failed("data-gone")
        assert "it trains base '/elsewhere/base' but this server serves" in failed("other-base")
        assert got["cancelled"].state == T.JOB_STATE_CANCELLED and first["cancelled"].event == "cancelled"

        # The resumed and the requeued job really run again, one after the other, in their own processes.
        for job_id in ("resumable", "queued"):
            events = list(manager.watch(got[job_id], lambda: True))
            assert events[-1].job.state == T.JOB_STATE_FAILED, [(e.event, e.details_json[:300]) for e in events]
        assert "cannot resume" in got["resumable"].error and "lora_r: 4 -> 8" in got["resumable"].error
        assert "train.jsonl:1" in got["queued"].error, got["queued"].error
    finally:
        manager.shutdown()
    rows = {r["id"]: r for r in JobStore(tmp_path / "jobs.sqlite3").load()}
    assert rows["resumable"]["config"]["resume"] is True and rows["cancelled"]["state"] == T.JOB_STATE_CANCELLED
    assert rows["no-checkpoint"]["state"] == T.JOB_STATE_FAILED


def test_a_job_that_sent_its_result_before_the_stop_is_registered(tmp_path, demo, monkeypatch):
    """The stop comes after the job process sent "done" but before the job was registered:
    the job still ends SUCCEEDED with its adapter registered (it is not left to re-train at
    the next start, nor FAILED there for want of a checkpoint: save_steps > max_steps)."""
    import threading
    from types import SimpleNamespace

    import torch
    from transformers import AutoModelForCausalLM

    import qlora_serve.training.jobs as jobs
    from conftest import wait_until
    from qlora_serve.adapters.fingerprint import base_fingerprint
    from qlora_serve.adapters.registry import AdapterRegistry

    received, go = threading.Event(), threading.Event()
    real_start = jobs.run_job_in_subprocess

    class HeldAfterResult:
        """The real job process; the worker's next read after its terminal event waits for `go`,
        so the stop lands exactly between the result's arrival and the job's registration."""

        def __init__(self, *args):
            self._job = real_start(*args)

        def __iter__(self):
            for ev in self._job:
                yield ev
                if ev.get("event") in jobs.TERMINAL_EVENTS:
                    received.set()
                    go.wait()

        def __getattr__(self, attr):  # cancel, kill, is_alive: the real process's
            return getattr(self._job, attr)

    monkeypatch.setattr(jobs, "run_job_in_subprocess", HeldAfterResult)
    model = AutoModelForCausalLM.from_pretrained(demo.base, dtype=torch.float32)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fp = base_fingerprint(demo.base, json.loads((demo.base / "config.json").read_text()))
    registry = AdapterRegistry(tmp_path / "registry", base_fingerprint=fp, linear_shapes=shapes, max_rank=16)
    workdir = tmp_path / "jobs" / "j1"
    workdir.mkdir(parents=True)
    (workdir / "train.jsonl").write_text('{"prompt": "one two", "completion": " three"}\n' * 4)
    config = {"base": str(demo.base), "name": "trained", "data": str(workdir / "train.jsonl"),
              "out": str(workdir / "out"), "progress_bar": False, "compute_dtype": "float32", "max_steps": 1,
              "batch_size": 1, "grad_accum": 1, "lora_r": 4, "logging_steps": 1, "save_steps": 1000}
    manager = JobManager(SimpleNamespace(registry=registry), JobStore(tmp_path / "jobs.sqlite3"), resume=True,
                         base_name=str(demo.base))
    try:
        job = manager.submit(Job(id="j1", adapter_name="trained", owner=None, set_default=True, config=config,
                                 workdir=workdir))
        assert received.wait(600), "the job sent no result"
        stopping = threading.Thread(target=manager.shutdown)  # the server stops now
        stopping.start()
        wait_until(lambda: manager._closed, what="the stop to begin")
        with manager._cv:  # the stop has dealt with every job (it sets _closed and does so under this lock)
            pass
        go.set()
        stopping.join(300)
        manager._worker.join(300)
        assert not stopping.is_alive() and not manager._worker.is_alive()
        assert job.state == T.JOB_STATE_SUCCEEDED, (job.error, [e.event for e in job.events])
        assert registry.resolve("trained").ref == "trained@1" and job.adapter.version == 1
    finally:
        go.set()
        manager.shutdown()
        registry.close()
    rows = {r["id"]: r for r in JobStore(tmp_path / "jobs.sqlite3").load()}
    assert (rows["j1"]["state"], rows["j1"]["result_name"], rows["j1"]["result_version"]) == \
        (T.JOB_STATE_SUCCEEDED, "trained", 1)


def test_store_of_an_earlier_release_opens_and_keeps_cancel_requests(tmp_path):
    """A jobs.sqlite3 written before the cancel_requested column existed gains it."""
    path = tmp_path / "jobs.sqlite3"
    store = JobStore(path)
    store.save(_job(tmp_path, "old", T.JOB_STATE_SUCCEEDED))
    store.close()
    db = sqlite3.connect(path)
    db.execute("ALTER TABLE jobs DROP COLUMN cancel_requested")
    db.commit()
    db.close()
    store = JobStore(path)
    assert [(r["id"], r["cancel_requested"]) for r in store.load()] == [("old", False)]
    store.save(_job(tmp_path, "new", T.JOB_STATE_RUNNING, cancel_requested=True))
    assert [(r["id"], r["cancel_requested"]) for r in store.load()] == [("old", False), ("new", True)]
    store.close()


# ------------------------------------------------------------ the flags
def _serve_config(*argv: str):
    import argparse

    from qlora_serve.options import add_flags, values_from
    from qlora_serve.server.config import ServerConfig

    parser = argparse.ArgumentParser()
    add_flags(parser, ServerConfig)
    return ServerConfig(**values_from(parser.parse_args(list(argv)), ServerConfig))


def test_serve_flags_for_resuming_and_the_training_share():
    from qlora_serve.training.jobs import JobResources, default_training_threads

    assert _serve_config().resume_interrupted_jobs is True
    assert _serve_config("--no-resume-interrupted-jobs").resume_interrupted_jobs is False
    cfg = _serve_config("--training-threads", "3", "--training-nice", "0", "--training-gpu-memory-fraction", "0.4")
    assert cfg.training_resources() == JobResources(threads=3, nice=0, gpu_memory_fraction=0.4)
    assert _serve_config().training_resources() == JobResources(threads=None, nice=10, gpu_memory_fraction=None)
    assert default_training_threads() >= 1
    for argv, flag in ((("--training-threads", "0"), "--training-threads"), (("--training-nice", "20"), "--training-nice"),
                       (("--training-nice", "-1"), "--training-nice"),
                       (("--training-gpu-memory-fraction", "0"), "--training-gpu-memory-fraction"),
                       (("--training-gpu-memory-fraction", "1.5"), "--training-gpu-memory-fraction"),
                       (("--training-gpu-memory-fraction", "nan"), "--training-gpu-memory-fraction")):
        with pytest.raises(ValueError, match=flag):
            _serve_config(*argv)


def test_job_resources_bound_the_job_process():
    """In a fresh process, as in a job's: torch's intra-op threads and the niceness."""
    import subprocess
    import sys

    code = ("import os; from qlora_serve.training.jobs import JobResources; before = os.nice(0); "
            "JobResources(threads=1, nice=3).apply(); import torch; "
            "print(torch.get_num_threads(), os.nice(0) - before, os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "3", "1"]


@pytest.mark.cuda
def test_gpu_memory_fraction_caps_the_job_process():
    """--training-gpu-memory-fraction: past the cap, the job's allocations fail (OOM in the
    job, not in the server)."""
    import subprocess
    import sys

    code = ("import torch\nfrom qlora_serve.training.jobs import JobResources\n"
            "JobResources(nice=0, gpu_memory_fraction=0.05).apply()\n"
            "total = torch.cuda.get_device_properties(0).total_memory\n"
            "small = torch.empty(int(total * 0.02), dtype=torch.uint8, device='cuda')\n"
            "try:\n    torch.empty(int(total * 0.10), dtype=torch.uint8, device='cuda'); print('no cap')\n"
            "except torch.OutOfMemoryError:\n    print('capped')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["capped"]
