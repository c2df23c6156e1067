"""gRPC Training service: QLoRA jobs on the server's base, one at a time, each in
its own process; a finished adapter is registered and served at once."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.server.auth import Principal, check_adapter_access
from qlora_serve.errors import (
    FailedPrecondition, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, Unavailable, clip_repr)
from qlora_serve.server.runtime import streaming_rpc, unary_rpc
from qlora_serve.v1 import common_pb2, training_pb2, training_pb2_grpc

log = logging.getLogger(__name__)

_SERVER_SET = ("base", "data", "eval_data", "out", "name", "register", "resume", "progress_bar")
_MAX_QUEUED_JOBS = 16
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
            if len(self._queue) >= _MAX_QUEUED_JOBS:
                raise ResourceExhausted(f"{_MAX_QUEUED_JOBS} training jobs are already queued; retry when one finishes")
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


class TrainingService(training_pb2_grpc.TrainingServicer):
    """Implements qlora_serve.v1.Training."""

    def __init__(self, runtime, jobs_dir: Path, max_dataset_bytes: int, store_path: Path | None = None) -> None:
        self._rt = runtime
        self._jobs_dir = jobs_dir
        self._store_path = store_path
        self._max_bytes = max_dataset_bytes
        self._manager: JobManager | None = None
        self._linear_names: tuple[list[str], str | None] | None = None
        self._lock = threading.Lock()
        self._render_lock = threading.Lock()

    def _mgr(self) -> JobManager:
        with self._lock:
            if self._manager is None:  # the base has loaded, start() is about to run
                raise Unavailable("the Training service is still starting; retry in a few seconds")
            return self._manager

    def start(self, *, resume: bool = False, resources=None) -> None:
        """Once the base has loaded: open the job store, resume unfinished jobs (not when the
        registry is another server's: their adapters could not be registered here)."""
        from qlora_serve.server.job_store import JobStore

        with self._lock:
            self._manager = self._manager or JobManager(
                self._rt, JobStore(self._store_path) if self._store_path else None, base_name=self._rt.engine.base.name,
                resume=resume and not getattr(self._rt.registry, "read_only", False), resources=resources)

    def shutdown(self) -> None:
        """Called by the server's stop(): kill a running job's process, drop the queue."""
        with self._lock:
            manager = self._manager
        if manager is not None:
            manager.shutdown()

    def _visible(self, job: Job, principal: Principal) -> Job:
        if not principal.is_admin and job.owner != principal.tenant:
            raise PermissionDenied(f"training job {job.id!r} belongs to another tenant")
        return job

    def _config(self, request) -> dict:
        from qlora_serve.training.config import TrainConfig, train_table

        try:
            params = tomllib.loads(request.config_toml) if request.config_toml else {}
        except tomllib.TOMLDecodeError as exc:
            raise InvalidArgument(f"config_toml is not valid TOML: {exc}") from None
        except RecursionError:  # tomllib recurses per nesting level
            raise InvalidArgument("config_toml is nested too deeply; it holds flat `key = value` lines") from None
        params = train_table(params, "config_toml")
        fixed = sorted(set(k.replace("-", "_") for k in params) & set(_SERVER_SET))
        if fixed:
            raise InvalidArgument(f"config_toml may not set {fixed}: the server sets them for every job")
        TrainConfig.check_keys(params, source="config_toml",
                               settable=[f for f in TrainConfig.field_names() if f not in _SERVER_SET])
        return params

    @unary_rpc
    def SubmitJob(self, request, context, principal):
        return self._submit(request, request.train_jsonl, request.eval_jsonl, principal)

    @unary_rpc
    def SubmitJobStream(self, request_iterator, context, principal):
        header, data = None, {S.DatasetChunk.DATASET_TRAIN: bytearray(), S.DatasetChunk.DATASET_EVAL: bytearray()}
        total = 0
        for msg in request_iterator:
            part = msg.WhichOneof("part")
            if part == "header":
                if header is not None:
                    raise InvalidArgument("SubmitJobStream got two headers; send one header, then dataset chunks")
                if msg.header.train_jsonl or msg.header.eval_jsonl:
                    raise InvalidArgument("the SubmitJobStream header carries no data; send it in chunks")
                header = msg.header
            elif part == "chunk":
                if header is None:
                    raise InvalidArgument("SubmitJobStream must start with a header (adapter_name, config_toml)")
                if msg.chunk.dataset not in data:
                    raise InvalidArgument("dataset chunk: set dataset to DATASET_TRAIN or DATASET_EVAL")
                total += len(msg.chunk.data)
                if total > self._max_bytes:  # stop reading at the limit, not after buffering it all
                    raise ResourceExhausted(f"datasets exceed {self._max_bytes} bytes (--max-dataset-bytes)")
                data[msg.chunk.dataset].extend(msg.chunk.data)
            else:
                raise InvalidArgument("empty SubmitJobStream message: set header or chunk")
        if header is None:
            raise InvalidArgument("empty SubmitJobStream: send a header, then the dataset chunks")
        return self._submit(header, bytes(data[S.DatasetChunk.DATASET_TRAIN]),
                            bytes(data[S.DatasetChunk.DATASET_EVAL]), principal)

    def _submit(self, request, train_jsonl: bytes, eval_jsonl: bytes, principal):
        from qlora_serve.adapters.records import validate_name
        from qlora_serve.training.config import TrainConfig

        validate_name(request.adapter_name)
        if getattr(self._rt.registry, "read_only", False):  # it would train, then fail at registration
            raise FailedPrecondition("this server's adapter registry belongs to another server (--registry-address "
                                     "or a shared registry), so a trained adapter could not be registered here; "
                                     "submit the job to a server that owns its registry")
        if not train_jsonl:
            raise InvalidArgument("train_jsonl is empty: upload the training data (JSONL)")
        size = len(train_jsonl) + len(eval_jsonl)
        if size > self._max_bytes:
            raise ResourceExhausted(f"datasets total {size} bytes; the limit is {self._max_bytes} (--max-dataset-bytes)")
        existing = self._rt.registry.list(name=request.adapter_name)
        owner = principal.tenant if self._rt.auth.enabled else None
        if existing:
            check_adapter_access(principal, existing[0].owner, write=True, adapter=f"adapter {request.adapter_name!r}")
            # A new version keeps the name's owner (public stays public), or registration would refuse it.
            owner = existing[0].owner
        config = {**self._config(request), "base": self._rt.engine.base.name, "name": request.adapter_name,
                  "progress_bar": False}
        job_id = uuid.uuid4().hex[:12]
        workdir = self._jobs_dir / job_id
        config.update(data=str(workdir / "train.jsonl"), out=str(workdir / "out"))
        if eval_jsonl:
            config["eval_data"] = str(workdir / "eval.jsonl")
        cfg = TrainConfig.from_dict(config, source="config_toml")  # refuse bad keys now, not in the job
        from qlora_serve.training.trainer import check_environment

        check_environment(cfg)  # report_to's package, a GPU for float16: refused now, not in the job
        max_rank = self._rt.engine.config.max_lora_rank
        if cfg.lora_r > max_rank:  # it would train, then fail at registration
            raise InvalidArgument(f"config_toml: lora_r = {cfg.lora_r} is above this server's --max-lora-rank "
                                  f"{max_rank}, so the adapter could not be served; use lora_r <= {max_rank}")
        if cfg.modules_to_save:
            raise InvalidArgument(f"config_toml sets modules_to_save={cfg.modules_to_save}: the server cannot serve "
                                  "such an adapter per request; train it locally (qlora-serve train) and merge it")
        self._check_targets(cfg.target_modules)
        if cfg.chat_template:  # refused now, not when the job runs
            from qlora_serve.training.chat_template import check_job_chat_template

            check_job_chat_template(cfg.chat_template, self._rt.tokenizer)
        workdir.mkdir(parents=True)
        try:
            self._write_checked(workdir / "train.jsonl", train_jsonl, "train_jsonl", cfg.format)
            if eval_jsonl:
                self._write_checked(workdir / "eval.jsonl", eval_jsonl, "eval_jsonl", cfg.format)
            job = Job(id=job_id, adapter_name=request.adapter_name, owner=owner, set_default=request.set_default,
                      config=config, workdir=workdir, max_steps=max(cfg.max_steps, 0))
            return self._mgr().submit(job).proto()
        except Exception:
            shutil.rmtree(workdir, ignore_errors=True)
            raise

    def _check_targets(self, targets: list[str]) -> None:
        """target_modules against the served base's Linear layers (a meta-device copy of
        its architecture, built once), so a typo or the output head is refused at submit."""
        from qlora_serve.training.model import check_target_modules, linear_module_names

        with self._lock:
            if self._linear_names is None:
                self._linear_names = linear_module_names(self._rt.engine.base.model.config)
        names, head = self._linear_names
        check_target_modules(targets, names, head)

    @staticmethod
    def _write_checked(path: Path, data: bytes, field_name: str, fmt: str = "auto") -> None:
        """Write an uploaded dataset and check every line's JSON and record format now,
        so a malformed line is INVALID_ARGUMENT at submit (naming the line), not a failed job."""
        from qlora_serve.training.data import read_jsonl

        path.write_bytes(data)
        try:
            read_jsonl(path, fmt)
        except InvalidArgument as exc:
            raise InvalidArgument(str(exc).replace(str(path), field_name)) from None

    @streaming_rpc
    def WatchJob(self, request, context, principal):
        job = self._visible(self._mgr().get(request.id), principal)
        yield from self._mgr().watch(job, context.is_active)

    @unary_rpc
    def ListJobs(self, request, context, principal):
        jobs = [j.proto() for j in self._mgr().all() if principal.is_admin or j.owner == principal.tenant]
        return training_pb2.ListJobsResponse(jobs=jobs)

    @unary_rpc
    def GetJob(self, request, context, principal):
        return self._visible(self._mgr().get(request.id), principal).proto()

    @unary_rpc
    def CancelJob(self, request, context, principal):
        return self._mgr().cancel(self._visible(self._mgr().get(request.id), principal)).proto()

    @unary_rpc
    def GetJobArtifact(self, request, context, principal):
        job = self._visible(self._mgr().get(request.id), principal)
        if request.kind != S.JOB_ARTIFACT_KIND_LOSS_CURVE:
            raise InvalidArgument("kind must be JOB_ARTIFACT_KIND_LOSS_CURVE (the loss-curve PNG)")
        data, step = self._loss_curve(job)
        return S.JobArtifact(id=job.id, kind=request.kind, media_type="image/png", data=data, step=step)

    def _loss_curve(self, job: Job) -> tuple[bytes, int]:
        """(PNG, last step drawn): the file an ended run wrote, else drawn from its metrics.json so far."""
        from qlora_serve.training.reporting import LOSS_CURVE_FILE, render_loss_curve
        from qlora_serve.training.trainer import METRICS_FILE

        out = Path(job.config.get("out", job.workdir / "out"))
        if job.ended and (out / LOSS_CURVE_FILE).is_file():
            return (out / LOSS_CURVE_FILE).read_bytes(), job.step
        try:
            log = json.loads((out / METRICS_FILE).read_text()).get("log", [])
        except (OSError, ValueError, AttributeError):
            log = None
        if not log:
            state = S.JobState.Name(job.state).removeprefix("JOB_STATE_")
            raise FailedPrecondition(f"training job {job.id!r} ({state}) has logged no step yet, so it has no loss "
                                     "curve; retry after its first logging step")
        with self._render_lock:  # matplotlib is not thread-safe
            return render_loss_curve(log, f"{job.adapter_name} (job {job.id}, step {log[-1].get('step', 0)})"), \
                int(log[-1].get("step", 0))
