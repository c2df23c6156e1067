"""Unit tests of the transport-neutral status names and the OpenAI schema (no server)."""

from __future__ import annotations

import pytest

from qlora_serve import errors
from qlora_serve.server import status
from qlora_serve.server.http_api import HTTP_STATUS, error_body
from qlora_serve.server.engine.chat import render_chat
from qlora_serve.server.engine.request import FinalEvent, FinishReason, SamplingParams, TokenLogprob
from qlora_serve.server.openai_schema import ChatRequest, CompletionRequest, Shaper, parse
from qlora_serve.server.quotas import QuotaExceeded
from qlora_serve.server.requests import CODE_NAMES, code_name


def test_status_names_agree_with_the_grpc_table():
    assert {cls: name for cls, name in CODE_NAMES.items()} == {cls: c.name for cls, c in status.CODES.items()}
    assert set(HTTP_STATUS) == set(CODE_NAMES)  # every domain error has an HTTP status
    assert code_name(errors.QueueFull("x")) == "RESOURCE_EXHAUSTED" and code_name(KeyError()) == "INTERNAL"


def test_error_body_is_openai_shaped_with_retry_after():
    exc = QuotaExceeded("over", tenant="t", limit_name="tokens_per_minute", limit=1, retry_after_s=7)
    code, body, headers = error_body(exc, "rid")
    assert code == 429 and headers["Retry-After"] == "7" and headers["X-Request-Id"] == "rid"
    assert body == {"error": {"message": "over", "type": "rate_limit_error", "param": None, "code": "quota"}}
    code, body, _ = error_body(RuntimeError("secret detail"), "rid")
    assert code == 500 and "secret detail" not in body["error"]["message"] and "rid" in body["error"]["message"]


def test_every_sampling_control_maps_onto_the_core_input():
    body = {"model": "m", "prompt": "x", "presence_penalty": 0.5, "frequency_penalty": -1.0, "repetition_penalty": 1.3,
            "min_p": 0.1, "stop_token_ids": [4, 7], "ignore_eos": True, "min_tokens": 2, "logprobs": 3}
    inp = parse(CompletionRequest, body).to_input("", "rid", prompt="x")
    assert (inp.presence_penalty, inp.frequency_penalty, inp.repetition_penalty, inp.min_p, tuple(inp.stop_token_ids),
            inp.ignore_eos, inp.min_tokens, inp.logprobs, inp.top_logprobs) == (0.5, -1.0, 1.3, 0.1, (4, 7), True, 2,
                                                                                 True, 3)
    # Completions: logprobs is the alternatives count (0 = chosen tokens only); chat: a bool + top_logprobs.
    for value, want in ((None, (False, 0)), (False, (False, 0)), (0, (True, 0)), (20, (True, 20))):
        inp = parse(CompletionRequest, {"prompt": "x", "logprobs": value}).to_input("", "r", prompt="x")
        assert (inp.logprobs, inp.top_logprobs) == want
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    for extra, want in (({}, (False, 0)), ({"logprobs": True}, (True, 0)),
                        ({"logprobs": True, "top_logprobs": 5}, (True, 5)), ({"top_logprobs": 0}, (False, 0))):
        inp = parse(ChatRequest, {**chat, **extra}).to_input("", "r", messages=(("user", "hi"),))
        assert (inp.logprobs, inp.top_logprobs) == want and inp.messages == (("user", "hi"),)
    # Unset: the core's "off" values.
    inp = parse(CompletionRequest, {"prompt": "x"}).to_input("", "r", prompt="x")
    assert (inp.presence_penalty, inp.frequency_penalty, inp.repetition_penalty, inp.min_p, tuple(inp.stop_token_ids),
            inp.ignore_eos, inp.min_tokens) == (0.0, 0.0, 1.0, 0.0, (), False, 0)


@pytest.mark.parametrize("route, extra, param", [
    (CompletionRequest, {"logprobs": 21}, "logprobs"),
    (CompletionRequest, {"logprobs": -1}, "logprobs"),
    (CompletionRequest, {"logprobs": True}, "logprobs"),
    (CompletionRequest, {"top_logprobs": 2}, "top_logprobs"),
    (ChatRequest, {"logprobs": 3}, "logprobs"),
    (ChatRequest, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (ChatRequest, {"top_logprobs": 2}, "top_logprobs"),
])
def test_logprobs_fields_are_refused_with_their_param(route, extra, param):
    body = {"prompt": "x"} if route is CompletionRequest else {"messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(errors.InvalidArgument) as e:
        parse(route, {**body, **extra}).to_input("", "r", prompt="x")
    assert e.value.param == param


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3), ("min_p", 1.5),
                                          ("repetition_penalty", 0), ("min_tokens", -1), ("stop_token_ids", [-1]),
                                          ("top_p", 0), ("temperature", -1)])
def test_core_range_errors_name_the_request_field(field, value):
    """The core (SamplingParams) checks the ranges; name_param ties its error to the field."""
    req = parse(CompletionRequest, {"prompt": "x", field: value})
    inp = req.to_input("", "r", prompt="x")
    with pytest.raises(errors.InvalidArgument) as e:
        SamplingParams(max_new_tokens=4, temperature=inp.temperature, top_p=1.0 if inp.top_p is None else inp.top_p,
                       presence_penalty=inp.presence_penalty, frequency_penalty=inp.frequency_penalty,
                       repetition_penalty=inp.repetition_penalty, min_p=inp.min_p,
                       stop_token_ids=inp.stop_token_ids, min_tokens=inp.min_tokens)
    assert req.name_param(e.value).param == field
    renamed = parse(ChatRequest, {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 9}) \
        .name_param(errors.InvalidArgument("max_new_tokens must be in [1, 8], got 9"))
    assert renamed.param == "max_completion_tokens" and str(renamed).startswith("max_completion_tokens must be")


def test_logprobs_response_shapes():
    class Tok:  # a stand-in tokenizer: token id -> its text
        def decode(self, ids, **_):
            return {1: "a", 2: "bc", 3: "\u00e9"}[ids[0]]

    entries = [TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.0))), TokenLogprob(3, float("-inf"), ((2, -0.1), (1, -2.0)))]
    final = FinalEvent(FinishReason.LENGTH, [1, 3], "a\u00e9", "", 2, entries)
    lp = Shaper(False, "r", "m", tokenizer=Tok(), top_logprobs=2).whole(final)["choices"][0]["logprobs"]
    assert lp == {"tokens": ["a", "\u00e9"], "token_logprobs": [-0.5, -9999.0], "text_offset": [0, 1],
                  "top_logprobs": [{"a": -0.5, "bc": -1.0}, {"bc": -0.1, "a": -2.0, "\u00e9": -9999.0}]}
    lp = Shaper(True, "r", "m", tokenizer=Tok(), top_logprobs=2).whole(final)["choices"][0]["logprobs"]
    assert lp["content"][1] == {"token": "\u00e9", "logprob": -9999.0, "bytes": [0xc3, 0xa9], "top_logprobs": [
        {"token": "bc", "logprob": -0.1, "bytes": [98, 99]}, {"token": "a", "logprob": -2.0, "bytes": [97]}]}
    assert Shaper(True, "r", "m").whole(final)["choices"][0]["logprobs"] is None  # not asked for


def test_request_mapping_defaults():
    inp = parse(ChatRequest, {"model": "a@2", "messages": [{"role": "user", "content": "hi"}], "stop": "END",
                              "max_completion_tokens": 5, "top_k": -1, "seed": 3}).to_input("a@2", "rid",
                                                                                             prompt_token_ids=[1])
    assert (inp.adapter, inp.max_new_tokens, inp.stop, inp.top_k, inp.seed, inp.temperature) == \
        ("a@2", 5, ("END",), 0, 3, 1.0)  # temperature defaults to OpenAI's 1.0
    with pytest.raises(errors.InvalidArgument, match="not both"):
        parse(CompletionRequest, {"prompt": "x", "max_tokens": 2, "max_completion_tokens": 3}).to_input("", "r")


def test_chat_without_a_template_is_a_clear_invalid_argument(demo):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo.base)
    body = parse(ChatRequest, {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    ids = render_chat(tok, body.message_pairs())  # the core's renderer, as /v1/chat/completions uses it
    want = tok("user: hi\nassistant: ", add_special_tokens=False)["input_ids"]  # ids: the demo decoder spaces words
    assert ids[-len(want):] == want
    tok.chat_template = None
    with pytest.raises(errors.InvalidArgument, match="no chat template") as e:
        render_chat(tok, body.message_pairs())
    http = body.name_param(e.value)  # the HTTP answer points at /v1/completions
    assert http.param == "messages" and "use /v1/completions" in str(http)
