"""gRPC Inference service: a thin adapter from qlora_serve.v1 messages and statuses to the
transport-neutral request path (server/requests.py), which validates, resolves the adapter,
hands the request to the engine and relays its answers."""

from __future__ import annotations

import time

import grpc

from qlora_serve.server.engine.request import FinalEvent, FinishReason, Request, TokenEvent
from qlora_serve.server.requests import GenerateInput, InferenceCore, RequestLimits  # noqa: F401 (re-export)
from qlora_serve.server.status import abort, code_for
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
        stop=tuple(msg.stop), request_id=msg.request_id)


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
        req = self._core.start(input_of(msg), principal, timeout_s=context.time_remaining())
        # A client that goes away frees its row within one engine step.
        context.add_callback(lambda: self._core.cancel(req))
        return req

    def _events(self, req: Request, context):
        """Engine events until the final one (see InferenceCore.events)."""
        return self._core.events(req, context.is_active)

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
        tenant = "" if req else self._tenant_of(context)
        self._core.record(method, req, code.name, started, final, tenant=tenant)

    # --------------------------------------------------------------- RPCs
    def Generate(self, request, context):
        started, req = time.monotonic(), None
        try:
            req = self._start(request, context)
            final = None
            for ev in self._events(req, context):
                if isinstance(ev, FinalEvent):
                    final = ev  # _events returns only after the FinalEvent (or raises)
            self._record("Generate", req, grpc.StatusCode.OK, started, final)
            return inference_pb2.GenerateResponse(
                text=final.text, token_ids=final.token_ids, finish_reason=_FINISH[final.finish_reason],
                prompt_tokens=final.prompt_tokens, completion_tokens=len(final.token_ids),
                adapter=self._adapter_ref(req), request_id=req.request_id)
        except Exception as exc:
            self._record("Generate", req, code_for(exc), started, context=context)
            abort(context, exc, req.request_id if req else request.request_id)

    def GenerateStream(self, request, context):
        started, req, recorded = time.monotonic(), None, False
        try:
            req = self._start(request, context)
            ref = self._adapter_ref(req)
            for ev in self._events(req, context):
                if isinstance(ev, TokenEvent):
                    yield inference_pb2.GenerateStreamResponse(text=ev.text, token_ids=ev.token_ids, adapter=ref,
                                                               request_id=req.request_id)
                else:
                    recorded = True
                    self._record("GenerateStream", req, grpc.StatusCode.OK, started, ev)
                    yield inference_pb2.GenerateStreamResponse(
                        text=ev.tail, finish_reason=_FINISH[ev.finish_reason], prompt_tokens=ev.prompt_tokens,
                        completion_tokens=len(ev.token_ids), adapter=ref, request_id=req.request_id)
        except Exception as exc:
            recorded = True
            self._record("GenerateStream", req, code_for(exc), started, context=context)
            abort(context, exc, req.request_id if req else request.request_id)
        finally:
            if not recorded:
                # The client cancelled while this generator was suspended at a yield: gRPC
                # drops it (GeneratorExit), so no except clause runs. Still count the RPC and
                # release the quota lease; the engine frees the row via the done callback.
                self._record("GenerateStream", req, grpc.StatusCode.CANCELLED, started)
