"""The OpenAI-compatible HTTP API through a REAL server on loopback (gRPC and HTTP
in one process, one engine), with the official `openai` package as the client and
raw HTTP (urllib) for the SSE wire format and error shapes. No mocks."""

from __future__ import annotations

import http.client as http_client
import json
import urllib.error
import urllib.request

import openai
import pytest

from conftest import wait_until
from qlora_serve.server.client import Client
from qlora_serve.v1 import common_pb2

MAX_NEW = 64


@pytest.fixture(scope="module")
def http(start_server):
    server = start_server(engine={"max_new_tokens": MAX_NEW, "default_max_new_tokens": 8})
    base = f"http://127.0.0.1:{server.http_port}"
    with Client(f"127.0.0.1:{server.port}", timeout=60) as grpc_client:
        yield server, base, openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0), grpc_client


def raw(base: str, path: str, body=None, *, data: bytes | None = None, headers=None):
    """(status, headers, body bytes) of one HTTP call, errors included."""
    if body is not None:
        data = json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, headers={"content-type": "application/json",
                                                                   **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def requests_total(server, method: str, code: str) -> float:
    return server.metrics.registry.get_sample_value(
        "qlora_requests_total", {"method": method, "adapter": "", "tenant": "anonymous", "code": code}) or 0.0


def test_models_lists_base_and_every_adapter_reference(http):
    server, _, oai, grpc_client = http
    grpc_client.set_alias("pirate", "stable", 1)
    models = {m.id: m for m in oai.models.list()}
    base = server.runtime.base_name
    assert base in models and models[base].owned_by == "qlora-serve"
    for ref in ("pirate", "pirate@1", "pirate@stable", "poet", "poet@1"):
        assert ref in models, ref
        assert models[ref].owned_by == "public" and models[ref].created > 0


def test_completion_matches_grpc_for_the_same_request(http):
    _, _, oai, grpc_client = http
    for temperature, seed in ((0.0, None), (0.9, 1234)):
        kw = {"seed": seed} if seed is not None else {}
        got = oai.completions.create(model="pirate", prompt="the ship", max_tokens=12, temperature=temperature, **kw)
        want = grpc_client.generate("the ship", adapter="pirate", max_new_tokens=12, temperature=temperature, **kw)
        choice = got.choices[0]
        assert choice.text == want.text
        assert got.usage.completion_tokens == want.completion_tokens == len(want.token_ids)
        assert got.usage.prompt_tokens == want.prompt_tokens
        assert got.usage.total_tokens == want.prompt_tokens + want.completion_tokens
        assert choice.finish_reason == ("length" if want.finish_reason == common_pb2.FINISH_REASON_LENGTH else "stop")
        assert got.object == "text_completion" and got.model == "pirate"


def test_completion_with_token_ids_and_base_names(http):
    server, _, oai, grpc_client = http
    ids = list(server.runtime.tokenizer("hello there").input_ids)
    want = grpc_client.generate(prompt_token_ids=ids, max_new_tokens=6)
    for model in ("", "base", server.runtime.base_name):
        got = oai.completions.create(model=model, prompt=ids, max_tokens=6, temperature=0)
        assert got.choices[0].text == want.text and got.usage.completion_tokens == want.completion_tokens


def test_chat_renders_the_template_and_matches_grpc(http):
    server, _, oai, grpc_client = http
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    tok = server.runtime.tokenizer
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False).input_ids
    want = grpc_client.generate(prompt_token_ids=list(ids), adapter="poet", max_new_tokens=10)
    got = oai.chat.completions.create(model="poet", messages=messages, max_completion_tokens=10, temperature=0)
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == want.text
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == want.completion_tokens
    assert got.object == "chat.completion"


def test_chat_stream_with_an_adapter_and_usage(http):
    _, _, oai, _ = http
    messages = [{"role": "user", "content": "tell me of the sea"}]
    whole = oai.chat.completions.create(model="pirate@1", messages=messages, max_tokens=16, temperature=0)
    chunks = list(oai.chat.completions.create(model="pirate@1", messages=messages, max_tokens=16, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completion_stream_and_stop(http):
    _, _, oai, _ = http
    whole = oai.completions.create(model="poet", prompt="a poem", max_tokens=20, temperature=0)
    text = whole.choices[0].text
    streamed = list(oai.completions.create(model="poet", prompt="a poem", max_tokens=20, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == text
    assert all(c.usage is None for c in streamed)  # no include_usage: no usage chunk
    stop = text[len(text) // 2:][:3].strip() or None
    if stop:  # a stop string from the middle of the greedy output ends it there
        cut = oai.completions.create(model="poet", prompt="a poem", max_tokens=20, temperature=0, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
        assert text.startswith(cut.choices[0].text)


def test_sse_wire_format(http):
    _, base, _, _ = http
    status, headers, body = raw(base, "/v1/completions", {"model": "pirate", "prompt": "ahoy", "max_tokens": 5,
                                                          "temperature": 0, "stream": True,
                                                          "stream_options": {"include_usage": True}})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 5
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"
    assert len({p["id"] for p in payloads}) == 1 and payloads[0]["object"] == "text_completion"
    assert headers["x-request-id"] and payloads[0]["id"] == "cmpl-" + headers["x-request-id"]
    for given, adopted in (("trace-42", True), ("has space", False)):
        _, headers, body = raw(base, "/v1/completions", {"model": "", "prompt": "x", "max_tokens": 1},
                               headers={"x-request-id": given})
        assert (json.loads(body)["id"] == "cmpl-" + given) == adopted == (headers["x-request-id"] == given)


@pytest.mark.parametrize("body, status, param, needle", [
    ({"model": "nope", "prompt": "x"}, 404, "model", "not registered"),
    ({"model": "pirate@9", "prompt": "x"}, 404, "model", "no version 9"),
    ({"model": "base", "prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ({"model": "base", "prompt": "x", "presence_penalty": 2.5}, 400, "presence_penalty", "[-2, 2]"),
    ({"model": "base", "prompt": "x", "logprobs": 21}, 400, "logprobs", "[0, 20]"),
    ({"model": "base", "prompt": "x", "min_p": 1.1}, 400, "min_p", "[0, 1]"),
    ({"model": "base", "prompt": "x", "echo": True}, 400, "echo", "not supported"),
    ({"model": "base", "prompt": "x", "max_tokens": MAX_NEW + 1}, 400, "max_tokens", f"[1, {MAX_NEW}]"),
    ({"model": "base", "prompt": "x", "top_p": 0}, 400, "top_p", "top_p"),
    ({"model": "base", "prompt": "x", "temperature": -1}, 400, "temperature", "temperature"),
    ({"model": "base", "prompt": "x", "seed": -1}, 400, "seed", "seed"),
    ({"model": "base", "prompt": ["a", "b"]}, 400, "prompt", "one prompt per request"),
    ({"model": "base", "prompt": {"x": 1}}, 400, "prompt", "list of token ids"),
    ({"model": "base", "prompt": [99999999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "base", "prompt": ""}, 400, "prompt", "prompt is empty"),
    ({"model": "base"}, 400, "prompt", "prompt"),
])
def test_completion_errors_in_openai_shape(http, body, status, param, needle):
    _, base, _, _ = http
    got, _, data = raw(base, "/v1/completions", body)
    err = json.loads(data)["error"]
    assert got == status, err
    assert set(err) == {"message", "type", "param", "code"} and needle in err["message"]
    assert err["param"] == param
    if status == 404:
        assert err["code"] == "model_not_found" and err["type"] == "not_found_error"


def test_defaults_of_the_controls_are_accepted(http):
    _, base, _, _ = http
    status, _, data = raw(base, "/v1/chat/completions", {
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "presence_penalty": 0,
        "frequency_penalty": 0, "logprobs": False, "n": 1, "user": "someone", "top_k": -1})
    assert status == 200, data


def test_bad_json_and_bad_messages(http):
    server, base, _, _ = http
    conn = http_client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.putrequest("POST", "/v1/completions")  # announces a body over the limit: refused before reading it
    conn.putheader("content-length", str(server.config.max_message_bytes + 1))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "--max-message-bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()
    status, _, data = raw(base, "/v1/chat/completions", data=b"{not json")
    assert status == 400 and "not valid JSON" in json.loads(data)["error"]["message"]
    status, _, data = raw(base, "/v1/chat/completions", {"model": "base", "messages": [{"role": "wizard",
                                                                                       "content": "x"}]})
    assert status == 400 and json.loads(data)["error"]["param"] == "messages"
    status, _, data = raw(base, "/v1/chat/completions", {"model": "base", "messages": []})
    assert status == 400


def test_openai_client_raises_typed_errors(http):
    _, _, oai, _ = http
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="base", prompt="x", n=3)


def test_metrics_and_access_log_match_grpc(http, caplog):
    server, base, oai, _ = http
    ok = requests_total(server, "Completions", "OK")
    refused = server.metrics.registry.get_sample_value(
        "qlora_rejections_total", {"reason": "not_found", "tenant": "anonymous"}) or 0.0
    with caplog.at_level("INFO", logger="qlora_serve.requests"):
        oai.completions.create(model="", prompt="count me", max_tokens=3, temperature=0)
        raw(base, "/v1/completions", {"model": "nope", "prompt": "x"})
    assert requests_total(server, "Completions", "OK") == ok + 1
    assert server.metrics.registry.get_sample_value(
        "qlora_rejections_total", {"reason": "not_found", "tenant": "anonymous"}) == refused + 1
    lines = [r.getMessage() for r in caplog.records if r.name == "qlora_serve.requests"]
    assert any("method=Completions" in m and "code=OK" in m and "completion_tokens=3" in m for m in lines)
    assert any("method=Completions" in m and "code=NOT_FOUND" in m and "reason=not_found" in m for m in lines)


def test_client_disconnect_cancels_the_stream(http, engine_gate):
    server, _, oai, _ = http
    kw = dict(model="pirate", prompt="a long tale", max_tokens=MAX_NEW, temperature=0)
    assert oai.completions.create(**kw).choices[0].finish_reason == "length"  # runs the whole budget
    cancelled = server.metrics.registry.get_sample_value(
        "qlora_requests_total", {"method": "Completions", "adapter": "pirate", "tenant": "anonymous",
                                 "code": "CANCELLED"}) or 0.0
    gate = engine_gate(server)
    stream = oai.completions.create(stream=True, **kw)
    next(iter(stream))  # the request is running
    gate.close()
    gate.wait_parked()  # mid-generation, the engine waits at the gate
    stream.close()  # the client goes away
    wait_until(lambda: (server.metrics.registry.get_sample_value(
        "qlora_requests_total", {"method": "Completions", "adapter": "pirate", "tenant": "anonymous",
                                 "code": "CANCELLED"}) or 0.0) == cancelled + 1, what="a CANCELLED record")
    gate.release()
    wait_until(lambda: server.metrics.registry.get_sample_value("qlora_running_requests") == 0,
               what="the engine row to be freed")


def test_client_disconnect_cancels_a_whole_request(http, engine_gate):
    server, _, _, _ = http
    labels = {"method": "Completions", "adapter": "", "tenant": "anonymous", "code": "CANCELLED"}
    before = server.metrics.registry.get_sample_value("qlora_requests_total", labels) or 0.0
    gate = engine_gate(server)
    gate.close()
    conn = http_client.HTTPConnection("127.0.0.1", server.http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({"model": "", "prompt": "wait", "max_tokens": 8}),
                 headers={"content-type": "application/json"})
    gate.wait_parked()  # the request is in the engine
    conn.close()  # the client goes away before the answer
    wait_until(lambda: server.metrics.registry.get_sample_value("qlora_requests_total", labels) == before + 1,
               what="a CANCELLED record")
    gate.release()
    wait_until(lambda: server.metrics.registry.get_sample_value("qlora_running_requests") == 0,
               what="the engine row to be freed")


def test_unavailable_while_loading(start_server):
    server = start_server(load=False)
    status, _, data = raw(f"http://127.0.0.1:{server.http_port}", "/v1/models")
    assert status == 503 and "loading" in json.loads(data)["error"]["message"]
