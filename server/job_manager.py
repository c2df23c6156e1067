"""Training jobs of one server: `Job` (a submitted job's state, events and result) and
`JobManager` (queues jobs, runs one at a time in its own process, registers each
finished adapter, persists the list through `server/job_store.py`, and on start-up
resumes or fails the jobs a stop interrupted). The gRPC face is server/training_service.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.errors import NotFound, ResourceExhausted, Unavailable, clip_repr
from qlora_serve.v1 import common_pb2, training_pb2

log = logging.getLogger(__name__)

MAX_QUEUED_JOBS = 16
_FINISH_AT_STOP_S = 120.0  # a stopping server waits this long for a trained job's registration
S = training_pb2  # enum values: S.JOB_STATE_*


@dataclass
class Job:
    """One training job's record and event history (guarded by the manager's condition)."""

    id: str
    adapter_name: str
    owner: str | None
    set_default: bool
    config: dict
    workdir: Path
    state: int = S.JOB_STATE_QUEUED
    step: int = 0
    max_steps: int = 0
    loss: float = 0.0
    eval_loss: float = 0.0
    error: str = ""
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    adapter: common_pb2.AdapterRef = field(default_factory=common_pb2.AdapterRef)
    events: list[training_pb2.TrainingEvent] = field(default_factory=list)
    cancel_requested: bool = False
    interrupted: bool = False  # stopped by the server's shutdown; resumes at the next start
    finishing: bool = False  # its process sent its result: it ends as that says, even if the server stops
    process = None  # the TrainingJob while running

    @property
    def ended(self) -> bool:
        return self.state in (S.JOB_STATE_SUCCEEDED, S.JOB_STATE_FAILED, S.JOB_STATE_CANCELLED)

    def proto(self) -> training_pb2.TrainingJob:
        return training_pb2.TrainingJob(
            id=self.id, adapter_name=self.adapter_name, state=self.state, step=self.step, max_steps=self.max_steps,
            loss=self.loss, eval_loss=self.eval_loss, error=self.error, created_at=self.created_at,
            started_at=self.started_at, finished_at=self.finished_at, adapter=self.adapter, owner=self.owner or "")


class JobManager:
    """Runs queued jobs one after another on a worker thread; with a `store`, every job
    is persisted and the jobs of earlier server runs are listed again (`resume`: see
    job_store.prepare_resume). resources: each job process's share (jobs.JobResources)."""

    def __init__(self, runtime, store=None, *, resume: bool = False, base_name: str | None = None,
                 resources=None) -> None:
        self._rt = runtime
        self._jobs: dict[str, Job] = {}
        self._queue: list[Job] = []
        self._cv = threading.Condition()
        self._closed = False
        self._store = store
        self._resume, self._base_name, self._resources = resume, base_name, resources
        if store is not None:
            self._restore(store)
        self._worker = threading.Thread(target=self._work, name="training-jobs", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._closed:
                raise Unavailable("the server is shutting down; training jobs are not accepted")
            if len(self._queue) >= MAX_QUEUED_JOBS:
                raise ResourceExhausted(f"{MAX_QUEUED_JOBS} training jobs are already queued; retry when one finishes")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._save(job)
            self._event(job, "queued", {})
            self._cv.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self._cv:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"training job {clip_repr(job_id)} does not exist; list jobs with ListJobs")
        return job

    def all(self) -> list[Job]:
        with self._cv:
            return sorted(self._jobs.values(), key=lambda j: j.created_at)

    def cancel(self, job: Job) -> Job:
        with self._cv:
            if job.ended:
                return job
            job.cancel_requested = True
            if job in self._queue:
                self._queue.remove(job)
                self._end(job, S.JOB_STATE_CANCELLED, "cancelled", {})
                return job
            self._save(job)  # a restart before the job has stopped must not resume it
            if job.process is not None:
                job.process.cancel()
        return job

    def shutdown(self) -> None:
        """Server stop: a running job's process is killed (its checkpoints stay on disk).
        With `resume`, queued and running jobs are left to the next start, else CANCELLED; one whose
        result came already ends by it (awaited up to _FINISH_AT_STOP_S s). Watchers return either way."""
        with self._cv:
            self._closed = True
            running = [j for j in self._jobs.values() if not j.ended and j.process is not None]
            queued, self._queue = self._queue, []
            finishing = [j for j in running if j.finishing]
            for job in queued + [j for j in running if not j.finishing]:
                if self._resume and not job.cancel_requested:  # the store keeps it QUEUED / RUNNING
                    job.interrupted = True
                    self._event(job, "interrupted", {"reason": "server shutdown", "resumes_at_next_start": True})
                elif job in running:
                    job.cancel_requested = True
                else:
                    self._end(job, S.JOB_STATE_CANCELLED, "cancelled", {"reason": "server shutdown"})
        for job in running:
            job.process.kill()
        with self._cv:  # registered while the registry is still open
            self._cv.wait_for(lambda: all(j.ended for j in finishing), timeout=_FINISH_AT_STOP_S)

    def watch(self, job: Job, is_active):
        """Every event of the job so far, then new ones until it ends or the client leaves."""
        sent = 0
        while True:
            with self._cv:
                while sent == len(job.events) and not job.ended and not self._closed and is_active():
                    self._cv.wait(timeout=0.5)
                batch, sent = job.events[sent:], len(job.events)
                done = (job.ended or self._closed) and sent == len(job.events)
            yield from batch
            if done or not is_active():
                return

    # ---------------------------------------------------------- internals
    def _restore(self, store) -> None:
        """Jobs of earlier server runs; an unfinished one is taken up again unless it was cancelled."""
        for row in store.load():
            name, version, digest = row.pop("result_name"), row.pop("result_version"), row.pop("result_digest")
            job = Job(**{**row, "workdir": Path(row["workdir"])})
            if name:
                job.adapter = common_pb2.AdapterRef(name=name, version=version, digest=digest)
            with self._cv:
                self._jobs[job.id] = job
                if not job.ended and job.cancel_requested:
                    self._end(job, S.JOB_STATE_CANCELLED, "cancelled", {"reason": "cancelled before the server stopped"})
                elif not job.ended:
                    self._take_up(job)
                else:  # its event history is gone: one event with its final state, so WatchJob ends meaningfully
                    kind = {S.JOB_STATE_SUCCEEDED: "registered", S.JOB_STATE_CANCELLED: "cancelled"}.get(job.state, "error")
                    self._event(job, kind, {"restored": True})

    def _take_up(self, job: Job) -> None:
        """A job the earlier server left QUEUED or RUNNING (caller holds the condition):
        queued again, or FAILED saying why (job_store.prepare_resume)."""
        from qlora_serve.server.job_store import prepare_resume

        kind, details = prepare_resume(job, resume=self._resume, base_name=self._base_name)
        if kind == "error":
            return self._end(job, S.JOB_STATE_FAILED, kind, details)
        self._queue.append(job)
        self._save(job)
        self._event(job, kind, details)

    def _save(self, job: Job) -> None:
        if self._store is not None:
            try:
                self._store.save(job)
            except Exception:  # noqa: BLE001 - a full disk must not stop the job itself
                log.exception("training job %s: could not persist its state", job.id)

    def _event(self, job: Job, kind: str, details: dict) -> None:
        """Append an event (caller holds the condition)."""
        job.events.append(training_pb2.TrainingEvent(job=job.proto(), event=kind,
                                                     details_json=json.dumps(details, default=str)))
        self._cv.notify_all()

    def _end(self, job: Job, state: int, kind: str, details: dict) -> None:
        job.state, job.finished_at = state, time.time()
        self._save(job)
        self._event(job, kind, details)

    def _work(self) -> None:
        from qlora_serve.training.config import TrainConfig
        from qlora_serve.training.jobs import run_job_in_subprocess

        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                job = self._queue.pop(0)
                job.state, job.started_at = S.JOB_STATE_RUNNING, time.time()
                self._save(job)
            result = None
            try:  # anything going wrong with one job fails that job, never this worker thread
                process = run_job_in_subprocess(TrainConfig.from_dict(job.config, source="job config"),
                                                self._resources)
                with self._cv:
                    job.process = process
                    stop_now = job.cancel_requested  # cancelled while the process was starting
                    closing = self._closed  # the server began stopping while it was starting
                    job.interrupted = closing and self._resume and not stop_now
                if closing:
                    process.kill()
                elif stop_now:
                    process.cancel()
                for ev in process:
                    with self._cv:
                        kind = ev.get("event", "")
                        job.step = int(ev.get("step", ev.get("global_step", job.step)) or job.step)
                        job.max_steps = int(ev.get("max_steps", job.max_steps) or job.max_steps)
                        if kind == "log" and ev.get("loss") is not None:
                            job.loss = float(ev["loss"])
                        if kind == "eval" and ev.get("eval_loss") is not None:
                            job.eval_loss = float(ev["eval_loss"])
                        if kind in ("done", "error"):
                            result = ev
                            job.finishing = not job.interrupted  # a shutdown from now on lets it finish
                        else:
                            if kind in ("log", "eval"):
                                self._save(job)  # progress survives a restart (shown in ListJobs)
                            self._event(job, kind, ev)
            except Exception as exc:  # noqa: BLE001
                log.exception("training job %s: the job runner failed", job.id)
                result = {"event": "error", "kind": "Internal", "message": f"the job runner failed: {type(exc).__name__}: {exc}"}
            self._finish(job, result or {"event": "error", "message": "the job ended without a result"})

    def _finish(self, job: Job, result: dict) -> None:
        if job.interrupted:  # killed by the server's shutdown: the store keeps it RUNNING for the next start
            return
        if job.cancel_requested and (result.get("event") == "error" or result.get("cancelled")):
            # Cancelled: stopped after a step, or killed when it did not stop within the grace period.
            with self._cv:
                self._end(job, S.JOB_STATE_CANCELLED, "cancelled", result)
            return
        if result.get("event") == "error":
            with self._cv:
                job.error = result.get("message", "unknown error").strip().splitlines()[0][:2000]
                self._end(job, S.JOB_STATE_FAILED, "error", result)
            return
        if result.get("cancelled"):
            with self._cv:
                self._end(job, S.JOB_STATE_CANCELLED, "cancelled", result)
            return
        try:
            rec = self._rt.registry.register_path(
                job.adapter_name, result["adapter_dir"], owner=job.owner, set_default=job.set_default,
                source="training", trusted=True)
        except Exception as exc:  # a bad adapter must fail the job, not the worker thread
            with self._cv:
                job.error = f"training finished but registration failed: {exc}"
                self._end(job, S.JOB_STATE_FAILED, "error", {"message": job.error})
            return
        with self._cv:
            job.adapter = common_pb2.AdapterRef(name=rec.name, version=rec.version, digest=rec.digest)
            if result.get("final_eval_loss") is not None:
                job.eval_loss = float(result["final_eval_loss"])
            self._end(job, S.JOB_STATE_SUCCEEDED, "registered", {**result, "adapter": rec.ref})
        log.info("training job %s registered %s", job.id, rec.ref)
