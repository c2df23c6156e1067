"""What the engine is asked to do, and what it answers, for one generation request."""

from __future__ import annotations

import math
import queue
from dataclasses import dataclass, field
from enum import Enum

from qlora_serve.errors import InvalidArgument

# Temperatures below this sample greedily: dividing logits by a tiny positive
# temperature (down to 1.4e-45, the smallest float32) overflows to inf and the
# softmax to NaN, and any temperature this small is argmax in effect anyway.
GREEDY_TEMPERATURE = 1e-5


class FinishReason(str, Enum):
    """Why a sequence stopped; mirrors qlora_serve.v1.FinishReason."""

    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters, validated at construction.

    temperature: 0 = greedy (argmax); > 0 divides the logits; below GREEDY_TEMPERATURE (1e-5) is greedy.
    top_p: nucleus mass in (0, 1]; 1 = off.   top_k: 0 = off.
    seed: None = nondeterministic.   max_new_tokens: >= 1.   stop: strings that end generation.
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InvalidArgument(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidArgument(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(s == "" for s in self.stop):
            raise InvalidArgument("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class AdapterHandle:
    """A resolved adapter version: `key` (its sha256 digest) identifies the weights
    in device slots and the host cache; `path` is its directory in the store."""

    name: str
    version: int
    key: str
    path: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class TokenEvent:
    """Tokens sampled since the last event and the text they completed (maybe "")."""

    token_ids: list[int]
    text: str


@dataclass
class FinalEvent:
    """The request finished normally. `text` is the whole output, `tail` the text
    not yet sent in a TokenEvent (held back while it might start a stop string)."""

    finish_reason: FinishReason
    token_ids: list[int]
    text: str
    tail: str
    prompt_tokens: int


@dataclass
class ErrorEvent:
    """The request ended with a domain error (deadline, cancel, load failure, fault)."""

    error: Exception


@dataclass
class Request:
    """One generation request as the engine sees it. The engine thread is the only
    writer of the mutable fields; `events` is how answers reach the handler thread."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterHandle | None
    tenant: str = ""
    deadline: float | None = None  # time.monotonic() seconds; None = no deadline
    arrival: float = 0.0  # time.monotonic() seconds
    events: "queue.SimpleQueue[TokenEvent | FinalEvent | ErrorEvent]" = field(default_factory=queue.SimpleQueue)

    @property
    def adapter_key(self) -> str | None:
        return self.adapter.key if self.adapter else None
