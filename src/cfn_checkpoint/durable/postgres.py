"""The PostgreSQL durable store (psycopg 3 and a connection pool). The SQL is in :mod:`.sql`.

URL: ``postgresql://user:password@host:port/dbname?connect_timeout=10&options=-csearch_path%3Dschema``
(``postgres://`` too; any libpq parameter may be given in the query string). The
store lives in the first schema of the ``search_path``, which must exist.

Several workers may share one database. Each transaction that commits a checkpoint
or finishes a recovery of a task holds an advisory lock of that task, so their
durable writes never interleave even without the Redis task lock; payload writers
share a second lock that a retention cleanup takes alone; and the migrations are
applied under a third, by whichever worker gets there first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import psycopg
import psycopg.conninfo
import psycopg.errors
import psycopg.pq
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import LockTimeoutError, StoreUnavailableError, ValidationError
from .schema import MIGRATIONS
from .sql import _INSERT_PAYLOAD, Connection, Cursor, SqlStore, redact_durable_url

#: Seconds to wait for a connection to be made, unless the URL says ``connect_timeout``.
DEFAULT_CONNECT_TIMEOUT = 10
#: Seconds a statement waits for a lock (a task's, a row's) before it fails, unless the
#: URL's ``options`` set ``lock_timeout``.
DEFAULT_LOCK_TIMEOUT = 60

_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|\?|%")


@functools.lru_cache(maxsize=1024)
def _pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (and a literal ``%`` as ``%%``); a ``?``
    inside a quoted literal or identifier is left alone."""

    def swap(match: re.Match[str]) -> str:
        text = match.group()
        return "%s" if text == "?" else "%%" if text == "%" else text.replace("%", "%%")

    return _PLACEHOLDER.sub(swap, sql)


def _lock_key(*parts: str) -> int:
    """A stable signed 64-bit advisory lock key (``hashtext`` may change between versions)."""
    digest = hashlib.blake2b("\0".join(("cfn-checkpoint", *parts)).encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _connect_failure(exc: psycopg.Error) -> str:
    """The reason in libpq's (often multi-line) connection error, on one line."""
    text = str(exc).strip()
    if "FATAL:" in text:  # the server answered: unknown user or database, bad password
        return " ".join(text.rsplit("FATAL:", 1)[1].split())
    text = " ".join(text.split()).removeprefix("connection failed: ")
    return text or type(exc).__name__


def conninfo_from_url(url: str) -> str:
    """The libpq connection string for a ``postgresql://`` URL, with this tool's defaults
    (connect timeout, TCP keepalives, lock timeout) where the URL leaves them out.

    Raises :class:`ValidationError` for a URL libpq would not accept.
    """
    where = redact_durable_url(url)
    scheme = url.split(":", 1)[0].lower()
    if scheme not in ("postgresql", "postgres") or not url[len(scheme) :].startswith("://"):
        raise ValidationError(
            f"not a PostgreSQL URL: {where!r} (expected postgresql://user@host:port/dbname)"
        )
    try:
        params: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.Error as exc:
        reason = _first_line(exc).replace(url, where)
        raise ValidationError(f"malformed PostgreSQL URL {where!r}: {reason}") from None
    for port in str(params.get("port", "")).split(","):
        if port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValidationError(f"malformed PostgreSQL URL {where!r}: bad port {port!r}")
    timeout = str(params.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
    if not (timeout.isdigit() and int(timeout) > 0):
        raise ValidationError(
            f"malformed PostgreSQL URL {where!r}: connect_timeout must be a whole number of "
            f"seconds above 0, not {timeout!r}"
        )
    params.setdefault("application_name", "cfn-checkpoint")
    # A server that vanishes mid-query (no RST) is noticed in about a minute.
    params.setdefault("keepalives", 1)
    params.setdefault("keepalives_idle", 30)
    params.setdefault("keepalives_interval", 10)
    params.setdefault("keepalives_count", 3)
    if psycopg.pq.version() >= 120000:  # libpq 12 added it
        params.setdefault("tcp_user_timeout", 60_000)
    options = str(params.get("options", ""))
    if "lock_timeout" not in options:
        params["options"] = f"{options} -c lock_timeout={DEFAULT_LOCK_TIMEOUT}s".strip()
    return psycopg.conninfo.make_conninfo("", **params)


class _Handle:
    """A pooled connection inside one transaction, taking ``?`` placeholders."""

    __slots__ = ("conn", "depth")

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.depth = 0

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        return self.conn.execute(_pg_sql(sql), parameters)

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor:
        cursor = self.conn.cursor()
        cursor.executemany(_pg_sql(sql), parameters)  # pipelined: one round trip
        return cursor


class PostgresStore(SqlStore):
    """Durable tier on a PostgreSQL database (one schema of it); safe to share between
    threads, and between processes and machines using the same database.

    Each thread's transaction has a pooled connection of its own; outside a
    transaction a statement borrows one and autocommits.
    """

    backend: ClassVar[str] = "PostgreSQL"
    column_types: ClassVar[dict[str, str]] = {
        "autoinc": "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
        "blob": "BYTEA",
        "real": "DOUBLE PRECISION",
    }
    # Text sorts and compares byte by byte, as on SQLite, whatever the database's locale.
    binary_collation: ClassVar[str] = ' COLLATE "C"'

    def __init__(self, url: str, *, pool_size: int = 8, pool_timeout: float = 30.0) -> None:
        """Connect to ``url``, apply missing migrations, and open a pool of up to
        ``pool_size`` connections; a thread waits at most ``pool_timeout`` seconds for one.

        Raises :class:`ValidationError` for a malformed URL and
        :class:`StoreUnavailableError` when the database cannot be reached or used.
        """
        self.where = redact_durable_url(url)
        conninfo = conninfo_from_url(url)
        self._pool_timeout = pool_timeout
        self._local = threading.local()
        try:
            first = psycopg.connect(conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"cannot connect to PostgreSQL at {self.where}: {_connect_failure(exc)}"
            ) from exc
        with first, self._errors(f"opening the store at {self.where}"):
            self.schema = self._current_schema(first)
            self._migrate(first)
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            conninfo,
            kwargs={"autocommit": True},
            min_size=1,
            max_size=max(1, pool_size),
            timeout=pool_timeout,
            check=ConnectionPool.check_connection,
            name=f"cfn-checkpoint {self.where}",
            num_workers=1,
            open=False,
        )
        self._pool.open()

    @classmethod
    def from_url(cls, url: str) -> PostgresStore:
        """Open the store named by a ``postgresql://`` URL."""
        return cls(url)

    def close(self) -> None:
        """Close every pooled connection."""
        self._pool.close()

    def _current_schema(self, conn: psycopg.Connection[Any]) -> str:
        row = conn.execute("SELECT current_schema(), current_setting('search_path')").fetchone()
        assert row is not None
        if row[0] is None:
            raise StoreUnavailableError(
                f"PostgreSQL at {self.where}: no schema of the search_path ({row[1]}) exists; "
                "create it, or name another with options=-csearch_path%3D<schema> in the URL"
            )
        return str(row[0])

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT to_regclass('cfn_schema_migrations') IS NOT NULL").fetchone()
        if row is not None and row[0]:
            found = conn.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
            if self._check_version(int(found[0] or 0) if found else 0) == len(MIGRATIONS):
                return  # current: no lock, no write
        db = _Handle(conn)
        conn.execute("BEGIN")
        try:
            # Workers starting together queue here; each re-reads the version under the
            # lock, so every migration is applied once.
            db.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key(self.schema, "migrate"),))
            self._apply_migrations(db)
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # -- transactions ------------------------------------------------------------------------

    def _current(self) -> _Handle | None:
        handle: _Handle | None = getattr(self._local, "handle", None)
        return handle

    @contextlib.contextmanager
    def _transaction(self, begin: str) -> Iterator[Connection]:
        with contextlib.ExitStack() as stack:
            with self._errors("starting a transaction"):
                conn = stack.enter_context(self._pool.connection(timeout=self._pool_timeout))
                conn.execute(begin)
            handle = _Handle(conn)
            self._local.handle = handle
            try:
                yield handle
            except BaseException:
                self._local.handle = None
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                raise
            self._local.handle = None
            with self._errors("committing"):
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def _savepoint(self, handle: _Handle) -> Iterator[Connection]:
        name = f"sp{handle.depth + 1}"
        with self._errors("starting a savepoint"):
            handle.conn.execute(f"SAVEPOINT {name}")
        handle.depth += 1
        try:
            yield handle
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                handle.conn.execute(f"ROLLBACK TO SAVEPOINT {name}")
                handle.conn.execute(f"RELEASE SAVEPOINT {name}")
            raise
        finally:
            handle.depth -= 1
        with self._errors("releasing a savepoint"):
            handle.conn.execute(f"RELEASE SAVEPOINT {name}")

    @contextlib.contextmanager
    def atomic(self) -> Iterator[Connection]:
        """One write transaction (a savepoint when nested); rolled back on any error."""
        handle = self._current()
        if handle is not None:
            with self._savepoint(handle) as db:
                yield db
            return
        with self._transaction("BEGIN") as db:
            yield db

    @contextlib.contextmanager
    def reading(self) -> Iterator[Connection]:
        """One read transaction: every query inside sees the same snapshot."""
        handle = self._current()
        if handle is not None:
            yield handle
            return
        with self._transaction("BEGIN ISOLATION LEVEL REPEATABLE READ") as db:
            yield db

    @contextlib.contextmanager
    def _session(self) -> Iterator[Connection]:
        handle = self._current()
        if handle is not None:
            yield handle
            return
        with self._pool.connection(timeout=self._pool_timeout) as conn:
            yield _Handle(conn)

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except psycopg.IntegrityError:
            raise
        except psycopg.errors.LockNotAvailable as exc:
            raise LockTimeoutError(
                f"PostgreSQL lock not granted within lock_timeout while {action}: "
                f"{_first_line(exc)}"
            ) from exc
        except PoolTimeout as exc:
            raise StoreUnavailableError(
                f"no connection to PostgreSQL at {self.where} within {self._pool_timeout:g} s "
                f"while {action}: {_first_line(exc)}"
            ) from exc
        except psycopg.Error as exc:
            raise StoreUnavailableError(
                f"PostgreSQL failed while {action}: {_first_line(exc)}"
            ) from exc

    # -- dialect -----------------------------------------------------------------------------

    def _insert_id(self, db: Connection, sql: str, params: Sequence[Any]) -> int:
        row = db.execute(f"{sql} RETURNING id", params).fetchone()
        return int(row[0])

    def _lock_task(self, db: Connection, task_id: str) -> None:
        db.execute("SELECT pg_advisory_xact_lock(?)", (_lock_key(self.schema, "task", task_id),))

    def _lock_payloads(self, db: Connection, *, exclusive: bool = False) -> None:
        kind = "" if exclusive else "_shared"
        key = _lock_key(self.schema, "payloads")
        db.execute(f"SELECT pg_advisory_xact_lock{kind}(?)", (key,))

    def _rows_restored(self, db: Connection, table: str) -> None:
        # Rows written back keep their ids; move the identity sequence past them, as
        # SQLite's AUTOINCREMENT does by itself, so later rows get new ids.
        db.execute(
            f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), top) "
            f"FROM (SELECT MAX(id) AS top FROM {table}) AS t WHERE top > COALESCE("
            f"pg_sequence_last_value(pg_get_serial_sequence('{table}', 'id')::regclass), 0)"
        )

    def _put_payloads(
        self, db: Connection, rows: Sequence[tuple[str, int, int, bytes]]
    ) -> set[str]:
        if not rows:
            return set()
        assert isinstance(db, _Handle)
        added: set[str] = set()
        with db.conn.cursor() as cursor:
            # Pipelined; each row's RETURNING says whether it was new.
            cursor.executemany(_pg_sql(f"{_INSERT_PAYLOAD} RETURNING digest"), rows, returning=True)
            while True:
                row = cursor.fetchone()
                if row is not None:
                    added.add(str(row[0]))
                if not cursor.nextset():
                    break
        return added
