"""End-to-end inference through a REAL gRPC server on a loopback port (no mocks).

One server per module (the `server` fixture in conftest.py: the tiny demo base in
NF4 + double quant, float32 compute, adapters pirate r=8, poet r=4 and
extra-r4/r8/r16). Covers: the quantized layers, mixed-adapter batches equal to
plain PEFT, unary == streaming, the metrics endpoint, and the CLI client verbs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import urllib.request

import bitsandbytes as bnb
import grpc
import pytest
import torch

from conftest import wait_until
from qlora_serve.server.engine.loader import disable_cpu_bf16_repack  # why: see its docstring
from qlora_serve.v1 import common_pb2

N_TOKENS = 12
PROMPTS = [
    "hello world",
    "The quick brown fox",
    "one two three four five",
    "Question: what is the capital",
    "def add(a, b):",
    "Adapters change what",
]


@pytest.fixture(scope="module")
def fp32_server(server):
    """The shared server with every 4-bit matmul in float32 (see disable_cpu_bf16_repack).
    Applied before any request has run a forward, so no layer is repacked yet."""
    assert server.runtime.engine.stats()["running"] == 0
    assert disable_cpu_bf16_repack(server.runtime.engine.base.model) > 0
    return server


def tokens_of(chunks) -> list[int]:
    return [t for ch in chunks for t in ch.token_ids]


# ----------------------------------------------------------------- (1) NF4
def test_loaded_layers_are_nf4_double_quant(fp32_server):
    from qlora_serve.server.engine.multi_lora import LoRALinear

    model = fp32_server.runtime.engine.base.model
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert wrapped, "MultiLoRA should wrap the base's Linear layers"
    four_bit = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    # Every adapted Linear is a Linear4bit under the wrapper: 2 layers x 7 projections.
    assert len(four_bit) == len(wrapped) == 14
    for w in wrapped:
        layer = w.base_layer
        assert isinstance(layer, bnb.nn.Linear4bit), type(layer)
        qs = layer.weight.quant_state
        assert qs.quant_type == "nf4"
        assert qs.nested, "double quantization: the absmax is itself quantized"
        assert qs.state2 is not None
        assert layer.weight.dtype == torch.uint8  # packed 4-bit codes
        assert layer.compute_dtype == torch.float32
    # The output head stays unquantized (bitsandbytes keeps lm_head in float).
    assert not isinstance(model.get_output_embeddings(), bnb.nn.Linear4bit)
    fp = fp32_server.runtime.engine.base.footprint
    assert 4.0 < fp.bits_per_param < 5.0


# ------------------------------------------------- (2) mixed batch == PEFT
@pytest.fixture(scope="module")
def peft_reference(demo, extra_adapters):
    """Plain PEFT on the same NF4 double-quant base, float32 compute, CPU:
    `ref(adapter_name_or_empty, prompt, n) -> greedy token ids`, one sequence at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(demo.base, quantization_config=quant, device_map="cpu",
                                                dtype=torch.float32)
    disable_cpu_bf16_repack(base)
    tok = AutoTokenizer.from_pretrained(demo.base)
    adapters = {**demo.adapters, **extra_adapters}
    model = None
    for name, path in sorted(adapters.items()):
        if model is None:
            model = PeftModel.from_pretrained(base, str(path), adapter_name=name)
        else:
            model.load_adapter(str(path), adapter_name=name)
    model.eval()

    @torch.inference_mode()
    def ref(adapter: str, prompt: str, n: int) -> list[int]:
        ids = tok(prompt, return_tensors="pt").input_ids
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                  pad_token_id=tok.pad_token_id)
        if adapter:
            model.set_adapter(adapter)
            out = model.generate(**kw)
        else:
            with model.disable_adapter():
                out = model.generate(**kw)
        return out[0, ids.shape[1]:].tolist()

    return ref


def test_concurrent_mixed_adapter_streams_equal_sequential_peft(fp32_server, client, peft_reference, engine_gate):
    """K streams over K different adapters (ranks 4/4/8/8/16) plus one on the base,
    all in ONE running batch, each equal to a sequential greedy PEFT run of its
    adapter alone.

    Float32 compute (and AVX512-BF16 off, see disable_cpu_bf16_repack) so that batch
    composition and left padding cannot change the arithmetic enough to flip a
    greedy token; in bf16 a token could legitimately differ.
    """
    names = ["", "extra-r16", "extra-r4", "extra-r8", "pirate", "poet"]
    jobs = list(zip(names, PROMPTS))  # different prompt lengths: rows are left-padded in the batch
    for name in names[1:]:
        client.load(name)  # resident before the batch, so no request waits on a cold load
    gate = engine_gate(fp32_server)
    engine = fp32_server.runtime.engine
    # Park the engine on a blocker's prefill, queue all K+1 streams, then release:
    # they are admitted together and decoded in the same forward passes.
    gate.close()
    blocker = client.inference.Generate.future(client.request("hello", max_new_tokens=N_TOKENS))
    gate.wait_parked()
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def run(name, prompt):
        try:
            results[name] = tokens_of(client.stream(prompt, adapter=name, max_new_tokens=N_TOKENS))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    wait_until(lambda: engine.stats()["queued"] == len(jobs), what="all streams queued")
    gate.release()
    for t in threads:
        t.join(60)
    blocker.result(60)
    assert not errors, errors
    # They really shared forward passes: all K+1 rows were prefilled and decoded together.
    assert max(gate.batch_sizes) >= len(jobs), gate.batch_sizes
    for name, prompt in jobs:
        expected = peft_reference(name, prompt, N_TOKENS)
        assert results[name] == expected, f"adapter {name or '<base>'!r} differs from PEFT"
    # The adapters really change the output (else this test would prove little).
    assert len({tuple(v) for v in results.values()}) == len(jobs)
    assert len({tuple(peft_reference(n, PROMPTS[0], N_TOKENS)) for n in names}) == len(names)


# ---------------------------------------------------- (3) unary == stream
@pytest.mark.parametrize("adapter", ["", "pirate", "extra-r16"])
def test_unary_and_stream_return_the_same(fp32_server, client, adapter):
    kw = dict(adapter=adapter, max_new_tokens=N_TOKENS, request_id=f"u-vs-s-{adapter}")
    unary = client.generate("hello world", **kw)
    chunks = list(client.stream("hello world", **kw))
    final = chunks[-1]
    assert tokens_of(chunks) == list(unary.token_ids)
    assert len(unary.token_ids) == unary.completion_tokens == final.completion_tokens
    assert "".join(ch.text for ch in chunks) == unary.text  # deltas + final message text
    assert final.finish_reason == unary.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    assert all(ch.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for ch in chunks[:-1])
    assert final.prompt_tokens == unary.prompt_tokens > 0
    assert final.adapter == unary.adapter and all(ch.adapter == unary.adapter for ch in chunks)
    assert unary.adapter.name == adapter
    if adapter:
        assert unary.adapter.version == 1 and len(unary.adapter.digest) == 64
    assert unary.request_id == final.request_id == f"u-vs-s-{adapter}"


def test_prompt_token_ids_equal_text_prompt(fp32_server, client):
    tok = fp32_server.runtime.tokenizer
    ids = tok("hello world").input_ids
    by_text = client.generate("hello world", adapter="poet", max_new_tokens=8)
    by_ids = client.generate(prompt_token_ids=ids, adapter="poet", max_new_tokens=8)
    assert list(by_ids.token_ids) == list(by_text.token_ids)
    assert by_ids.prompt_tokens == len(ids)


# ------------------------------------------------------------ (5) metrics
def _scrape(server) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def _sample(text: str, name: str, **labels) -> float:
    """Sum of the Prometheus samples of `name` whose labels include `labels` (0 when none)."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if m and labels.items() <= dict(re.findall(r'(\w+)="([^"]*)"', m.group(1) or "")).items():
            total += float(m.group(2))
    return total


def test_metrics_endpoint_counts_requests_by_adapter_and_code(fp32_server, client):
    tenant = "anonymous"  # auth is off: every caller is the anonymous tenant
    before = _scrape(fp32_server)
    for _ in range(2):
        client.generate("hello", adapter="pirate", max_new_tokens=4)
    list(client.stream("hello", adapter="poet", max_new_tokens=4))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("hello", adapter="no-such-adapter", max_new_tokens=4)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    after = _scrape(fp32_server)

    def delta(name, **labels):
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("qlora_requests_total", method="Generate", adapter="pirate", tenant=tenant, code="OK") == 2
    assert delta("qlora_requests_total", method="GenerateStream", adapter="poet", tenant=tenant, code="OK") == 1
    # Refused before it had an adapter: counted under adapter "" (whatever tenant label it got).
    assert delta("qlora_requests_total", method="Generate", adapter="", code="NOT_FOUND") == 1
    assert delta("qlora_generated_tokens_total", adapter="pirate", tenant=tenant) == 8
    assert delta("qlora_request_latency_seconds_count", adapter="pirate") == 2
    assert _sample(after, "qlora_time_to_first_token_seconds_count") > 0
    assert "qlora_queue_depth" in after and "qlora_resident_adapters" in after


# -------------------------------------------------------------- (8) CLI
def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", *args], capture_output=True, text=True,
                          encoding="utf-8", errors="replace", timeout=timeout, env=env)


def test_cli_generate_and_adapters_list(fp32_server, client):
    address = f"127.0.0.1:{fp32_server.port}"
    expected = client.generate("hello", adapter="pirate", max_new_tokens=8)
    out = _cli("generate", "--address", address, "--adapter", "pirate", "--max-new-tokens", "8", "--json", "hello")
    assert out.returncode == 0, out.stderr
    import json

    got = json.loads(out.stdout)
    assert [int(t) for t in got["tokenIds"]] == list(expected.token_ids)
    assert got["adapter"]["name"] == "pirate"

    out = _cli("generate", "--address", address, "--adapter", "pirate", "--max-new-tokens", "8", "hello")
    assert out.returncode == 0, out.stderr
    assert out.stdout == expected.text + "\n"

    out = _cli("adapters", "list", "--address", address)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:2] == ["ADAPTER", "RANK"]
    rows = {l.split()[0]: l.split()[1] for l in lines[1:]}
    assert rows == {"pirate@1": "8", "poet@1": "4", "extra-r4@1": "4", "extra-r8@1": "8", "extra-r16@1": "16"}

    out = _cli("generate", "--address", address, "--adapter", "nope", "hello")
    assert out.returncode != 0
    assert "NOT_FOUND" in out.stderr and "nope" in out.stderr
