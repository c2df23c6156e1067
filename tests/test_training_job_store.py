"""Training jobs persist in SQLite: a new JobManager on the same file (a restarted
server) lists every job with its result; a job that was queued or running is FAILED
with the reason. Real SQLite file, the real JobManager."""

from __future__ import annotations

import time

from qlora_serve.server.job_store import JobStore
from qlora_serve.server.training_service import Job, JobManager
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
