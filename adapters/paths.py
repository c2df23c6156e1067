"""Allowed-roots containment for server-side adapter paths.

A client may ask the server to register "a directory on the server". Without
checks that is an arbitrary-file-read primitive, so (as vLLM's filesystem
resolver does) a path is accepted only when its *realpath* lies inside one of
the operator's allowed roots. Rules, each tested:

- a `..` component is refused outright, even if it would resolve inside a root
  (there is no legitimate need for it, and refusing is easier to reason about);
- relative paths are refused: the server's working directory means nothing to
  a remote client, so callers (the CLI) must send absolute paths;
- the directory's realpath must be inside a root (this catches absolute paths
  outside and symlinked directories that escape);
- every file we will read must itself realpath inside a root (this catches a
  symlinked `adapter_model.safetensors` pointing at e.g. /etc/shadow), and must
  be a regular file (a FIFO or /dev/zero would hang or never end).
Symlinks that stay inside a root are fine: the Hugging Face cache links
snapshot files to `../../blobs/<sha>` in the same cache tree.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path

from qlora_serve.errors import InvalidArgument, PermissionDenied, clip_repr


def _is_within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives (Windows) or mixed abs/rel
        return False


def real_roots(roots: Sequence[str | os.PathLike]) -> tuple[str, ...]:
    """The realpaths of `roots` (resolved once, when the registry is built)."""
    return tuple(os.path.realpath(os.fspath(r)) for r in roots)


def resolve_adapter_dir(path: str | os.PathLike, roots: Sequence[str]) -> Path:
    """Return the realpath of a client-named adapter directory, or raise.

    `roots` are realpaths (see `real_roots`). Raises PermissionDenied for `..`
    and for anything whose realpath is outside every root; InvalidArgument for
    an empty/relative path or one that is not a directory.
    """
    raw = os.fspath(path)
    if not raw or "\x00" in raw:
        raise InvalidArgument("adapter path is empty or contains a NUL byte; pass the absolute path of the adapter directory on the server")
    if ".." in Path(raw).parts:
        raise PermissionDenied(f"adapter path {clip_repr(raw)} contains '..', which is refused; pass the absolute path without '..'")
    if not os.path.isabs(raw):
        raise InvalidArgument(f"adapter path {clip_repr(raw)} is relative; pass an absolute path on the server (the CLI makes local paths absolute)")
    if not roots:
        raise PermissionDenied(
            "registering from a server path is disabled: no allowed adapter roots are configured; "
            "start the server with --allowed-adapter-root DIR, or upload the files instead"
        )
    real = os.path.realpath(raw)
    if not any(_is_within(real, root) for root in roots):
        raise PermissionDenied(
            f"adapter path {clip_repr(raw)} (resolves to {clip_repr(real)}) is outside the allowed adapter roots {list(roots)}; "
            f"copy the adapter under one of them or add a root with --allowed-adapter-root"
        )
    if not os.path.isdir(real):
        raise InvalidArgument(f"adapter path {clip_repr(raw)} is not a directory; pass the folder that holds adapter_config.json and adapter_model.safetensors")
    return Path(real)


def resolve_adapter_file(adapter_dir: Path, name: str, roots: Sequence[str] | None) -> Path:
    """Return the realpath of file `name` of `adapter_dir`, refusing symlinks that
    escape the roots (PermissionDenied) and non-regular files (InvalidArgument).
    `roots=None` skips containment (trusted operator paths)."""
    shown = adapter_dir / name
    real = os.path.realpath(shown)
    if roots is not None and not any(_is_within(real, root) for root in roots):
        raise PermissionDenied(
            f"{shown} is a symlink to {clip_repr(real)}, outside the allowed adapter roots {list(roots)}; "
            f"replace the link with a copy of the file"
        )
    try:
        st = os.stat(real)
    except OSError as exc:
        raise InvalidArgument(f"{shown} cannot be read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{shown} is not a regular file")
    return Path(real)
