"""The adapter registry: a SQLite catalogue of versioned, validated LoRA adapters
over a content-addressed store (`adapters/store.py`).

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
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from qlora_serve.adapters.layout import (  # noqa: F401 (FINGERPRINT_KEY, METADATA_FILE: re-exported)
    ADAPTER_FILES,
    CONFIG_FILE,
    FINGERPRINT_KEY,
    METADATA_FILE,
    PICKLE_WEIGHTS,
    REQUIRED_FILES,
    WEIGHTS_FILE,
)
from qlora_serve.adapters.paths import real_roots, resolve_adapter_dir, resolve_adapter_file
from qlora_serve.adapters.peft_format import check_fits_base, load_lora_adapter
from qlora_serve.adapters.records import (
    ALIAS_RE,
    AdapterRecord,
    _validate_labels,
    _validate_owner,
    parse_ref,
    validate_name,
)
from qlora_serve.adapters.store import ContentStore, StagedAdapter
from qlora_serve.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QloraServeError,
    ResourceExhausted,
    clip_repr,
)

log = logging.getLogger(__name__)

DB_FILE = "registry.sqlite3"
LOCK_FILE = "registry.lock"
SCHEMA_VERSION = 1
DEFAULT_ALIAS = "default"
LATEST = "latest"
DEFAULT_MAX_UPLOAD_BYTES = 256 << 20  # 256 MiB
LIST_HINT = "list adapters with `qlora-serve adapters list`"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS names (
    name         TEXT PRIMARY KEY,
    next_version INTEGER NOT NULL           -- never decreases: versions are not reused
);
CREATE TABLE IF NOT EXISTS adapters (
    name             TEXT    NOT NULL REFERENCES names(name),
    version          INTEGER NOT NULL,
    digest           TEXT    NOT NULL,      -- store/<digest>/
    source           TEXT    NOT NULL,
    base_fingerprint TEXT    NOT NULL,
    rank             INTEGER NOT NULL,
    alpha            REAL    NOT NULL,
    target_modules   TEXT    NOT NULL,      -- JSON list
    size_bytes       INTEGER NOT NULL,
    created_at       REAL    NOT NULL,      -- unix seconds
    owner            TEXT,                  -- NULL = public
    labels           TEXT    NOT NULL,      -- JSON object
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS adapters_digest ON adapters(digest);
CREATE TABLE IF NOT EXISTS aliases (
    name    TEXT    NOT NULL,
    alias   TEXT    NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (name, alias),
    FOREIGN KEY (name, version) REFERENCES adapters(name, version) ON DELETE CASCADE
);
"""
_COLUMNS = "name, version, digest, source, base_fingerprint, rank, alpha, target_modules, size_bytes, created_at, owner, labels"


class AdapterRegistry:
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
    ):
        self.data_dir = Path(data_dir)
        self.base_fingerprint = base_fingerprint
        self.linear_shapes = {k: tuple(v) for k, v in linear_shapes.items()}
        self.max_rank = max_rank
        self.allowed_roots = real_roots(allowed_roots)
        self.allow_fingerprint_mismatch = allow_fingerprint_mismatch
        self.max_upload_bytes = max_upload_bytes
        self.compute_dtype = compute_dtype
        self._lock = threading.RLock()
        # digest -> why its stored files failed `verify` (adapter health). Its own lock:
        # the engine's reader thread marks, gRPC threads read, without waiting on SQLite.
        self._unusable: dict[str, str] = {}
        self._health_lock = threading.Lock()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_fd = self._acquire_dir_lock()
        try:
            self._conn = sqlite3.connect(self.data_dir / DB_FILE, check_same_thread=False, isolation_level=None)
            self._init_db()
            self._store = ContentStore(self.data_dir)
            # Nothing can be in flight yet, so every tmp entry and unreferenced
            # store dir is a leftover of a crash (or of a failed delete).
            self._store.gc(self._referenced_digests())
        except sqlite3.DatabaseError as exc:  # e.g. "file is not a database": a corrupted catalogue
            self.close()
            raise FailedPrecondition(
                f"{self.data_dir / DB_FILE} cannot be read as the adapter registry ({exc}); restore it from a "
                "backup, or start with a new --data-dir and register the adapters again (keep this directory: "
                "its store/ holds the adapter files)") from None
        except BaseException:
            self.close()
            raise

    # -- lifecycle -----------------------------------------------------------

    def _acquire_dir_lock(self) -> int:
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FailedPrecondition(
                f"the adapter registry in {self.data_dir} is open in another process (or another registry object); "
                f"stop that server or use another --data-dir"
            ) from None
        return fd

    def _init_db(self) -> None:
        conn = self._conn
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise FailedPrecondition(f"{self.data_dir / DB_FILE}: SQLite refused WAL mode ({mode}); put --data-dir on a local filesystem")
        # FULL: a registration reported as done survives power loss, not only a crash.
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise FailedPrecondition(f"{self.data_dir / DB_FILE} has schema {version}, newer than this qlora-serve ({SCHEMA_VERSION}); upgrade qlora-serve")
        with self._tx():
            # Statement by statement: executescript() would COMMIT our transaction.
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        """Close the database and release the data_dir lock. Idempotent."""
        with self._lock:
            conn, self._conn = getattr(self, "_conn", None), None
            if conn is not None:
                conn.close()
            fd, self._lock_fd = getattr(self, "_lock_fd", None), None
            if fd is not None:
                os.close(fd)  # releases the flock

    def __enter__(self) -> "AdapterRegistry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any exception."""
        with self._lock:
            if self._conn is None:
                raise FailedPrecondition("the adapter registry is closed")
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the catalogue: one read transaction, and
        writers (which take the same lock) wait until it ends."""
        with self._lock:
            if self._conn is None:
                raise FailedPrecondition("the adapter registry is closed")
            if self._conn.in_transaction:  # already inside a write transaction: same state
                yield
                return
            self._conn.execute("BEGIN")
            try:
                yield
            finally:
                self._conn.execute("COMMIT")

    def _query(self, sql: str, args: Sequence = ()) -> list[tuple]:
        with self._lock:
            if self._conn is None:
                raise FailedPrecondition("the adapter registry is closed")
            return self._conn.execute(sql, args).fetchall()

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
                    return record
                self._store.commit(staged)
                committed = True
                record = AdapterRecord(
                    name=name, version=0, digest=digest, source=source, base_fingerprint=fingerprint,
                    rank=adapter.rank, alpha=adapter.alpha, target_modules=tuple(adapter.target_modules),
                    size_bytes=staged.size_bytes, created_at=time.time(), owner=owner, labels=labels,
                    path=self._store.path(digest),
                )
                try:
                    with self._tx() as conn:
                        record = self._insert_version(conn, record)
                        if set_default:
                            conn.execute("INSERT OR REPLACE INTO aliases (name, alias, version) VALUES (?, ?, ?)", (name, DEFAULT_ALIAS, record.version))
                            record = AdapterRecord(**{**record.__dict__, "aliases": (DEFAULT_ALIAS,)})
                except BaseException:
                    # The row did not land: drop the store dir unless another row uses it.
                    if digest not in self._referenced_digests():
                        self._store.remove(digest)
                    raise
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
            fingerprint = self._check_fingerprint(adapter.config.base_fingerprint, shown)
            check_fits_base(adapter, self.linear_shapes)
            if METADATA_FILE in staged.files:
                try:
                    meta = json.loads((staged.dir / METADATA_FILE).read_text())
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise InvalidArgument(f"{staged.dir / METADATA_FILE} is not valid JSON: {exc}") from None
                except RecursionError:
                    raise InvalidArgument(f"{staged.dir / METADATA_FILE}: the JSON is nested too deeply") from None
                if not isinstance(meta, dict):
                    raise InvalidArgument(f"{staged.dir / METADATA_FILE} must hold a JSON object")
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

    def _check_owner(self, name: str, owner: str | None) -> None:
        rows = self._query("SELECT DISTINCT owner FROM adapters WHERE name=?", (name,))
        if rows and any(r[0] != owner for r in rows):
            raise AlreadyExists(
                f"adapter name {name!r} already exists and belongs to {'the public namespace' if rows[0][0] is None else 'another owner'}; "
                f"choose another name"
            )

    def _insert_version(self, conn: sqlite3.Connection, record: AdapterRecord) -> AdapterRecord:
        """Allocate the next version of record.name and insert it (inside a transaction)."""
        conn.execute("INSERT OR IGNORE INTO names (name, next_version) VALUES (?, 1)", (record.name,))
        (version,) = conn.execute("SELECT next_version FROM names WHERE name=?", (record.name,)).fetchone()
        conn.execute("UPDATE names SET next_version=? WHERE name=?", (version + 1, record.name))
        conn.execute(
            f"INSERT INTO adapters ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (record.name, version, record.digest, record.source, record.base_fingerprint, record.rank, record.alpha,
             json.dumps(list(record.target_modules)), record.size_bytes, record.created_at, record.owner,
             json.dumps(record.labels, sort_keys=True)),
        )
        return AdapterRecord(**{**record.__dict__, "version": version})

    # -- lookup --------------------------------------------------------------

    def _row_to_record(self, row: tuple, aliases: Sequence[str] = ()) -> AdapterRecord:
        name, version, digest, source, fp, rank, alpha, targets, size, created, owner, labels = row
        return AdapterRecord(
            name=name, version=version, digest=digest, source=source, base_fingerprint=fp, rank=rank,
            alpha=alpha, target_modules=tuple(json.loads(targets)), size_bytes=size, created_at=created,
            owner=owner, labels=json.loads(labels), path=self._store.path(digest), aliases=tuple(sorted(aliases)),
        )

    def _alias_map(self, name: str | None = None) -> dict[tuple[str, int], list[str]]:
        """(name, version) -> its aliases; call inside `_snapshot` with the rows it goes with."""
        sql, args = "SELECT name, alias, version FROM aliases", ()
        if name is not None:
            sql, args = sql + " WHERE name=?", (name,)
        out: dict[tuple[str, int], list[str]] = {}
        for n, alias, version in self._query(sql, args):
            out.setdefault((n, version), []).append(alias)
        return out

    def _versions(self, name: str) -> list[int]:
        return [r[0] for r in self._query("SELECT version FROM adapters WHERE name=? ORDER BY version", (name,))]

    def _not_found(self, name: str) -> NotFound:
        return NotFound(f"adapter {name!r} is not registered; {LIST_HINT}")

    def resolve(self, ref: str) -> AdapterRecord:
        """The record a ref names: "name" (the "default" alias, else the highest
        version), "name@3", "name@latest" or "name@<alias>"."""
        name, selector = parse_ref(ref)
        with self._snapshot():
            versions = self._versions(name)
            if not versions:
                raise self._not_found(name)
            if selector is None:
                aliased = self._query("SELECT version FROM aliases WHERE name=? AND alias=?", (name, DEFAULT_ALIAS))
                version = aliased[0][0] if aliased else versions[-1]
            elif selector == LATEST:
                version = versions[-1]
            elif selector.isdigit():
                version = int(selector)
                if version not in versions:
                    raise NotFound(f"adapter {name!r} has no version {version} (versions: {', '.join(map(str, versions))}); {LIST_HINT}")
            else:
                aliased = self._query("SELECT version FROM aliases WHERE name=? AND alias=?", (name, selector))
                if not aliased:
                    known = ", ".join(f"{a}->{v}" for a, v in sorted(self.aliases(name).items())) or "none"
                    raise NotFound(f"adapter {name!r} has no alias {selector!r} (aliases: {known}); {LIST_HINT}")
                version = aliased[0][0]
            rows = self._query(f"SELECT {_COLUMNS} FROM adapters WHERE name=? AND version=?", (name, version))
            return self._row_to_record(rows[0], self._alias_map(name).get((name, version), ()))

    def owner_of(self, ref: str) -> str | None:
        """The owner (None = public) of the name a ref names, read before anything
        else about it, so access can be decided before versions or aliases are
        revealed; NotFound (naming only the name) when it has no versions."""
        name, _ = parse_ref(ref)
        rows = self._query("SELECT owner FROM adapters WHERE name=? LIMIT 1", (name,))
        if not rows:
            raise self._not_found(name)
        return rows[0][0]

    def get(self, name: str, version: int | None = None) -> AdapterRecord:
        """`name@version`, or what plain `name` resolves to when version is None."""
        validate_name(name)
        if version is None:
            return self.resolve(name)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidArgument(f"version must be a positive integer, got {version!r}")
        return self.resolve(f"{name}@{version}")

    def list(self, *, name: str | None = None, owner: str | None = None, include_public: bool = True) -> list[AdapterRecord]:
        """Records ordered by (name, version), with their aliases, read in one
        transaction (a snapshot). `name` restricts to one name.
        owner=None: every record (operator view). owner="t": records owned by
        "t", plus public ones (owner None) when include_public."""
        sql, args = f"SELECT {_COLUMNS} FROM adapters WHERE 1=1", []
        if name is not None:
            sql += " AND name=?"
            args.append(validate_name(name))
        if owner is not None:
            sql += " AND (owner=? OR owner IS NULL)" if include_public else " AND owner=?"
            args.append(owner)
        with self._snapshot():
            rows = self._query(sql + " ORDER BY name, version", args)
            aliases = self._alias_map(name)
        return [self._row_to_record(r, aliases.get((r[0], r[1]), ())) for r in rows]

    # -- aliases -------------------------------------------------------------

    def set_alias(self, name: str, alias: str, version: int) -> AdapterRecord:
        """Point `name@alias` at `version` (creating or moving it) and return that
        record. "default" decides what plain `name` serves; "latest" is reserved."""
        validate_name(name)
        if not isinstance(alias, str) or not ALIAS_RE.match(alias):
            raise InvalidArgument(f"alias {clip_repr(alias)} is invalid: use 1-64 characters from letters, digits, '.', '_', '-', starting with a letter")
        if alias == LATEST:
            raise InvalidArgument(f"alias {LATEST!r} is reserved: it always means the highest version")
        with self._lock:
            self.get(name, version)  # NotFound / InvalidArgument before any change
            with self._tx() as conn:
                conn.execute("INSERT OR REPLACE INTO aliases (name, alias, version) VALUES (?, ?, ?)", (name, alias, version))
            return self.get(name, version)  # with the alias just set

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove `name@alias`; removing "default" makes plain `name` serve the highest version."""
        validate_name(name)
        with self._tx() as conn:
            if conn.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias)).rowcount == 0:
                raise NotFound(f"adapter {name!r} has no alias {clip_repr(alias)}; {LIST_HINT}")

    def aliases(self, name: str) -> dict[str, int]:
        """{alias: version} of `name` ({} if it has none); NotFound for an unknown name."""
        validate_name(name)
        with self._lock:
            if not self._versions(name):
                raise self._not_found(name)
            return dict(self._query("SELECT alias, version FROM aliases WHERE name=? ORDER BY alias", (name,)))

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
            for digest in {rec.digest for rec in victims} - referenced:
                self.mark_usable(digest)
                try:
                    self._store.remove(digest)
                except OSError as exc:  # the rows are gone; the next open's GC retries
                    log.warning("could not remove store dir %s: %s", digest, exc)
            log.info("deleted adapter versions %s", [rec.ref for rec in victims])
            return victims

    # -- adapter health ------------------------------------------------------

    def mark_unusable(self, digest: str, reason: str) -> None:
        """Record that `digest`'s stored files cannot be served (`reason` says why);
        inference refuses it at once until it verifies again, is registered again
        (which re-commits its files) or is deleted. Thread-safe."""
        with self._health_lock:
            self._unusable[digest] = reason

    def mark_usable(self, digest: str) -> None:
        """Clear `digest`'s unusable mark, if any. Thread-safe."""
        with self._health_lock:
            self._unusable.pop(digest, None)

    def unusable_reason(self, digest: str) -> str | None:
        """Why `digest` is marked unusable, or None when it is not. Thread-safe."""
        with self._health_lock:
            return self._unusable.get(digest)

    def verify(self, record: AdapterRecord) -> None:
        """Check a record is servable by this server, before loading it: its
        store files re-hash to its digest and its base fingerprint is the running
        base's (unless mismatches are allowed). FailedPrecondition otherwise, and
        the digest is marked unusable; a pass clears the mark."""
        try:
            self._verify(record)
        except FailedPrecondition as exc:
            self.mark_unusable(record.digest, str(exc))
            raise
        self.mark_usable(record.digest)

    def _verify(self, record: AdapterRecord) -> None:
        if record.base_fingerprint != self.base_fingerprint and not self.allow_fingerprint_mismatch:
            raise FailedPrecondition(
                f"adapter {record.ref} was registered for base {record.base_fingerprint} but this server runs base "
                f"{self.base_fingerprint}; start the matching base, or --allow-fingerprint-mismatch"
            )
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

    def _referenced_digests(self) -> set[str]:
        return {r[0] for r in self._query("SELECT DISTINCT digest FROM adapters")}
