"""Registry writes that reach an engine replica, forwarded to the registry server it follows.

A Ray Serve replica with `config.registry_address` (server/ray_services.py) answers
RegisterAdapter, UploadAdapter, SetAlias and DeleteAdapter by forwarding the call to
that `qlora-serve serve --role registry` server over gRPC:

- the request bytes as received (the registry parses them: a malformed one is its own
  INVALID_ARGUMENT), UploadAdapter's stream message by message as the client sends it;
- the caller's credentials exactly as received (`authorization` / `x-api-key`), never
  the replica's service key: the registry checks the caller's rights and tenancy;
- its answer unchanged: the message, or the status code, details and trailing metadata
  (Ray 2.60's proxy passes code and details of an error on, not its trailing metadata).
  Only a registry that cannot be reached at all gets a message of ours (UNAVAILABLE).

Ray's proxy does not pass the caller's deadline to the replica; it cancels the replica's
call when the caller leaves or its deadline passes, and that cancels the forwarded call.
Each forwarded call is bounded here as well (_UNARY_TIMEOUT_S, _UPLOAD_TIMEOUT_S).
After a write succeeds, the names it changed are dropped from this replica's registry
cache at once (`invalidate`), so its next request sees the write; other replicas see it
when the registry's change stream reaches them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Iterable
from typing import Any

import grpc
from google.protobuf.message_factory import GetMessageClass

from qlora_serve.errors import MAX_MESSAGE_CHARS, clip
from qlora_serve.v1 import registry_pb2

log = logging.getLogger(__name__)

_SERVICE = registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistry"]
FORWARDED = ("RegisterAdapter", "UploadAdapter", "SetAlias", "DeleteAdapter")
CREDENTIALS = ("authorization", "x-api-key")  # the metadata keys a caller's API key travels in
_UNARY_TIMEOUT_S = 120.0  # RegisterAdapter reads and hashes a directory on the registry's disk
_UPLOAD_TIMEOUT_S = 600.0  # an upload streams the adapter's files through the proxy


class Forwarded(Exception):
    """The registry's non-OK answer: relay `code`, `details` and `trailers` unchanged."""

    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple = ()) -> None:
        super().__init__(details)
        self.code, self.details, self.trailers = code, details, trailers


def credentials(metadata: Iterable[tuple[str, Any]]) -> tuple[tuple[str, Any], ...]:
    """The caller's API-key metadata, in the order received (nothing else is forwarded)."""
    return tuple((k, v) for k, v in metadata if k.lower() in CREDENTIALS)


def raw_bytes(msg) -> bytes:
    """A request as Ray's proxy hands it over (bytes, or a message) as its wire bytes."""
    return msg if isinstance(msg, bytes) else msg.SerializeToString()


class RegistryForwarder:
    """Forwards registry writes to the registry server at `address` (host:port).
    registry: the replica's RemoteRegistry (its cache is invalidated after a write), or None.
    max_message_bytes: the largest message either way, bytes."""

    def __init__(self, address: str, *, registry=None, max_message_bytes: int = 8 << 20) -> None:
        self.address = address
        self._registry = registry
        self._channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", max_message_bytes),
                                                                ("grpc.max_send_message_length", max_message_bytes)])
        self._calls = {}
        for name in FORWARDED:
            m = _SERVICE.methods_by_name[name]
            factory = self._channel.stream_unary if m.client_streaming else self._channel.unary_unary
            # No request serializer: the bytes the caller sent go out unchanged.
            self._calls[name] = factory(f"/{_SERVICE.full_name}/{name}", request_serializer=None,
                                        response_deserializer=GetMessageClass(m.output_type).FromString)

    def close(self) -> None:
        self._channel.close()

    async def forward(self, method: str, request, metadata: Iterable[tuple[str, Any]]):
        """Forward one call; returns the registry's response message or raises Forwarded.
        request: the request bytes (or message), for UploadAdapter an async iterator of them.
        metadata: the caller's invocation metadata (only its credentials go on)."""
        loop = asyncio.get_running_loop()
        streaming = _SERVICE.methods_by_name[method].client_streaming
        pending: list = []  # the stream's next message being awaited for gRPC's sending thread
        if streaming:
            request = self._pull(request, loop, pending)
        else:
            request = raw_bytes(request)
        call = self._calls[method].future(request, metadata=credentials(metadata),
                                          timeout=_UPLOAD_TIMEOUT_S if streaming else _UNARY_TIMEOUT_S)
        done = loop.create_future()

        def finished(_call) -> None:  # on a gRPC thread
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

        call.add_done_callback(finished)
        try:
            await done
        except asyncio.CancelledError:  # the caller left (or its deadline passed at the proxy)
            call.cancel()
            for fut in pending:  # unblock the sending thread
                fut.cancel()
            raise
        try:
            response = call.result()
        except grpc.RpcError as exc:
            raise self._relayed(exc) from None
        self._written(method, response)
        return response

    @staticmethod
    def _pull(stream, loop: asyncio.AbstractEventLoop, pending: list):
        """The async request stream as an iterator gRPC's sending thread consumes, one
        message at a time from the event loop (the caller's pace: nothing is buffered).
        pending: holds the future of the message awaited, so a cancel can end the wait."""
        it = stream.__aiter__()
        while True:
            fut = asyncio.run_coroutine_threadsafe(it.__anext__(), loop)
            pending[:] = [fut]
            try:
                msg = fut.result(_UPLOAD_TIMEOUT_S)
            except (StopAsyncIteration, concurrent.futures.CancelledError):
                return
            yield raw_bytes(msg)

    def _relayed(self, exc: grpc.RpcError) -> Forwarded:
        code, details = exc.code(), exc.details() or ""
        trailers = tuple((k, v) for k, v in (exc.trailing_metadata() or ()) if not k.endswith("-bin"))
        if code == grpc.StatusCode.UNAVAILABLE and details.lower().startswith("failed to connect"):
            log.warning("registry write not forwarded: the adapter registry at %s is unreachable: %s",
                        self.address, details)
            details = f"the adapter registry at {self.address} is unreachable; retry when it is up"
        return Forwarded(code, clip(details, MAX_MESSAGE_CHARS), trailers)

    def _written(self, method: str, response) -> None:
        """Drop the changed names from this replica's cache (the change event does so later)."""
        if self._registry is None:
            return
        infos = list(response.deleted) if method == "DeleteAdapter" else [response]
        for info in infos:
            self._registry.invalidate(info.name)
            if method in ("RegisterAdapter", "UploadAdapter"):
                self._registry.mark_usable(info.digest)  # registered again: its next load verifies it again


__all__ = ["CREDENTIALS", "FORWARDED", "Forwarded", "RegistryForwarder", "credentials", "raw_bytes"]
