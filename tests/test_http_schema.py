"""Unit tests of the transport-neutral status names and the OpenAI schema (no server)."""

from __future__ import annotations

import pytest

from qlora_serve import errors
from qlora_serve.server import status
from qlora_serve.server.http_api import HTTP_STATUS, error_body
from qlora_serve.server.openai_schema import PENDING_SAMPLING_FIELDS, ChatRequest, CompletionRequest, parse, render_chat
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


@pytest.mark.parametrize("field", sorted(PENDING_SAMPLING_FIELDS))
def test_each_pending_control_is_refused_in_one_place(field):
    on = {"stop_token_ids": [1], "ignore_eos": True, "logprobs": True, "top_logprobs": 2, "min_tokens": 2}
    value = on.get(field, 0.5)
    req = parse(CompletionRequest, {"model": "m", "prompt": "x", field: value})
    with pytest.raises(errors.InvalidArgument, match=f"{field} is not supported yet") as e:
        req.to_input("", "rid", prompt="x")
    assert e.value.param == field
    # The "off" value is accepted.
    off = PENDING_SAMPLING_FIELDS[field]
    if off is not None:
        parse(CompletionRequest, {"model": "m", "prompt": "x", field: off}).to_input("", "rid", prompt="x")


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
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    messages = parse(ChatRequest, body).messages
    ids = render_chat(tok, messages)
    assert tok.decode(ids).endswith("user: hi\nassistant: ")
    tok.chat_template = None
    with pytest.raises(errors.InvalidArgument, match="no chat template"):
        render_chat(tok, messages)
