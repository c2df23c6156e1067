"""Training jobs survive a server restart, end to end: a real `qlora-serve serve`
process (the CLI, `--no-http`) trains a job that checkpoints every few steps, is
SIGKILLed mid-job, and is started again on the same data dir. The job's own process
runs niced (--training-nice) and exits with the server (no orphan goes on writing
checkpoints); the restarted server
resumes the job under the same id from its last checkpoint (a "resumed" event naming
the step), then a SIGTERM stops the server mid-job and the next start resumes it
again; it finishes, and its adapter is registered and served. A job cancelled before
the crash stays cancelled; a job still queued at the crash runs after the restart.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from caesar_task import RECIPE, caesar, char_base, write_caesar_data  # noqa: F401, F811 (char_base: a fixture)
from conftest import wait_until, watch_until
from server_process import start_serve
from qlora_serve.server.client import Client
from qlora_serve.v1 import training_pb2 as T

SAVE = 10
JOB = {**RECIPE, "max_steps": 60, "save_steps": SAVE, "logging_steps": 5, "save_total_limit": 2}
SMALL = {**RECIPE, "max_steps": 4, "save_steps": SAVE, "logging_steps": 2}

pytestmark = pytest.mark.slow


def toml_of(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


class Server:
    """`python -m qlora_serve.server.cli serve --no-http ...` on a free port, read back
    from its "ready on" line (printed once the base has loaded)."""

    def __init__(self, base: Path, data_dir: Path, log: Path) -> None:
        self.proc, self.address = start_serve(
            ["--base", str(base), "--port", "0", "--no-metrics", "--no-http", "--data-dir", str(data_dir),
             "--compute-dtype", "float32", "--grace", "5"], log, timeout_s=240, omp_threads=None)
        self.client = Client(self.address, timeout=120)

    def job_processes(self) -> list[int]:
        """Pids of this server's training job processes (multiprocessing spawn children)."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmd = (entry / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and b"spawn_main" in cmd:
                pids.append(int(entry.name))
        return pids

    def signal(self, sig: int) -> int:
        self.client.close() if hasattr(self, "client") else None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(60)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def details(ev) -> dict:
    return json.loads(ev.details_json)


def logged_step_at_least(n: int):
    return lambda ev: ev.event == "log" and details(ev)["step"] >= n


def test_job_resumes_after_sigkill_and_sigterm_then_registers_and_serves(char_base, tmp_path):
    data = write_caesar_data(tmp_path, 10)
    data_dir, log = tmp_path / "data", tmp_path / "server.log"

    # ---- run 1: the job checkpoints every SAVE steps; a second job is cancelled, a third waits.
    s1 = Server(char_base, data_dir, log)
    job = s1.client.submit_job("resumed", data["train"], config_toml=toml_of(JOB), set_default=True)
    cancelled = s1.client.submit_job("never", data["train"], config_toml=toml_of(SMALL))
    queued = s1.client.submit_job("waits", data["train"], config_toml=toml_of(SMALL))
    assert s1.client.cancel_job(cancelled.id).state == T.JOB_STATE_CANCELLED
    watch_until(s1.client, job.id, logged_step_at_least(SAVE + 5))  # checkpoint-SAVE is complete by now
    (worker,) = s1.job_processes()
    assert nice_of(worker) == min(19, nice_of(s1.proc.pid) + 10)  # --training-nice's default: inference first
    assert s1.signal(signal.SIGKILL) == -signal.SIGKILL
    wait_until(lambda: not alive(worker), timeout=30, what="the job process to exit with its server")

    # ---- run 2: same id, resumed from its last checkpoint; then SIGTERM mid-job.
    s2 = Server(char_base, data_dir, log)
    again = s2.client.get_job(job.id)
    assert again.state in (T.JOB_STATE_QUEUED, T.JOB_STATE_RUNNING) and not again.error, again
    events = watch_until(s2.client, job.id, logged_step_at_least(3 * SAVE + 5))
    resumed = events[0]
    assert resumed.event == "resumed", [e.event for e in events]
    first_resume = details(resumed)["from_step"]
    assert first_resume >= SAVE and first_resume % SAVE == 0 and details(resumed)["interrupted_at_step"] >= SAVE + 5
    start = details(next(e for e in events if e.event == "start"))
    assert start["resume_from"].endswith(f"checkpoint-{first_resume}")
    steps = [details(e)["step"] for e in events if e.event == "log"]
    assert steps and steps[0] == first_resume + 5 and steps == sorted(steps), steps
    assert s2.client.get_job(cancelled.id).state == T.JOB_STATE_CANCELLED
    assert s2.client.get_job(queued.id).state == T.JOB_STATE_QUEUED  # requeued, behind the resumed job
    (worker,) = s2.job_processes()
    assert s2.signal(signal.SIGTERM) == 0
    wait_until(lambda: not alive(worker), timeout=30, what="the job process to stop with its server")

    # ---- run 3: resumed again, then it finishes, registers and serves; the queued job runs after it.
    s3 = Server(char_base, data_dir, log)
    try:
        events = watch_until(s3.client, job.id, lambda ev: False)
        kinds = [e.event for e in events]
        assert kinds[0] == "resumed" and kinds[-1] == "registered", kinds
        second_resume = details(events[0])["from_step"]
        assert second_resume >= 3 * SAVE > first_resume, (first_resume, second_resume)
        final = events[-1].job
        assert final.id == job.id and final.state == T.JOB_STATE_SUCCEEDED and final.step == JOB["max_steps"]
        assert final.adapter.name == "resumed" and final.adapter.version == 1 and not final.error
        (info,) = s3.client.list_adapters("resumed")
        assert info.digest == final.adapter.digest and list(info.aliases) == ["default"]
        word = data["held_out"][0]
        assert s3.client.generate(word + "=", adapter="resumed", max_new_tokens=4).completion_tokens > 0
        print(f"resumed from steps {first_resume} and {second_resume}; held-out {word} -> "
              f"{s3.client.generate(word + '=', adapter='resumed', max_new_tokens=4).text!r} (want {caesar(word)!r})")

        waited = watch_until(s3.client, queued.id, lambda ev: False)
        assert [e.event for e in waited][0] == "requeued" and waited[-1].event == "registered", \
            [e.event for e in waited]
        assert s3.client.get_job(cancelled.id).state == T.JOB_STATE_CANCELLED
        assert [j.id for j in s3.client.list_jobs()] == [job.id, cancelled.id, queued.id]
    finally:
        s3.signal(signal.SIGTERM)
