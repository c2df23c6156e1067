"""The OpenAI-compatible HTTP front end: Starlette routes served by uvicorn on a thread
of the gRPC server's process, over the same `Runtime` (one engine, registry, key set,
quotas and metrics) and the same request path (`InferenceCore`, server/requests.py).

Routes: GET /v1/models, GET /v1/models/{model} (OpenAI's retrieve), GET /v1/model_info
(not OpenAI: gRPC GetModelInfo as JSON), POST /v1/completions, POST /v1/chat/completions
(both with ``stream: true`` as server-sent events ending in ``data: [DONE]``).

Blocking work (tokenizing, waiting on the engine's event queue) runs on worker threads
bounded like gRPC's handler pool. Each generation watches the connection: a client
that goes away cancels its request, and the engine frees the row within one step.
"""

from __future__ import annotations

import json
import logging
import math
import re
import socket
import threading
import time
import uuid

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse
from starlette.routing import Route

from qlora_serve import errors
from qlora_serve.errors import InvalidArgument, NotFound, QloraServeError
from qlora_serve.server.engine.request import FinalEvent, Request, TokenEvent
from qlora_serve.server.openai_schema import (
    BASE_ALIASES,
    ChatRequest,
    CompletionRequest,
    Shaper,
    parse,
)
from qlora_serve.server.requests import CallLog, InferenceCore, code_name

log = logging.getLogger("qlora_serve.http")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # an X-Request-Id the server adopts as its own

# Domain error -> (HTTP status, OpenAI error type), as Google's API design guide maps
# the gRPC codes (FAILED_PRECONDITION is 400 there too). Most specific class first.
HTTP_STATUS: dict[type[QloraServeError], tuple[int, str]] = {
    errors.InvalidArgument: (400, "invalid_request_error"),
    errors.FailedPrecondition: (400, "invalid_request_error"),
    errors.Unauthenticated: (401, "authentication_error"),
    errors.PermissionDenied: (403, "permission_error"),
    errors.NotFound: (404, "not_found_error"),
    errors.AlreadyExists: (409, "invalid_request_error"),
    errors.ResourceExhausted: (429, "rate_limit_error"),
    errors.Cancelled: (499, "invalid_request_error"),
    errors.Internal: (500, "server_error"),
    errors.Unavailable: (503, "server_error"),
    errors.DeadlineExceeded: (504, "timeout_error"),
}


class BodyTooLarge(InvalidArgument):
    """A request body over --max-message-bytes (the limit gRPC messages have too)."""

    http_status = 413


def status_of(exc: BaseException) -> tuple[int, str]:
    """(HTTP status, OpenAI error type) of an exception; non-domain errors are 500."""
    if getattr(exc, "http_status", None):
        return exc.http_status, "invalid_request_error"
    for cls in type(exc).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500, "server_error"


class ModelNotFound(NotFound):
    """`model` names neither the base nor an adapter (OpenAI's code: model_not_found)."""

    code = "model_not_found"
    param = "model"


def error_body(exc: BaseException, request_id: str = "") -> tuple[int, dict, dict]:
    """(status, OpenAI error object, headers) for an exception; 429 carries Retry-After."""
    status, kind = status_of(exc)
    if isinstance(exc, QloraServeError):
        message = str(exc)
    else:
        log.error("unexpected error in request %s", request_id or "-", exc_info=exc)
        message = f"internal error ({type(exc).__name__}); report request id {request_id or '-'}"
    code = getattr(exc, "code", None) or getattr(exc, "reason", None) or code_name(exc).lower()
    headers = {}
    retry = getattr(exc, "retry_after_s", None)
    if retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    if request_id:
        headers["X-Request-Id"] = request_id
    body = {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None), "code": code}}
    return status, body, headers


def _error_response(exc: BaseException, request_id: str = "") -> JSONResponse:
    status, body, headers = error_body(exc, request_id)
    return JSONResponse(body, status_code=status, headers=headers)


class _Disconnected(Exception):
    """Writing to the client failed: it went away (handled like an http.disconnect)."""


class _Generation:
    """An ASGI response that runs one admitted request: pumps engine events from a
    worker thread while watching the connection, then answers (JSON or SSE)."""

    def __init__(self, api: "OpenAIApi", req: Request, shaper: Shaper, body, call: CallLog, method: str) -> None:
        self.api, self.req, self.shaper, self.body, self.call, self.method = api, req, shaper, body, call, method
        self.gone = threading.Event()  # set when the client disconnected
        self.started = call.started

    async def __call__(self, scope, receive, send) -> None:
        final, exc, code = None, None, "CANCELLED"
        core, req = self.api.core, self.req
        raw_send = send

        async def send(message) -> None:
            try:
                await raw_send(message)
            except OSError:  # uvicorn's ClientDisconnected
                self.gone.set()
                raise _Disconnected() from None

        events = core.events(req, lambda: not self.gone.is_set())
        headers = [(b"x-request-id", req.request_id.encode())]
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._watch, receive, tg.cancel_scope)
                try:  # inside the group: an exception here must not become an ExceptionGroup
                    if self.body.stream:
                        final = await self._stream(events, send, headers)
                    else:
                        final = await self._collect(events)
                        await self._send_json(send, 200, self.shaper.whole(final), headers)
                except _Disconnected:
                    pass  # CANCELLED below
                except Exception as e:  # noqa: BLE001 - every failure is answered and recorded below
                    exc = e
                tg.cancel_scope.cancel()
            # A disconnect cancels the group (final and exc stay None): CANCELLED.
            code = "OK" if final is not None else ("CANCELLED" if exc is None or self.gone.is_set()
                                                   else code_name(exc))
            if exc is not None and not self.gone.is_set():  # best effort: the client may be gone by now
                if not self._sent_headers:
                    status, body, hdrs = error_body(exc, req.request_id)
                    await self._send_json(send, status, body,
                                          [(k.lower().encode(), v.encode()) for k, v in hdrs.items()])
                else:  # mid-stream: an error event, then the end (as vLLM does)
                    await self._send_event(send, error_body(exc, req.request_id)[1])
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
        except _Disconnected:
            code = "CANCELLED"
        finally:
            if final is None:
                self.gone.set()
                core.cancel(req)  # frees the row if it is still running (no-op once finished)
            usage = core.record(self.method, req, code, self.started, final)
            if usage is not None:  # the quota's count: tokens streamed before a disconnect included
                self.call.prompt_tokens, self.call.completion_tokens = usage
            self.call.finish(code, exc)

    _sent_headers = False

    async def _watch(self, receive, scope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.gone.set()
                scope.cancel()
                return

    async def _next(self, events):
        return await anyio.to_thread.run_sync(next, events, None, limiter=self.api.limiter)

    async def _collect(self, events) -> FinalEvent:
        while True:
            ev = await self._next(events)
            if isinstance(ev, FinalEvent):
                return ev

    async def _stream(self, events, send, headers) -> FinalEvent:
        shaper, usage = self.shaper, self.body.include_usage
        ev = await self._next(events)  # the first event (or error) before committing to 200
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache"), *headers]})
        self._sent_headers = True
        first = True
        while True:
            if isinstance(ev, TokenEvent):
                if ev.text or first or ev.logprobs:  # logprobs of held-back tokens go out at once
                    await self._send_event(send, shaper.chunk(ev.text, first=first, with_usage=usage,
                                                              logprobs=ev.logprobs))
                    first = False
            elif isinstance(ev, FinalEvent):
                if first and shaper.chat:
                    await self._send_event(send, shaper.chunk("", first=True, with_usage=usage))
                await self._send_event(send, shaper.chunk(ev.tail, ev.finish_reason, with_usage=usage))
                if usage:
                    await self._send_event(send, shaper.usage_chunk(ev))
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
                return ev
            ev = await self._next(events)

    @staticmethod
    async def _send_event(send, obj: dict) -> None:
        data = b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _send_json(self, send, status: int, obj: dict, headers) -> None:
        data = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                *headers]})
        self._sent_headers = True
        await send({"type": "http.response.body", "body": data, "more_body": False})


class OpenAIApi:
    """The Starlette app over a `Runtime`. threads: most worker threads at once."""

    def __init__(self, runtime, threads: int, max_body_bytes: int) -> None:
        self.rt = runtime
        self.max_body_bytes = max_body_bytes
        self.core = InferenceCore(runtime)
        self.limiter = anyio.CapacityLimiter(threads)
        self.started_at = int(time.time())  # the base's `created` in /v1/models
        self.app = Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.retrieve_model, methods=["GET"]),
            Route("/v1/model_info", self.model_info, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ])

    def _principal(self, request: HttpRequest):
        return self.rt.authenticate_metadata(list(request.headers.items()))

    def _adapter_ref(self, model: str) -> str:
        """"" for the base (its name, "" or "base"), else the adapter reference."""
        return "" if model in BASE_ALIASES or model == self.rt.base_name else model

    async def _read_call(self, request: HttpRequest, method: str, work):
        """A read-only route: auth, readiness, `work(principal)` on a worker thread, JSON."""
        call = CallLog(method, "", self.rt.metrics)
        try:
            principal = self._principal(request)
            call.tenant = principal.tenant
            self.rt.require_ready()
            data = await anyio.to_thread.run_sync(work, principal, limiter=self.limiter)
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's error shape
            if isinstance(exc, NotFound) and method == "RetrieveModel":
                exc = _model_not_found(exc)
            call.finish(code_name(exc), exc)
            return _error_response(exc)
        call.finish("OK")
        return JSONResponse(data)

    async def models(self, request: HttpRequest):
        return await self._read_call(request, "ListModels",
                                     lambda principal: {"object": "list", "data": self._model_list(principal)})

    async def retrieve_model(self, request: HttpRequest):
        """GET /v1/models/{model}: OpenAI's retrieve, for the base or an adapter reference."""
        model = request.path_params["model"]
        return await self._read_call(request, "RetrieveModel", lambda principal: self._model_entry(model, principal))

    async def model_info(self, request: HttpRequest):
        """GET /v1/model_info (not OpenAI): what gRPC GetModelInfo answers, as JSON."""
        return await self._read_call(request, "GetModelInfo",
                                     lambda _principal: {"object": "model_info", **self.rt.model_info()})

    def _base_entry(self, model_id: str) -> dict:
        base = self.rt.base_name
        return {"id": model_id, "object": "model", "created": self.started_at, "owned_by": "qlora-serve",
                "root": base, "parent": None, "max_model_len": self.rt.max_context}

    def _adapter_entry(self, ref: str, rec) -> dict:
        return {"id": ref, "object": "model", "created": int(rec.created_at), "owned_by": rec.owner or "public",
                "root": rec.ref, "parent": self.rt.base_name}

    def _model_entry(self, model: str, principal) -> dict:
        """On a worker thread: the model object of one `model` value (NotFound / PermissionDenied)."""
        ref = self._adapter_ref(model)
        return self._base_entry(model) if not ref else self._adapter_entry(ref, self.rt.resolve_record(ref, principal))

    def _model_list(self, principal) -> list[dict]:
        """On a worker thread (SQLite reads): the base, then each visible adapter's references."""
        data = [self._base_entry(self.rt.base_name)]
        entry = self._adapter_entry
        by_name: dict[str, list] = {}
        for rec in self.rt.visible_adapters(principal):
            by_name.setdefault(rec.name, []).append(rec)
        for name, recs in by_name.items():
            try:
                current = self.rt.registry.resolve(name)
                aliases = self.rt.registry.aliases(name)
            except NotFound:  # deleted since the listing
                continue
            data.append(entry(name, current))
            data.extend(entry(rec.ref, rec) for rec in recs)
            versions = {rec.version: rec for rec in recs}
            for alias, version in aliases.items():
                if version in versions:
                    data.append(entry(f"{name}@{alias}", versions[version]))
        return data

    async def completions(self, request: HttpRequest):
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: HttpRequest):
        return await self._generate(request, chat=True)

    async def _generate(self, request: HttpRequest, *, chat: bool):
        method = "ChatCompletions" if chat else "Completions"
        call = CallLog(method, "", self.rt.metrics)
        given = request.headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex  # log-safe ids only
        call.request_id = request_id
        started, principal = call.started, None
        try:
            principal = self._principal(request)
            call.tenant = principal.tenant
            raw = await self._json(request)
            body = parse(ChatRequest if chat else CompletionRequest, raw)
            adapter = self._adapter_ref(body.model)
            call.adapter = adapter
            req = await anyio.to_thread.run_sync(self._start, body, chat, adapter, request_id, principal,
                                                 limiter=self.limiter)
        except Exception as exc:  # noqa: BLE001 - answered in OpenAI's error shape
            if isinstance(exc, NotFound):  # the only NotFound before admission: `model` names no adapter
                exc = _model_not_found(exc)
            self.core.record(method, None, code_name(exc), started, tenant=principal.tenant if principal else "")
            call.finish(code_name(exc), exc)
            return _error_response(exc, request_id)
        if req.adapter is not None:
            call.adapter = req.adapter.ref
        call.prompt = body.messages[-1].as_dict()["content"] if chat else body.prompt_parts()[0]
        model = body.model or self.rt.base_name
        shaper = Shaper(chat, req.request_id, model, tokenizer=self.rt.tokenizer,
                        top_logprobs=req.params.top_logprobs if req.params.logprobs else None)
        return _Generation(self, req, shaper, body, call, method)

    async def _json(self, request: HttpRequest):
        """The body as JSON, read up to max_body_bytes (BodyTooLarge beyond, never buffered whole)."""
        limit, chunks, size = self.max_body_bytes, [], 0
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(f"the request body has {declared} bytes; the limit is {limit} (--max-message-bytes)")
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the request body is over {limit} bytes (--max-message-bytes)")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            raise InvalidArgument("the request body is not valid JSON") from None

    def _start(self, body, chat: bool, adapter: str, request_id: str, principal) -> Request:
        """On a worker thread: render/tokenize, validate, resolve, admit (InferenceCore.start)."""
        self.rt.require_ready()
        if chat:  # rendered by the core: one renderer and the prompt byte bound for both APIs
            inp = body.to_input(adapter, request_id, messages=body.message_pairs())
        else:
            text, ids = body.prompt_parts()
            inp = body.to_input(adapter, request_id, prompt=text, prompt_token_ids=ids)
        try:
            return self.core.start(inp, principal)
        except InvalidArgument as exc:
            raise body.name_param(exc) from None


def _model_not_found(exc: NotFound) -> ModelNotFound:
    return ModelNotFound(f"{exc} (the `model` field names an adapter reference: name, name@3 or name@alias; "
                         "the base model's name, 'base' or '' mean no adapter; GET /v1/models lists them)")


class HttpFrontEnd:
    """uvicorn serving `OpenAIApi` on its own thread. `port` is the bound port (useful with 0)."""

    def __init__(self, runtime, host: str, port: int, threads: int, max_body_bytes: int) -> None:
        self.api = OpenAIApi(runtime, threads, max_body_bytes)
        self.host, self.port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "HttpFrontEnd":
        """Bind (OSError if taken) and serve; returns once uvicorn accepts connections."""
        family, kind, proto, _, addr = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            sock.close()
            raise OSError(f"could not bind HTTP port {self.host}:{self.port} ({exc}); "
                          "is another server running there? (--http-port, --no-http)") from None
        self.port = sock.getsockname()[1]
        # log_config=None: uvicorn leaves the process logging (text or json) as the CLI set it.
        config = uvicorn.Config(self.api.app, log_config=None, log_level="warning", access_log=False,
                                lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not self._server.started:
            raise OSError(f"the HTTP front end did not start on {self.host}:{self.port}")
        return self

    def stop(self) -> None:
        """Close the listener and end open connections (call after the engine drained)."""
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
