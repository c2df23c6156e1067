"""The transport-neutral request path: what every front end (gRPC, HTTP) does with
one generation request, between "a caller sent this" and "here are the tokens".

A front end authenticates the caller (`Runtime.authenticate_metadata`), turns its
wire message into a `GenerateInput`, then:

    core = InferenceCore(runtime)
    req = core.start(inp, principal, timeout_s=...)   # readiness, validation, adapter, quota, queue
    for ev in core.events(req, is_active):            # TokenEvent..., FinalEvent
        ...
    core.record(method, req, "OK", started, final)    # metrics + quota charge, on every exit

Everything here raises domain errors (`qlora_serve.errors`); each front end maps
them to its own statuses in one place (server/status.py for gRPC, server/http_api.py
for HTTP). `CallLog` is the one access-log line and refusal metric per call.
"""

from __future__ import annotations

import functools
import logging
import math
import queue
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from qlora_serve import errors
from qlora_serve.adapters.layout import CHAT_TEMPLATE_FILE
from qlora_serve.errors import Cancelled, DeadlineExceeded, InvalidArgument, QloraServeError
from qlora_serve.server.engine.chat import render_chat
from qlora_serve.options import option
from qlora_serve.server.engine.request import (
    AdapterHandle,
    ErrorEvent,
    FinalEvent,
    Request,
    SamplingParams,
    TokenEvent,
)

if TYPE_CHECKING:  # annotations only: the runtime imports this module's RequestLimits
    from qlora_serve.server.auth import Principal
    from qlora_serve.server.runtime import Runtime

access_log = logging.getLogger("qlora_serve.requests")
POLL_S = 0.5  # how often a waiting handler re-checks that its client is still there
# Default prompt bound in UTF-8 bytes per --max-prompt-tokens token: natural text
# averages about 4 bytes a token, so only pathological prompts reach 16.
PROMPT_BYTES_PER_TOKEN = 16

# Status names, transport-neutral: the gRPC code names (server/status.py maps the same
# classes to grpc.StatusCode; tests check the two tables agree). Most specific class first.
CODE_NAMES: dict[type[QloraServeError], str] = {
    errors.InvalidArgument: "INVALID_ARGUMENT",
    errors.NotFound: "NOT_FOUND",
    errors.AlreadyExists: "ALREADY_EXISTS",
    errors.FailedPrecondition: "FAILED_PRECONDITION",
    errors.ResourceExhausted: "RESOURCE_EXHAUSTED",
    errors.Unauthenticated: "UNAUTHENTICATED",
    errors.PermissionDenied: "PERMISSION_DENIED",
    errors.Unavailable: "UNAVAILABLE",
    errors.DeadlineExceeded: "DEADLINE_EXCEEDED",
    errors.Cancelled: "CANCELLED",
    errors.Internal: "INTERNAL",
}

# Statuses that mean "refused before (or instead of) doing the work". In-flight
# failures (INTERNAL, DEADLINE_EXCEEDED, CANCELLED) are counted by code in
# qlora_requests_total instead.
REFUSAL_CODES = frozenset({
    "INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "NOT_FOUND",
    "FAILED_PRECONDITION", "UNAVAILABLE", "ALREADY_EXISTS",
})


def code_name(exc: BaseException) -> str:
    """The status name of an exception; anything not a domain error is INTERNAL."""
    for cls in type(exc).__mro__:
        if cls in CODE_NAMES:
            return CODE_NAMES[cls]
    return "INTERNAL"


def domain_error(exc: BaseException | None) -> QloraServeError | None:
    """The domain error behind `exc`: itself, or one on its cause/context chain
    (gRPC's abort raises inside the handler's ``except``)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, QloraServeError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def rejection_reason(code: str | None, exc: BaseException | None = None) -> str | None:
    """The ``reason`` label for a refused call (the code in lower case, or the domain
    error's own ``reason`` such as ``quota``), or None when ``code`` is not a refusal."""
    if code not in REFUSAL_CODES:
        return None
    return getattr(domain_error(exc), "reason", None) or code.lower()


class CallLog:
    """One call's access-log line and refusal metric: fill the fields as they are
    learned, then `finish` once. Prompt text is logged only at DEBUG."""

    def __init__(self, method: str, tenant: str, metrics) -> None:
        self.method = method.rsplit("/", 1)[-1]
        self.tenant = tenant
        self.metrics = metrics
        self.started = time.monotonic()
        self.request_id = ""
        self.adapter = ""
        self.prompt = ""
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def finish(self, code: str, exc: BaseException | None = None) -> None:
        """code: a status name (``OK``, ``INVALID_ARGUMENT``, ...)."""
        reason = rejection_reason(code, exc)
        if reason is not None:
            self.metrics.rejected(reason, self.tenant)
        latency_ms = (time.monotonic() - self.started) * 1000.0
        fields = {"method": self.method, "request_id": self.request_id or "-", "tenant": self.tenant or "-",
                  "adapter": self.adapter or "-", "code": code, "prompt_tokens": self.prompt_tokens,
                  "completion_tokens": self.completion_tokens, "latency_ms": round(latency_ms, 1)}
        if reason is not None:
            fields["reason"] = reason
        if self.prompt and access_log.isEnabledFor(logging.DEBUG):
            fields["prompt"] = self.prompt  # prompt text only with debug logging on
        access_log.info(" ".join(f"{k}={v}" if k != "prompt" else f"{k}={v!r}" for k, v in fields.items()),
                        extra=fields)


@dataclass(frozen=True)
class RequestLimits:
    """Per-request input limits (INVALID_ARGUMENT beyond them)."""

    max_prompt_tokens: int = option(8192, "longest prompt accepted, in tokens")
    max_prompt_bytes: int = option(0, f"longest text prompt accepted, in UTF-8 bytes, checked before tokenizing "
                                      f"(tokenizing costs CPU); 0 = {PROMPT_BYTES_PER_TOKEN} x max-prompt-tokens")
    max_stop_strings: int = option(16, "most stop strings one request may send")
    max_stop_chars: int = option(256, "longest stop string, in characters")
    request_timeout_s: float = option(300.0, "server-side deadline per request, seconds; a client deadline may only shorten it")

    def __post_init__(self) -> None:
        if self.max_prompt_bytes == 0:
            object.__setattr__(self, "max_prompt_bytes", PROMPT_BYTES_PER_TOKEN * self.max_prompt_tokens)
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"{f.name} must be > 0, got {getattr(self, f.name)}")


@dataclass(frozen=True)
class GenerateInput:
    """One generation request, whatever the transport (mirrors qlora_serve.v1.GenerateRequest).

    adapter: "" = base only, else a reference (name, name@3, name@alias).
    prompt / prompt_token_ids / messages: exactly one non-empty; messages are
        (role, content) pairs rendered with the tokenizer's chat template.
    max_new_tokens: None = the server default.   top_p: None = 1 (off).   seed: None = random.
    The remaining fields are SamplingParams' controls (server/engine/request.py), with
    their "off" values as defaults; SamplingParams checks their ranges.
    """

    adapter: str = ""
    prompt: str = ""
    prompt_token_ids: Sequence[int] = ()
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    request_id: str = ""
    messages: Sequence[tuple[str, str]] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0


@functools.lru_cache(maxsize=256)
def _template_of(path: str, digest: str) -> tuple[str | None]:
    """(The chat template stored with adapter `digest`, or None); its store dir never
    changes once it exists. FileNotFoundError, never cached, when the dir is not there."""
    try:
        return ((Path(path) / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8"),)
    except FileNotFoundError:
        if not Path(path).is_dir():
            raise  # not fetched yet (a registry follower's cache): a miss must not stick
        return (None,)


def adapter_chat_template(adapter: AdapterHandle, fetch: Callable[[], None] | None = None) -> str | None:
    """The adapter's own chat template (`chat_template.jinja`, saved by `qlora-serve train
    --chat-template`), so its chats render as its training data did; None = the base's.
    fetch: brings the adapter's files here when they are not (a RemoteRegistry's verify)."""
    try:
        return _template_of(adapter.path, adapter.digest)[0]
    except FileNotFoundError:
        if fetch is None:
            return None
    fetch()
    try:
        return _template_of(adapter.path, adapter.digest)[0]
    except FileNotFoundError:
        return None


class InferenceCore:
    """Validation, adapter access, quota and engine hand-off for one request
    (see the module docstring for the call sequence)."""

    def __init__(self, runtime: "Runtime") -> None:
        self._rt = runtime

    def validate(self, inp: GenerateInput, template: str | None = None) -> tuple[list[int], SamplingParams]:
        """Prompt ids and sampling parameters, or InvalidArgument naming what to fix.
        template: the chat template for `messages` (an adapter's own), else the tokenizer's."""
        limits: RequestLimits = self._rt.limits
        engine = self._rt.engine
        if sum(map(bool, (inp.prompt, len(inp.prompt_token_ids), len(inp.messages)))) > 1:
            raise InvalidArgument("set one of prompt, prompt_token_ids or messages, not several")
        if inp.prompt or inp.messages:
            size = len(inp.prompt.encode("utf-8")) + sum(len(c.encode("utf-8")) for _, c in inp.messages)
            if size > limits.max_prompt_bytes:  # before tokenizing: a 7 MiB prompt costs seconds of CPU
                raise InvalidArgument(f"prompt has {size} bytes; the limit is {limits.max_prompt_bytes} "
                                      f"(--max-prompt-bytes; --max-prompt-tokens is {limits.max_prompt_tokens})")
        if inp.messages:
            ids = render_chat(self._rt.tokenizer, inp.messages, template=template)
        elif inp.prompt:
            ids = list(self._rt.tokenizer(inp.prompt).input_ids)
        else:
            if len(inp.prompt_token_ids) > limits.max_prompt_tokens:  # before scanning them all
                raise InvalidArgument(f"prompt_token_ids has {len(inp.prompt_token_ids)} tokens; the limit is "
                                      f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
            ids = list(inp.prompt_token_ids)
            vocab = self._rt.vocab_size
            bad = next((t for t in ids if t >= vocab or t < 0), None)
            if bad is not None:
                raise InvalidArgument(f"prompt_token_ids contains {bad}, outside the vocabulary (size {vocab})")
        if not ids:
            raise InvalidArgument("prompt is empty: set prompt (text) or prompt_token_ids")
        if len(ids) > limits.max_prompt_tokens:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens} (--max-prompt-tokens)")
        cfg = engine.config
        if inp.max_new_tokens is not None:
            max_new = inp.max_new_tokens
            if max_new < 1 or max_new > cfg.max_new_tokens:
                raise InvalidArgument(f"max_new_tokens must be in [1, {cfg.max_new_tokens}], got {max_new}")
        else:
            max_new = min(cfg.default_max_new_tokens, max(1, self._rt.max_context - len(ids)))
        if len(inp.stop) > limits.max_stop_strings:
            raise InvalidArgument(f"stop has {len(inp.stop)} strings; the limit is {limits.max_stop_strings}")
        if any(len(s) > limits.max_stop_chars for s in inp.stop):
            raise InvalidArgument(f"a stop string is longer than {limits.max_stop_chars} characters")
        for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p"):
            value = getattr(inp, name)
            if value is not None and not math.isfinite(value):
                raise InvalidArgument(f"{name} must be a finite number, got {value}")
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=float(inp.temperature),
            top_p=float(inp.top_p) if inp.top_p is not None else 1.0,
            top_k=int(inp.top_k),
            seed=int(inp.seed) if inp.seed is not None else None,
            stop=tuple(inp.stop),
            presence_penalty=float(inp.presence_penalty),
            frequency_penalty=float(inp.frequency_penalty),
            repetition_penalty=float(inp.repetition_penalty),
            min_p=float(inp.min_p),
            stop_token_ids=frozenset(inp.stop_token_ids),
            ignore_eos=bool(inp.ignore_eos),
            min_tokens=int(inp.min_tokens),
            logprobs=bool(inp.logprobs),
            top_logprobs=int(inp.top_logprobs),
        )
        params.check_vocab(self._rt.vocab_size)
        engine.validate_lengths(len(ids), max_new)
        return ids, params

    def start(self, inp: GenerateInput, principal: "Principal", *, timeout_s: float | None = None,
              is_active: Callable[[], bool] | None = None) -> Request:
        """Readiness, validation, adapter resolution and quota, then queue on the engine.
        timeout_s: the client's remaining deadline in seconds (None = none); it may
        only shorten the server's --request-timeout-s. is_active: False once the client
        has gone; checked after tokenizing, so nothing is queued for a client that left."""
        rt = self._rt
        rt.require_ready()
        deadline = time.monotonic() + rt.limits.request_timeout_s
        if timeout_s is not None:
            deadline = min(deadline, time.monotonic() + timeout_s)
        adapter: AdapterHandle | None = None
        if inp.adapter and inp.messages:  # an adapter trained with its own chat template renders its chats
            adapter = rt.resolve_adapter(inp.adapter, principal)
        template = None
        if adapter is not None:  # a registry follower fetches the files now, so the FIRST chat uses the template
            template = adapter_chat_template(
                adapter, fetch=lambda: rt.registry.verify(rt.registry.get(adapter.name, adapter.version)))
        ids, params = self.validate(inp, template=template)
        if inp.adapter and adapter is None:
            adapter = rt.resolve_adapter(inp.adapter, principal)
        if is_active is not None and not is_active():
            rid = inp.request_id or "-"
            if time.monotonic() >= deadline:
                raise DeadlineExceeded(f"request {rid}: the client deadline passed before it was queued")
            raise Cancelled(f"request {rid}: the client went away before it was queued")
        req = Request(
            request_id=inp.request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            adapter=adapter,
            tenant=principal.tenant,
            deadline=deadline,
            arrival=time.monotonic(),
        )
        rt.admit(req, principal)
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: the engine frees the row within one step (no-op once finished)."""
        self._rt.engine.cancel(req)

    def events(self, req: Request, is_active: Callable[[], bool]) -> Iterator[TokenEvent | FinalEvent]:
        """Yield engine events until the final one; raise the domain error of an ErrorEvent,
        or Cancelled once `is_active()` turns False (the request is then cancelled)."""
        while True:
            try:
                ev = req.events.get(timeout=POLL_S)
            except queue.Empty:
                if not is_active():
                    self.cancel(req)
                    raise Cancelled(f"request {req.request_id}: the client went away")
                continue
            # Tokens that queued up while this thread was busy go out as one message:
            # no added latency, and far fewer messages when the handler lags the engine.
            pending = None
            while isinstance(ev, TokenEvent):
                try:
                    nxt = req.events.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(nxt, TokenEvent):
                    pending = nxt
                    break
                ev = TokenEvent(ev.token_ids + nxt.token_ids, ev.text + nxt.text,
                                None if ev.logprobs is None else ev.logprobs + nxt.logprobs)
            for item in (ev, pending):
                if isinstance(item, ErrorEvent):
                    raise item.error
                if isinstance(item, TokenEvent):
                    # Charged to the tenant's quota on every exit path (see Runtime.finished).
                    self._rt.relayed(req, len(item.token_ids))
                if item is not None:
                    yield item
                if isinstance(item, FinalEvent):
                    return

    @staticmethod
    def outcome(exc: Exception, req: Request | None, client_deadline_passed: bool = False) -> Exception:
        """The error a request ends with: a cancel once its deadline (the client's, or
        --request-timeout-s) has passed is DEADLINE_EXCEEDED, whichever side saw it first."""
        if not isinstance(exc, Cancelled):
            return exc
        expired = req is not None and req.deadline is not None and time.monotonic() >= req.deadline
        if not (expired or client_deadline_passed):
            return exc
        rid = req.request_id if req is not None else "-"
        return DeadlineExceeded(f"request {rid} passed its deadline; raise the client timeout or lower max_new_tokens")

    def record(self, method: str, req: Request | None, code: str, started: float,
               final: FinalEvent | None = None, tenant: str = "", *,
               count_call: bool = True) -> tuple[int, int] | None:
        """Latency and tokens of the finished call, and release its quota lease. Call
        exactly once per started call. Returns (prompt, completion) tokens: the one count
        the quota charged, for metrics and the access log on every exit (a stream the
        client cancelled still generated what it streamed), or None without a Request.
        tenant: for a call refused before it had a Request ("" if unknown).
        count_call: also count it in qlora_requests_total (the gRPC guard counts every
        RPC itself, so the gRPC front end passes False)."""
        rt = self._rt
        adapter = req.adapter.name if req and req.adapter else ""
        tenant = req.tenant if req else tenant
        if count_call:
            rt.metrics.requests.labels(method, adapter, tenant, code).inc()
        if final is not None:
            rt.metrics.latency.labels(adapter).observe(time.monotonic() - started)
        usage = rt.finished(req, final)
        if usage is not None:
            rt.metrics.prompt_tokens.labels(adapter, tenant).inc(usage[0])
            rt.metrics.tokens.labels(adapter, tenant).inc(usage[1])
        return usage
