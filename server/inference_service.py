"""gRPC Inference service: validate, resolve the adapter, hand to the engine, relay answers."""

from __future__ import annotations

import math
import queue
import time
import uuid
from dataclasses import dataclass, fields

import grpc

from qlora_serve.server.engine.chat import render_chat
from qlora_serve.server.engine.config import option
from qlora_serve.server.engine.request import (
    AdapterHandle,
    ErrorEvent,
    FinalEvent,
    FinishReason,
    Request,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
)
from qlora_serve.errors import Cancelled, DeadlineExceeded, InvalidArgument
from qlora_serve.server.interceptors import note_outcome, report_usage
from qlora_serve.server.status import abort, code_for, deadline_passed
from qlora_serve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

_FINISH = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
}
_POLL_S = 0.5  # how often a waiting handler re-checks that its client is still there
# Default prompt bound in UTF-8 bytes per --max-prompt-tokens token: natural text
# averages about 4 bytes a token, so only pathological prompts reach 16.
PROMPT_BYTES_PER_TOKEN = 16


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


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Implements qlora_serve.v1.Inference on top of a loaded `Runtime` (see server/app.py)."""

    def __init__(self, runtime) -> None:
        self._rt = runtime

    # ------------------------------------------------------------ helpers
    def _validate(self, msg: inference_pb2.GenerateRequest) -> tuple[list[int], SamplingParams]:
        limits: RequestLimits = self._rt.limits
        engine = self._rt.engine
        if sum(map(bool, (msg.prompt, len(msg.prompt_token_ids), len(msg.messages)))) > 1:
            raise InvalidArgument("set one of prompt, prompt_token_ids or messages, not several")
        if msg.prompt or msg.messages:
            size = len(msg.prompt.encode("utf-8")) + sum(len(m.content.encode("utf-8")) for m in msg.messages)
            if size > limits.max_prompt_bytes:  # before tokenizing: a 7 MiB prompt costs seconds of CPU
                raise InvalidArgument(f"prompt has {size} bytes; the limit is {limits.max_prompt_bytes} "
                                      f"(--max-prompt-bytes; --max-prompt-tokens is {limits.max_prompt_tokens})")
        if msg.messages:
            ids = render_chat(self._rt.tokenizer, [(m.role, m.content) for m in msg.messages])
        elif msg.prompt:
            ids = list(self._rt.tokenizer(msg.prompt).input_ids)
        else:
            if len(msg.prompt_token_ids) > limits.max_prompt_tokens:  # before scanning them all
                raise InvalidArgument(f"prompt_token_ids has {len(msg.prompt_token_ids)} tokens; the limit is "
                                      f"{limits.max_prompt_tokens} (--max-prompt-tokens)")
            ids = list(msg.prompt_token_ids)
            vocab = self._rt.vocab_size
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise InvalidArgument(f"prompt_token_ids contains {bad}, outside the vocabulary (size {vocab})")
        if not ids:
            raise InvalidArgument("prompt is empty: set prompt (text) or prompt_token_ids")
        if len(ids) > limits.max_prompt_tokens:
            raise InvalidArgument(f"prompt has {len(ids)} tokens; the limit is {limits.max_prompt_tokens} (--max-prompt-tokens)")
        cfg = engine.config
        if msg.HasField("max_new_tokens"):
            max_new = msg.max_new_tokens
            if max_new < 1 or max_new > cfg.max_new_tokens:
                raise InvalidArgument(f"max_new_tokens must be in [1, {cfg.max_new_tokens}], got {max_new}")
        else:
            max_new = min(cfg.default_max_new_tokens, max(1, self._rt.max_context - len(ids)))
        if len(msg.stop) > limits.max_stop_strings:
            raise InvalidArgument(f"stop has {len(msg.stop)} strings; the limit is {limits.max_stop_strings}")
        if any(len(s) > limits.max_stop_chars for s in msg.stop):
            raise InvalidArgument(f"a stop string is longer than {limits.max_stop_chars} characters")
        for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "min_p"):
            if not math.isfinite(getattr(msg, field)):
                raise InvalidArgument(f"{field} must be a finite number, got {getattr(msg, field)}")
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=float(msg.temperature),
            top_p=float(msg.top_p) if msg.HasField("top_p") else 1.0,
            top_k=int(msg.top_k),
            seed=int(msg.seed) if msg.HasField("seed") else None,
            stop=tuple(msg.stop),
            **sampling_controls(msg),
        )
        params.check_vocab(self._rt.vocab_size)
        engine.validate_lengths(len(ids), max_new)
        return ids, params

    def _start(self, msg, context) -> Request:
        rt = self._rt
        rt.require_ready()
        principal = rt.authenticate(context)
        ids, params = self._validate(msg)
        adapter: AdapterHandle | None = rt.resolve_adapter(msg.adapter, principal) if msg.adapter else None
        if not context.is_active():  # gone while its prompt was tokenized: queue nothing for it
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                raise DeadlineExceeded(f"request {msg.request_id or '-'}: the client deadline passed before it was queued")
            raise Cancelled(f"request {msg.request_id or '-'}: the client went away before it was queued")
        deadline = time.monotonic() + rt.limits.request_timeout_s
        remaining = context.time_remaining()
        if remaining is not None:
            deadline = min(deadline, time.monotonic() + remaining)
        req = Request(
            request_id=msg.request_id or uuid.uuid4().hex,
            prompt_ids=ids,
            params=params,
            adapter=adapter,
            tenant=principal.tenant,
            deadline=deadline,
            arrival=time.monotonic(),
        )
        rt.admit(req, principal)
        # A client that goes away frees its row within one engine step; add_callback
        # returns False (and never calls it) when the client left after the check above.
        if not context.add_callback(lambda: rt.engine.cancel(req)):
            rt.engine.cancel(req)
        return req

    def _events(self, req: Request, context):
        """Yield engine events until the final one; raise the domain error of an ErrorEvent."""
        while True:
            try:
                ev = req.events.get(timeout=_POLL_S)
            except queue.Empty:
                if not context.is_active():
                    self._rt.engine.cancel(req)
                    raise self._outcome(Cancelled(f"request {req.request_id}: the client went away"), req, context)
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
    def _outcome(exc: Exception, req: Request | None, context) -> Exception:
        """The error a request ends with: a cancel once its deadline (the client's, or
        --request-timeout-s) has passed is DEADLINE_EXCEEDED, whichever side saw it first."""
        if not isinstance(exc, Cancelled):
            return exc
        expired = req is not None and req.deadline is not None and time.monotonic() >= req.deadline
        if not (expired or deadline_passed(context)):
            return exc
        rid = req.request_id if req is not None else "-"
        return DeadlineExceeded(f"request {rid} passed its deadline; raise the client timeout or lower max_new_tokens")

    def _adapter_ref(self, req: Request) -> common_pb2.AdapterRef:
        a = req.adapter
        return common_pb2.AdapterRef(name=a.name, version=a.version, digest=a.key) if a else common_pb2.AdapterRef()

    def _tenant_of(self, context) -> str:
        """The caller's tenant for a request refused before it had a Request ("" if unknown)."""
        try:
            return self._rt.authenticate(context).tenant if context is not None else ""
        except Exception:
            return ""

    def _record(self, method: str, req: Request | None, code: grpc.StatusCode, started: float,
                final: FinalEvent | None = None, context=None) -> None:
        rt = self._rt
        adapter = req.adapter.name if req and req.adapter else ""
        tenant = req.tenant if req else self._tenant_of(context)
        note_outcome(adapter, code)  # the guard counts the RPC (qlora_requests_total) with these
        if final is not None:
            rt.metrics.latency.labels(adapter).observe(time.monotonic() - started)
        # One count of the tokens (the quota's charge) for metrics and the access log, on
        # every exit: a stream the client cancelled still generated what it streamed.
        usage = rt.finished(req, final)
        if usage is not None:
            rt.metrics.prompt_tokens.labels(adapter, tenant).inc(usage[0])
            rt.metrics.tokens.labels(adapter, tenant).inc(usage[1])
            report_usage(context, *usage)

    # --------------------------------------------------------------- RPCs
    def Generate(self, request, context):
        started, req = time.monotonic(), None
        try:
            req = self._start(request, context)
            final = None
            for ev in self._events(req, context):
                if isinstance(ev, FinalEvent):
                    final = ev  # _events returns only after the FinalEvent (or raises)
            self._record("Generate", req, grpc.StatusCode.OK, started, final, context)
            return inference_pb2.GenerateResponse(
                text=final.text, token_ids=final.token_ids, finish_reason=_FINISH[final.finish_reason],
                prompt_tokens=final.prompt_tokens, completion_tokens=len(final.token_ids),
                adapter=self._adapter_ref(req), request_id=req.request_id,
                logprobs=logprobs_pb(self._rt.tokenizer, final.logprobs))
        except Exception as exc:
            exc = self._outcome(exc, req, context)
            self._record("Generate", req, code_for(exc), started, context=context)
            abort(context, exc, req.request_id if req else request.request_id)

    def GenerateStream(self, request, context):
        started, req, recorded = time.monotonic(), None, False
        try:
            req = self._start(request, context)
            ref = self._adapter_ref(req)
            for ev in self._events(req, context):
                if isinstance(ev, TokenEvent):
                    yield inference_pb2.GenerateStreamResponse(
                        text=ev.text, token_ids=ev.token_ids, adapter=ref, request_id=req.request_id,
                        logprobs=logprobs_pb(self._rt.tokenizer, ev.logprobs))
                else:
                    recorded = True
                    self._record("GenerateStream", req, grpc.StatusCode.OK, started, ev, context)
                    yield inference_pb2.GenerateStreamResponse(
                        text=ev.tail, finish_reason=_FINISH[ev.finish_reason], prompt_tokens=ev.prompt_tokens,
                        completion_tokens=len(ev.token_ids), adapter=ref, request_id=req.request_id)
        except Exception as exc:
            recorded = True
            exc = self._outcome(exc, req, context)
            self._record("GenerateStream", req, code_for(exc), started, context=context)
            abort(context, exc, req.request_id if req else request.request_id)
        finally:
            if not recorded:
                # The client cancelled while this generator was suspended at a yield: gRPC
                # drops it (GeneratorExit), so no except clause runs. Still count the RPC and
                # release the quota lease; the engine frees the row via the done callback.
                code = code_for(self._outcome(Cancelled("client went away"), req, context))
                self._record("GenerateStream", req, code, started, context=context)

    def GetModelInfo(self, request, context):
        try:
            self._rt.require_ready()
            self._rt.authenticate(context)
            cfg = self._rt.engine.config
            return inference_pb2.ModelInfo(**self._rt.engine.base.info(), max_new_tokens=cfg.max_new_tokens,
                                           max_prompt_tokens=self._rt.limits.max_prompt_tokens)
        except Exception as exc:
            abort(context, exc)


def sampling_controls(msg: inference_pb2.GenerateRequest) -> dict:
    """The GenerateRequest's sampling controls as SamplingParams keyword arguments
    (SamplingParams validates their ranges)."""
    return dict(
        presence_penalty=float(msg.presence_penalty), frequency_penalty=float(msg.frequency_penalty),
        repetition_penalty=float(msg.repetition_penalty) if msg.HasField("repetition_penalty") else 1.0,
        min_p=float(msg.min_p), stop_token_ids=frozenset(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        min_tokens=int(msg.min_tokens), logprobs=msg.logprobs, top_logprobs=int(msg.top_logprobs))


def logprobs_pb(tokenizer, logprobs: list[TokenLogprob] | None) -> list[inference_pb2.TokenLogprob]:
    """Engine logprobs -> proto messages, each token with its own text."""
    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return [inference_pb2.TokenLogprob(
        token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
        top_logprobs=[inference_pb2.TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in lp.top])
        for lp in logprobs or ()]
