"""Train -> serve, end to end, through a REAL gRPC server on a loopback port (no mocks).

One server per module on a tiny byte-level base (vocab 259: every letter is one
token), float32 compute, no adapters at start. Training uses the Caesar-shift
task of caesar_task.py ("abcd=" -> "bcde"): a random base cannot do it,
300 CPU steps learn it, so "serves the learned answers" is checkable.

Covers:
- `qlora-serve train ... --register ADDRESS` (subprocess) then `qlora-serve generate
  --adapter NAME` (subprocess): the adapter serves at once with the learned answers,
  and the server's greedy tokens equal plain PEFT's for that adapter directory.
- the Training gRPC service: SubmitJob -> WatchJob to SUCCEEDED -> registered
  (ListAdapters) and served; GetJob / ListJobs; CancelJob of a running job and of a
  queued one; bad config keys, server-set keys, bad values and malformed JSONL are
  INVALID_ARGUMENT at submit; a job whose process is killed ends FAILED while the
  server stays healthy; Generate answers while a job trains.
- `qlora-serve jobs submit --watch`, `jobs list`, `jobs watch`, `jobs cancel`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch

from caesar_task import RECIPE, WORD_LEN, caesar, char_base, write_caesar_data  # noqa: F401, F811 (char_base: a fixture)
from conftest import watch_until
from qlora_serve.server.engine.loader import disable_cpu_bf16_repack  # why: see its docstring

from qlora_serve.v1 import training_pb2 as T

HELD_OUT = 30
MAX_DATASET_BYTES = 12 << 20  # above gRPC's 8 MiB message limit: such datasets go in chunks
LONG = {**RECIPE, "max_steps": 100000, "logging_steps": 2}  # a job that only ends when cancelled or killed


def toml_of(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    exe = shutil.which("qlora-serve")
    cmd = [exe] if exe else [sys.executable, "-m", "qlora_serve.server.cli"]
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=timeout, env=env)


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """2000 training words (prompt/completion JSONL) and HELD_OUT words never trained on."""
    return write_caesar_data(tmp_path_factory.mktemp("caesar"), HELD_OUT)


@pytest.fixture(scope="module")
def srv(start_server, char_base):
    server = start_server(base=str(char_base), adapters=[], max_dataset_bytes=MAX_DATASET_BYTES)
    assert disable_cpu_bf16_repack(server.runtime.engine.base.model) > 0  # before any forward pass
    return server


@pytest.fixture(scope="module")
def address(srv) -> str:
    return f"127.0.0.1:{srv.port}"


@pytest.fixture(scope="module")
def client(address):
    from qlora_serve.server.client import Client

    with Client(address, timeout=240) as c:
        yield c


@pytest.fixture(scope="module")
def peft_greedy(char_base):
    """`ref(adapter_dir, prompt, n) -> greedy token ids` with plain PEFT on the same NF4
    double-quant base (float32 compute, CPU)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(char_base)
    models = {}

    @torch.inference_mode()
    def ref(adapter_dir, prompt: str, n: int) -> list[int]:
        key = str(adapter_dir)
        if key not in models:
            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.float32)
            base = AutoModelForCausalLM.from_pretrained(char_base, quantization_config=quant, device_map="cpu",
                                                        dtype=torch.float32)
            disable_cpu_bf16_repack(base)
            models[key] = PeftModel.from_pretrained(base, key).eval()
        ids = tok(prompt, return_tensors="pt").input_ids
        out = models[key].generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=n, pad_token_id=tok.pad_token_id)
        return out[0, ids.shape[1]:].tolist()

    return ref


def exact_match(client, adapter: str, words: list[str]) -> float:
    hits = sum(client.generate(w + "=", adapter=adapter, max_new_tokens=WORD_LEN + 2).text == caesar(w) for w in words)
    return hits / len(words)


def health(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def _jobs_dir(srv) -> Path:
    return srv.config.data_dir / "jobs"


# ------------------------------------------------- (1) bad input at submit
def test_bad_submissions_are_invalid_argument_and_create_no_job(srv, client, data):
    good = data["train"].read_bytes()
    cases = [  # (kwargs, text the error must contain)
        (dict(config_toml="bogus_key = 1\n"), "bogus_key"),
        (dict(config_toml="[train]\nlora_r = 8\nnot_a_flag = true\n"), "not_a_flag"),
        (dict(config_toml='base = "/etc"\n'), "base"),
        (dict(config_toml='register = "localhost:1"\n'), "register"),
        (dict(config_toml='name = "other"\n'), "name"),  # the adapter_name field sets it, not the config
        (dict(config_toml='modules_to_save = ["lm_head"]\n'), "modules_to_save"),  # not servable
        (dict(config_toml='learning_rate = "1e-4"\n'), "learning_rate must be a number"),
        (dict(config_toml="lora_r = 0\n"), "lora_r"),
        (dict(config_toml='compute_dtype = "float8"\n'), "compute_dtype must be one of"),  # float16: CUDA only
        (dict(config_toml="lora_r = \n"), "TOML"),
        (dict(train_jsonl=b'{"text": "ok"}\n{oops\n'), "train_jsonl:2"),
        (dict(train_jsonl=b'{"prompt": "a=", "completion": "b"}\n{"text": "x"}\n'), "train_jsonl:2"),
        (dict(train_jsonl=b"\n\n"), "empty"),
        (dict(train_jsonl=b""), "train_jsonl"),
        (dict(eval_jsonl=b'[1, 2]\n'), "eval_jsonl:1"),
        (dict(name="../escape"), "is invalid"),
        (dict(config_toml='target_modules = ["q_projj"]\n'), "did you mean 'q_proj'"),  # the base's names, at submit
        (dict(config_toml='target_modules = ["q_proj", "lm_head"]\n'), "is the output head"),  # not servable
        (dict(config_toml="lora_rank = 8\n"), "did you mean 'lora_r'?"),
        (dict(train_jsonl=b'{"text": "ok"}\n{"text": "caf\xe9"}\n'), "train_jsonl:2: not UTF-8"),
        (dict(config_toml='format = "alpaca"\n'), "train_jsonl:1: alpaca format needs"),
        (dict(config_toml='chat_template = "/etc/passwd"\n'), "not a path: a path would name a file on the server"),
        (dict(config_toml='chat_template = "{% for m in messages %}{{ m.content }"\n'), "does not render a sample"),
        (dict(config_toml="data_weights = [0.5, 0.5]\n"), "data_weights has 2 value(s) but data names 1 file(s)"),
    ]
    before = len(client.list_jobs())
    for kw, needle in cases:
        args = {"name": "bad", "train_jsonl": good, **kw}
        with pytest.raises(grpc.RpcError) as err:
            client.submit_job(args.pop("name"), args.pop("train_jsonl"), **args)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (kw, err.value.details())
        assert needle in err.value.details(), (kw, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("bad", good, config_toml="bogus_key = 1\n")
    valid = err.value.details().split("valid keys are: ")[1].split(", ")
    assert "lora_r" in valid and not {"base", "data", "eval_data", "out", "name", "register", "resume"} & set(valid)
    assert len(client.list_jobs()) == before
    assert not _jobs_dir(srv).exists() or not any(_jobs_dir(srv).iterdir())  # no leftovers from refused jobs
    for call in (client.get_job, client.cancel_job, lambda i: list(client.watch_job(i))):
        with pytest.raises(grpc.RpcError) as err:
            call("no-such-job")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_dataset_over_the_grpc_message_limit_is_uploaded_in_chunks(srv, client, data):
    # Few long lines: quick to tokenize (and truncate), so the job reaches its first step soon.
    line = (json.dumps({"text": "abcd efgh " * 100_000}) + "\n").encode()
    big = line * (9 * 2**20 // len(line) + 1)  # > 8 MiB, the server's gRPC message limit
    assert 8 << 20 < len(big) < MAX_DATASET_BYTES
    job = client.submit_job("bigdata", big, config_toml=toml_of({**LONG, "max_seq_len": 64}))
    assert job.state in (T.JOB_STATE_QUEUED, T.JOB_STATE_RUNNING)
    assert client.cancel_job(job.id).id == job.id
    watch_until(client, job.id)
    assert (_jobs_dir(srv) / job.id / "train.jsonl").stat().st_size == len(big)
    too_big = line * (MAX_DATASET_BYTES // len(line) + 1)
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("bigdata", too_big)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-dataset-bytes" in err.value.details()


# -------------------------------- (2) Done when: train --register, generate
def test_train_cli_register_then_generate_serves_learned_answers(srv, address, client, char_base, data, tmp_path,
                                                                  peft_greedy):
    held_out = data["held_out"]
    assert exact_match(client, "", held_out) <= 0.05  # the base cannot do it

    out_dir = tmp_path / "learned"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in RECIPE.items()]
    run = _cli("train", "--base", str(char_base), "--data", str(data["train"]), "--out", str(out_dir),
               "--name", "learned", "--register", f"localhost:{srv.port}", "--no-progress-bar", *flags)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "registered as learned" in run.stderr and run.stdout.strip() == str(out_dir)

    # Listed at once, no restart: version 1, the default alias, the trained rank.
    (info,) = client.list_adapters("learned")
    assert (info.version, info.rank, list(info.aliases)) == (1, 16, ["default"])

    # `qlora-serve generate --adapter learned` gives the learned answers (held-out words).
    for w in held_out[:2]:
        gen = _cli("generate", "--address", address, "--adapter", "learned", "--max-new-tokens", "6", w + "=")
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout == caesar(w) + "\n"
    assert exact_match(client, "learned", held_out) >= 0.9

    # Served output == plain PEFT's greedy output for that adapter directory (and != the base's).
    for w in held_out[:4]:
        served = client.generate(w + "=", adapter="learned", max_new_tokens=6)
        assert served.adapter.name == "learned" and served.adapter.version == 1
        assert list(served.token_ids) == peft_greedy(out_dir, w + "=", 6)
        assert list(served.token_ids) != list(client.generate(w + "=", max_new_tokens=6).token_ids)


# ------------------------------------------- (3) Training service: success
def test_submit_job_watch_to_succeeded_then_registered_and_served(srv, client, data):
    job = client.submit_job("viagrpc", data["train"], eval_jsonl=data["eval"], config_toml=toml_of(RECIPE),
                            set_default=True)
    assert job.state in (T.JOB_STATE_QUEUED, T.JOB_STATE_RUNNING) and job.adapter_name == "viagrpc"
    assert job.max_steps == 300 and job.created_at > 0

    events = watch_until(client, job.id)
    kinds = [e.event for e in events]
    assert kinds[0] == "queued" and "start" in kinds and kinds[-1] == "registered", kinds
    logs = [json.loads(e.details_json) for e in events if e.event == "log"]
    assert [d["step"] for d in logs] == [50, 100, 150, 200, 250, 300]
    assert all(d["loss"] > 0 and d["tokens_per_s"] > 0 and "learning_rate" in d for d in logs)
    assert logs[-1]["loss"] < logs[0]["loss"]
    start = json.loads(next(e for e in events if e.event == "start").details_json)
    assert start["train_examples"] == 2000 and start["trainable_params"] > 0

    final = events[-1].job
    assert final.state == T.JOB_STATE_SUCCEEDED and final.step == 300 and not final.error
    assert final.adapter.name == "viagrpc" and final.adapter.version == 1 and len(final.adapter.digest) == 64
    assert 0 < final.eval_loss < 0.5 and 0 < final.loss < 0.5
    assert final.created_at <= final.started_at <= final.finished_at
    assert client.get_job(job.id) == final
    assert job.id in [j.id for j in client.list_jobs()]
    # Re-watching an ended job replays the whole history and ends.
    assert [e.event for e in watch_until(client, job.id)] == kinds

    (info,) = client.list_adapters("viagrpc")
    assert info.digest == final.adapter.digest and list(info.aliases) == ["default"]
    assert exact_match(client, "viagrpc", data["held_out"][:10]) >= 0.9


# -------------------------- (4) cancel a running job; server responsive
def test_cancel_running_job_while_server_answers_generate(srv, address, client, data):
    job = client.submit_job("tocancel", data["train"], config_toml=toml_of(LONG))
    first_log = watch_until(client, job.id, lambda ev: ev.event == "log")
    assert first_log[-1].event == "log"
    assert client.get_job(job.id).state == T.JOB_STATE_RUNNING

    # Responsiveness: the server answers while the job's process trains.
    latencies = []
    for w in data["held_out"][:5]:
        t0 = time.perf_counter()
        resp = client.generate(w + "=", adapter="learned", max_new_tokens=6)
        latencies.append(time.perf_counter() - t0)
        assert resp.text == caesar(w)
    assert health(address) == "SERVING"
    running = client.get_job(job.id)
    assert running.state == T.JOB_STATE_RUNNING and running.step >= 2, running
    assert max(latencies) < 20, latencies

    cancelled = client.cancel_job(job.id)
    assert cancelled.state in (T.JOB_STATE_RUNNING, T.JOB_STATE_CANCELLED)
    events = watch_until(client, job.id)
    final = events[-1]
    assert final.event == "cancelled" and final.job.state == T.JOB_STATE_CANCELLED, [e.event for e in events]
    assert 2 <= final.job.step < 100000 and final.job.finished_at > 0 and not final.job.adapter.name
    assert client.cancel_job(job.id).state == T.JOB_STATE_CANCELLED  # idempotent
    assert client.list_adapters("tocancel") == []  # a cancelled job registers nothing
    assert health(address) == "SERVING"
    assert client.generate("abcd=", adapter="learned", max_new_tokens=6).text == "bcde"


# ------------------ (5) a crashing job fails alone; a queued job cancels
def test_killed_job_fails_server_stays_healthy_and_queued_job_cancels(srv, address, client, data):
    crash = client.submit_job("crashes", data["train"], config_toml=toml_of(LONG))
    queued = client.submit_job("never-runs", data["train"], config_toml=toml_of(RECIPE))
    assert client.get_job(queued.id).state == T.JOB_STATE_QUEUED  # one job at a time

    # Cancelling a queued job: CANCELLED at once, it never starts.
    gone = client.cancel_job(queued.id)
    assert gone.state == T.JOB_STATE_CANCELLED and gone.started_at == 0
    assert [e.event for e in watch_until(client, queued.id)] == ["queued", "cancelled"]

    watch_until(client, crash.id, lambda ev: ev.event == "start")
    pid = srv.training._mgr().get(crash.id).process.pid  # the job's own process
    assert pid and pid != os.getpid()
    os.kill(pid, signal.SIGKILL)  # as an OOM kill or a segfaulting kernel would

    final = watch_until(client, crash.id)[-1]
    assert final.event == "error" and final.job.state == T.JOB_STATE_FAILED
    assert "exited with code -9" in final.job.error, final.job.error
    assert client.get_job(crash.id).state == T.JOB_STATE_FAILED
    assert client.list_adapters("crashes") == [] and client.list_adapters("never-runs") == []
    assert health(address) == "SERVING"
    assert client.generate("wxyz=", adapter="learned", max_new_tokens=6).text == "xyza"
    states = {j.id: j.state for j in client.list_jobs()}
    assert states[crash.id] == T.JOB_STATE_FAILED and states[queued.id] == T.JOB_STATE_CANCELLED


# ------------------------------------------------------ (6) jobs CLI verbs
def test_jobs_cli_submit_watch_list_and_cancel(srv, address, client, data, tmp_path):
    cfg = tmp_path / "job.toml"
    cfg.write_text("[train]\n" + toml_of({**RECIPE, "max_steps": 40, "logging_steps": 20}))
    run = _cli("jobs", "submit", "--address", address, "--name", "cli-job", "--data", str(data["train"]),
               "--eval-data", str(data["eval"]), "--config", str(cfg), "--set-default", "--watch")
    assert run.returncode == 0, (run.stdout, run.stderr)
    lines = run.stdout.splitlines()
    assert lines[0].startswith("submitted job ")
    job_id = lines[0].split()[2]
    assert any("started: 2000 examples" in l for l in lines), lines
    assert any(f"[{job_id}] step 20/40  loss" in l for l in lines), lines
    assert "SUCCEEDED at step 40: adapter cli-job@1 registered" in lines[-1], lines

    listed = _cli("jobs", "list", "--address", address)
    assert listed.returncode == 0, listed.stderr
    row = next(l for l in listed.stdout.splitlines() if l.startswith(job_id))
    assert row.split()[1:4] == ["cli-job", "SUCCEEDED", "40/40"] and row.endswith("cli-job@1")

    replay = _cli("jobs", "watch", job_id, "--address", address, "--json")
    assert replay.returncode == 0, replay.stderr
    events = [json.loads(l) for l in replay.stdout.splitlines()]
    assert events[0]["event"] == "queued" and events[-1]["event"] == "registered"
    assert events[-1]["job"]["state"] == "JOB_STATE_SUCCEEDED"

    again = _cli("jobs", "cancel", job_id, "--address", address, "--json")  # an ended job stays as it was
    assert again.returncode == 0 and json.loads(again.stdout)[0]["state"] == "JOB_STATE_SUCCEEDED"

    gen = _cli("generate", "--address", address, "--adapter", "cli-job", "--max-new-tokens", "6", "abcd=")
    assert gen.returncode == 0, gen.stderr
    assert client.generate("abcd=", adapter="cli-job", max_new_tokens=6).text + "\n" == gen.stdout
    assert client.list_adapters("cli-job")[0].aliases == ["default"]

    bad = _cli("jobs", "submit", "--address", address, "--name", "x", "--data", str(data["train"]),
               "--config", str(cfg.with_name("nope.toml")))
    assert bad.returncode == 2 and "does not exist" in bad.stderr
    cfg.write_text("lora_rank = 8\n")
    bad = _cli("jobs", "submit", "--address", address, "--name", "x", "--data", str(data["train"]), "--config", str(cfg))
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "lora_rank" in bad.stderr
    failed = _cli("jobs", "watch", "--address", address,
                  next(j.id for j in client.list_jobs() if j.state == T.JOB_STATE_FAILED))
    assert failed.returncode == 1 and "FAILED" in failed.stdout.splitlines()[-1]
