"""Training jobs persisted in SQLite (`DATA_DIR/jobs.sqlite3`, beside the adapter
registry), so a restarted server lists every job and its result.

A job that was QUEUED or RUNNING when the server stopped is taken up again by the
restarted server's JobManager (resumed from its last checkpoint) or marked FAILED with
the reason; `cancel_requested` is kept so a job cancelled just before the stop stays
cancelled.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path
from typing import Any

from qlora_serve.errors import InvalidArgument, clip_repr

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    adapter_name TEXT NOT NULL,
    owner TEXT,
    set_default INTEGER NOT NULL,
    config TEXT NOT NULL,
    workdir TEXT NOT NULL,
    state INTEGER NOT NULL,
    step INTEGER NOT NULL,
    max_steps INTEGER NOT NULL,
    loss REAL NOT NULL,
    eval_loss REAL NOT NULL,
    error TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    result_name TEXT NOT NULL,
    result_version INTEGER NOT NULL,
    result_digest TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0
)
"""
# Columns added after the first release: (name, definition) for ALTER TABLE on older files.
_ADDED = (("cancel_requested", "INTEGER NOT NULL DEFAULT 0"),)
_FIELDS = ("id", "adapter_name", "owner", "set_default", "config", "workdir", "state", "step", "max_steps", "loss",
           "eval_loss", "error", "created_at", "started_at", "finished_at", "result_name", "result_version",
           "result_digest", "cancel_requested")


class JobStore:
    """One row per job; `save` upserts, `load` returns every row as a dict (oldest first)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        for name, definition in _ADDED:
            if name not in have:
                self._db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    def save(self, job) -> None:
        """Upsert `job` (a job_manager.Job)."""
        row = (job.id, job.adapter_name, job.owner, int(job.set_default), json.dumps(job.config), str(job.workdir),
               int(job.state), int(job.step), int(job.max_steps), float(job.loss), float(job.eval_loss), job.error,
               job.created_at, job.started_at, job.finished_at, job.adapter.name, int(job.adapter.version),
               job.adapter.digest, int(job.cancel_requested))
        marks = ", ".join("?" * len(_FIELDS))
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO jobs ({', '.join(_FIELDS)}) VALUES ({marks})", row)

    def load(self) -> list[dict[str, Any]]:
        with self._lock:
            rows = self._db.execute(f"SELECT {', '.join(_FIELDS)} FROM jobs ORDER BY created_at").fetchall()
        out = []
        for row in rows:
            d = dict(zip(_FIELDS, row))
            d["config"] = json.loads(d["config"])
            d["set_default"], d["cancel_requested"] = bool(d["set_default"]), bool(d["cancel_requested"])
            out.append(d)
        return out

    def close(self) -> None:
        with self._lock:
            self._db.close()


def prepare_resume(job, *, resume: bool, base_name: str | None) -> tuple[str, dict]:
    """What a restarted server does with a job (job_manager.Job) the earlier one left
    QUEUED or RUNNING: ("resumed" | "requeued", event details) with the job set to run
    again (a RUNNING one from its newest complete checkpoint: `resume = true` in its
    config; an incomplete newer checkpoint, the process having died while saving, is
    deleted), or ("error", details) with job.error saying why it cannot run again."""
    from qlora_serve.training.jobs import resumable_checkpoint
    from qlora_serve.v1.training_pb2 import JOB_STATE_QUEUED, JOB_STATE_RUNNING

    running = job.state == JOB_STATE_RUNNING
    was = f"RUNNING at step {job.step}" if running else "QUEUED"
    why, found = _why_not(job.config, resume, base_name), None
    if why is None and running:
        found = resumable_checkpoint(job.config.get("out", job.workdir / "out"), discard_incomplete=True)
        if found is None:
            why = f"it had written no checkpoint yet (one every save_steps = {job.config.get('save_steps', 200)} steps)"
    if why is not None:
        job.error = f"interrupted: the server stopped while the job was {was}; it cannot resume: {why}; submit it again"
        return "error", {"message": job.error}
    details = {"reason": "the server restarted", "was": was}
    if found is not None:
        details.update(from_step=found[1], checkpoint=str(found[0]), interrupted_at_step=job.step)
        job.config, job.step = {**job.config, "resume": True}, found[1]
    job.state, job.error = JOB_STATE_QUEUED, ""
    return ("resumed" if found is not None else "requeued"), details


def _why_not(config: dict, resume: bool, base_name: str | None) -> str | None:
    """Why a job with this config cannot run again on this server (None: it can)."""
    from qlora_serve.training.config import TrainConfig

    if not resume:
        return "resuming is off on this server (--no-resume-interrupted-jobs, or its registry is another's)"
    if base_name is not None and config.get("base") != base_name:
        return f"it trains base {clip_repr(config.get('base'))} but this server serves {clip_repr(base_name)}"
    for key in ("data", "eval_data"):
        if config.get(key) and not Path(config[key]).is_file():
            return f"its uploaded dataset {config[key]} is gone"
    try:
        TrainConfig.from_dict(config, source="job config")
    except (ValueError, InvalidArgument) as exc:
        return f"its settings are refused now: {exc}"
    return None
