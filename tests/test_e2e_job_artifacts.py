"""GetJobArtifact (the loss curve of a training job) through a REAL gRPC server with
authentication on: the owner gets the PNG the run wrote (or, while it runs, one
drawn from its metrics so far), another tenant gets PERMISSION_DENIED as for
GetJob; refusals of the new options at submit. Demo base, float32, a few steps."""

from __future__ import annotations

import json

import grpc
import pytest
import torch

from e2e_keys import write_key_file
from qlora_serve.server.client import Client
from qlora_serve.v1 import training_pb2 as T

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONFIG = {"compute_dtype": "float32", "batch_size": 4, "grad_accum": 1, "logging_steps": 1, "learning_rate": 1e-3}


def _toml(values: dict) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def _rows(lo: int, hi: int) -> bytes:
    return "".join(json.dumps({"prompt": f"word {i} =", "completion": f" {i + 1}"}) + "\n" for i in range(lo, hi)).encode()


@pytest.fixture(scope="module")
def tenants(start_server, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys = write_key_file(key_file, {"alpha": "client", "bravo": "client"})
    server = start_server(key_file=key_file, adapters=[])
    address = f"127.0.0.1:{server.port}"
    clients = {t: Client(address, api_key=k, timeout=240) for t, k in keys.items()}
    yield server, clients
    for c in clients.values():
        c.close()


def _code(fn, *args) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        fn(*args)
    return err.value.code()


def test_loss_curve_of_a_job_follows_its_visibility(tenants):
    server, clients = tenants
    alpha, bravo = clients["alpha"], clients["bravo"]
    job = alpha.submit_job("curved", _rows(0, 32), eval_jsonl=_rows(40, 48),
                           config_toml=_toml({**CONFIG, "max_steps": 3, "eval_steps": 2}))
    events = list(alpha.watch_job(job.id))
    assert events[-1].job.state == T.JOB_STATE_SUCCEEDED, events[-1]
    art = alpha.loss_curve(job.id)
    written = server.config.data_dir / "jobs" / job.id / "out" / "loss_curve.png"
    assert (art.id, art.kind, art.media_type, art.step) == (job.id, T.JOB_ARTIFACT_KIND_LOSS_CURVE, "image/png", 3)
    assert art.data.startswith(PNG_MAGIC) and art.data == written.read_bytes()
    # Another tenant cannot read it, exactly as it cannot GetJob; unknown ids and kinds are named.
    assert _code(bravo.loss_curve, job.id) == _code(bravo.get_job, job.id) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(alpha.loss_curve, "no-such-job") == grpc.StatusCode.NOT_FOUND
    unspecified = T.GetJobArtifactRequest(id=job.id)
    assert _code(lambda: alpha.training.GetJobArtifact(unspecified, **alpha._kw())) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_running_jobs_curve_is_drawn_from_its_metrics_so_far(tenants):
    _, clients = tenants
    alpha = clients["alpha"]
    job = alpha.submit_job("curved", _rows(0, 32), config_toml=_toml({**CONFIG, "max_steps": 100000}))
    call = alpha.watch_job(job.id)
    for ev in call:
        if ev.event == "log":
            break
    art = alpha.loss_curve(job.id)
    assert art.data.startswith(PNG_MAGIC) and art.step >= 1
    alpha.cancel_job(job.id)
    for ev in call:
        pass
    assert ev.job.state == T.JOB_STATE_CANCELLED
    # The cancelled run wrote its curve too, and that file is what is served now.
    assert alpha.loss_curve(job.id).step == ev.job.step


def test_new_options_are_refused_at_submit_naming_the_fix(tenants):
    _, clients = tenants
    alpha = clients["alpha"]
    cases = [(dict(keep_best=True), "need validation data"),
             (dict(early_stopping_patience=2, eval_steps=0), "need validation data"),
             (dict(report_to="wandb"), "report_to must be one of")]
    if not torch.cuda.is_available():
        cases.append((dict(compute_dtype="float16"), "float16 needs a CUDA GPU"))
    before = len(alpha.list_jobs())
    for values, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            alpha.submit_job("refused", _rows(0, 8), config_toml=_toml(values))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details(), values
    assert len(alpha.list_jobs()) == before
