"""The SQLite durable store: one file in WAL mode. The SQL itself is in :mod:`.sql`."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar
from urllib.parse import unquote, urlparse

from ..errors import StoreUnavailableError, ValidationError
from .schema import MIGRATIONS
from .sql import CleanupResult, Connection, SqlStore, utcnow

__all__ = ["CleanupResult", "SqliteStore", "sqlite_path_from_url", "utcnow"]


def sqlite_path_from_url(url: str) -> str:
    """The file path in ``sqlite:///relative.db`` or ``sqlite:////absolute.db``."""
    parsed = urlparse(url)
    if parsed.scheme != "sqlite":
        raise ValidationError(f"not a SQLite URL: {url!r} (expected sqlite:///path/to/file.db)")
    if parsed.netloc:
        raise ValidationError(f"SQLite URL {url!r} has a host; use sqlite:///path (three slashes)")
    path = unquote(parsed.path)
    if path.startswith("/"):
        path = path[1:]  # sqlite:///rel.db -> rel.db, sqlite:////abs.db -> /abs.db
    if not path:
        raise ValidationError(f"SQLite URL {url!r} names no file")
    return path


@contextlib.contextmanager
def _db_errors(action: str) -> Iterator[None]:
    try:
        yield
    except sqlite3.IntegrityError:
        raise
    except sqlite3.DatabaseError as exc:
        raise StoreUnavailableError(f"SQLite failed while {action}: {exc}") from exc


class SqliteStore(SqlStore):
    """Durable tier on one SQLite file in WAL mode; safe to share between threads.

    One connection, used by one thread at a time; a write transaction (``BEGIN
    IMMEDIATE``) excludes every other writer of the file, so per-task and payload
    locks need nothing more.
    """

    backend: ClassVar[str] = "SQLite"
    column_types: ClassVar[dict[str, str]] = {
        "autoinc": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "blob": "BLOB",
        "real": "REAL",
    }
    # A hand edit may leave text in the BLOB column; read it back as bytes anyway.
    blob_column: ClassVar[str] = "CAST(data AS BLOB)"

    def __init__(self, path: str, *, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.where = path
        if path != ":memory:":
            parent = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(parent):
                raise StoreUnavailableError(
                    f"cannot open SQLite file {path}: no directory {parent}"
                )
        self._lock = threading.RLock()
        self._depth = 0
        with _db_errors(f"opening {path}"):
            self._conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
            try:
                if self._applied_version() < len(MIGRATIONS):
                    # Only a new or older database is written to on open; a current one
                    # is opened without a write lock (readers go on while a writer works).
                    self._conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
                    self._conn.execute("PRAGMA journal_mode = WAL")
                    with self.atomic() as db:  # BEGIN IMMEDIATE: one migrator at a time
                        self._apply_migrations(db)
                self._conn.execute("PRAGMA synchronous = NORMAL")
            except BaseException:
                self._conn.close()
                raise

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        """Open the store named by a ``sqlite:///`` URL."""
        return cls(sqlite_path_from_url(url))

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()

    # -- transactions ------------------------------------------------------------------------

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Connection]:
        """One write transaction (a savepoint when nested); rolled back on any error."""
        with self._lock:
            if self._depth:
                name = f"sp{self._depth}"
                self._conn.execute(f"SAVEPOINT {name}")
                self._depth += 1
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute(f"ROLLBACK TO {name}")
                    self._conn.execute(f"RELEASE {name}")
                    raise
                finally:
                    self._depth -= 1
                self._conn.execute(f"RELEASE {name}")
                return
            with _db_errors("starting a transaction"):
                self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            with _db_errors("committing"):
                self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        with self._lock:
            if self._depth:
                yield self._conn
                return
            with _db_errors("starting a read transaction"):
                self._conn.execute("BEGIN DEFERRED")
            self._depth = 1
            try:
                yield self._conn
            finally:
                self._depth = 0
                self._conn.execute("COMMIT")

    @contextlib.contextmanager
    def _session(self) -> Iterator[Connection]:
        with self._lock:
            yield self._conn

    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        return _db_errors(action)

    def _applied_version(self) -> int:
        """The schema version, read without taking a write lock (0 for a new database)."""
        exists = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cfn_schema_migrations'"
        ).fetchone()
        if not exists:
            return 0
        row = self._conn.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
        return self._check_version(int(row[0] or 0))

    def _insert_id(self, db: Connection, sql: str, params: Sequence[Any]) -> int:
        cursor = db.execute(sql, params)
        return int(getattr(cursor, "lastrowid", 0) or 0)

    def _after_cleanup(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA incremental_vacuum")
