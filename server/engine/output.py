"""Output: what a row's sampled tokens become for its client.

Each sampled token is detokenized incrementally (stop strings held back until they
can no longer match), sent as a TokenEvent with its logprobs when asked for, and
checked against the finish rules (stop token, eos, stop string, length); a row
that finishes gets its FinalEvent. A row whose sampling or forward pass failed gets
an ErrorEvent naming its request id. Engine thread only.
"""

from __future__ import annotations

import logging
import time

from qlora_serve.server.engine.detokenizer import IncrementalDetokenizer
from qlora_serve.server.engine.loader import LoadedBase
from qlora_serve.server.engine.request import ErrorEvent, FinalEvent, FinishReason, Request, TokenEvent
from qlora_serve.server.engine.scheduler import Row, internal_error

log = logging.getLogger(__name__)


class OutputProcessor:
    """Turns sampled tokens into events on each request's queue."""

    def __init__(self, base: LoadedBase, metrics=None) -> None:
        self.base = base  # tokenizer and eos ids; the engine replaces it with the runner's
        self.metrics = metrics

    def detokenizer(self, req: Request) -> IncrementalDetokenizer:
        """A fresh detokenizer for a row of `req` (its stop strings)."""
        return IncrementalDetokenizer(self.base.tokenizer, req.params.stop)

    def emit(self, rows: list[Row], picked: tuple[list[int | Exception], list]) -> list[Row]:
        """Send each row's new token (picked: tokens or per-row errors, and logprobs).
        Returns the rows that received a token (for fairness charging)."""
        now, served = time.monotonic(), []
        for row, tok, lp in zip(rows, *picked):
            if row.done:
                continue
            if isinstance(tok, Exception):  # this row's sampling failed; the others go on
                log.error("sampling failed for request %s: %r", row.request.request_id, tok)
                row.request.events.put(ErrorEvent(internal_error(row.request, tok, "sampling")))
                row.done = True
                continue
            row.generated.append(tok)
            # A stop token ends the text as a stop string does: its own text is not returned.
            text = "" if tok in row.request.params.stop_token_ids else row.detok.add(tok)
            if row.first_token_at is None:
                row.first_token_at = now
                if self.metrics:
                    self.metrics.observe_ttft(now - row.request.arrival)
            if lp is not None:
                row.logprobs.append(lp)
            row.request.events.put(TokenEvent([tok], text, None if lp is None else [lp]))
            served.append(row)
            reason = self.finish_reason(row, tok)
            if reason is not None:
                tail = row.detok.flush()
                if row.detok.stopped:
                    reason = FinishReason.STOP
                row.request.events.put(FinalEvent(reason, list(row.generated), row.detok.text, tail,
                                                  len(row.request.prompt_ids), row.logprobs or None))
                row.done = True
        return served

    def finish_reason(self, row: Row, tok: int) -> FinishReason | None:
        """Why the row ends after `tok`, or None while it goes on."""
        if tok in row.request.params.stop_token_ids:
            return FinishReason.STOP
        if tok in self.base.eos_token_ids and not row.request.params.ignore_eos:
            return FinishReason.EOS
        if row.detok.stopped:
            return FinishReason.STOP
        if len(row.generated) >= row.request.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    @staticmethod
    def fail(row: Row, err: Exception) -> None:
        """Answer `err` to a row not yet answered; it leaves at the next retire."""
        if not row.done:
            row.request.events.put(ErrorEvent(err))
            row.done = True
