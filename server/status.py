"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from qlora_serve import errors
from qlora_serve.server.requests import CODE_NAMES, code_name

log = logging.getLogger(__name__)

# The transport-neutral table (server/requests.py) as gRPC codes: one mapping, two forms.
CODES: dict[type[errors.QloraServeError], grpc.StatusCode] = {
    cls: grpc.StatusCode[name] for cls, name in CODE_NAMES.items()}


# A client deadline reaches the server as a cancellation that may arrive a little before
# the server's own copy of it expires: the timeout travels relative and starts here later.
DEADLINE_SKEW_S = 0.1


def deadline_passed(context: grpc.ServicerContext | None) -> bool:
    """Whether the call's client deadline has passed (within DEADLINE_SKEW_S). A call
    that ends then ended by its deadline: DEADLINE_EXCEEDED, never CANCELLED."""
    remaining = context.time_remaining() if context is not None else None
    return remaining is not None and remaining <= DEADLINE_SKEW_S


def code_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for an exception; anything not a domain error is INTERNAL."""
    return grpc.StatusCode[code_name(exc)]


def public_message(exc: BaseException, request_id: str = "") -> str:
    """The status message a caller sees: a domain error's own (bounded) message, else
    a generic one naming the request id (the fault itself is logged here)."""
    if isinstance(exc, errors.QloraServeError):
        # The net under errors.clip: a message past 8 KiB would be refused by gRPC itself.
        return errors.clip(str(exc), errors.MAX_MESSAGE_CHARS)
    log.error("unexpected error in request %s", request_id or "-", exc_info=exc)
    return f"internal error ({type(exc).__name__}); report request id {request_id or '-'}"


def abort(context: grpc.ServicerContext, exc: BaseException, request_id: str = "") -> None:
    """End the RPC with the status for `exc` (raises, as context.abort does)."""
    code, message = code_for(exc), public_message(exc, request_id)
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:  # machine-readable retry hint (also in the message)
        context.set_trailing_metadata((("retry-after", str(retry_after)),))
    context.abort(code, message)
