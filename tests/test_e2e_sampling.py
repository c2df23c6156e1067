"""Sampling controls, logprobs, chat messages and GetModelInfo through a REAL gRPC
server on loopback (conftest's module-scoped `server`: the demo base in NF4, float32
compute), plus the engine-level eos behaviour (ignore_eos, min_tokens) on a base
whose eos token is chosen by the test."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys

import grpc
import pytest
import torch

from conftest import run_in_one_step
from qlora_serve.server.engine.loader import disable_cpu_bf16_repack  # why: see its docstring
from qlora_serve.v1 import common_pb2

PROMPT = "The quick brown fox"
N = 10


@pytest.fixture(scope="module")
def fp32_server(server):
    """Every 4-bit matmul in float32 before the first forward (see disable_cpu_bf16_repack),
    so that logprobs can be compared with plain PEFT in float32."""
    assert disable_cpu_bf16_repack(server.runtime.engine.base.model) > 0
    return server


def status_of(fn) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as e:
        return e.code(), e.details()
    return grpc.StatusCode.OK, ""


# ------------------------------------------------------------------ logprobs
@pytest.fixture(scope="module")
def peft_logits(demo):
    """Plain PEFT (NF4 double-quant base, float32 compute): `ref(adapter, ids) ->
    float32 log_softmax [len(ids), vocab]` of one forward over `ids`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(demo.base, quantization_config=quant, device_map="cpu",
                                                dtype=torch.float32)
    disable_cpu_bf16_repack(base)
    model = PeftModel.from_pretrained(base, str(demo.adapters["pirate"]), adapter_name="pirate").eval()

    @torch.inference_mode()
    def ref(adapter: str, ids: list[int]) -> torch.Tensor:
        x = torch.tensor([ids])
        if adapter:
            model.set_adapter(adapter)
            out = model(input_ids=x)
        else:
            with model.disable_adapter():
                out = model(input_ids=x)
        return torch.log_softmax(out.logits[0].float(), dim=-1)

    return ref


@pytest.mark.parametrize("adapter", ["", "pirate"])
def test_logprobs_equal_peft_float32_log_softmax(fp32_server, client, peft_logits, adapter):
    resp = client.generate(PROMPT, adapter=adapter, max_new_tokens=N, logprobs=True, top_logprobs=5)
    prompt_ids = list(fp32_server.runtime.tokenizer(PROMPT).input_ids)
    out = list(resp.token_ids)
    assert [lp.token_id for lp in resp.logprobs] == out
    ref = peft_logits(adapter, prompt_ids + out)[len(prompt_ids) - 1:-1]  # the distribution each token came from
    for i, lp in enumerate(resp.logprobs):
        assert lp.logprob == pytest.approx(float(ref[i, out[i]]), abs=1e-4)
        top_v, top_i = ref[i].topk(5)
        assert [t.token_id for t in lp.top_logprobs] == top_i.tolist()
        assert [t.logprob for t in lp.top_logprobs] == pytest.approx(top_v.tolist(), abs=1e-4)
        assert lp.token == fp32_server.runtime.tokenizer.decode([out[i]])
    # Streamed: the same entries, one per token id of each chunk.
    chunks = list(client.stream(PROMPT, adapter=adapter, max_new_tokens=N, logprobs=True, top_logprobs=5))
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert [lp for c in chunks for lp in c.logprobs] == list(resp.logprobs)
    # Not asked for: none sent.
    assert not client.generate(PROMPT, adapter=adapter, max_new_tokens=3).logprobs


# ---------------------------------------------------------- per-row isolation


def test_a_penalty_on_one_row_never_touches_the_others(fp32_server, client, engine_gate, peft_logits):
    client.load("pirate")
    plain = dict(adapter="pirate", max_new_tokens=16)
    penalised = dict(adapter="pirate", max_new_tokens=16, repetition_penalty=1.8, frequency_penalty=1.0,
                     presence_penalty=0.5, logprobs=True)
    sampled = dict(max_new_tokens=16, temperature=1.0, seed=5, min_p=0.05)
    base = dict(max_new_tokens=16)
    alone = {k: client.generate(PROMPT, **kw) for k, kw in
             (("plain", plain), ("penalised", penalised), ("sampled", sampled), ("base", base))}
    # The penalty really changes this row's output (else the test would prove nothing).
    assert list(alone["penalised"].token_ids) != list(alone["plain"].token_ids)
    gate = engine_gate(fp32_server)
    got = run_in_one_step(fp32_server, client, gate, [(PROMPT, kw) for kw in (plain, penalised, sampled, base)])
    for key, resp in zip(("plain", "penalised", "sampled", "base"), got):
        assert list(resp.token_ids) == list(alone[key].token_ids), key
    # Logprobs stay the model's raw distribution: a penalty changes the choice, not the report.
    prompt_ids = list(fp32_server.runtime.tokenizer(PROMPT).input_ids)
    out = list(got[1].token_ids)
    ref = peft_logits("pirate", prompt_ids + out)[len(prompt_ids) - 1:-1]
    assert [lp.token_id for lp in got[1].logprobs] == out
    assert [lp.logprob for lp in got[1].logprobs] == pytest.approx(
        [float(ref[i, t]) for i, t in enumerate(out)], abs=1e-4)


# ------------------------------------------- stop_token_ids, min_tokens (server)
def test_stop_token_ids_end_the_request_and_min_tokens_delays_them(client):
    kw = dict(max_new_tokens=N, ignore_eos=True)  # whatever the demo model does with eos, N tokens
    greedy = list(client.generate(PROMPT, **kw).token_ids)
    stop = greedy[3]
    first = greedy.index(stop)
    resp = client.generate(PROMPT, stop_token_ids=[stop], **kw)
    assert list(resp.token_ids) == greedy[:first + 1]
    assert resp.finish_reason == common_pb2.FINISH_REASON_STOP
    text_before = client.generate(PROMPT, max_new_tokens=first, ignore_eos=True).text if first else ""
    assert resp.text == text_before  # the stop token's own text is not returned
    chunks = list(client.stream(PROMPT, stop_token_ids=[stop], **kw))
    assert [t for c in chunks for t in c.token_ids] == greedy[:first + 1]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    # min_tokens: the stop id is masked for the first min_tokens tokens.
    delayed = list(client.generate(PROMPT, stop_token_ids=[stop], min_tokens=first + 2, **kw).token_ids)
    assert delayed[:first] == greedy[:first] and stop not in delayed[:first + 2]


# ------------------------------------------------ eos behaviour (engine level)
@pytest.fixture(scope="module")
def eos_engine(demo):
    """A real engine on the demo base whose eos token is greedy's 3rd token for PROMPT."""
    from qlora_serve.server.engine.config import EngineConfig
    from qlora_serve.server.engine.engine import Engine
    from qlora_serve.server.engine.loader import load_base

    base = load_base(str(demo.base), compute_dtype="float32", device="cpu")
    engine = Engine(base, EngineConfig()).start()
    ids = list(base.tokenizer(PROMPT).input_ids)
    greedy = _run(engine, ids, max_new_tokens=N, ignore_eos=True)[0]
    # The engine is idle; from its next request on, greedy's 3rd token is this base's eos.
    engine.base = dataclasses.replace(base, eos_token_ids=frozenset({greedy[2]}))
    yield engine, ids, greedy
    engine.shutdown(grace_s=5)


def _run(engine, ids, **kw):
    from qlora_serve.server.engine.request import ErrorEvent, FinalEvent, Request, SamplingParams

    req = Request(request_id="t", prompt_ids=ids, params=SamplingParams(**kw), adapter=None)
    engine.submit(req)
    while True:
        ev = req.events.get(timeout=60)
        if isinstance(ev, ErrorEvent):
            raise ev.error
        if isinstance(ev, FinalEvent):
            return ev.token_ids, ev.finish_reason


def test_eos_ends_unless_ignore_eos_and_min_tokens_masks_it(eos_engine):
    from qlora_serve.server.engine.request import FinishReason

    engine, ids, greedy = eos_engine
    eos = greedy[2]
    first = greedy.index(eos)
    assert _run(engine, ids, max_new_tokens=N) == (greedy[:first + 1], FinishReason.EOS)
    assert _run(engine, ids, max_new_tokens=N, ignore_eos=True) == (greedy, FinishReason.LENGTH)
    masked, reason = _run(engine, ids, max_new_tokens=N, min_tokens=first + 3)
    assert masked[:first] == greedy[:first] and eos not in masked[:first + 3]
    assert reason == FinishReason.LENGTH or masked[-1] == eos
    # ignore_eos with min_tokens: eos is no end token, so nothing is masked.
    assert _run(engine, ids, max_new_tokens=N, ignore_eos=True, min_tokens=N) == (greedy, FinishReason.LENGTH)


# -------------------------------------------------------------- bad ranges
@pytest.mark.parametrize("field,value,needle", [
    ("presence_penalty", 2.5, "presence_penalty must be in [-2, 2]"),
    ("presence_penalty", float("nan"), "presence_penalty must be a finite number"),
    ("frequency_penalty", -3.0, "frequency_penalty must be in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be a finite number > 0"),
    ("repetition_penalty", float("inf"), "repetition_penalty must be a finite number > 0"),
    ("min_p", 1.01, "min_p must be in [0, 1]"),
    ("min_p", -0.5, "min_p must be in [0, 1]"),
    ("min_tokens", -1, "min_tokens must be in [0, max_new_tokens (4)]"),
    ("min_tokens", 5, "min_tokens must be in [0, max_new_tokens (4)]"),
    ("top_logprobs", 21, "top_logprobs must be in [0, 20]"),
    ("top_logprobs", -2, "top_logprobs must be in [0, 20]"),
    ("stop_token_ids", [10**6], "stop_token_ids contains 1000000, outside the vocabulary (size {vocab})"),
])
def test_out_of_range_controls_are_invalid_argument(server, client, field, value, needle):
    needle = needle.format(vocab=server.runtime.vocab_size)
    kw = {"max_new_tokens": 4, field: value}
    if field == "top_logprobs":
        kw["logprobs"] = True
    for fn in (client.generate, lambda *a, **k: list(client.stream(*a, **k))):
        code, details = status_of(lambda: fn("hello", **kw))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (field, value, code, details)
        assert needle in details, details
    code, details = status_of(lambda: client.generate("hello", max_new_tokens=4, top_logprobs=3))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_logprobs needs logprobs" in details


# -------------------------------------------------------------------- chat
CHAT = [("system", "be brief"), ("user", "hello world")]


def test_chat_messages_render_with_the_tokenizers_template(fp32_server, client):
    tok = fp32_server.runtime.tokenizer
    expected = tok.apply_chat_template([{"role": r, "content": c} for r, c in CHAT], add_generation_prompt=True,
                                       tokenize=True, return_dict=False)
    chat = client.chat(CHAT, adapter="poet", max_new_tokens=6)
    same = client.generate(prompt_token_ids=expected, adapter="poet", max_new_tokens=6)
    assert chat.prompt_tokens == len(expected)
    assert list(chat.token_ids) == list(same.token_ids) and chat.text == same.text
    chunks = list(client.stream(messages=[{"role": r, "content": c} for r, c in CHAT], adapter="poet",
                                max_new_tokens=6))
    assert [t for c in chunks for t in c.token_ids] == list(same.token_ids)


def test_an_adapters_own_chat_template_renders_its_chats(fp32_server, client, demo, tmp_path):
    """Issue 13 defect 11: an adapter trained with --chat-template carries chat_template.jinja;
    chat requests to it render with that template (what training rendered), others with the base's."""
    template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    adapter = tmp_path / "templated"
    shutil.copytree(demo.adapters["poet"], adapter)
    (adapter / "chat_template.jinja").write_text(template)
    info = client.upload("poet-templated", adapter)
    tok = fp32_server.runtime.tokenizer
    msgs = [{"role": r, "content": c} for r, c in CHAT]
    own = tok.apply_chat_template(msgs, chat_template=template, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    base = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert len(own) != len(base)
    chat = client.chat(CHAT, adapter="poet-templated", max_new_tokens=4)
    same = client.generate(prompt_token_ids=own, adapter="poet-templated", max_new_tokens=4)
    assert chat.prompt_tokens == len(own) and list(chat.token_ids) == list(same.token_ids)
    assert client.chat(CHAT, adapter="poet", max_new_tokens=4).prompt_tokens == len(base)
    # The template is part of the adapter's identity: the same weights without it are another digest.
    assert info.digest != client.get_adapter("poet").digest
    # A tenant's template is bounded on every chat: one that explodes on some messages
    # (the sample chat at registration renders) is refused, without pinning the worker.
    (adapter / "chat_template.jinja").write_text("{% if messages[-1]['content'] == 'boom' %}{% for i in range(99999) %}"
                                                 "{% for j in range(99999) %}{% endfor %}{% endfor %}{% endif %}" + template)
    client.upload("poet-bomb", adapter)
    code, details = status_of(lambda: client.chat([("user", "boom")], adapter="poet-bomb", max_new_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "exceeds the server's bounds" in details, details
    assert client.chat(CHAT, adapter="poet-bomb", max_new_tokens=4).prompt_tokens == len(own)
    (adapter / "chat_template.jinja").write_bytes(b"{{ caf\xe9 }}")
    code, details = status_of(lambda: client.upload("poet-latin1", adapter))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "chat_template.jinja is not UTF-8" in details, details


def test_bad_chat_requests_are_invalid_argument(client):
    code, details = status_of(lambda: client.generate("hello", messages=CHAT, max_new_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "one of prompt, prompt_token_ids or messages" in details
    code, details = status_of(lambda: client.chat([("", "hi")], max_new_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role is empty" in details


def test_chat_on_a_base_without_template_is_invalid_argument(start_server, demo, tmp_path_factory):
    """Also: with authentication on, GetModelInfo needs a key like every other RPC."""
    from e2e_keys import write_key_file

    root = tmp_path_factory.mktemp("no-template")
    base = root / "base"
    shutil.copytree(demo.base, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    cfg_path = base / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    from qlora_serve.server.client import Client

    keys = write_key_file(root / "keys.toml", {"acme": "client"})
    server = start_server(base=str(base), adapters=[], key_file=root / "keys.toml")
    with Client(f"127.0.0.1:{server.port}", timeout=60) as anonymous:
        code, _ = status_of(anonymous.model_info)
        assert code == grpc.StatusCode.UNAUTHENTICATED
    with Client(f"127.0.0.1:{server.port}", api_key=keys["acme"], timeout=60) as c:
        assert not c.model_info().chat_template
        code, details = status_of(lambda: c.chat([("user", "hi")], max_new_tokens=2))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "has no chat template" in details, details
        assert c.generate("hi", max_new_tokens=2).completion_tokens == 2
    # The same refusal over HTTP: a 400 naming `messages` that points at /v1/completions.
    import openai

    oai = openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=keys["acme"], max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert e.value.param == "messages" and "use /v1/completions" in e.value.message


# -------------------------------------------------------------- model info
def test_get_model_info_and_the_cli(fp32_server, client):
    base = fp32_server.runtime.engine.base
    info = client.model_info()
    assert info.base_name == base.name and info.context_length == base.max_context > 0
    assert info.vocab_size == base.model.config.vocab_size == base.model.get_output_embeddings().out_features
    assert info.compute_dtype == "float32" and info.device == "cpu" and info.chat_template
    assert info.resident_bytes == base.footprint.model_bytes > info.quantized_bytes == base.footprint.quantized_bytes > 0
    assert info.max_new_tokens == fp32_server.runtime.engine.config.max_new_tokens
    address = f"127.0.0.1:{fp32_server.port}"
    out = subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", "model-info", "--json", "--address", address],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["vocab_size"] == info.vocab_size
    out = subprocess.run([sys.executable, "-m", "qlora_serve.server.cli", "generate", "--address", address, "--chat",
                          "--system", "be brief", "--max-new-tokens", "4", "--top-logprobs", "2",
                          "--repetition-penalty", "1.2", "hello world"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len([ln for ln in lines if "|" in ln]) == 4  # one logprob line per token, each with alternatives
