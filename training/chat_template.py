"""`chat_template`: a Jinja chat template used for messages / alpaca / sharegpt
records instead of the tokenizer's own, checked before the model loads and saved
with the adapter so that serving can render exactly what training rendered.

The value is a path to a template file, or the template text itself when it holds
`{{` or `{%` (Jinja syntax, which no file name needs). The adapter directory gets
it as `chat_template.jinja`, the file name transformers' `save_pretrained` writes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from qlora_serve.chat_render import MAX_TEMPLATE_BYTES, render_bounded
from qlora_serve.errors import InvalidArgument, clip

TEMPLATE_FILE = "chat_template.jinja"
# Rendered once before training: a template that fails here would fail on every record.
_SAMPLE = [{"role": "user", "content": "sample question 1"}, {"role": "assistant", "content": "sample answer 2"}]


def is_inline(value: str) -> bool:
    """True when `value` is the template text itself rather than a file path."""
    return "{{" in value or "{%" in value


def read_chat_template(value: str) -> tuple[str, str]:
    """(template text, where it came from: the file path or "inline"). InvalidArgument
    when the file is missing, too large or not UTF-8."""
    if is_inline(value):
        if len(value.encode("utf-8")) > MAX_TEMPLATE_BYTES:
            raise InvalidArgument(f"chat_template (inline text) has over {MAX_TEMPLATE_BYTES} bytes; "
                                  "a chat template is a few KiB")
        return value, "inline"
    path = Path(value)
    if not path.is_file():
        raise InvalidArgument(f"chat_template file {clip(value)} does not exist (a value containing '{{{{' or "
                              "'{%' is read as the template text itself)")
    size = path.stat().st_size
    if size > MAX_TEMPLATE_BYTES:
        raise InvalidArgument(f"chat_template file {path} has {size} bytes; a chat template is at most "
                              f"{MAX_TEMPLATE_BYTES} (is it the right file?)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"chat_template file {path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                              f"at offset {exc.start})") from None
    if not text.strip():
        raise InvalidArgument(f"chat_template file {path} is empty")
    return text, str(path)


def check_chat_template(text: str, tokenizer, source: str) -> None:
    """Render a sample conversation (user, assistant) with `text`, and a user turn with
    the generation prompt; InvalidArgument naming `source` and the Jinja error (with
    its line) when it fails, exceeds the renderer's bounds (time, sizes), or when the
    output leaves out the messages' content."""
    shown = "(inline text)" if source == "inline" else f"file {clip(source)}"
    # A tenant's template (a job's runs in the server): rendered within the bounds of
    # qlora_serve.chat_render, as the adapter's serving will render it.
    tokens = dict(tokenizer.special_tokens_map)
    try:
        full = render_bounded(text, messages=_SAMPLE, tools=None, documents=None, add_generation_prompt=False,
                              **tokens)
        render_bounded(text, messages=_SAMPLE[:1], tools=None, documents=None, add_generation_prompt=True, **tokens)
    except Exception as exc:  # noqa: BLE001 - TemplateSyntaxError, UndefinedError, raise_exception(...)
        line = getattr(exc, "lineno", None)
        where = f" (template line {line})" if line else ""
        raise InvalidArgument(f"chat_template {shown} does not render a sample conversation{where}: "
                              f"{type(exc).__name__}: {clip(exc)}") from None
    missing = [m["content"] for m in _SAMPLE if m["content"] not in str(full)]
    if missing:
        raise InvalidArgument(f"chat_template {shown} leaves the messages' content out of its output "
                              f"(rendered {clip(repr(full), 200)}); it must write each message's "
                              "message['content']")


def use_chat_template(value: str | None, tokenizer) -> dict[str, Any] | None:
    """Install the template `value` names on `tokenizer` (after checking it) and return
    what the metadata records ({"source", "sha256"}); None (tokenizer unchanged) when unset."""
    if value is None:
        return None
    text, source = read_chat_template(value)
    check_chat_template(text, tokenizer, source)
    tokenizer.chat_template = text
    return template_record(value, tokenizer)


def check_job_chat_template(value: str, tokenizer) -> None:
    """A server job's `chat_template` (checked at submit): only the template text, since
    a path would read a file of the server's; rendered like a local run's."""
    if not is_inline(value):
        raise InvalidArgument("config_toml: a job's chat_template is the template text itself (a value with "
                              "'{{' or '{%'), not a path: a path would name a file on the server")
    check_chat_template(value, tokenizer, "inline")


def template_record(value: str | None, tokenizer) -> dict[str, Any] | None:
    """The metadata's `chat_template` entry of a run whose tokenizer `use_chat_template`
    set up: {"source": path or "inline", "sha256": of the text}; None when unset."""
    if value is None:
        return None
    return {"source": "inline" if is_inline(value) else value, "sha256": template_digest(tokenizer.chat_template)}


def template_digest(text: str) -> str:
    """sha256 hex digest of the template's UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_chat_template(out_dir: Path, text: str | None) -> Path:
    """Write `text` as OUT/chat_template.jinja (beside the adapter files). None removes
    the file an earlier run into OUT may have left: it would be registered, and served,
    with an adapter not trained on it."""
    path = Path(out_dir) / TEMPLATE_FILE
    if text is None:
        path.unlink(missing_ok=True)
        return path
    tmp = path.with_suffix(".jinja.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
