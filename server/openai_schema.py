"""OpenAI request bodies (pydantic) and response objects for the HTTP front end.

Parsing turns a body into the transport-neutral `GenerateInput` (server/requests.py);
every refusal is an `InvalidArgument` that names the field, so the HTTP layer maps
it to a 400 in OpenAI's error shape like any other domain error.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qlora_serve.errors import InvalidArgument
from qlora_serve.server.engine.request import FinalEvent, FinishReason
from qlora_serve.server.requests import GenerateInput

BASE_ALIASES = ("", "base")  # `model` values that mean "no adapter", besides the base's own name
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (gRPC's is 0 = greedy)
_MAX_SEED = 2**64  # seeds are uint64 on the gRPC side

# Sampling controls OpenAI / vLLM clients send that the engine does not implement yet,
# with the value that means "off" (accepted, so clients that send defaults still work).
# THE one place to wire them: when SamplingParams gains a control, drop it here and map it
# in `CommonRequest.to_input`.
PENDING_SAMPLING_FIELDS: dict[str, Any] = {
    "logprobs": None, "top_logprobs": None, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    "repetition_penalty": 1.0, "min_p": 0.0, "stop_token_ids": None, "ignore_eos": False, "min_tokens": 0,
}
# OpenAI features this server does not have at all: refused, never silently ignored.
_UNSUPPORTED: dict[str, Any] = {
    "suffix": None, "echo": False, "best_of": None, "logit_bias": None, "tools": None, "tool_choice": None,
    "functions": None, "function_call": None, "response_format": None, "parallel_tool_calls": None,
    "audio": None, "modalities": None, "prediction": None,
}


class StreamOptions(BaseModel):
    include_usage: bool = False


class CommonRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions. Unknown fields are
    ignored (as vLLM does); known-unsupported ones are refused (see `refuse_unsupported`)."""

    model_config = ConfigDict(extra="allow")

    model: str = ""
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # vLLM extension; 0 or -1 = off
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None  # accepted and ignored (OpenAI's abuse-tracking id)
    # PENDING_SAMPLING_FIELDS, typed so a wrong type is still a precise 400.
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    min_tokens: int | None = None

    def refuse_unsupported(self) -> None:
        """InvalidArgument for a feature this server lacks, set to something other than "off"."""
        if self.n != 1:
            raise _invalid(f"n must be 1 (one choice per request), got {self.n}", "n")
        for name, off in PENDING_SAMPLING_FIELDS.items():
            value = getattr(self, name, None)
            if value is not None and value != off and not (name == "logprobs" and value is False):
                raise _invalid(f"{name} is not supported yet; leave it unset", name)
        extra = self.model_extra or {}
        for name, off in _UNSUPPORTED.items():
            value = extra.get(name)
            if value is not None and value != off and not (name == "best_of" and value == 1):
                raise _invalid(f"{name} is not supported by this server; leave it unset", name)

    def to_input(self, adapter: str, request_id: str, *, prompt: str = "",
                 prompt_token_ids: list[int] | None = None) -> GenerateInput:
        """The transport-neutral request (ranges are checked by the core)."""
        self.refuse_unsupported()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise InvalidArgument("set max_tokens or max_completion_tokens, not both")
        max_new = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.seed is not None and not 0 <= self.seed < _MAX_SEED:
            raise _invalid(f"seed must be in [0, 2**64), got {self.seed}", "seed")
        if self.top_k is not None and self.top_k < -1:
            raise _invalid(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}", "top_k")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return GenerateInput(
            adapter=adapter, prompt=prompt, prompt_token_ids=prompt_token_ids or (),
            max_new_tokens=max_new,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=max(0, self.top_k or 0), seed=self.seed, stop=tuple(stop),
            request_id=request_id)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonRequest):
    prompt: Any  # str | list[int], or a list of one of those: checked by prompt_parts

    def prompt_parts(self) -> tuple[str, list[int] | None]:
        """(text, None) or ("", token ids): one prompt per request."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise _invalid(f"prompt holds {len(p)} prompts; send one prompt per request", "prompt")
            p = p[0]
        if isinstance(p, str):
            return p, None
        if isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            return "", list(p)
        raise _invalid("prompt must be a string or a list of token ids", "prompt")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_dict(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content or ""}


class ChatRequest(CommonRequest):
    messages: list[ChatMessage] = Field(min_length=1)


def _invalid(message: str, param: str | None) -> InvalidArgument:
    """An InvalidArgument that names the offending field (OpenAI's error `param`)."""
    exc = InvalidArgument(message)
    exc.param = param
    return exc


def parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body; InvalidArgument naming the first bad fields (bounded)."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        problems = [f"{'.'.join(str(x) for x in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:3]]
        more = f" (and {exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
        first = exc.errors()[0]["loc"]
        raise _invalid("invalid request: " + "; ".join(problems) + more,
                       str(first[0]) if first else None) from None


def render_chat(tokenizer, messages: list[ChatMessage]) -> list[int]:
    """Prompt token ids of `messages` through the tokenizer's chat template (with the
    assistant turn opened); InvalidArgument when there is no template or it refuses them."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("the base model's tokenizer has no chat template, so chat messages cannot be "
                              "rendered: use /v1/completions with a prompt instead")
    try:
        text = tokenizer.apply_chat_template([m.as_dict() for m in messages], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # jinja2 raise_exception() in a template, e.g. roles that must alternate
        raise InvalidArgument(f"the chat template refused these messages: {str(exc)[:200]}") from None
    # The template writes any special tokens (BOS) itself: do not add them twice.
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------ responses
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


def usage(final: FinalEvent) -> dict[str, int]:
    n = len(final.token_ids)
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": n, "total_tokens": final.prompt_tokens + n}


class Shaper:
    """Builds the response objects of one completion or chat completion."""

    def __init__(self, chat: bool, request_id: str, model: str) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def whole(self, final: FinalEvent) -> dict:
        reason = FINISH[final.finish_reason]
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": final.text}, "logprobs": None,
                      "finish_reason": reason}
            return self._envelope("chat.completion", [choice], usage=usage(final))
        choice = {"index": 0, "text": final.text, "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice], usage=usage(final))

    def chunk(self, text: str, finish: FinishReason | None = None, *, first: bool = False,
              with_usage: bool = False) -> dict:
        reason = FINISH[finish] if finish is not None else None
        extra = {"usage": None} if with_usage else {}
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": None,
                                                             "finish_reason": reason}], **extra)
        return self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                   "finish_reason": reason}], **extra)

    def usage_chunk(self, final: FinalEvent) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(final))
