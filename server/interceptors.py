"""The request guard: one server interceptor around every ``qlora_serve.v1`` RPC.

It does four things the servicers would otherwise each repeat:

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
* **Request metric.** ``qlora_requests_total{method,adapter,tenant,code}``
  counts every finished RPC of every service, health and reflection included
  (those are counted only: not parsed, not logged). A servicer that knows more
  than the status (which adapter served, why a stream ended) says so with
  `note_outcome`.

Install it OUTSIDE the `AuthInterceptor` (first in the list) so it also counts
and logs the calls authentication refuses.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable

import grpc
from google.protobuf.message import DecodeError

from qlora_serve.server.auth import Authenticator
from qlora_serve.errors import InvalidArgument, Unauthenticated
from qlora_serve.server import requests
from qlora_serve.server.metrics import Metrics
from qlora_serve.server.status import abort, deadline_passed

GUARDED_PREFIX = "/qlora_serve.v1."

# The refusal statuses (server/requests.py REFUSAL_CODES) as gRPC codes.
REFUSAL_CODES = frozenset(c for c in grpc.StatusCode if c.name in requests.REFUSAL_CODES)


_END = object()  # end of a response iterator
_current = threading.local()  # .call: the _Call whose handler code runs on this thread


def note_outcome(adapter: str, code: grpc.StatusCode | None = None) -> None:
    """Called by a servicer while it handles an RPC: the adapter name that served
    it (the metric's ``adapter`` label) and, when the servicer knows better than the
    status the guard sees (a stream the client left), the code it ended with."""
    call = getattr(_current, "call", None)
    if call is not None:
        call.noted_adapter, call.noted_code = adapter, code


def rejection_reason(code: grpc.StatusCode | None, exc: BaseException | None = None) -> str | None:
    """The ``reason`` label for a refused call, or None when ``code`` is not a refusal."""
    return requests.rejection_reason(code.name if code is not None else None, exc)


class _Call(requests.CallLog):
    """Bookkeeping for one RPC: the shared access-log line, filled from protobuf messages."""

    def __init__(self, method: str, tenant: str, metrics: Metrics) -> None:
        super().__init__(method, tenant, metrics)
        self.served = False  # a response named the adapter that served (else the label is "")
        self.noted_adapter: str | None = None
        self.noted_code: grpc.StatusCode | None = None
        self.usage_reported = False  # set by report_usage: the servicer's count wins

    @contextlib.contextmanager
    def current(self):
        """Run handler code with this call as the thread's current call (for `note_outcome`)."""
        _current.call = self
        try:
            yield
        finally:
            _current.call = None

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
            self.adapter, self.served = f"{ref.name}@{ref.version}", True
        if not self.usage_reported:
            self.prompt_tokens = getattr(response, "prompt_tokens", 0) or self.prompt_tokens
            self.completion_tokens = getattr(response, "completion_tokens", 0) or self.completion_tokens

    def count(self, code: grpc.StatusCode) -> grpc.StatusCode:
        """Count the RPC in qlora_requests_total; returns the code it was counted under."""
        code = self.noted_code or code
        adapter = self.noted_adapter
        if adapter is None:
            adapter = self.adapter.split("@", 1)[0] if self.served else ""
        self.metrics.requests.labels(self.method, adapter, self.tenant, code.name).inc()
        return code

    def finish(self, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
        super().finish(self.count(code).name, exc)


_CALL_ATTR = "_qlora_serve_call"  # the guard's _Call, on the call's context, for report_usage


def report_usage(context: grpc.ServicerContext | None, prompt_tokens: int, completion_tokens: int) -> None:
    """Give the call's access-log line the servicer's token count (the one its quota
    charged and its metrics counted), also for a call that ends without a final message."""
    call = getattr(context, _CALL_ATTR, None)
    if call is not None:
        call.prompt_tokens, call.completion_tokens, call.usage_reported = prompt_tokens, completion_tokens, True


def _code_after(context: grpc.ServicerContext, failed: bool) -> grpc.StatusCode:
    code = context.code()
    if code is not None:
        return code
    if not failed:
        return grpc.StatusCode.OK
    if context.is_active():
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.DEADLINE_EXCEEDED if deadline_passed(context) else grpc.StatusCode.CANCELLED


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
        self._active = 0  # guarded calls whose handler has not returned yet
        self._idle = threading.Condition()

    def in_flight(self) -> int:
        """Guarded calls whose handler is still running (a stream: still sending)."""
        with self._idle:
            return self._active

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no guarded call is in flight or `timeout_s` seconds passed; True if idle."""
        with self._idle:
            return self._idle.wait_for(lambda: self._active == 0, timeout=max(timeout_s, 0.0))

    @contextlib.contextmanager
    def _in_flight(self, counted: bool):
        """Count a call as in flight while its handler runs. Only qlora_serve.v1 calls:
        a health Watch stays open until the port closes and would hold every drain."""
        if not counted:
            yield
            return
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                if self._active == 0:
                    self._idle.notify_all()

    def _tenant(self, metadata) -> tuple[str, bool]:
        try:
            return self._auth.authenticate(metadata).tenant, True
        except Unauthenticated:
            return "", False

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None:
            return handler
        tenant, authed = self._tenant(handler_call_details.invocation_metadata)
        metrics, deserialize = self._metrics, handler.request_deserializer
        # Health and reflection are counted (qlora_requests_total) but not parsed or logged.
        guarded = method.startswith(GUARDED_PREFIX)

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

        def finish(call: _Call, code: grpc.StatusCode, exc: BaseException | None = None) -> None:
            call.finish(code, exc) if guarded else call.count(code)

        streaming_request = bool(handler.stream_unary or handler.stream_stream)
        if not guarded:
            read = lambda request_or_iter, context, call: request_or_iter  # noqa: E731
        else:
            read = parsed_stream if streaming_request else parsed

        if handler.unary_unary or handler.stream_unary:
            inner = handler.unary_unary or handler.stream_unary

            def unary_response(request_or_iter, context):
                call, response = _Call(method, tenant, metrics), None
                setattr(context, _CALL_ATTR, call)
                try:
                    with self._in_flight(guarded), call.current():
                        response = inner(read(request_or_iter, context, call), context)
                except BaseException as exc:
                    finish(call, _code_after(context, True), exc)
                    raise
                call.saw_response(response)
                finish(call, _code_after(context, False))
                return response

            key = "unary_unary" if handler.unary_unary else "stream_unary"
            wrapped = {key: unary_response}
        else:
            inner = handler.unary_stream or handler.stream_stream

            def stream_response(request_or_iter, context):
                with self._in_flight(guarded):
                    yield from stream_body(request_or_iter, context)

            def stream_body(request_or_iter, context):
                call, responses = _Call(method, tenant, metrics), None
                setattr(context, _CALL_ATTR, call)
                try:
                    with call.current():
                        responses = iter(inner(read(request_or_iter, context, call), context))
                    while True:
                        with call.current():
                            response = next(responses, _END)
                        if response is _END:
                            break
                        call.saw_response(response)
                        yield response
                except BaseException as exc:
                    # The client left (GeneratorExit) or the handler raised: close the handler's
                    # generator first, so its cleanup (and its note_outcome) runs before the count.
                    with call.current(), contextlib.suppress(Exception):
                        getattr(responses, "close", lambda: None)()
                    finish(call, _code_after(context, True), exc)
                    raise
                finish(call, _code_after(context, False))

            key = "unary_stream" if handler.unary_stream else "stream_stream"
            wrapped = {key: stream_response}
        if guarded:
            return handler._replace(request_deserializer=None, **wrapped)
        return handler._replace(**wrapped)
