"""The adapter registry: a SQLite catalogue of versioned, validated LoRA adapters
over a content-addressed store (`adapters/store.py`); file names in `adapters/layout.py`.

Layout under `data_dir`:
    registry.sqlite3 (+ -wal, -shm)   the catalogue, WAL mode, synchronous=FULL
    registry.lock                     flock held while a registry is open
    store/<sha256>/                   the adapter files, immutable once there
    tmp/                              staging and trash; emptied on open

Semantics (the servicer and CLI rely on these):
- Versions are 1, 2, ... per name and are never reused, even after a delete,
  so "name@3" always means the same bytes (or nothing).
- A ref is "name", "name@<int>", "name@latest" or "name@<alias>". Plain "name"
  serves the version the alias "default" points at, else the highest version.
  Rollback = `set_alias(name, "default", older)`. "latest" is reserved (always
  the highest version) and cannot be set. Alias names start with a letter, so
  they never look like a version number.
- Registering the same files (same digest: adapter_config.json and
  adapter_model.safetensors, see `store.py`) again under the same name returns
  the existing record instead of a new version (safe client retries); its
  owner/labels are not changed. The same files under another name is a new
  record sharing the stored copy.
- A name belongs to the owner of its existing versions: registering a new
  version with a different owner raises AlreadyExists. `owner=None` (or "")
  means public.
- Deleting a version removes the aliases that point at it (a deleted "default"
  makes plain "name" fall back to the highest remaining version); store files
  no other version references are removed after the transaction commits.
- Every refusal raises a `qlora_serve.errors` error before the
  catalogue or the store changes.

Base fingerprint policy: an adapter may declare the base it was trained on in
`adapter_config.json` under `FINGERPRINT_KEY` (our trainer writes it, value
from `adapters.fingerprint.base_fingerprint`). A declared fingerprint that
differs from the server's is refused (FailedPrecondition) unless the registry
was built with `allow_fingerprint_mismatch=True`. An adapter that declares none
(any PEFT adapter from elsewhere) is accepted: absence is not a mismatch, and
`base_model_name_or_path` is ignored because it is a free-form path or hub id
that differs between machines for the same base; the module name/shape check
(`check_fits_base`) still refuses adapters for another architecture. The
record stores the declared fingerprint, else the server's at registration, and
`verify()` refuses a record whose fingerprint is not the running base's (e.g.
after restarting on another base) unless mismatches are allowed.

Thread safety: one sqlite3 connection (check_same_thread=False) and the store
mutations are serialized by one `threading.RLock`. The slow part of a
registration (copying, hashing, parsing tensors, validating) runs outside the
lock, so concurrent registrations overlap; only the final store rename + row
insert is serialized. One process per data_dir: the constructor takes an
exclusive flock and raises FailedPrecondition if another registry holds it.

Adapter health: the registry owns which digests failed `verify()` (their stored files
are corrupt or unreadable): `unusable_reason(digest)`, under a lock of its own.

Files: the schema and the catalogue queries are in `catalogue.py` (`Catalogue`, the
base class); this module adds registration, deletion, verification and health.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from qlora_serve.adapters.catalogue import _COLUMNS, DB_FILE, DEFAULT_ALIAS, LIST_HINT, Catalogue
from qlora_serve.adapters.changes import ALIAS_SET, DELETED, REGISTERED, ChangeLog
from qlora_serve.adapters.health import HealthMarks
from qlora_serve.adapters.layout import (  # noqa: F401 (FINGERPRINT_KEY, METADATA_FILE: re-exported)
    ADAPTER_FILES,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    FINGERPRINT_KEY,
    METADATA_FILE,
    PICKLE_WEIGHTS,
    REQUIRED_FILES,
    WEIGHTS_FILE,
)
from qlora_serve.adapters.paths import real_roots, resolve_adapter_dir, resolve_adapter_file
from qlora_serve.adapters.peft_format import check_fits_base, load_lora_adapter
from qlora_serve.adapters.records import AdapterRecord, _validate_labels, _validate_owner, validate_name
from qlora_serve.adapters.store import DIGEST_RE, ContentStore, StagedAdapter
from qlora_serve.chat_render import MAX_TEMPLATE_BYTES, check_template_renders
from qlora_serve.errors import FailedPrecondition, InvalidArgument, NotFound, QloraServeError, ResourceExhausted, clip_repr

log = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_BYTES = 256 << 20  # 256 MiB


def _check_chat_template_file(path: Path) -> None:
    """An adapter's chat template is read as UTF-8 text on chat requests: refuse one that cannot be."""
    raw = path.read_bytes()
    if len(raw) > MAX_TEMPLATE_BYTES or not raw.strip():
        raise InvalidArgument(f"{path} must hold a chat template of 1 to {MAX_TEMPLATE_BYTES} bytes, "
                              f"has {len(raw)}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    check_template_renders(text, str(path))


class AdapterRegistry(Catalogue, HealthMarks):
    """The catalogue + store. See the module docstring for semantics.

    data_dir: where registry.sqlite3, store/ and tmp/ live (created if absent).
    base_fingerprint: the running base's `base_fingerprint(...)`.
    linear_shapes: base module name -> (in_features, out_features) of its Linear layers.
    max_rank: the largest LoRA rank the engine serves (--max-lora-rank).
    allowed_roots: directories `register_path` may read from; empty = path registration off.
    allow_fingerprint_mismatch: accept adapters declaring another base.
    max_upload_bytes: total size limit of one `register_files` upload, bytes.
    compute_dtype: the dtype the server computes in (torch dtype; None = float32): weights
        and scaled deltas that overflow it are refused at registration.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        *,
        base_fingerprint: str,
        linear_shapes: Mapping[str, tuple[int, int]],
        max_rank: int,
        allowed_roots: Sequence[str | os.PathLike] = (),
        allow_fingerprint_mismatch: bool = False,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        compute_dtype=None,
        read_only: bool = False,
    ):
        self.data_dir = Path(data_dir)
        self.read_only = read_only
        self.base_fingerprint = base_fingerprint
        self.linear_shapes = {k: tuple(v) for k, v in linear_shapes.items()}
        self.max_rank = max_rank
        self.allowed_roots = real_roots(allowed_roots)
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self.max_upload_bytes = max_upload_bytes
        self.compute_dtype = compute_dtype
        self._lock = threading.RLock()
        self.changes = ChangeLog()  # what watchers (engine replicas) replay; appended under _lock
        HealthMarks.__init__(self)  # digests whose stored files failed `verify`
        if read_only:  # a reader beside the one writer (which holds the lock): see _open_reader
            self._lock_fd = None
            self._conn = self._open_reader()
            self._store = ContentStore(self.data_dir)
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_dir_lock()
        try:
            self._conn = sqlite3.connect(self.data_dir / DB_FILE, check_same_thread=False, isolation_level=None)
            self._init_db()
            self._store = ContentStore(self.data_dir)
            # Nothing can be in flight yet, so every tmp entry and unreferenced
            # store dir is a leftover of a crash (or of a failed delete).
            self._store.gc(self._referenced_digests())
            self._repair_sizes()
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database": a corrupted catalogue
            self.close()
            raise FailedPrecondition(
                f"{self.data_dir / DB_FILE} cannot be read as the adapter registry ({exc}); restore it from a "
                "backup, or start with a new --data-dir and register the adapters again (keep this directory: "
                "its store/ holds the adapter files)") from None
        except BaseException:
            self.close()
            raise
    def __enter__(self) -> "AdapterRegistry":
        return self

    # -- registration --------------------------------------------------------

    def register_path(
        self,
        name: str,
        path: str | os.PathLike,
        *,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
        set_default: bool = False,
        source: str = "local",
        trusted: bool = False,
    ) -> AdapterRecord:
        """Register a new version of `name` from a directory on this machine.

        The directory and every file read from it must realpath inside
        `allowed_roots` (PermissionDenied otherwise). `trusted=True` skips that
        containment check and is ONLY for operator-supplied start-up flags
        (`--adapter NAME=PATH`, with source="startup"), never for request input.
        Copies adapter_config.json, adapter_model.safetensors and the optional
        files into the store. `set_default=True` also points "default" at the
        result, in the same transaction.
        """
        validate_name(name)
        shown = os.fspath(path)
        if trusted:
            src_dir = Path(os.path.realpath(shown))
            if not src_dir.is_dir():
                raise InvalidArgument(f"adapter path {shown!r} is not a directory; pass the folder that holds {CONFIG_FILE} and {WEIGHTS_FILE}")
        else:
            src_dir = resolve_adapter_dir(shown, self.allowed_roots)
        roots = None if trusted else self.allowed_roots
        present = [f for f in ADAPTER_FILES if os.path.lexists(src_dir / f)]
        files = {f: resolve_adapter_file(src_dir, f, roots) for f in present}
        if any(f not in files for f in REQUIRED_FILES):
            # Raises the precise message (missing config, pickle weights, ...)
            # naming the source directory; reads only the small config file.
            load_lora_adapter(src_dir, max_rank=self.max_rank)
            raise InvalidArgument(f"{shown} needs {CONFIG_FILE} and {WEIGHTS_FILE}")

        def fill(staged: StagedAdapter) -> None:
            for fname, real in files.items():
                self._store.stage_copy(staged, fname, real)

        return self._register(name, fill, shown=shown, source=source, owner=owner, labels=labels, set_default=set_default)

    def register_files(
        self,
        name: str,
        files: Mapping[str, bytes],
        *,
        owner: str | None = None,
        labels: Mapping[str, str] | None = None,
        set_default: bool = False,
        source: str = "upload",
    ) -> AdapterRecord:
        """Register a new version of `name` from uploaded file contents
        {file name: bytes}. Accepted names: ADAPTER_FILES.
        Over `max_upload_bytes` in total -> ResourceExhausted (checked before
        anything is written; a streaming servicer should also stop reading at
        the limit)."""
        validate_name(name)
        allowed = ADAPTER_FILES
        for fname, data in files.items():
            if fname in PICKLE_WEIGHTS:
                raise InvalidArgument(
                    f"{fname} is a pickle checkpoint, which can run code when loaded and is refused; convert it: "
                    f"PeftModel.from_pretrained(base, dir).save_pretrained(out_dir, safe_serialization=True) and upload {WEIGHTS_FILE}"
                )
            if fname not in allowed:
                raise InvalidArgument(f"uploaded file {clip_repr(fname)} is not accepted; upload only {', '.join(allowed)}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise InvalidArgument(f"uploaded file {clip_repr(fname)} must be bytes")
        total = sum(len(data) for data in files.values())
        if total > self.max_upload_bytes:
            raise ResourceExhausted(
                f"upload of {total} bytes exceeds the server's limit of {self.max_upload_bytes} bytes; "
                f"raise --max-upload-bytes or register from a server-side path under an allowed root"
            )
        missing = [f for f in REQUIRED_FILES if f not in files]
        if missing:
            raise InvalidArgument(f"upload is missing {', '.join(missing)}; a PEFT adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")

        def fill(staged: StagedAdapter) -> None:
            for fname, data in files.items():
                self._store.stage_bytes(staged, fname, bytes(data))

        return self._register(name, fill, shown=f"upload:{name}", source=source, owner=owner, labels=labels, set_default=set_default)

    def _register(
        self,
        name: str,
        fill: Callable[[StagedAdapter], None],
        *,
        shown: str,
        source: str,
        owner: str | None,
        labels: Mapping[str, str] | None,
        set_default: bool,
    ) -> AdapterRecord:
        owner = _validate_owner(owner)
        labels = _validate_labels(labels)
        self._check_owner(name, owner)  # early, cheap; repeated under the lock below
        staged = self._store.new_stage()
        committed = False
        try:
            fill(staged)
            fingerprint, adapter = self._validate_staged(staged, shown)
            digest = staged.digest
            with self._lock:
                self._check_owner(name, owner)
                same = self._query(f"SELECT {_COLUMNS} FROM adapters WHERE name=? AND digest=? ORDER BY version LIMIT 1", (name, digest))
                if same:
                    version = same[0][1]
                    # Record and aliases read under this lock hold: a delete racing this
                    # registration lands before or after it, never between (no NOT_FOUND).
                    record = self.set_alias(name, DEFAULT_ALIAS, version) if set_default else self.get(name, version)
                    self.mark_usable(digest)
                    return record  # set_alias logged its change; nothing else changed
                self._store.commit(staged)
                committed = True
                size = self._store.size_of(digest)  # the stored copy's (kept if already there), not this stage's
                record = AdapterRecord(
                    name=name, version=0, digest=digest, source=source, base_fingerprint=fingerprint,
                    rank=adapter.rank, alpha=adapter.alpha, target_modules=tuple(adapter.target_modules),
                    size_bytes=size, created_at=time.time(), owner=owner, labels=labels,
                    path=self._store.path(digest),
                )
                try:
                    with self._tx() as conn:
                        # A corrupt stored copy that commit replaced may differ in README: same size for all.
                        conn.execute("UPDATE adapters SET size_bytes=? WHERE digest=?", (size, digest))
                        record = self._insert_version(conn, record)
                        if set_default:
                            conn.execute("INSERT OR REPLACE INTO aliases (name, alias, version) VALUES (?, ?, ?)", (name, DEFAULT_ALIAS, record.version))
                            record = AdapterRecord(**{**record.__dict__, "aliases": (DEFAULT_ALIAS,)})
                except BaseException:
                    # The row did not land: drop the store dir unless another row uses it.
                    if digest not in self._referenced_digests():
                        self._store.remove(digest)
                    raise
                self._changed(REGISTERED, name, version=record.version, digest=digest)
                if set_default:
                    self._changed(ALIAS_SET, name, version=record.version, alias=DEFAULT_ALIAS)
                self.mark_usable(digest)
                log.info("registered adapter %s (digest %s, %d bytes)", record.ref, digest[:12], record.size_bytes)
                return record
        finally:
            if not committed:
                self._store.discard(staged)

    def _validate_staged(self, staged: StagedAdapter, shown: str):
        """Validate exactly the bytes that will be stored (no check-then-copy race).
        Messages name `shown` (the caller's path), not the private temp dir."""
        try:
            adapter = load_lora_adapter(staged.dir, max_rank=self.max_rank, dtype=self.compute_dtype)
            meta = {}
            if METADATA_FILE in staged.files:
                try:
                    meta = json.loads((staged.dir / METADATA_FILE).read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InvalidArgument(f"{staged.dir / METADATA_FILE} is not valid JSON: {exc}") from None
                except RecursionError:
                    raise InvalidArgument(f"{staged.dir / METADATA_FILE}: the JSON is nested too deeply") from None
                if not isinstance(meta, dict):
                    raise InvalidArgument(f"{staged.dir / METADATA_FILE} must hold a JSON object")
            # Our trainer writes the fingerprint to the metadata file (adapter_config.json
            # stays exactly PEFT's); adapters trained before that carry it in the config.
            declared = adapter.config.base_fingerprint
            fingerprint = self._check_fingerprint(meta.get("base_fingerprint") if declared is None else declared, shown)
            check_fits_base(adapter, self.linear_shapes)
            if CHAT_TEMPLATE_FILE in staged.files:
                _check_chat_template_file(staged.dir / CHAT_TEMPLATE_FILE)
        except QloraServeError as exc:
            raise type(exc)(str(exc).replace(str(staged.dir), shown)) from None
        return fingerprint, adapter

    def _check_fingerprint(self, claimed, shown: str) -> str:
        """The fingerprint to record for an adapter declaring `claimed` (None = none)."""
        if claimed is None:
            return self.base_fingerprint  # absence is not a mismatch (see module docstring)
        if not isinstance(claimed, str) or not claimed:
            raise InvalidArgument(f"{shown}/{CONFIG_FILE}: {FINGERPRINT_KEY} must be a non-empty string, got {claimed!r}")
        if claimed != self.base_fingerprint:
            if not self.allow_fingerprint_mismatch:
                raise FailedPrecondition(
                    f"{shown} was trained on base {claimed} but this server runs base {self.base_fingerprint}; "
                    f"register it on a server running that base, or start with --allow-fingerprint-mismatch to accept it anyway"
                )
            log.warning("%s declares base %s, server runs %s: accepted (mismatch allowed)", shown, claimed, self.base_fingerprint)
        return claimed
    # -- delete / verify -----------------------------------------------------

    def delete(self, name: str, version: int | None = None) -> list[AdapterRecord]:
        """Delete one version (or all when None) and the aliases pointing at it;
        return the deleted records. Store files no remaining record uses are
        removed after the transaction commits (a crash in between leaves them
        to the GC at the next open)."""
        with self._lock:
            victims = [self.get(name, version)] if version is not None else self.list(name=validate_name(name))
            if not victims:
                raise self._not_found(name)
            with self._tx() as conn:
                for rec in victims:
                    conn.execute("DELETE FROM aliases WHERE name=? AND version=?", (rec.name, rec.version))
                    conn.execute("DELETE FROM adapters WHERE name=? AND version=?", (rec.name, rec.version))
            referenced = self._referenced_digests()
            for rec in victims:
                self._changed(DELETED, rec.name, version=rec.version, digest=rec.digest,
                              digest_gone=rec.digest not in referenced)
            for digest in {rec.digest for rec in victims} - referenced:
                self.mark_usable(digest)
                try:
                    self._store.remove(digest)
                except OSError as exc:  # the rows are gone; the next open's GC retries
                    log.warning("could not remove store dir %s: %s", digest, exc)
            log.info("deleted adapter versions %s", [rec.ref for rec in victims])
            return victims

    def stored_path(self, digest: str) -> Path:
        """The store directory of `digest` (what engine servers download); NotFound when
        no registered version uses it, InvalidArgument when it is not a sha256 hex digest."""
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise InvalidArgument(f"digest {clip_repr(digest)} is invalid: give the 64 lowercase hex digits of AdapterInfo.digest")
        if not self._query("SELECT 1 FROM adapters WHERE digest=? LIMIT 1", (digest,)):
            raise NotFound(f"no registered adapter version has digest {digest[:12]}...; {LIST_HINT}")
        return self._store.path(digest)

    # -- adapter health (marks: HealthMarks) ---------------------------------

    def _verify(self, record: AdapterRecord) -> None:
        """For `verify`: the store files re-hash to the record's digest, and its base
        fingerprint is the running base's."""
        self.check_base(record)
        try:
            actual = self._store.digest_of(record.path)
            if actual != record.digest and self._store.digest_of(record.path, every_file=True) == record.digest:
                actual = record.digest  # registered when the digest covered every stored file
        except OSError as exc:
            raise FailedPrecondition(
                f"adapter {record.ref}: its files in {record.path} cannot be read ({exc.strerror or exc}); "
                f"delete this version and register it again"
            ) from None
        if actual != record.digest:
            raise FailedPrecondition(
                f"adapter {record.ref}: the files in {record.path} are corrupt (sha256 {actual[:12]}..., "
                f"expected {record.digest[:12]}...); delete this version and register it again"
            )
