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
MAX_TOP_LOGPROBS = 20  # OpenAI's bound for chat top_logprobs; vLLM's default max_logprobs is 20 too


class FinishReason(str, Enum):
    """Why a sequence stopped; mirrors qlora_serve.v1.FinishReason."""

    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding parameters, validated at construction (InvalidArgument
    names the field and its range). Names and semantics follow OpenAI / vLLM.

    temperature: 0 = greedy (argmax); > 0 divides the logits; below GREEDY_TEMPERATURE (1e-5) is greedy.
    top_p: nucleus mass in (0, 1]; 1 = off.   top_k: 0 = off.   min_p: in [0, 1], 0 = off; drops
    tokens whose probability is below min_p x that of the most likely token.
    seed: None = nondeterministic.   max_new_tokens: >= 1.   stop: strings that end generation.
    presence_penalty, frequency_penalty: in [-2, 2], 0 = off (OpenAI): subtract
    presence x [token was generated] + frequency x (times generated) from its logit.
    repetition_penalty: > 0, 1 = off (HF / vLLM): a token seen in prompt or output has
    its logit divided by it when positive, multiplied when negative.
    stop_token_ids: generating one ends the request (finish STOP; the token is in
    token_ids, its text is not).   ignore_eos: eos does not end the request.
    min_tokens: eos and stop_token_ids cannot be generated before this many tokens.
    logprobs: report each generated token's log-probability; top_logprobs: and the
    k (0..20) most likely alternatives (needs logprobs).
    """

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        # Any iterable of ids is accepted (a list from JSON, a repeated proto field).
        object.__setattr__(self, "stop_token_ids", frozenset(int(t) for t in self.stop_token_ids))
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:  # also refuses NaN
                raise InvalidArgument(f"{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise InvalidArgument(f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidArgument("stop_token_ids must be >= 0")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidArgument(
                f"min_tokens must be in [0, max_new_tokens ({self.max_new_tokens})], got {self.min_tokens}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs and not self.logprobs:
            raise InvalidArgument("top_logprobs needs logprobs set to true")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether any of presence / frequency / repetition penalty is on."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Refuse token ids the model cannot produce (InvalidArgument)."""
        bad = next((t for t in sorted(self.stop_token_ids) if t >= vocab_size), None)
        if bad is not None:
            raise InvalidArgument(f"stop_token_ids contains {bad}, outside the vocabulary (size {vocab_size})")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (raw float32 log-softmax
    of its logits, before temperature, penalties or truncation, as vLLM reports by
    default) and the `top` most likely (token_id, logprob) pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class AdapterHandle:
    """A resolved adapter version: `digest` (the sha256 of its files) identifies the
    weights in device slots and the host cache; `path` is its directory in the store."""

    name: str
    version: int
    digest: str
    path: str

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass
class TokenEvent:
    """Tokens sampled since the last event and the text they completed (maybe "")."""

    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs


@dataclass
class FinalEvent:
    """The request finished normally. `text` is the whole output, `tail` the text
    not yet sent in a TokenEvent (held back while it might start a stop string)."""

    finish_reason: FinishReason
    token_ids: list[int]
    text: str
    tail: str
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for logprobs


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
    def adapter_digest(self) -> str | None:
        return self.adapter.digest if self.adapter else None
