"""The SQLite half of the adapter registry: schema and its version, the one
connection and its transactions, and the queries over names, versions and aliases
(resolve, get, list, aliases). `AdapterRegistry` (registry.py) builds on it with
registration, deletion, verification and adapter health; the semantics are in its
module docstring.

Thread safety: one sqlite3 connection (check_same_thread=False), serialized by the
registry's `threading.RLock` (`_lock`), which the store mutations also take.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from qlora_serve.adapters.changes import ALIAS_DELETED, ALIAS_SET
from qlora_serve.adapters.records import ALIAS_RE, AdapterRecord, parse_ref, validate_name
from qlora_serve.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, clip_repr

DB_FILE = "registry.sqlite3"
LOCK_FILE = "registry.lock"
SCHEMA_VERSION = 1
DEFAULT_ALIAS = "default"
LATEST = "latest"
LIST_HINT = "list adapters with `qlora-serve adapters list`"

log = logging.getLogger(__name__)

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


def not_found(name: str) -> NotFound:
    """The NOT_FOUND of a name with no versions."""
    return NotFound(f"adapter {name!r} is not registered; {LIST_HINT}")


def version_ref(name: str, version: int | None) -> str:
    """The ref of `name@version` (plain `name` when version is None), both checked."""
    validate_name(name)
    if version is None:
        return name
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise InvalidArgument(f"version must be a positive integer, got {version!r}")
    return f"{name}@{version}"


def pick_version(name: str, selector: str | None, versions: Sequence[int], aliases: Mapping[str, int]) -> int:
    """The version a ref's selector names (see `Catalogue.resolve`), given the name's
    versions (ascending, non-empty) and its aliases {alias: version}; NotFound names
    what exists. Shared with readers that hold a copy of the name (remote registry)."""
    if selector is None:
        return aliases.get(DEFAULT_ALIAS, versions[-1])
    if selector == LATEST:
        return versions[-1]
    if selector.isdigit():
        if int(selector) not in versions:
            raise NotFound(f"adapter {name!r} has no version {int(selector)} (versions: {', '.join(map(str, versions))}); {LIST_HINT}")
        return int(selector)
    if selector not in aliases:
        known = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "none"
        raise NotFound(f"adapter {name!r} has no alias {selector!r} (aliases: {known}); {LIST_HINT}")
    return aliases[selector]


class Catalogue:
    """The catalogue queries of `AdapterRegistry`, which sets `data_dir`, `_lock`,
    `_conn` (None once closed) and `_store` (for each record's path)."""

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

    def _open_reader(self) -> sqlite3.Connection:
        """read_only=True: a read-only connection to the catalogue a writer process
        (`qlora-serve serve` on this data_dir) keeps. Every query sees the writer's
        last commit (WAL), so a registration, alias move or delete reaches readers at
        once. Local filesystem only: WAL readers share memory with the writer."""
        db = self.data_dir / DB_FILE
        if not db.is_file():
            raise FailedPrecondition(f"no adapter registry at {db}: start its writer first "
                                     f"(qlora-serve serve --data-dir {self.data_dir})")
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False, isolation_level=None)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            conn.close()
            raise FailedPrecondition(f"{db} has schema {version}, this qlora-serve reads {SCHEMA_VERSION}; "
                                     f"run the same qlora-serve version as the registry's writer")
        return conn

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

    def __enter__(self) -> "Catalogue":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any exception."""
        if getattr(self, "read_only", False):
            raise FailedPrecondition("this adapter registry is read-only (it reads another process's); register, "
                                     "alias and delete adapters on the registry's writer (qlora-serve serve)")
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

    # -- registration rows ---------------------------------------------------

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
        return not_found(name)

    def resolve(self, ref: str) -> AdapterRecord:
        """The record a ref names: "name" (the "default" alias, else the highest
        version), "name@3", "name@latest" or "name@<alias>"."""
        name, selector = parse_ref(ref)
        with self._snapshot():
            versions = self._versions(name)
            if not versions:
                raise self._not_found(name)
            aliases = dict(self._query("SELECT alias, version FROM aliases WHERE name=?", (name,)))
            version = pick_version(name, selector, versions, aliases)
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
        return self.resolve(version_ref(name, version))

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
            self._changed(ALIAS_SET, name, version=version, alias=alias)
            return self.get(name, version)  # with the alias just set

    def delete_alias(self, name: str, alias: str) -> None:
        """Remove `name@alias`; removing "default" makes plain `name` serve the highest version."""
        validate_name(name)
        with self._lock:
            with self._tx() as conn:
                if conn.execute("DELETE FROM aliases WHERE name=? AND alias=?", (name, alias)).rowcount == 0:
                    raise NotFound(f"adapter {name!r} has no alias {clip_repr(alias)}; {LIST_HINT}")
            self._changed(ALIAS_DELETED, name, alias=alias)

    def _changed(self, kind: str, name: str, **fields) -> None:
        """Append a committed change to the change log (call under `_lock`, in commit order)."""
        log = getattr(self, "changes", None)
        if log is not None:
            log.append(kind, name, **fields)

    def aliases(self, name: str) -> dict[str, int]:
        """{alias: version} of `name` ({} if it has none); NotFound for an unknown name."""
        validate_name(name)
        with self._lock:
            if not self._versions(name):
                raise self._not_found(name)
            return dict(self._query("SELECT alias, version FROM aliases WHERE name=? ORDER BY alias", (name,)))

    def _repair_sizes(self) -> None:
        """Set each row's size_bytes to its stored copy's (bytes). Rows written before
        the size came from the store could carry the size of a discarded copy with
        another README, which made followers refuse the download as oversized."""
        for digest, size in self._query("SELECT DISTINCT digest, size_bytes FROM adapters"):
            try:
                actual = self._store.size_of(digest)
            except OSError:  # missing or unreadable: verify() reports it on load
                continue
            if actual != size:
                with self._tx() as conn:
                    conn.execute("UPDATE adapters SET size_bytes=? WHERE digest=?", (actual, digest))
                log.info("adapter files %s: size_bytes %d -> %d (the stored copy's)", digest[:12], size, actual)

    def _referenced_digests(self) -> set[str]:
        return {r[0] for r in self._query("SELECT DISTINCT digest FROM adapters")}
