"""Content-addressed adapter store: `data_dir/store/<digest>/<files>`.

Why content-addressed: a registered version must keep serving the exact bytes
it was validated with, whatever happens to the source directory afterwards
(deleted, overwritten, re-trained in place); and two names registering the
same files share one copy.

Crash safety comes from the order of operations (see `AdapterRegistry`):
files are written into `data_dir/tmp/<random>/`, fsynced, the directory is
renamed to `store/<digest>` (atomic on one filesystem, which is why tmp/ sits
beside store/), and only then is the catalogue row committed. A crash at any
point leaves a temp dir or an unreferenced store dir, never a row without
files; `gc()` at open removes both.

Digest definition (stable, documented so other tools can recompute it):
sha256 over the UTF-8 lines `"{name}\\0{size}\\0{sha256(file) hex}\\n"` of the
files serving reads (`DIGESTED_FILES`: adapter_config.json,
adapter_model.safetensors and, when present, chat_template.jinja), sorted by name, so an
adapter without a chat template keeps the digest it always had. A README.md or metadata file is stored
beside them but is not part of the identity: registering the same served files
with another README is the same content. Versions registered before this rule
carry the digest over every stored file (`every_file=True`); both verify.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qlora_serve.adapters.layout import CHAT_TEMPLATE_FILE
from qlora_serve.adapters.peft_format import CONFIG_FILE, WEIGHTS_FILE
from qlora_serve.errors import InvalidArgument

log = logging.getLogger(__name__)

STORE_DIR = "store"
TMP_DIR = "tmp"
COPY_CHUNK_BYTES = 1 << 20  # 1 MiB: large enough for throughput, small enough to bound memory
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
DIGESTED_FILES = (CONFIG_FILE, WEIGHTS_FILE, CHAT_TEMPLATE_FILE)  # what serving reads: an adapter's identity


def manifest_digest(files: dict[str, tuple[int, str]], *, every_file: bool = False) -> str:
    """The adapter digest from {file name: (size in bytes, sha256 hex)}: over the
    `DIGESTED_FILES` among them, or over all of them with `every_file` (the rule
    before the digest covered only served files)."""
    h = hashlib.sha256()
    for name in sorted(files):
        if not every_file and name not in DIGESTED_FILES:
            continue
        size, sha = files[name]
        h.update(f"{name}\0{size}\0{sha}\n".encode())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    """Make a rename/create inside `path` durable (POSIX needs the dir fsynced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_stream(src, dst, hasher) -> int:
    """Copy file object `src` to `dst`, updating `hasher`; return bytes copied."""
    total = 0
    while chunk := src.read(COPY_CHUNK_BYTES):
        hasher.update(chunk)
        dst.write(chunk)
        total += len(chunk)
    return total


@dataclass
class StagedAdapter:
    """Files being written in a private temp dir, not yet in the store.

    `files` maps file name -> (size in bytes, sha256 hex)."""

    dir: Path
    files: dict[str, tuple[int, str]] = field(default_factory=dict)

    @property
    def digest(self) -> str:
        return manifest_digest(self.files)

    @property
    def size_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


class ContentStore:
    """The on-disk half of the registry. Not locked: `AdapterRegistry` serializes
    `commit`, `remove` and `gc` under its lock; staging runs unlocked (each stage
    has its own temp dir)."""

    def __init__(self, data_dir: Path):
        self.root = Path(data_dir) / STORE_DIR
        self.tmp = Path(data_dir) / TMP_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest

    # -- staging -------------------------------------------------------------

    def new_stage(self) -> StagedAdapter:
        return StagedAdapter(dir=Path(tempfile.mkdtemp(prefix="stage-", dir=self.tmp)))

    def stage_copy(self, staged: StagedAdapter, name: str, src: Path) -> None:
        """Copy regular file `src` into the stage as `name` (hashing and fsyncing it).

        Opens with O_NOFOLLOW|O_NONBLOCK and re-checks the type on the open file,
        so a file swapped for a symlink or FIFO after the path checks is refused
        instead of followed or blocked on."""
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(src, flags)
        except OSError as exc:
            raise InvalidArgument(f"{src} cannot be read: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as fin:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise InvalidArgument(f"{src} is not a regular file")
            hasher = hashlib.sha256()
            with open(staged.dir / name, "wb") as fout:
                size = _copy_stream(fin, fout, hasher)
                fout.flush()
                os.fsync(fout.fileno())
        staged.files[name] = (size, hasher.hexdigest())

    def stage_bytes(self, staged: StagedAdapter, name: str, data: bytes) -> None:
        """Write uploaded bytes into the stage as `name` (fsynced)."""
        with open(staged.dir / name, "wb") as fout:
            fout.write(data)
            fout.flush()
            os.fsync(fout.fileno())
        staged.files[name] = (len(data), hashlib.sha256(data).hexdigest())

    def discard(self, staged: StagedAdapter) -> None:
        shutil.rmtree(staged.dir, ignore_errors=True)

    # -- store (caller holds the registry lock) ------------------------------

    def commit(self, staged: StagedAdapter) -> Path:
        """Move the stage to `store/<digest>` atomically and return that path.
        If the digest is already stored intact, the stage is discarded instead."""
        digest = staged.digest
        final = self.path(digest)
        if final.exists():
            if self.digest_of(final) == digest:
                self.discard(staged)
                return final
            log.warning("store dir %s does not match its digest; replacing it", final)
            self.remove(digest)
        _fsync_dir(staged.dir)
        os.replace(staged.dir, final)
        _fsync_dir(self.root)
        return final

    def size_of(self, digest: str) -> int:
        """Total bytes of the files in `store/<digest>`: what a record of that digest
        serves and a download sends. Not the stage's size: a stage of an already
        stored digest may carry another README or metadata file, and is discarded."""
        return sum(p.stat().st_size for p in self.path(digest).iterdir())

    def digest_of(self, directory: Path, *, every_file: bool = False) -> str:
        """Re-hash the files in `directory` into its digest (used by verify and commit)."""
        files: dict[str, tuple[int, str]] = {}
        for path in sorted(directory.iterdir()):
            hasher = hashlib.sha256()
            with open(path, "rb") as f:
                size = _copy_stream(f, _NullWriter(), hasher)
            files[path.name] = (size, hasher.hexdigest())
        return manifest_digest(files, every_file=every_file)

    def remove(self, digest: str) -> None:
        """Delete `store/<digest>`. Renamed into tmp/ first so a crash mid-delete
        never leaves a half-deleted dir under a digest name (tmp/ is GC'd)."""
        src = self.path(digest)
        if not src.exists():
            return
        trash = Path(tempfile.mkdtemp(prefix="trash-", dir=self.tmp))
        os.replace(src, trash / digest)
        _fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def gc(self, referenced: set[str]) -> list[str]:
        """Remove everything in tmp/ and every store dir whose digest is not in
        `referenced`. Only call when no registration is in flight (at open, or
        under the registry lock for `remove`-style sweeps). Returns what went."""
        removed: list[str] = []
        for entry in self.tmp.iterdir():
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
            removed.append(f"{TMP_DIR}/{entry.name}")
        for entry in self.root.iterdir():
            if DIGEST_RE.match(entry.name) and entry.name not in referenced:
                self.remove(entry.name)
                removed.append(f"{STORE_DIR}/{entry.name}")
        if removed:
            log.info("adapter store GC removed %d leftover entries: %s", len(removed), removed)
        return removed


class _NullWriter:
    def write(self, _chunk: bytes) -> None:
        pass
