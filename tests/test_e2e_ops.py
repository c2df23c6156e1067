"""Errors and operations through a REAL server on loopback and the real CLI
(issue 9, defects 14-21): deeply nested JSON/TOML, SubmitJob limits, Health/List,
qlora_requests_total for every RPC, CLI messages instead of tracebacks,
--server-path, TOML config errors, the README's examples and the adapter digest."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from qlora_serve.server.client import Client

INVALID = grpc.StatusCode.INVALID_ARGUMENT
README = Path(__file__).resolve().parents[1] / "README.md"
JSONL = b'{"text": "hello world"}\n'


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return tmp_path_factory.mktemp("allowed-root")


@pytest.fixture(scope="module")
def server(start_server, roots):
    return start_server(allowed_roots=[roots])


@pytest.fixture(scope="module")
def client(server):
    with Client(f"127.0.0.1:{server.port}", timeout=60) as c:
        yield c


def _copy_adapter(src: Path, dst: Path, *, config: str | None = None, readme: str | None = None) -> Path:
    dst.mkdir(parents=True)
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(src / f, dst / f)
    if config is not None:
        (dst / "adapter_config.json").write_text(config)
    if readme is not None:
        (dst / "README.md").write_text(readme)
    return dst


def _cli(*args, cwd=None, env=None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", *args], capture_output=True, timeout=180,
                          env=env, cwd=cwd, **kw)


def _text(b: bytes) -> str:
    return b.decode("utf-8", "replace")


# ------------------------------------------------------------- (14) nesting
def test_deeply_nested_adapter_config_is_invalid_argument(client, demo, tmp_path):
    nested = '{"peft_type": "LORA", "r": 8, "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    src = _copy_adapter(demo.adapters["pirate"], tmp_path / "deep", config=nested)
    with pytest.raises(grpc.RpcError) as err:
        client.upload("deep", src)
    assert err.value.code() == INVALID, err.value.details()
    assert "adapter_config.json" in err.value.details() and "nested too deeply" in err.value.details()


@pytest.mark.parametrize("where", ["train_jsonl", "config_toml"])
def test_deeply_nested_submitjob_input_is_invalid_argument(client, where):
    deep_jsonl = b'{"text": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    deep_toml = "lora_r = " + "[" * 100_000 + "]" * 100_000
    kw = {"train_jsonl": deep_jsonl} if where == "train_jsonl" else {"train_jsonl": JSONL, "config_toml": deep_toml}
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("nested", **kw)
    assert err.value.code() == INVALID, err.value.details()
    assert where in err.value.details() and "nested too deeply" in err.value.details()
    assert client.list_jobs() == []


# ---------------------------------------------------- (15) SubmitJob limits
@pytest.mark.parametrize("toml, words", [
    ("lora_r = 128", ["lora_r", "128", "--max-lora-rank", "64"]),
    ("lora_r = 1000000000", ["lora_r", "1000000000"]),
    ("batch_size = 1000000000000", ["batch_size", "1000000000000", "65536"]),
    ("grad_accum = 1000000000000", ["grad_accum", "65536"]),
    ("max_seq_len = 1000000000000", ["max_seq_len", "1048576"]),
    ("max_steps = 1000000000000", ["max_steps", "100000000"]),
], ids=["above-max-lora-rank", "lora-r-1e9", "batch-1e12", "accum-1e12", "seq-1e12", "steps-1e12"])
def test_submitjob_refuses_what_cannot_be_served_or_run(client, toml, words):
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("limits", JSONL, config_toml=toml)
    assert err.value.code() == INVALID, err.value.details()
    for w in words:
        assert w in err.value.details(), (w, err.value.details())
    assert client.list_jobs() == []


# --------------------------------------------------------- (20) TOML errors
def test_submitjob_toml_with_train_and_another_table_names_the_table(client):
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("toml", JSONL, config_toml="[train]\nlora_r = 8\n\n[model]\nname = 'x'\n")
    assert err.value.code() == INVALID
    assert "[model]" in err.value.details() and "[train]" in err.value.details(), err.value.details()
    assert "unknown key 'train'" not in err.value.details()


def test_submitjob_unknown_key_offers_the_closest_settable_key(client):
    with pytest.raises(grpc.RpcError) as err:
        client.submit_job("toml", JSONL, config_toml="lerning_rate = 1e-4\n")
    details = err.value.details()
    assert err.value.code() == INVALID
    assert "did you mean 'learning_rate'" in details, details
    valid = details.split("valid keys are:", 1)[1]
    for server_set in ("base", "data", "eval_data", "out", "register", "resume", "progress_bar"):
        assert not re.search(rf"\b{server_set}\b", valid), (server_set, details)


def test_train_cli_toml_with_train_and_another_table_names_the_table(tmp_path):
    from qlora_serve.errors import InvalidArgument
    from qlora_serve.training.config import TrainConfig

    cfg = tmp_path / "run.toml"
    cfg.write_text("[train]\nlora_r = 8\n[optimizer]\nlr = 1\n")
    with pytest.raises(InvalidArgument, match=r"\[optimizer\].*\[train\]"):
        TrainConfig.from_toml(cfg)
    cfg.write_text("lora-rr = 8\n")
    with pytest.raises(InvalidArgument, match="did you mean 'lora_r'"):
        TrainConfig.from_toml(cfg)


# ------------------------------------------------------------ (16) Health/List
def test_health_list_answers_every_service(server, client, caplog):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from qlora_serve.server.app import SERVICE_NAMES

    with caplog.at_level(logging.ERROR):
        resp = health_pb2_grpc.HealthStub(client.channel).List(health_pb2.HealthListRequest(), timeout=10)
    assert set(resp.statuses) == {"", *SERVICE_NAMES}
    assert all(s.status == health_pb2.HealthCheckResponse.SERVING for s in resp.statuses.values())
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


# ------------------------------------------------------ (17) requests_total
def _requests(server, method: str, code: str = "OK", adapter: str | None = None) -> float:
    total = 0.0
    for metric in server.metrics.registry.collect():
        for s in metric.samples:
            if (s.name == "qlora_requests_total" and s.labels["method"] == method and s.labels["code"] == code
                    and (adapter is None or s.labels["adapter"] == adapter)):
                total += s.value
    return total


def test_requests_total_counts_every_rpc_of_every_service_once(server, client):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    methods = [("Generate", "OK"), ("GenerateStream", "OK"), ("ListAdapters", "OK"), ("GetAdapter", "OK"),
               ("GetAdapter", "NOT_FOUND"), ("ListJobs", "OK"), ("Check", "OK"), ("List", "OK")]
    before = {m: _requests(server, *m) for m in methods}
    pirate_before = _requests(server, "Generate", "OK", adapter="pirate")
    client.generate("hello", adapter="pirate", max_new_tokens=2)
    list(client.stream("hello", adapter="poet", max_new_tokens=2))
    client.list_adapters()
    client.get_adapter("pirate")
    with pytest.raises(grpc.RpcError):
        client.get_adapter("no-such-adapter")
    client.list_jobs()
    health = health_pb2_grpc.HealthStub(client.channel)
    health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    health.List(health_pb2.HealthListRequest(), timeout=10)
    after = {m: _requests(server, *m) for m in methods}
    assert {m: after[m] - before[m] for m in methods} == {m: 1 for m in methods}
    # The generation keeps its adapter label, counted once (not also by the servicer).
    assert _requests(server, "Generate", "OK", adapter="pirate") - pirate_before == 1


# ------------------------------------------------------------- (18) CLI
def test_cli_register_a_missing_directory_or_a_file_is_a_message(server, tmp_path):
    afile = tmp_path / "adapter.safetensors"
    afile.write_bytes(b"x")
    for path, words in ((tmp_path / "no-such-dir", "does not exist"), (afile, "is a file")):
        proc = _cli("adapters", "register", "x", str(path), "--address", f"127.0.0.1:{server.port}")
        err = _text(proc.stderr)
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert err.startswith("qlora-serve: error:") and str(path) in err and words in err, err


def test_cli_list_into_a_closed_pipe_exits_quietly(server):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qlora_serve.server.cli", "adapters", "list", "--json",
                             "--address", f"127.0.0.1:{server.port}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # the reader is gone before the CLI writes (as `| head -1` after its line)
    err = proc.stderr.read()
    assert proc.wait(timeout=180) == 141
    assert _text(err) == "", _text(err)


def test_cli_generate_with_non_utf8_arguments_is_a_message(server):
    for args in ([b"\xff\xfehello"], ["hello", "--adapter", b"pir\xffate"]):
        proc = _cli("generate", *args, "--address", f"127.0.0.1:{server.port}", env={"PYTHONUTF8": "1"})
        err = _text(proc.stderr)
        assert proc.returncode == 2 and "Traceback" not in err, err
        assert "not valid UTF-8" in err and ("prompt" in err or "adapter" in err), err


def test_cli_serve_on_a_corrupted_registry_names_the_file(demo, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "registry.sqlite3").write_bytes(b"this is not a database\n" * 512)
    proc = _cli("serve", "--base", str(demo.base), "--port", "0", "--no-metrics", "--no-http", "--compute-dtype", "float32",
                "--data-dir", str(data))
    err = _text(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("qlora-serve: error:")]
    assert len(errors) == 1, err
    assert str(data / "registry.sqlite3") in errors[0] and "backup" in errors[0] and "--data-dir" in errors[0]


# ---------------------------------------------------------- (19) --server-path
def test_cli_server_path_makes_a_relative_path_absolute(server, client, demo, roots):
    _copy_adapter(demo.adapters["poet"], roots / "poet-copy")
    proc = _cli("adapters", "register", "relpath", "./poet-copy", "--server-path", "--json",
                "--address", f"127.0.0.1:{server.port}", cwd=roots)
    assert proc.returncode == 0, _text(proc.stderr)
    assert json.loads(proc.stdout)[0]["name"] == "relpath"
    assert client.get_adapter("relpath").version == 1


# ------------------------------------------------------------ (21) docs, digest
def test_readme_api_table_lists_every_service_and_rpc():
    from qlora_serve.server.app import SERVICE_NAMES
    from qlora_serve.v1 import inference_pb2, registry_pb2, training_pb2

    text = README.read_text()
    for module in (inference_pb2, registry_pb2, training_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            assert service.full_name in SERVICE_NAMES
            row = next((line for line in text.splitlines() if line.startswith(f"| `{service.name}` |")), None)
            assert row is not None, f"README's API table has no row for {service.name}"
            for method in service.methods:
                assert f"`{method.name}`" in row, (service.name, method.name)


def test_readme_python_example_prints_finish_reason_by_name(server):
    block = re.search(r"\*\*Python\*\*:\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    code = block.replace("localhost:50051", f"127.0.0.1:{server.port}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    first = out.getvalue().splitlines()[0]
    assert re.search(r" FINISH_REASON_(LENGTH|EOS|STOP) pirate 1$", first), first


def test_startup_hint_is_the_command_the_readme_shows():
    from qlora_serve.server.cli import try_command
    from qlora_serve.server.client import DEFAULT_ADDRESS

    hint = try_command(DEFAULT_ADDRESS, ["pirate", "poet"])
    text = README.read_text()
    shown = text.split("It prints its address and a command", 1)[1].split("```bash\n", 1)[1].split("\n", 1)[0]
    assert shown == hint
    assert try_command("localhost:50052", ["pirate"]) == 'qlora-serve generate --address localhost:50052 --adapter pirate "hello"'
    assert "--address" in text.split("It prints its address and a command", 1)[1].split("```", 1)[0]


def test_identical_served_files_with_another_readme_are_the_same_version(client, demo, tmp_path):
    src = demo.adapters["pirate"]
    a = client.upload("same-content", _copy_adapter(src, tmp_path / "a", readme="# first\n"))
    b = client.upload("same-content", _copy_adapter(src, tmp_path / "b", readme="# second, edited\n"))
    c = client.upload("same-content", _copy_adapter(src, tmp_path / "c"))  # no README at all
    assert (a.version, a.digest) == (b.version, b.digest) == (c.version, c.digest) == (1, a.digest)
    assert [i.version for i in client.list_adapters("same-content")] == [1]
    # A changed served file is new content: a new version.
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = float(cfg.get("lora_alpha", 8)) / 2
    d = client.upload("same-content", _copy_adapter(src, tmp_path / "d", config=json.dumps(cfg)))
    assert d.version == 2 and d.digest != a.digest
    # The digest is the documented one: over adapter_config.json and adapter_model.safetensors only.
    import hashlib

    from qlora_serve.adapters.store import manifest_digest

    files = {f: (len(data), hashlib.sha256(data).hexdigest()) for f in ("adapter_config.json", "adapter_model.safetensors")
             for data in [(src / f).read_bytes()]}
    assert a.digest == manifest_digest(files)
    assert client.generate("hello", adapter="same-content@1", max_new_tokens=2).completion_tokens == 2
