"""Training data files -> tokenized examples with per-token labels.

Files: JSONL (one object per line), JSONL.gz (gzip detected by its magic bytes), a
JSON array of objects, CSV (`.csv`, the header row names the keys), and, with the
optional `datasets` library, Parquet (`.parquet`) and `save_to_disk` folders. Record
formats (all records of a file in the same format; `--format` names it, else it is
detected from the keys, and a record whose keys fit two formats is refused):

- `{"text": "..."}`: loss on every token.
- `{"prompt": "...", "completion": "..."}`: loss only on the completion. Prompt and
  completion are tokenized separately and concatenated, so the prompt's tokens are
  exactly those `tokenizer(prompt)` gives at inference time.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: loss only on assistant turns.
  With a tokenizer chat template each turn is the difference between the template
  rendered up to that turn and up to the previous one; without a template the plain
  format is `"{role}: {content}\\n"` per non-assistant turn and `"assistant: "` (no
  loss) + content + eos (loss) per assistant turn.
- alpaca `{"instruction", "input" (optional), "output"}`: the messages
  `[user: instruction + "\\n\\n" + input, assistant: output]`.
- sharegpt `{"conversations": [{"from": "human"|"gpt"|"system"|..., "value"}]}`:
  messages with roles human -> user, gpt -> assistant.

The first piece is encoded as serving encodes a prompt (`encode_prefix`: with the
tokenizer's bos, never a doubled one). `train_on_inputs` puts loss on every token.

Every example ends with the eos token and the eos token's label is kept, so the
model learns to stop. Everything here runs before the model is loaded, so bad data
fails in seconds with the line number.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.errors import InvalidArgument, clip

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


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
    # Per data file of the run (training/mixing.py): path, sha256, format, counts, share.
    sources: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels}

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def file_digest(path: Path) -> str:
    """sha256 hex digest of a file's bytes (of a folder: its files' relative paths and bytes, sorted)."""
    h = hashlib.sha256()
    files = sorted(p for p in Path(path).rglob("*") if p.is_file()) if Path(path).is_dir() else [Path(path)]
    for f in files:
        if f != Path(path):
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


FORMATS = ("auto", "text", "prompt_completion", "messages", "alpaca", "sharegpt")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                   "system": "system", "tool": "tool"}
# Keys that identify each record format (auto-detection needs exactly one match).
_FORMAT_KEYS = {"messages": ("messages",), "sharegpt": ("conversations",), "alpaca": ("instruction", "output"),
                "prompt_completion": ("prompt", "completion"), "text": ("text",)}


def read_jsonl(path: str | Path, fmt: str = "auto") -> tuple[str, list[tuple[int, dict]]]:
    """Parse and check a data file; return (format name, [(line number, record)]).

    The file is JSONL (optionally gzip-compressed, detected by its magic bytes), a
    JSON array of objects (first character `[`), or CSV (`.csv`, header row = keys).
    `fmt` is one of FORMATS; "auto" detects it from the first record's keys.
    alpaca and sharegpt records are returned converted to the messages format.
    Raises InvalidArgument naming the file and 1-based line number of the first bad line.
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise InvalidArgument(f"format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    if path.is_dir():
        if not _is_saved_dataset(path):
            raise InvalidArgument(f"data {path} is a directory; pass a JSONL, JSON, JSONL.gz, CSV or Parquet file, "
                                  "or a Hugging Face save_to_disk folder")
        rows = _arrow_records(path)
    elif not path.is_file():
        raise InvalidArgument(f"data file {path} does not exist")
    else:
        rows = _arrow_records(path) if path.suffix.lower() == ".parquet" else _raw_records(path)
    records: list[tuple[int, dict]] = []
    detected: str | None = None if fmt == "auto" else fmt
    for lineno, obj in rows:
        if not isinstance(obj, dict):
            raise InvalidArgument(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        line_fmt = _detect_format(obj, path, lineno) if detected is None or fmt == "auto" else detected
        record = _normalise(line_fmt, obj, path, lineno)  # the record's own errors first
        if detected is None:
            detected = line_fmt
        elif line_fmt != detected:
            raise InvalidArgument(f"{path}:{lineno}: format {line_fmt!r} differs from the file's first record ({detected!r}); use one format per file")
        records.append((lineno, record))
    if not records:
        raise InvalidArgument(f"{path}: the dataset is empty (no records); nothing to train on")
    return ("messages" if detected in ("alpaca", "sharegpt") else detected), records


def _is_saved_dataset(path: Path) -> bool:
    return any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _arrow_records(path: Path):
    """Yield (1-based row number, record) of a Parquet file or a `datasets` save_to_disk
    folder (a DatasetDict's "train" split), read with the optional `datasets` library."""
    try:
        import datasets
    except ImportError:
        split = "['train']" if (path / "dataset_dict.json").is_file() else ""
        export = (f"datasets.load_from_disk('{path}'){split}" if path.is_dir()
                  else f"datasets.Dataset.from_parquet('{path}')")
        raise InvalidArgument(f"data {path} is Arrow/Parquet data, which needs the `datasets` library "
                              f"(pip install 'qlora-serve[data]'); or export it as JSONL: "
                              f"python -c \"import datasets; {export}.to_json('train.jsonl')\"") from None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise InvalidArgument(f"data {path} is a DatasetDict without a 'train' split "
                                          f"(splits: {', '.join(ds)}); save the split to train on")
                ds = ds["train"]
        else:
            ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    except InvalidArgument:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt or foreign files are data errors
        raise InvalidArgument(f"data {path} cannot be read as a dataset: {type(exc).__name__}: {exc}") from None
    yield from enumerate(ds, start=1)


def _open_binary(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _decode(raw: bytes, path: Path, lineno: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                              "save the file as UTF-8 (gzip-compressed is fine)") from None


def _raw_records(path: Path):
    """Yield (1-based line/row number, parsed value) of a JSONL / JSON array / CSV file."""
    try:
        with _open_binary(path) as fh:
            if path.name.lower().removesuffix(".gz").endswith(".csv"):
                reader = csv.DictReader(_decode(raw, path, i) for i, raw in enumerate(fh, start=1))
                for row in reader:
                    yield reader.line_num, {k: v for k, v in row.items() if k is not None}
                return
            lines = enumerate(fh, start=1)
            for lineno, raw in lines:
                line = _decode(raw, path, lineno)
                if not line.strip():
                    continue  # blank lines (e.g. a trailing newline) carry nothing
                if line.lstrip().startswith("["):  # a JSON array of records
                    text = line + "".join(_decode(r, path, n) for n, r in lines)
                    try:
                        array = json.loads(text)
                    except json.JSONDecodeError as exc:
                        raise InvalidArgument(f"{path}: not a valid JSON array ({exc.msg} at line "
                                              f"{exc.lineno + lineno - 1} column {exc.colno})") from None
                    except RecursionError:
                        raise InvalidArgument(f"{path}: the JSON is nested too deeply") from None
                    yield from ((i, obj) for i, obj in enumerate(array, start=1))
                    return
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                except RecursionError:  # json recurses per nesting level: deep nesting is bad input, not a crash
                    raise InvalidArgument(f"{path}:{lineno}: the JSON is nested too deeply; a record is one flat "
                                          "object of strings (or a messages list)") from None
                yield lineno, obj
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InvalidArgument(f"{path}: cannot be read: {exc}") from None
    except csv.Error as exc:
        raise InvalidArgument(f"{path}: not valid CSV: {exc}") from None


def _detect_format(obj: dict, path: Path, lineno: int) -> str:
    found = [f for f, keys in _FORMAT_KEYS.items() if any(k in obj for k in keys)]
    if len(found) > 1:
        raise InvalidArgument(f"{path}:{lineno}: the record's keys {clip(sorted(obj))} fit formats {found}; "
                              f"pass --format to say which one")
    if not found:
        raise InvalidArgument(
            f"{path}:{lineno}: unknown record with keys {clip(sorted(obj))}; expected {{\"text\"}}, {{\"prompt\", \"completion\"}}, "
            f"{{\"messages\"}}, alpaca {{\"instruction\", \"input\", \"output\"}} or sharegpt {{\"conversations\"}}"
        )
    return found[0]


def _normalise(fmt: str, obj: dict, path: Path, lineno: int) -> dict:
    """Check a record of format `fmt`; alpaca / sharegpt come back as {"messages": [...]}."""
    if fmt == "alpaca":
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise InvalidArgument(f"{path}:{lineno}: alpaca format needs a non-empty string {key!r}")
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise InvalidArgument(f"{path}:{lineno}: alpaca 'input' must be a string")
        user = obj["instruction"] + ("\n\n" + extra if extra else "")
        obj = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": obj["output"]}]}
        fmt = "messages"
    elif fmt == "sharegpt":
        conv = obj.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise InvalidArgument(f"{path}:{lineno}: 'conversations' must be a non-empty list")
        msgs = []
        for i, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or turn.get("from") not in _SHAREGPT_ROLES:
                raise InvalidArgument(f"{path}:{lineno}: conversations[{i}] must be {{\"from\": one of "
                                      f"{sorted(_SHAREGPT_ROLES)}, \"value\": string}}")
            msgs.append({"role": _SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        obj = {"messages": msgs}
        fmt = "messages"
    if fmt == "messages":
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise InvalidArgument(f"{path}:{lineno}: 'messages' must be a non-empty list")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidArgument(f"{path}:{lineno}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InvalidArgument(f"{path}:{lineno}: 'messages' has no assistant turn, so there is nothing to learn")
    elif fmt == "prompt_completion":
        for key in ("prompt", "completion"):
            if not isinstance(obj.get(key), str):
                raise InvalidArgument(f"{path}:{lineno}: '{key}' must be a string (prompt/completion format needs both)")
        if not obj["completion"]:
            raise InvalidArgument(f"{path}:{lineno}: 'completion' is empty, so there is nothing to learn")
    elif fmt == "text":
        if not isinstance(obj.get("text"), str) or not obj["text"]:
            raise InvalidArgument(f"{path}:{lineno}: 'text' must be a non-empty string")
    return obj


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


def encode_prefix(tokenizer, text: str) -> list[int]:
    """Token ids of the start of a sequence, as serving encodes a prompt: with the
    tokenizer's special tokens (bos), unless `text` already begins with the bos token
    (a chat template that writes it itself), so there is never a doubled bos."""
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def tokenize_records(fmt: str, records: list[tuple[int, dict]], tokenizer, max_seq_len: int, path: Path,
                     train_on_inputs: bool = False) -> tuple[list[Example], int, int]:
    """Tokenize records into Examples ending in a trained eos; truncate to max_seq_len.
    `train_on_inputs`: loss on prompt / user tokens too (default: completions / assistant turns only).

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
            # Special tokens (bos) only at the start, exactly as serving encodes a prompt.
            piece = encode_prefix(tokenizer, text) if i == 0 else tokenizer(text, add_special_tokens=False)["input_ids"]
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
        if train_on_inputs:
            labels = list(ids)
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


def load_dataset(path: str | Path, tokenizer, max_seq_len: int, fmt: str = "auto", train_on_inputs: bool = False) -> Dataset:
    """Read, check and tokenize a data file (see the module docstring for formats)."""
    path = Path(path)
    fmt, records = read_jsonl(path, fmt)
    examples, cut_ex, cut_tok = tokenize_records(fmt, records, tokenizer, max_seq_len, path, train_on_inputs)
    return Dataset(
        path=path,
        format=fmt,
        examples=examples,
        digest=file_digest(path),
        truncated_examples=cut_ex,
        truncated_tokens=cut_tok,
        label_tokens=sum(sum(1 for x in e.labels if x != IGNORE_INDEX) for e in examples),
    )
