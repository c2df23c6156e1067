"""The committed stubs are exactly what `bash protos/generate.sh` produces."""

from __future__ import annotations

import filecmp
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
V1 = ROOT / "protos" / "qlora_serve" / "v1"


def test_committed_stubs_are_fresh(tmp_path):
    subprocess.run(["bash", str(ROOT / "protos" / "generate.sh"), str(tmp_path)], check=True)
    fresh = sorted(p.name for p in (tmp_path / "qlora_serve" / "v1").iterdir())
    committed = sorted(p.name for p in V1.iterdir() if p.suffix in (".py", ".pyi") and p.name != "__init__.py")
    assert fresh == committed, "stub files differ: run `bash protos/generate.sh` and commit"
    stale = [n for n in fresh if not filecmp.cmp(tmp_path / "qlora_serve" / "v1" / n, V1 / n, shallow=False)]
    assert not stale, f"stale generated stubs {stale}: run `bash protos/generate.sh` and commit the result"


def test_public_contract_names():
    """Names clients compile against: renaming any of these breaks them."""
    from qlora_serve.v1 import inference_pb2, registry_pb2, training_pb2

    assert inference_pb2.DESCRIPTOR.package == "qlora_serve.v1"
    inference = inference_pb2.DESCRIPTOR.services_by_name["Inference"]
    assert {m.name for m in inference.methods} == {"Generate", "GenerateStream", "GetModelInfo"}
    registry = registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistry"]
    assert {m.name for m in registry.methods} >= {
        "RegisterAdapter", "UploadAdapter", "ListAdapters", "GetAdapter", "SetAlias", "DeleteAdapter",
        "LoadAdapter", "UnloadAdapter"}
    training = training_pb2.DESCRIPTOR.services_by_name["Training"]
    assert {m.name for m in training.methods} == {"SubmitJob", "SubmitJobStream", "WatchJob", "ListJobs", "GetJob", "CancelJob",
                                                  "GetJobArtifact"}
    req = inference_pb2.GenerateRequest.DESCRIPTOR.fields_by_name
    assert {"adapter", "prompt", "prompt_token_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed",
            "stop", "request_id", "messages", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p",
            "stop_token_ids", "ignore_eos", "min_tokens", "logprobs", "top_logprobs"} <= set(req)
    # Numbers are the wire contract: an old client's fields must keep meaning what they meant.
    assert {f.name: f.number for f in inference_pb2.GenerateRequest.DESCRIPTOR.fields if f.number > 10} == {
        "presence_penalty": 11, "frequency_penalty": 12, "repetition_penalty": 13, "min_p": 14,
        "stop_token_ids": 15, "ignore_eos": 16, "min_tokens": 17, "logprobs": 18, "top_logprobs": 19,
        "messages": 20}
    resp = inference_pb2.GenerateResponse.DESCRIPTOR.fields_by_name
    assert {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "adapter",
            "request_id", "logprobs"} <= set(resp)
    assert "logprobs" in inference_pb2.GenerateStreamResponse.DESCRIPTOR.fields_by_name
    assert {"base_name", "context_length", "vocab_size", "compute_dtype", "resident_bytes"} <= set(
        inference_pb2.ModelInfo.DESCRIPTOR.fields_by_name)
