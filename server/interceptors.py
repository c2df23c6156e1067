"""The request guard: one server interceptor around every ``qlora_serve.v1`` RPC.

It does three things the servicers would otherwise each repeat:

* **Parsing.** gRPC's own deserializer turns a malformed request (bad wire
  format, or a ``string`` field that is not valid UTF-8) into INTERNAL
  "Exception deserializing request". The guard swaps each handler's
  ``request_deserializer`` for a raw-bytes passthrough and parses inside the
  handler instead, answering INVALID_ARGUMENT with a message naming the problem.
* **Refusal metrics.** Every call that ends in a refusal status (see
  `REFUSAL_CODES`) increments ``qlora_rejections_total{reason,tenant}``: the
  reason is the status code in lower case, or, for RESOURCE_EXHAUSTED, the
  domain error's ``reason`` (``quota``, ``queue_full``).
* **Access log.** One line per finished RPC on the ``qlora_serve.requests``
  logger: method, request id, tenant, adapter, status code, tokens, latency.
  Prompt text is logged only when that logger is at DEBUG. The line and the
  refusal metric are `requests.CallLog`'s, shared with the HTTP front end.

Install it OUTSIDE the `AuthInterceptor` (first in the list) so it also counts
and logs the calls authentication refuses. Health and reflection pass through.
"""

from __future__ import annotations

from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from qlora_serve.server.auth import Authenticator
from qlora_serve.errors import InvalidArgument, Unauthenticated
from qlora_serve.server import requests
from qlora_serve.server.metrics import Metrics
from qlora_serve.server.status import abort

GUARDED_PREFIX = "/qlora_serve.v1."

# The refusal statuses (server/requests.py REFUSAL_CODES) as gRPC codes.
REFUSAL_CODES = frozenset(c for c in grpc.StatusCode if c.name in requests.REFUSAL_CODES)


def rejection_reason(code: grpc.StatusCode | None, exc: BaseException | None = None) -> str | None:
    """The ``reason`` label for a refused call, or None when ``code`` is not a refusal."""
    return requests.rejection_reason(code.name if code is not None else None, exc)


class _Call(requests.CallLog):
    """Bookkeeping for one RPC: the shared access-log line, filled from protobuf messages."""

    def saw_request(self, request: Any) -> None:
        self.request_id = getattr(request, "request_id", "") or ""
        self.adapter = getattr(request, "adapter", "") or getattr(request, "name", "") or ""
        self.prompt = getattr(request, "prompt", "") or ""

    def saw_response(self, response: Any) -> None:
        if response is None:
            return
        self.request_id = getattr(response, "request_id", "") or self.request_id
        ref = getattr(response, "adapter", None)
        if ref is not None and getattr(ref, "name", ""):
            self.adapter = f"{ref.name}@{ref.version}"
        self.prompt_tokens = getattr(response, "prompt_tokens", 0) or self.prompt_tokens
        self.completion_tokens = getattr(response, "completion_tokens", 0) or self.completion_tokens

    def finish(self, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
        super().finish(code.name, exc)


def _code_after(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = context.code()
    if code is not None:
        return code
    if not failed:
        return grpc.StatusCode.OK
    return grpc.StatusCode.CANCELLED if not context.is_active() else grpc.StatusCode.UNKNOWN


def _parse(deserialize: Callable[[bytes], Any], raw: bytes, method: str) -> Any:
    try:
        return deserialize(raw)
    except DecodeError as exc:
        raise InvalidArgument(
            f"{method}: the request could not be parsed as protobuf ({exc}); check that every string field is "
            "valid UTF-8 and that the message was serialized with the qlora_serve.v1 protos") from None


class RequestGuard(grpc.ServerInterceptor):
    """Parsing with INVALID_ARGUMENT, refusal metrics and the access log (see module docstring)."""

    def __init__(self, authenticator: Authenticator, metrics: Metrics) -> None:
        self._auth = authenticator
        self._metrics = metrics

    def _tenant(self, metadata) -> tuple[str, bool]:
        try:
            return self._auth.authenticate(metadata).tenant, True
        except Unauthenticated:
            return "", False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(GUARDED_PREFIX):
            return handler
        tenant, authed = self._tenant(handler_call_details.invocation_metadata)
        metrics, deserialize = self._metrics, handler.request_deserializer

        def parsed(raw: bytes, context, call: _Call) -> Any:
            # An unauthenticated call gets UNAUTHENTICATED from the handler, not a parse error.
            if not authed or deserialize is None:
                return raw
            try:
                request = _parse(deserialize, raw, method)
            except InvalidArgument as exc:
                abort(context, exc)
            call.saw_request(request)
            return request

        def parsed_stream(raw_iter, context, call: _Call):
            for raw in raw_iter:  # the servicer maps InvalidArgument to INVALID_ARGUMENT
                yield raw if not authed or deserialize is None else _parse(deserialize, raw, method)

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary
            read = parsed if handler.unary_unary else parsed_stream

            def unary_response(request_or_iter, context):
                call, response = _Call(method, tenant, metrics), None
                try:
                    response = inner(read(request_or_iter, context, call), context)
                except BaseException as exc:
                    call.finish(_code_after(context, True), exc)
                    raise
                call.saw_response(response)
                call.finish(_code_after(context, False))
                return response

            key = "unary_unary" if handler.unary_unary else "stream_unary"
            return handler._replace(request_deserializer=None, **{key: unary_response})

        inner = handler.unary_stream or handler.stream_stream
        read = parsed if handler.unary_stream else parsed_stream

        def stream_response(request_or_iter, context):
            call = _Call(method, tenant, metrics)
            try:
                for response in inner(read(request_or_iter, context, call), context):
                    call.saw_response(response)
                    yield response
            except BaseException as exc:
                call.finish(_code_after(context, True), exc)
                raise
            call.finish(_code_after(context, False))

        key = "unary_stream" if handler.unary_stream else "stream_stream"
        return handler._replace(request_deserializer=None, **{key: stream_response})
