"""Checks of `qlora-serve` command-line input that turn would-be tracebacks into
one-line messages (`qlora-serve: error: ...`, exit status 2)."""

from __future__ import annotations

import re
from pathlib import Path

from qlora_serve.adapters.layout import CONFIG_FILE, WEIGHTS_FILE

# C0 and C1 controls except tab and newline, DEL, and the bidi overrides/isolates
# that reorder what a terminal shows.
_TERMINAL_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


class CliError(Exception):
    """A mistake on the command line: printed as `qlora-serve: error: ...`, exit status 2."""


def local_adapter_dir(path: str) -> Path:
    """The local adapter directory to upload, or CliError saying what is wrong with `path`."""
    d = Path(path)
    if not d.exists():
        raise CliError(f"{path} does not exist; pass the local PEFT adapter directory ({CONFIG_FILE} + "
                       f"{WEIGHTS_FILE}), or --server-path for a directory on the server")
    if not d.is_dir():
        raise CliError(f"{path} is a file; pass the directory that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
    if not (d / CONFIG_FILE).is_file():
        raise CliError(f"{path} has no {CONFIG_FILE}; pass a PEFT adapter directory "
                       "(PeftModel.save_pretrained writes one)")
    return d


def check_utf8(args) -> None:
    """Refuse command-line text that is not UTF-8 (Python keeps such bytes as surrogates,
    which cannot be sent in a protobuf string) before any call, naming the argument."""
    skip = {"func", "path"} if not getattr(args, "server_path", False) else {"func"}  # an upload's path stays local
    for key, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for v in values:
            for text in (v if isinstance(v, tuple) else (v,)):
                if key in skip or not isinstance(text, str):
                    continue
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    shown = text.encode("utf-8", "backslashreplace").decode()[:80]
                    raise CliError(f"{key.replace('_', '-')} is not valid UTF-8 text ({shown!r}); the server takes "
                                   "UTF-8 only: check the terminal's encoding (locale) or the bytes passed") from None


def terminal_text(text: str) -> str:
    """`text` with control characters (all but newline and tab) written as escapes
    (ESC -> `\\x1b`), so model output cannot move the cursor, recolour or retitle the
    terminal. For terminal output only: `--json` prints the text unchanged (JSON-escaped)."""
    return _TERMINAL_UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
