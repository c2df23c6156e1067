"""gRPC Training service: QLoRA jobs on the server's base, one at a time, each in
its own process; a finished adapter is registered and served at once. The jobs
themselves (queue, processes, restarts) are server/job_manager.py's."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import tomllib
import uuid
from pathlib import Path

from qlora_serve.server.auth import Principal, check_adapter_access
from qlora_serve.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted, Unavailable
from qlora_serve.server.job_manager import Job, JobManager
from qlora_serve.server.runtime import streaming_rpc, unary_rpc
from qlora_serve.v1 import training_pb2, training_pb2_grpc

log = logging.getLogger(__name__)

_SERVER_SET = ("base", "data", "eval_data", "out", "name", "register", "resume", "progress_bar")
S = training_pb2  # enum values: S.JOB_STATE_*


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
