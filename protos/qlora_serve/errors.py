"""Domain errors. Code below the API raises these; `server/status.py` maps each
kind to exactly one gRPC status code, so handlers never build statuses themselves.

Every message must say what to fix, not only what went wrong.
"""

from __future__ import annotations


class QloraServeError(Exception):
    """Base class for every error the product reports to a caller."""


class InvalidArgument(QloraServeError):
    """The request (or a file it names) is malformed: fix the input. -> INVALID_ARGUMENT"""


class NotFound(QloraServeError):
    """A named thing (adapter, version, job) does not exist. -> NOT_FOUND"""


class AlreadyExists(QloraServeError):
    """Creating something that exists and may not be overwritten. -> ALREADY_EXISTS"""


class FailedPrecondition(QloraServeError):
    """Valid request, but the system is not in a state to do it. -> FAILED_PRECONDITION"""


class ResourceExhausted(QloraServeError):
    """A limit (queue, quota, KV budget, size) is reached; retrying later may work. -> RESOURCE_EXHAUSTED"""


class QueueFull(ResourceExhausted):
    """The engine's waiting queue is full (--max-waiting). -> RESOURCE_EXHAUSTED"""

    reason = "queue_full"  # the qlora_rejections_total label


class Unauthenticated(QloraServeError):
    """No or unknown credentials. -> UNAUTHENTICATED"""


class PermissionDenied(QloraServeError):
    """Known caller without the right to do this. -> PERMISSION_DENIED"""


class Unavailable(QloraServeError):
    """The server is loading or draining; retry elsewhere or later. -> UNAVAILABLE"""


class DeadlineExceeded(QloraServeError):
    """The request's deadline passed before it finished. -> DEADLINE_EXCEEDED"""


class Cancelled(QloraServeError):
    """The client went away. -> CANCELLED"""


class Internal(QloraServeError):
    """A bug or fault inside the server; the message carries a request id to report. -> INTERNAL"""


# Longest caller input a message repeats (characters). gRPC carries the message in
# a header, and headers over 8 KiB are refused ("metadata size exceeds soft limit")
# instead of reporting the real error; 200 characters still identify the input.
CLIP_CHARS = 200
# Bound on a whole status message (characters), the net under CLIP_CHARS.
MAX_MESSAGE_CHARS = 2000


def clip(text: object, limit: int = CLIP_CHARS) -> str:
    """`text` (str() of it) cut to at most `limit` characters plus a marker saying how
    many were left out: for caller input echoed in an error message."""
    text = text if isinstance(text, str) else str(text)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def clip_repr(value: object, limit: int = CLIP_CHARS) -> str:
    """repr(value) for an error message, cut like `clip` (the repr of a 10 KiB string stays short)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}...[{len(value) - limit} more characters]"
    return clip(repr(value), limit)
