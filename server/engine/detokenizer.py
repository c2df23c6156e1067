"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE (a character can span
tokens), so we decode a sliding window and emit only text that is stable (the
approach of TGI/vLLM). Text that could still become a stop string is held back.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, honouring stop strings."""

    tokenizer: object
    stop: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # all stable text so far (before stop truncation)
    _prefix_offset: int = 0
    _read_offset: int = 0
    _sent: int = 0  # characters of `text` already handed out
    stopped: bool = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Append one token; return the text now safe to send (may be "")."""
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
        full = self._decode(self.token_ids[self._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.token_ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            cut = self._stop_index()
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
                return self._take(len(self.text))
            # Hold back the longest suffix that is a prefix of some stop string.
            hold = 0
            for s in self.stop:
                for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:n]):
                        hold = max(hold, n)
                        break
            return self._take(len(self.text) - hold)
        return self._take(len(self.text))

    def _stop_index(self) -> int | None:
        # Only the newest text can complete a stop string: search just past what was sent.
        start = max(0, self._sent - max(len(s) for s in self.stop))
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        return min(hits) if hits else None

    def _take(self, upto: int) -> str:
        upto = max(upto, self._sent)
        delta = self.text[self._sent:upto]
        self._sent = upto
        return delta

    def flush(self) -> str:
        """At the end: everything not yet sent (held-back text that never became a stop)."""
        if not self.stopped:
            tail = self._decode(self.token_ids[self._prefix_offset:])
            already = self._decode(self.token_ids[self._prefix_offset:self._read_offset])
            if len(tail) > len(already):
                self.text += tail[len(already):]
                self._prefix_offset = self._read_offset = len(self.token_ids)
            cut = self._stop_index() if self.stop else None
            if cut is not None:
                self.stopped = True
                self.text = self.text[:cut]
        return self._take(len(self.text))
