"""gRPC Inference service: a thin adapter from qlora_serve.v1 messages and statuses to the
transport-neutral request path (server/requests.py), which validates, resolves the adapter,
hands the request to the engine and relays its answers."""

from __future__ import annotations

import time

import grpc

from qlora_serve.errors import Cancelled
from qlora_serve.server.engine.request import FinalEvent, FinishReason, Request, TokenEvent, TokenLogprob
from qlora_serve.server.interceptors import note_outcome, report_usage
from qlora_serve.server.requests import GenerateInput, InferenceCore, RequestLimits  # noqa: F401 (re-export)
from qlora_serve.server.status import abort, code_for, deadline_passed
from qlora_serve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

_FINISH = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.EOS: common_pb2.FINISH_REASON_EOS,
}


def input_of(msg: inference_pb2.GenerateRequest) -> GenerateInput:
    """The transport-neutral request of a GenerateRequest (unset optionals stay None)."""
    return GenerateInput(
        adapter=msg.adapter, prompt=msg.prompt, prompt_token_ids=list(msg.prompt_token_ids),
        max_new_tokens=msg.max_new_tokens if msg.HasField("max_new_tokens") else None,
        temperature=float(msg.temperature), top_p=float(msg.top_p) if msg.HasField("top_p") else None,
        top_k=int(msg.top_k), seed=int(msg.seed) if msg.HasField("seed") else None,
        stop=tuple(msg.stop), request_id=msg.request_id,
        messages=tuple((m.role, m.content) for m in msg.messages),
        presence_penalty=float(msg.presence_penalty), frequency_penalty=float(msg.frequency_penalty),
        repetition_penalty=float(msg.repetition_penalty) if msg.HasField("repetition_penalty") else 1.0,
        min_p=float(msg.min_p), stop_token_ids=tuple(msg.stop_token_ids), ignore_eos=msg.ignore_eos,
        min_tokens=int(msg.min_tokens), logprobs=msg.logprobs, top_logprobs=int(msg.top_logprobs))


class InferenceService(inference_pb2_grpc.InferenceServicer):
    """Implements qlora_serve.v1.Inference: a gRPC adapter over `InferenceCore`
    (server/requests.py) on a loaded `Runtime` (see server/app.py)."""

    def __init__(self, runtime) -> None:
        self._rt = runtime
        self._core = InferenceCore(runtime)

    # ------------------------------------------------------------ helpers
    def _start(self, msg, context) -> Request:
        rt = self._rt
        rt.require_ready()
        principal = rt.authenticate(context)
        req = self._core.start(input_of(msg), principal, timeout_s=context.time_remaining(),
                               is_active=context.is_active)
        # A client that goes away frees its row within one engine step; add_callback
        # returns False (and never calls it) when the client left after start's check.
        if not context.add_callback(lambda: self._core.cancel(req)):
            self._core.cancel(req)
        return req

    def _events(self, req: Request, context):
        """Engine events until the final one (see InferenceCore.events)."""
        return self._core.events(req, context.is_active)

    def _outcome(self, exc: Exception, req: Request | None, context) -> Exception:
        """See InferenceCore.outcome: a cancel past the deadline is DEADLINE_EXCEEDED."""
        return self._core.outcome(exc, req, deadline_passed(context))

    def _tenant_of(self, context) -> str:
        """The caller's tenant for a request refused before it had a Request ("" if unknown)."""
        try:
            return self._rt.authenticate(context).tenant if context is not None else ""
        except Exception:
            return ""

    def _record(self, method: str, req: Request | None, code: grpc.StatusCode, started: float,
                final: FinalEvent | None = None, context=None) -> None:
        tenant = "" if req else self._tenant_of(context)
        note_outcome(req.adapter.name if req and req.adapter else "", code)  # the guard counts the RPC
        usage = self._core.record(method, req, code.name, started, final, tenant=tenant, count_call=False)
        if usage is not None:
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
            return response_of(self._rt.tokenizer, req, final)
        except Exception as exc:
            exc = self._outcome(exc, req, context)
            self._record("Generate", req, code_for(exc), started, context=context)
            abort(context, exc, req.request_id if req else request.request_id)

    def GenerateStream(self, request, context):
        started, req, recorded = time.monotonic(), None, False
        try:
            req = self._start(request, context)
            for ev in self._events(req, context):
                if isinstance(ev, FinalEvent):
                    recorded = True
                    self._record("GenerateStream", req, grpc.StatusCode.OK, started, ev, context)
                yield stream_message(self._rt.tokenizer, req, ev)
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
            return inference_pb2.ModelInfo(**self._rt.model_info())
        except Exception as exc:
            abort(context, exc)


def adapter_ref(req: Request) -> common_pb2.AdapterRef:
    """The adapter version (and digest) that serves `req`; empty for the base."""
    a = req.adapter
    return common_pb2.AdapterRef(name=a.name, version=a.version, digest=a.digest) if a else common_pb2.AdapterRef()


def response_of(tokenizer, req: Request, final: FinalEvent) -> inference_pb2.GenerateResponse:
    """The unary answer of a finished request."""
    return inference_pb2.GenerateResponse(
        text=final.text, token_ids=final.token_ids, finish_reason=_FINISH[final.finish_reason],
        prompt_tokens=final.prompt_tokens, completion_tokens=len(final.token_ids),
        adapter=adapter_ref(req), request_id=req.request_id, logprobs=logprobs_pb(tokenizer, final.logprobs))


def stream_message(tokenizer, req: Request, ev: TokenEvent | FinalEvent) -> inference_pb2.GenerateStreamResponse:
    """One GenerateStream message: a token delta, or the final message (finish reason, usage)."""
    if isinstance(ev, TokenEvent):
        return inference_pb2.GenerateStreamResponse(
            text=ev.text, token_ids=ev.token_ids, adapter=adapter_ref(req), request_id=req.request_id,
            logprobs=logprobs_pb(tokenizer, ev.logprobs))
    return inference_pb2.GenerateStreamResponse(
        text=ev.tail, finish_reason=_FINISH[ev.finish_reason], prompt_tokens=ev.prompt_tokens,
        completion_tokens=len(ev.token_ids), adapter=adapter_ref(req), request_id=req.request_id)


def logprobs_pb(tokenizer, logprobs: list[TokenLogprob] | None) -> list[inference_pb2.TokenLogprob]:
    """Engine logprobs -> proto messages, each token with its own text."""
    def text(t: int) -> str:
        return tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return [inference_pb2.TokenLogprob(
        token_id=lp.token_id, token=text(lp.token_id), logprob=lp.logprob,
        top_logprobs=[inference_pb2.TopLogprob(token_id=t, token=text(t), logprob=v) for t, v in lp.top])
        for lp in logprobs or ()]
