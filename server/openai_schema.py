"""OpenAI request bodies (pydantic) and response objects for the HTTP front end.

Parsing turns a body into the transport-neutral `GenerateInput` (server/requests.py);
every refusal is an `InvalidArgument` that names the field, so the HTTP layer maps
it to a 400 in OpenAI's error shape like any other domain error.
"""

from __future__ import annotations

import re
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from qlora_serve.errors import InvalidArgument
from qlora_serve.server.engine.chat import NoChatTemplate
from qlora_serve.server.engine.request import MAX_TOP_LOGPROBS, FinalEvent, FinishReason, TokenLogprob
from qlora_serve.server.requests import GenerateInput

BASE_ALIASES = ("", "base")  # `model` values that mean "no adapter", besides the base's own name
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default (gRPC's is 0 = greedy)
_MAX_SEED = 2**64  # seeds are uint64 on the gRPC side

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
    # Sampling controls (vLLM's names and semantics); ranges are checked by the core,
    # whose errors `name_param` ties to the field. `logprobs` differs per route (see
    # CompletionRequest / ChatRequest.logprob_options).
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
        extra = self.model_extra or {}
        for name, off in _UNSUPPORTED.items():
            value = extra.get(name)
            if value is not None and value != off and not (name == "best_of" and value == 1):
                raise _invalid(f"{name} is not supported by this server; leave it unset", name)

    def logprob_options(self) -> tuple[bool, int]:
        """(logprobs, top_logprobs) for the core; each route reads the fields its own way."""
        raise NotImplementedError

    def to_input(self, adapter: str, request_id: str, *, prompt: str = "",
                 prompt_token_ids: list[int] | None = None,
                 messages: tuple[tuple[str, str], ...] = ()) -> GenerateInput:
        """The transport-neutral request (ranges are checked by the core)."""
        self.refuse_unsupported()
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise _invalid("set max_tokens or max_completion_tokens, not both", "max_tokens")
        max_new = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if self.seed is not None and not 0 <= self.seed < _MAX_SEED:
            raise _invalid(f"seed must be in [0, 2**64), got {self.seed}", "seed")
        if self.top_k is not None and self.top_k < -1:
            raise _invalid(f"top_k must be >= 0 (0 or -1 = off), got {self.top_k}", "top_k")
        logprobs, top_logprobs = self.logprob_options()
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return GenerateInput(
            adapter=adapter, prompt=prompt, prompt_token_ids=prompt_token_ids or (), messages=messages,
            max_new_tokens=max_new,
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=self.top_p, top_k=max(0, self.top_k or 0), seed=self.seed, stop=tuple(stop),
            request_id=request_id,
            presence_penalty=_or(self.presence_penalty, 0.0), frequency_penalty=_or(self.frequency_penalty, 0.0),
            repetition_penalty=_or(self.repetition_penalty, 1.0), min_p=_or(self.min_p, 0.0),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=bool(self.ignore_eos),
            min_tokens=_or(self.min_tokens, 0), logprobs=logprobs, top_logprobs=top_logprobs)

    def name_param(self, exc: InvalidArgument) -> InvalidArgument:
        """The core's InvalidArgument with `param` set to the request field it is about
        (its messages start with the GenerateInput field's name), in this API's names."""
        if getattr(exc, "param", None) is not None:
            return exc
        if isinstance(exc, NoChatTemplate):
            return _invalid("the base model's tokenizer has no chat template, so chat messages cannot be "
                            "rendered: use /v1/completions with a prompt instead", "messages")
        message = str(exc)
        field = next((p for prefix, p in _CORE_PREFIXES.items() if message.startswith(prefix)), None)
        if field is None:
            match = _LEADING_NAME.match(message)
            field = match.group(1) if match else ""
        if field == "max_new_tokens":
            sent = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
            exc = InvalidArgument(sent + message[len(field):])
            field = sent
        exc.param = field if field in type(self).model_fields else None
        if exc.param == "prompt" and isinstance(self, ChatRequest):
            exc.param = "messages"
        return exc

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(CommonRequest):
    prompt: Any  # str | list[int], or a list of one of those: checked by prompt_parts

    def logprob_options(self) -> tuple[bool, int]:
        """OpenAI's legacy / vLLM semantics: `logprobs` is the number of alternatives per
        token (0..20; 0 = the chosen tokens' logprobs only); unset or false = none."""
        lp = self.logprobs
        if self.top_logprobs:  # not a /v1/completions field: refused rather than ignored
            raise _invalid("top_logprobs is a chat completions field; on /v1/completions set logprobs to the "
                           f"number of alternatives per token (0..{MAX_TOP_LOGPROBS})", "top_logprobs")
        if lp is None or lp is False:
            return False, 0
        if lp is True or not 0 <= lp <= MAX_TOP_LOGPROBS:
            raise _invalid(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] on /v1/completions (the number "
                           f"of most likely alternatives per token; 0 = the chosen tokens only), got {lp}", "logprobs")
        return True, int(lp)

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

    def logprob_options(self) -> tuple[bool, int]:
        """OpenAI chat semantics: `logprobs` true/false, `top_logprobs` 0..20 (needs logprobs)."""
        lp, top = self.logprobs, self.top_logprobs
        if lp is not None and not isinstance(lp, bool):
            raise _invalid("logprobs must be true or false on /v1/chat/completions (top_logprobs sets the number "
                           f"of alternatives), got {lp}", "logprobs")
        if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
            raise _invalid(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", "top_logprobs")
        if top and not lp:
            raise _invalid("top_logprobs needs logprobs set to true", "top_logprobs")
        return bool(lp), top or 0

    def message_pairs(self) -> tuple[tuple[str, str], ...]:
        """(role, content) pairs for the core's chat renderer."""
        return tuple((m.role, m.as_dict()["content"]) for m in self.messages)


# Core error messages whose leading word is not this API's field name (see CommonRequest.name_param).
_CORE_PREFIXES = {"prompt_token_ids": "prompt", "a stop string": "stop", "the chat template": "messages"}
_LEADING_NAME = re.compile(r"([a-z_]+)\b")


def _or(value, off):
    return off if value is None else value


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


# ------------------------------------------------------------------ responses
FINISH = {FinishReason.LENGTH: "length", FinishReason.STOP: "stop", FinishReason.EOS: "stop"}


def usage(final: FinalEvent) -> dict[str, int]:
    n = len(final.token_ids)
    return {"prompt_tokens": final.prompt_tokens, "completion_tokens": n, "total_tokens": final.prompt_tokens + n}


_LOGPROB_FLOOR = -9999.0  # JSON has no -inf: the floor vLLM reports too


def _logprob(value: float) -> float:
    return value if value > _LOGPROB_FLOOR else _LOGPROB_FLOOR  # NaN > x is False: floored too


class Shaper:
    """Builds the response objects of one completion or chat completion.

    top_logprobs: None = the request asked for no logprobs; else the number of
    alternatives per token. tokenizer: decodes each token on its own for logprobs."""

    def __init__(self, chat: bool, request_id: str, model: str, *, tokenizer=None,
                 top_logprobs: int | None = None) -> None:
        self.chat = chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())
        self.tokenizer = tokenizer
        self.top_logprobs = top_logprobs
        self.text_offset = 0  # completions: characters of token text reported so far
        self._texts: dict[int, str] = {}

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def _token(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:  # the same decoding as gRPC's TokenLogprob.token
            text = self._texts[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return text

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        """OpenAI's `choices[i].logprobs` for these tokens (None when not asked for)."""
        if self.top_logprobs is None:
            return None
        entries = entries or []
        if self.chat:
            def alt(token_id: int, value: float) -> dict:
                token = self._token(token_id)
                return {"token": token, "logprob": _logprob(value), "bytes": list(token.encode("utf-8"))}

            return {"content": [{**alt(e.token_id, e.logprob), "top_logprobs": [alt(t, v) for t, v in e.top]}
                                for e in entries], "refusal": None}
        tokens, offsets, tops = [], [], []
        for e in entries:
            token = self._token(e.token_id)
            tokens.append(token)
            offsets.append(self.text_offset)
            self.text_offset += len(token)
            top = {self._token(t): _logprob(v) for t, v in e.top}
            top.setdefault(token, _logprob(e.logprob))  # OpenAI: the chosen token is always there (k + 1 at most)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries], "top_logprobs": tops,
                "text_offset": offsets}

    def whole(self, final: FinalEvent) -> dict:
        reason = FINISH[final.finish_reason]
        logprobs = self.logprobs(final.logprobs)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": final.text}, "logprobs": logprobs,
                      "finish_reason": reason}
            return self._envelope("chat.completion", [choice], usage=usage(final))
        choice = {"index": 0, "text": final.text, "logprobs": logprobs, "finish_reason": reason}
        return self._envelope("text_completion", [choice], usage=usage(final))

    def chunk(self, text: str, finish: FinishReason | None = None, *, first: bool = False,
              with_usage: bool = False, logprobs: list[TokenLogprob] | None = None) -> dict:
        """One streamed chunk; `logprobs`: the entries of the tokens it reports (None: not asked / none)."""
        reason = FINISH[finish] if finish is not None else None
        extra = {"usage": None} if with_usage else {}
        lp = self.logprobs(logprobs) if logprobs else None
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else ({"content": text} if text else {})
            return self._envelope("chat.completion.chunk", [{"index": 0, "delta": delta, "logprobs": lp,
                                                             "finish_reason": reason}], **extra)
        return self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": lp,
                                                   "finish_reason": reason}], **extra)

    def usage_chunk(self, final: FinalEvent) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(obj, [], usage=usage(final))
