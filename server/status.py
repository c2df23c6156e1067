"""The one place where domain errors become gRPC status codes."""

from __future__ import annotations

import logging

import grpc

from qlora_serve import errors

log = logging.getLogger(__name__)

CODES: dict[type[errors.QloraServeError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.Internal: grpc.StatusCode.INTERNAL,
}


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
    for cls in type(exc).__mro__:
        if cls in CODES:
            return CODES[cls]
    return grpc.StatusCode.INTERNAL


def abort(context: grpc.ServicerContext, exc: BaseException, request_id: str = "") -> None:
    """End the RPC with the status for `exc` (raises, as context.abort does)."""
    code = code_for(exc)
    if isinstance(exc, errors.QloraServeError):
        # The net under errors.clip: a message past 8 KiB would be refused by gRPC itself.
        message = errors.clip(str(exc), errors.MAX_MESSAGE_CHARS)
    else:
        log.error("unexpected error in request %s", request_id or "-", exc_info=exc)
        message = f"internal error ({type(exc).__name__}); report request id {request_id or '-'}"
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:  # machine-readable retry hint (also in the message)
        context.set_trailing_metadata((("retry-after", str(retry_after)),))
    context.abort(code, message)
