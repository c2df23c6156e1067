"""The sampling controls, logprobs and model-info routes of the OpenAI-compatible HTTP
API through a REAL server on loopback (conftest's module-scoped `server`: gRPC and HTTP
in one process, one engine), with the official `openai` package as the client and raw
HTTP for the shapes. The reference for each control is the gRPC answer to the same
request (tests/test_e2e_sampling.py checks gRPC against transformers / PEFT). No mocks."""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request

import openai
import pytest

PROMPT = "The quick brown fox"
N = 10
CHAT = [("system", "be brief"), ("user", "tell me of the sea")]


@pytest.fixture(scope="module")
def http(server):
    base = f"http://127.0.0.1:{server.http_port}"
    return base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def raw(base: str, path: str, body=None):
    """(status, parsed JSON body) of one HTTP call, errors included."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def messages() -> list[dict]:
    return [{"role": r, "content": c} for r, c in CHAT]


def completion_logprobs_of(grpc_logprobs, offset: int = 0) -> dict:
    """What /v1/completions must report for these gRPC TokenLogprobs (OpenAI's legacy shape:
    the chosen token is always in top_logprobs, so up to k + 1 entries)."""
    tops = []
    for lp in grpc_logprobs:
        top = {t.token: t.logprob for t in lp.top_logprobs}
        top.setdefault(lp.token, lp.logprob)
        tops.append(top)
    offsets = []
    for lp in grpc_logprobs:
        offsets.append(offset)
        offset += len(lp.token)
    return {"tokens": [lp.token for lp in grpc_logprobs], "token_logprobs": [lp.logprob for lp in grpc_logprobs],
            "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs_of(grpc_logprobs) -> list[dict]:
    def alt(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [{**alt(lp.token, lp.logprob), "top_logprobs": [alt(t.token, t.logprob) for t in lp.top_logprobs]}
            for lp in grpc_logprobs]


def approx_equal(got, want, where: str = "") -> None:
    """Equal structures; floats within 1e-5 (the same float32 values, whichever path)."""
    if isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-5), where
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for key in want:
            approx_equal(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            approx_equal(g, w, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


# ------------------------------------------------------------------ logprobs
@pytest.mark.parametrize("adapter", ["", "pirate"])
def test_completion_logprobs_equal_grpc_stream_and_whole(http, client, adapter):
    _, oai = http
    want = client.generate(PROMPT, adapter=adapter, max_new_tokens=N, logprobs=True, top_logprobs=5)
    assert len(want.logprobs) == N
    got = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=5)
    lp = got.choices[0].logprobs  # parsed by openai.types.CompletionChoice's Logprobs
    approx_equal(lp.model_dump(), completion_logprobs_of(want.logprobs))
    assert got.choices[0].text == want.text
    chunks = list(oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=5,
                                         stream=True))
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for c in chunks:
        if c.choices[0].logprobs is not None:
            for key, values in c.choices[0].logprobs.model_dump().items():
                merged[key] += values
    approx_equal(merged, completion_logprobs_of(want.logprobs))  # text_offset continues across chunks
    # logprobs=0: the chosen tokens' logprobs only (OpenAI's legacy semantics).
    zero = oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=N, temperature=0, logprobs=0)
    assert [list(top) for top in zero.choices[0].logprobs.top_logprobs] == [[lp.token] for lp in want.logprobs]
    # Not asked for: null.
    assert oai.completions.create(model=adapter, prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


@pytest.mark.parametrize("top", [0, 3])
def test_chat_logprobs_equal_grpc_stream_and_whole(http, client, top):
    _, oai = http
    want = client.chat(CHAT, adapter="poet", max_new_tokens=N, logprobs=True, top_logprobs=top)
    kw = dict(model="poet", messages=messages(), max_tokens=N, temperature=0, logprobs=True, top_logprobs=top)
    got = oai.chat.completions.create(**kw)
    content = got.choices[0].logprobs.content  # openai.types.chat.ChatCompletionTokenLogprob
    assert [len(c.top_logprobs) for c in content] == [top] * len(want.logprobs)
    approx_equal([c.model_dump() for c in content], chat_logprobs_of(want.logprobs))
    assert got.choices[0].message.content == want.text
    chunks = list(oai.chat.completions.create(stream=True, **kw))
    streamed = [c.model_dump() for ch in chunks if ch.choices and ch.choices[0].logprobs
                for c in ch.choices[0].logprobs.content]
    approx_equal(streamed, chat_logprobs_of(want.logprobs))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text


def test_logprobs_raw_shapes(http):
    base, _ = http
    status, body = raw(base, "/v1/completions", {"model": "", "prompt": PROMPT, "max_tokens": 3, "temperature": 0,
                                                 "logprobs": 2})
    lp = body["choices"][0]["logprobs"]
    assert status == 200 and set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == 3
    assert all(isinstance(v, float) and v <= 0 for v in lp["token_logprobs"])
    status, body = raw(base, "/v1/chat/completions", {"model": "", "messages": messages(), "max_tokens": 3,
                                                      "temperature": 0, "logprobs": True, "top_logprobs": 2})
    entry = body["choices"][0]["logprobs"]["content"][0]
    assert status == 200 and set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
    assert set(entry["top_logprobs"][0]) == {"token", "logprob", "bytes"} and len(entry["top_logprobs"]) == 2


# ------------------------------------------------------------- the controls
@pytest.mark.parametrize("controls", [
    {"repetition_penalty": 1.8},
    {"presence_penalty": 1.5, "frequency_penalty": 1.0},
    {"min_p": 0.05, "temperature": 1.0, "seed": 5},
    {"top_k": 3, "temperature": 1.0, "seed": 11},
])
def test_controls_reach_the_engine_and_equal_grpc(http, client, controls):
    _, oai = http
    kw = dict(controls)
    temperature = kw.pop("temperature", 0.0)
    extra = {k: kw.pop(k) for k in ("repetition_penalty", "min_p", "top_k") if k in kw}
    grpc_kw = {k: v for k, v in controls.items() if k != "temperature"}
    want = client.generate(PROMPT, adapter="pirate", max_new_tokens=N, temperature=temperature, **grpc_kw)
    got = oai.completions.create(model="pirate", prompt=PROMPT, max_tokens=N, temperature=temperature,
                                 extra_body=extra, **kw)
    assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
    chat_want = client.chat(CHAT, adapter="pirate", max_new_tokens=N, temperature=temperature, **grpc_kw)
    chat = oai.chat.completions.create(model="pirate", messages=messages(), max_tokens=N, temperature=temperature,
                                       extra_body=extra, **kw)
    assert chat.choices[0].message.content == chat_want.text


def test_repetition_penalty_changes_greedy_output(http, client):
    _, oai = http
    plain = oai.completions.create(model="pirate", prompt=PROMPT, max_tokens=16, temperature=0)
    penalised = oai.completions.create(model="pirate", prompt=PROMPT, max_tokens=16, temperature=0,
                                       extra_body={"repetition_penalty": 1.8})
    assert penalised.choices[0].text != plain.choices[0].text  # else the equality with gRPC proves nothing
    assert penalised.choices[0].text == client.generate(PROMPT, adapter="pirate", max_new_tokens=16,
                                                        repetition_penalty=1.8).text


def test_stop_token_ids_and_min_tokens(http, client):
    _, oai = http
    greedy = list(client.generate(PROMPT, max_new_tokens=N, ignore_eos=True).token_ids)
    stop = greedy[3]
    first = greedy.index(stop)
    kw = dict(model="", prompt=PROMPT, max_tokens=N, temperature=0)
    got = oai.completions.create(**kw, extra_body={"stop_token_ids": [stop], "ignore_eos": True})
    assert got.choices[0].finish_reason == "stop" and got.usage.completion_tokens == first + 1
    assert got.choices[0].text == client.generate(PROMPT, max_new_tokens=N, ignore_eos=True,
                                                  stop_token_ids=[stop]).text
    chunks = list(oai.completions.create(**kw, stream=True, extra_body={"stop_token_ids": [stop],
                                                                        "ignore_eos": True}))
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    # min_tokens masks the stop id for the first min_tokens tokens: the output runs past it.
    delayed = oai.completions.create(**kw, extra_body={"stop_token_ids": [stop], "ignore_eos": True,
                                                       "min_tokens": first + 2})
    assert delayed.usage.completion_tokens > first + 1
    assert delayed.choices[0].text == client.generate(PROMPT, max_new_tokens=N, ignore_eos=True, stop_token_ids=[stop],
                                                      min_tokens=first + 2).text


def test_ignore_eos_and_min_tokens_on_an_eos(server, http, client):
    """The base's eos is set to greedy's 3rd token (the engine is idle, as in
    test_e2e_sampling's eos_engine): eos ends the request unless ignore_eos or min_tokens."""
    _, oai = http
    engine = server.runtime.engine
    greedy = list(client.generate(PROMPT, max_new_tokens=N, ignore_eos=True).token_ids)
    first = greedy.index(greedy[2])
    original = engine.base
    engine.base = dataclasses.replace(original, eos_token_ids=frozenset({greedy[2]}))
    try:
        kw = dict(model="", prompt=PROMPT, max_tokens=N, temperature=0)
        ended = oai.completions.create(**kw)
        assert ended.choices[0].finish_reason == "stop" and ended.usage.completion_tokens == first + 1
        ignored = oai.completions.create(**kw, extra_body={"ignore_eos": True})
        assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == N
        held = oai.completions.create(**kw, extra_body={"min_tokens": N})
        assert held.usage.completion_tokens == N  # eos is masked until N tokens
    finally:
        engine.base = original


# ---------------------------------------------------------------- bad ranges
@pytest.mark.parametrize("path, extra, param, needle", [
    ("/v1/completions", {"logprobs": 21}, "logprobs", "[0, 20]"),
    ("/v1/completions", {"logprobs": True}, "logprobs", "integer"),
    ("/v1/completions", {"top_logprobs": 3}, "top_logprobs", "chat completions field"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs", "needs logprobs"),
    ("/v1/chat/completions", {"logprobs": 5}, "logprobs", "true or false"),
    ("/v1/completions", {"presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ("/v1/chat/completions", {"frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
    ("/v1/completions", {"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ("/v1/completions", {"min_p": 1.5}, "min_p", "[0, 1]"),
    ("/v1/completions", {"min_tokens": 9, "max_tokens": 4}, "min_tokens", "min_tokens must be in [0"),
    ("/v1/completions", {"stop_token_ids": [10**7]}, "stop_token_ids", "outside the vocabulary"),
    ("/v1/completions", {"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"),
    ("/v1/chat/completions", {"max_completion_tokens": 10**6}, "max_completion_tokens",
     "max_completion_tokens must be in [1,"),
    ("/v1/completions", {"top_p": 0}, "top_p", "top_p"),
    ("/v1/chat/completions", {"ignore_eos": "maybe"}, "ignore_eos", "bool"),
])
def test_bad_controls_are_400_naming_the_param(http, path, extra, param, needle):
    base, _ = http
    body = {"model": "", "prompt": PROMPT} if path == "/v1/completions" else {"model": "", "messages": messages()}
    status, data = raw(base, path, {**body, **extra})
    err = data["error"]
    assert status == 400 and err["type"] == "invalid_request_error", err
    assert err["param"] == param and needle in err["message"], err


# ---------------------------------------------------------------- model info
def test_model_info_and_retrieve_routes(server, http, client):
    base, oai = http
    status, info = raw(base, "/v1/model_info")
    want = client.model_info()
    assert status == 200 and info["object"] == "model_info"
    for key in ("base_name", "context_length", "vocab_size", "compute_dtype", "resident_bytes", "quantized_bytes",
                "max_new_tokens", "max_prompt_tokens", "chat_template", "device"):
        assert info[key] == getattr(want, key), key
    assert info["resident_bytes"] > 0 and info["compute_dtype"] == "float32"
    name = server.runtime.base_name
    model = oai.models.retrieve(name)
    assert model.id == name and model.owned_by == "qlora-serve" and model.model_extra["max_model_len"] == \
        info["context_length"]
    pirate = oai.models.retrieve("pirate@1")
    assert pirate.id == "pirate@1" and pirate.owned_by == "public" and pirate.created > 0
    assert pirate.model_extra["root"] == "pirate@1" and pirate.model_extra["parent"] == name
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("pirate@99")
    assert e.value.code == "model_not_found"
