"""JSONL training data -> tokenized examples with per-token labels.

Formats (one JSON object per line, all lines of a file in the same format):

- `{"text": "..."}`: loss on every token.
- `{"prompt": "...", "completion": "..."}`: loss only on the completion. Prompt and
  completion are tokenized separately and concatenated, so the prompt's tokens are
  exactly those `tokenizer(prompt)` gives at inference time.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: loss only on assistant turns.
  With a tokenizer chat template each turn is the difference between the template
  rendered up to that turn and up to the previous one; without a template the plain
  format is `"{role}: {content}\\n"` per non-assistant turn and `"assistant: "` (no
  loss) + content + eos (loss) per assistant turn.

Every example ends with the eos token and the eos token's label is kept, so the
model learns to stop. Everything here runs before the model is loaded, so bad data
fails in seconds with the line number.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.errors import InvalidArgument, clip

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips
_FORMATS = {"text": ("text",), "prompt_completion": ("prompt", "completion"), "messages": ("messages",)}


@dataclass
class Example:
    """One tokenized example: `labels[i]` is `input_ids[i]` or IGNORE_INDEX (no loss there)."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class Dataset:
    """Tokenized examples plus what the run records about them (torch map-style dataset)."""

    path: Path
    format: str
    examples: list[Example]
    digest: str  # sha256 of the file bytes
    truncated_examples: int = 0
    truncated_tokens: int = 0
    label_tokens: int = field(default=0)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_jsonl(path: str | Path) -> tuple[str, list[tuple[int, dict]]]:
    """Parse and check a JSONL file; return (format name, [(line number, record)]).

    Raises InvalidArgument naming the file and 1-based line number of the first bad line.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgument(f"data file {path} does not exist")
    records: list[tuple[int, dict]] = []
    fmt: str | None = None
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) carry nothing
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:  # json recurses per nesting level: deep nesting is bad input, not a crash
                raise InvalidArgument(f"{path}:{lineno}: the JSON is nested too deeply; a record is one flat "
                                      "object of strings (or a messages list)") from None
            if not isinstance(obj, dict):
                raise InvalidArgument(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            line_fmt = _detect_format(obj, path, lineno)
            if fmt is None:
                fmt = line_fmt
            elif line_fmt != fmt:
                raise InvalidArgument(f"{path}:{lineno}: format {line_fmt!r} differs from the file's first record ({fmt!r}); use one format per file")
            records.append((lineno, obj))
    if not records:
        raise InvalidArgument(f"{path}: the dataset is empty (no JSON lines); nothing to train on")
    return fmt, records


def _detect_format(obj: dict, path: Path, lineno: int) -> str:
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise InvalidArgument(f"{path}:{lineno}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"{path}:{lineno}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InvalidArgument(f"{path}:{lineno}: 'messages' has no assistant turn, so there is nothing to learn")
        return "messages"
    if "prompt" in obj or "completion" in obj:
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise InvalidArgument(f"{path}:{lineno}: '{key}' must be a string (prompt/completion format needs both)")
        if not obj["completion"]:
            raise InvalidArgument(f"{path}:{lineno}: 'completion' is empty, so there is nothing to learn")
        return "prompt_completion"
    if "text" in obj:
        if not isinstance(obj["text"], str) or not obj["text"]:
            raise InvalidArgument(f"{path}:{lineno}: 'text' must be a non-empty string")
        return "text"
    raise InvalidArgument(
        f"{path}:{lineno}: unknown record with keys {clip(sorted(obj))}; expected {{\"text\"}}, "
        f"{{\"prompt\", \"completion\"}} or {{\"messages\"}}"
    )


def _segments(fmt: str, obj: dict, tokenizer) -> list[tuple[str, bool]]:
    """Split a record into (text, trained?) pieces, in order."""
    if fmt == "text":
        return [(obj["text"], True)]
    if fmt == "prompt_completion":
        return [(obj["prompt"], False), (obj["completion"], True)]
    msgs = obj["messages"]
    if getattr(tokenizer, "chat_template", None):
        pieces, prev = [], ""
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                # The generation prompt ("<|assistant|>\n" etc.) is context, not a target.
                head = tokenizer.apply_chat_template(msgs[:i], tokenize=False, add_generation_prompt=True) if i else ""
                if not head.startswith(prev):
                    raise ValueError("the chat template does not render conversations prefix-consistently")
                pieces.append((head[len(prev):], False))
                prev = head
            full = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
            if not full.startswith(prev):
                raise ValueError("the chat template does not render conversations prefix-consistently")
            pieces.append((full[len(prev):], m["role"] == "assistant"))
            prev = full
        return [(t, trained) for t, trained in pieces if t]
    pieces = []
    for m in msgs:
        if m["role"] == "assistant":
            pieces += [("assistant: ", False), (m["content"], True), ("\n", False)]
        else:
            pieces.append((f"{m['role']}: {m['content']}\n", False))
    if pieces[-1] == ("\n", False):
        pieces.pop()  # the conversation ends with the assistant's eos
    return pieces


def tokenize_records(fmt: str, records: list[tuple[int, dict]], tokenizer, max_seq_len: int, path: Path) -> tuple[list[Example], int, int]:
    """Tokenize records into Examples ending in a trained eos; truncate to max_seq_len.

    Returns (examples, truncated example count, truncated token count).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidArgument("the tokenizer has no eos token; the model could never learn to stop")
    uses_template = fmt == "messages" and bool(getattr(tokenizer, "chat_template", None))
    out: list[Example] = []
    cut_examples = cut_tokens = 0
    for lineno, obj in records:
        try:
            segments = _segments(fmt, obj, tokenizer)
        except Exception as exc:  # template errors (e.g. roles it rejects) are data errors
            raise InvalidArgument(f"{path}:{lineno}: the chat template failed on this conversation: {exc}") from None
        ids: list[int] = []
        labels: list[int] = []
        for i, (text, trained) in enumerate(segments):
            # Special tokens (bos) only at the start, and never when the template wrote them itself.
            piece = tokenizer(text, add_special_tokens=(i == 0 and not uses_template))["input_ids"]
            ids += piece
            labels += piece if trained else [IGNORE_INDEX] * len(piece)
        if fmt == "messages" and not uses_template:
            # plain format: each assistant turn ends in eos (trained), replacing the "\n" piece
            ids, labels = _plain_turn_eos(ids, labels, tokenizer, eos)
        if not ids or ids[-1] != eos:
            ids.append(eos)
            labels.append(eos)  # the eos label is kept: this is how the model learns to stop
        elif labels[-1] == IGNORE_INDEX:
            labels[-1] = eos
        if len(ids) > max_seq_len:
            cut_examples += 1
            cut_tokens += len(ids) - max_seq_len
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            raise InvalidArgument(
                f"{path}:{lineno}: after truncation to max_seq_len={max_seq_len} no trained token is left; "
                f"raise max_seq_len or shorten the prompt"
            )
        out.append(Example(input_ids=ids, labels=labels))
    return out, cut_examples, cut_tokens


def _plain_turn_eos(ids: list[int], labels: list[int], tokenizer, eos: int) -> tuple[list[int], list[int]]:
    """Insert a trained eos after every trained run (end of an assistant turn)."""
    new_ids, new_labels = [], []
    for i, (t, lab) in enumerate(zip(ids, labels)):
        new_ids.append(t)
        new_labels.append(lab)
        next_trained = i + 1 < len(labels) and labels[i + 1] != IGNORE_INDEX
        if lab != IGNORE_INDEX and not next_trained:
            new_ids.append(eos)
            new_labels.append(eos)
    return new_ids, new_labels


def load_dataset(path: str | Path, tokenizer, max_seq_len: int) -> Dataset:
    """Read, check and tokenize a JSONL file (see the module docstring for formats)."""
    path = Path(path)
    fmt, records = read_jsonl(path)
    examples, cut_ex, cut_tok = tokenize_records(fmt, records, tokenizer, max_seq_len, path)
    return Dataset(
        path=path,
        format=fmt,
        examples=examples,
        digest=file_digest(path),
        truncated_examples=cut_ex,
        truncated_tokens=cut_tok,
        label_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples),
    )
