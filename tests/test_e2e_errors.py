"""Bad input through a REAL gRPC server: exact status codes and messages that name
the field, the server still serving after each; start-up errors that name the file
(from the API and from the `serve` CLI)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import grpc
import pytest
import torch

from qlora_serve.errors import QloraServeError
from qlora_serve.v1 import common_pb2

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def limits(server):
    """Facts the bad inputs are built from (context length, vocabulary size, max_new_tokens)."""
    rt = server.runtime
    return {"context": rt.max_context, "vocab": rt.vocab_size, "max_new": rt.engine.config.max_new_tokens}


def _bad_requests(lim):
    """(id, request kwargs, status, words the message must contain)."""
    ctx, vocab, max_new = lim["context"], lim["vocab"], lim["max_new"]
    return [
        ("unknown-adapter", dict(prompt="hi", adapter="no-such-adapter"), grpc.StatusCode.NOT_FOUND,
         ["no-such-adapter", "adapters list"]),
        ("unknown-version", dict(prompt="hi", adapter="pirate@9"), grpc.StatusCode.NOT_FOUND,
         ["pirate", "9", "adapters list"]),
        ("empty-prompt", dict(prompt=""), INVALID, ["prompt"]),
        ("max-new-zero", dict(prompt="hi", max_new_tokens=0), INVALID, ["max_new_tokens", "0"]),
        ("max-new-negative", dict(prompt="hi", max_new_tokens=-3), INVALID, ["max_new_tokens", "-3"]),
        ("max-new-above-limit", dict(prompt="hi", max_new_tokens=max_new + 1), INVALID,
         ["max_new_tokens", str(max_new + 1), str(max_new)]),
        ("beyond-context", dict(prompt_token_ids=[5] * (ctx - 10), max_new_tokens=20), INVALID,
         ["max_new_tokens", "context", str(ctx)]),
        ("temperature-negative", dict(prompt="hi", temperature=-0.5), INVALID, ["temperature"]),
        ("top-p-zero", dict(prompt="hi", top_p=0.0), INVALID, ["top_p"]),
        ("top-p-above-one", dict(prompt="hi", top_p=1.5), INVALID, ["top_p"]),
        ("top-k-negative", dict(prompt="hi", top_k=-1), INVALID, ["top_k"]),
        ("prompt-and-ids", dict(prompt="hi", prompt_token_ids=[1, 2]), INVALID, ["prompt", "prompt_token_ids"]),
        ("token-outside-vocab", dict(prompt_token_ids=[1, vocab]), INVALID, ["prompt_token_ids", str(vocab)]),
        ("temperature-nan", dict(prompt="hi", temperature=float("nan")), INVALID, ["temperature"]),
    ]


BAD_IDS = [case[0] for case in _bad_requests({"context": 0, "vocab": 0, "max_new": 0})]  # ids only


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize("case", BAD_IDS)
def test_bad_request_gets_exact_status_naming_the_field(server, client, limits, case, stream):
    _, kwargs, code, words = next(c for c in _bad_requests(limits) if c[0] == case)
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "")
    kwargs.setdefault("max_new_tokens", 4)
    with pytest.raises(grpc.RpcError) as err:
        if stream:
            list(client.stream(prompt, **kwargs))
        else:
            client.generate(prompt, **kwargs)
    assert err.value.code() == code, err.value.details()
    details = err.value.details()
    for word in words:
        assert word in details, f"{word!r} not in {details!r}"
    assert "Traceback" not in details and "internal error" not in details
    # The server keeps serving.
    ok = client.generate("hello", adapter="pirate", max_new_tokens=4)
    assert ok.completion_tokens >= 1 and ok.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED


# --------------------------------------------------------- start-up errors
@pytest.fixture(scope="module")
def broken_adapters(demo, tmp_path_factory):
    """{kind: (adapter dir, the file the error must name)} built from the pirate adapter."""
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("broken-adapters")

    def copy(name):
        d = root / name
        shutil.copytree(demo.adapters["pirate"], d)
        return d

    out = {}
    d = copy("missing-weights")
    (d / "adapter_model.safetensors").unlink()
    out["missing-weights"] = (d, d / "adapter_model.safetensors")
    d = copy("missing-config")
    (d / "adapter_config.json").unlink()
    out["missing-config"] = (d, d / "adapter_config.json")
    d = copy("pickle-bin")
    weights = load_file(d / "adapter_model.safetensors")
    (d / "adapter_model.safetensors").unlink()
    torch.save(weights, d / "adapter_model.bin")
    out["pickle-bin"] = (d, d / "adapter_model.bin")
    d = copy("wrong-shapes")
    weights = load_file(d / "adapter_model.safetensors")
    key = next(k for k in weights if "down_proj.lora_A" in k)  # base down_proj takes 256 features
    weights[key] = torch.zeros(weights[key].shape[0], 64)
    save_file(weights, d / "adapter_model.safetensors")
    out["wrong-shapes"] = (d, d / "adapter_model.safetensors")
    out["not-a-directory"] = (root / "does-not-exist", root / "does-not-exist")
    return out


@pytest.mark.parametrize("kind", ["missing-weights", "missing-config", "pickle-bin", "wrong-shapes", "not-a-directory"])
def test_startup_with_a_broken_adapter_fails_naming_the_file(start_server, broken_adapters, kind):
    path, named = broken_adapters[kind]
    server = None
    with pytest.raises(QloraServeError) as err:
        server = start_server(adapters=[("broken", str(path))], load=False)
        server.load()
    message = str(err.value)
    assert str(named) in message, message
    assert {"pickle-bin": "pickle", "wrong-shapes": "base", "missing-weights": "missing",
            "missing-config": "missing", "not-a-directory": "not a directory"}[kind] in message


def test_cli_serve_with_a_bad_adapter_exits_with_a_one_line_error(demo, tmp_path):
    bad = tmp_path / "bad" / "path"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    proc = subprocess.run(
        [sys.executable, "-m", "qlora_serve.server.cli", "serve", "--base", str(demo.base), "--adapter", f"x={bad}",
         "--port", "0", "--no-metrics", "--no-http", "--compute-dtype", "float32", "--data-dir", str(tmp_path / "data")],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("qlora-serve: error:")]
    assert len(errors) == 1, proc.stderr
    assert str(bad) in errors[0]
    assert "ready on" not in proc.stdout
