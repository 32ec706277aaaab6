"""The SQLite durable store (WAL): domain rows, the checkpoint catalog and payloads."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlparse

from ..codec import decompress_verified
from ..errors import CorruptCheckpointError, StoreUnavailableError, ValidationError
from ..model import (
    USABLE_STATUSES,
    CheckpointMetadata,
    CheckpointStatus,
    CheckpointTrigger,
    DurableSnapshot,
    TableRows,
)
from .schema import MIGRATIONS, SKILL_TABLE, TASK_TABLES

_USABLE = tuple(s.value for s in USABLE_STATUSES)
_CATALOG_COLUMNS = (
    "checkpoint_id, task_id, trigger, status, state_hash, runtime_state_hash, "
    "durable_state_hash, created_at, completed_at, error, metadata, key_count, row_count, "
    "raw_bytes, stored_bytes, point_in_time, format_version, redis_version, "
    "last_recovered_at, recovery_count"
)


@dataclass(frozen=True, slots=True)
class CleanupResult:
    """What a retention cleanup removed (or, in a dry run, would remove)."""

    checkpoint_ids: list[str]
    payloads_removed: int
    bytes_freed: int


class _Rollback(Exception):
    """Raised inside a transaction to roll it back on purpose (dry runs)."""


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(UTC).isoformat(timespec="microseconds")


def _parse(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


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


class SqliteStore:
    """Durable tier on one SQLite file in WAL mode; safe to share between threads."""

    def __init__(self, path: str, *, busy_timeout: float = 30.0) -> None:
        self.path = path
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
                    self._migrate()
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
    def atomic(self) -> Iterator[sqlite3.Connection]:
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
    def reading(self) -> Iterator[sqlite3.Connection]:
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

    def _applied_version(self) -> int:
        """The schema version, read without taking a write lock (0 for a new database)."""
        exists = self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'cfn_schema_migrations'"
        ).fetchone()
        if not exists:
            return 0
        row = self._conn.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
        current = int(row[0] or 0)
        if current > len(MIGRATIONS):
            raise StoreUnavailableError(
                f"{self.path} has schema version {current}, newer than this cfn-checkpoint "
                f"({len(MIGRATIONS)}); upgrade cfn-checkpoint"
            )
        return current

    def _migrate(self) -> None:
        with self.atomic() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS cfn_schema_migrations "
                "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
            )
            row = db.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
            current = row[0] or 0
            if current > len(MIGRATIONS):
                raise StoreUnavailableError(
                    f"{self.path} has schema version {current}, newer than this cfn-checkpoint "
                    f"({len(MIGRATIONS)}); upgrade cfn-checkpoint"
                )
            for version, statements in enumerate(MIGRATIONS, start=1):
                if version <= current:
                    continue
                for statement in statements:
                    db.execute(
                        statement.format(autoinc="INTEGER PRIMARY KEY AUTOINCREMENT", blob="BLOB")
                    )
                db.execute(
                    "INSERT INTO cfn_schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, _iso(utcnow())),
                )

    def schema_version(self) -> int:
        """The highest migration applied."""
        with self._lock, _db_errors("reading the schema version"):
            row = self._conn.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
        return int(row[0] or 0)

    # -- domain rows -------------------------------------------------------------------------

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        with self.atomic() as db, _db_errors("recording a durable row"):
            cursor = db.execute(sql, params)
        return int(cursor.lastrowid or 0)

    def record_task_result(
        self,
        task_id: str,
        agent_id: str | None,
        result: Any,
        *,
        confidence: float | None = None,
    ) -> int:
        """Store a task result (JSON-encoded unless a string); returns its id."""
        text = result if isinstance(result, str) else json.dumps(result, sort_keys=True)
        return self._insert(
            "INSERT INTO task_results (task_id, agent_id, result, confidence, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (task_id, agent_id, text, confidence, _iso(utcnow())),
        )

    def record_agent_metric(self, task_id: str, agent_id: str, metric: str, value: float) -> int:
        """Store one metric sample of an agent; returns its id."""
        return self._insert(
            "INSERT INTO agent_metrics (task_id, agent_id, metric, value, recorded_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (task_id, agent_id, metric, value, _iso(utcnow())),
        )

    def record_audit_event(
        self, task_id: str, event: str, *, agent_id: str | None = None, details: Any = None
    ) -> int:
        """Append an event to the task's audit trail; returns its id."""
        text = None if details is None else json.dumps(details, sort_keys=True)
        return self._insert(
            "INSERT INTO audit_trail (task_id, agent_id, event, details, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (task_id, agent_id, event, text, _iso(utcnow())),
        )

    def put_skill(
        self, skill_id: str, *, name: str, version: str | None = None, metadata: Any = None
    ) -> None:
        """Insert or replace one row of the global skill metadata."""
        text = None if metadata is None else json.dumps(metadata, sort_keys=True)
        with self.atomic() as db:
            db.execute(
                "INSERT INTO skill_metadata (skill_id, name, version, metadata, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (skill_id) DO UPDATE SET name = excluded.name,"
                " version = excluded.version, metadata = excluded.metadata,"
                " updated_at = excluded.updated_at",
                (skill_id, name, version, text, _iso(utcnow())),
            )

    def _table(self, db: sqlite3.Connection, sql: str, params: Sequence[Any]) -> TableRows:
        cursor = db.execute(sql, params)
        columns = [d[0] for d in cursor.description]
        return TableRows(columns, [tuple(r) for r in cursor.fetchall()])

    def read_durable(self, task_id: str) -> DurableSnapshot:
        """The task's rows and the skill metadata, read in one transaction."""
        with self.reading() as db, _db_errors(f"reading durable rows of task {task_id}"):
            tables = {
                name: self._table(
                    db, f"SELECT * FROM {name} WHERE task_id = ? ORDER BY id", (task_id,)
                )
                for name in TASK_TABLES
            }
            skills = self._table(db, f"SELECT * FROM {SKILL_TABLE} ORDER BY skill_id", ())
        return DurableSnapshot(task_id, tables, skills)

    def replace_task_rows(
        self, db: sqlite3.Connection, task_id: str, tables: dict[str, TableRows]
    ) -> int:
        """Inside ``atomic()``: make the task's rows exactly ``tables``; returns rows written."""
        written = 0
        for name in TASK_TABLES:
            db.execute(f"DELETE FROM {name} WHERE task_id = ?", (task_id,))
            table = tables.get(name)
            if table is None or not table.rows:
                continue
            columns = ", ".join(table.columns)
            marks = ", ".join("?" * len(table.columns))
            db.executemany(f"INSERT INTO {name} ({columns}) VALUES ({marks})", table.rows)
            written += len(table.rows)
        return written

    # -- catalog -----------------------------------------------------------------------------

    def _metadata(self, row: Sequence[Any]) -> CheckpointMetadata:
        try:
            return self._decode_catalog(row)
        except (TypeError, ValueError, KeyError) as exc:  # JSON, ISO times, enum names
            raise CorruptCheckpointError(
                f"catalog row of checkpoint {row[0]!r} is damaged: {exc}"
            ) from exc

    def _decode_catalog(self, row: Sequence[Any]) -> CheckpointMetadata:
        return CheckpointMetadata(
            checkpoint_id=row[0],
            task_id=row[1],
            trigger=CheckpointTrigger(row[2]),
            status=CheckpointStatus(row[3]),
            state_hash=row[4],
            runtime_state_hash=row[5],
            durable_state_hash=row[6],
            created_at=_parse(row[7]) or utcnow(),
            completed_at=_parse(row[8]),
            error=row[9],
            metadata=dict(json.loads(row[10])) if row[10] else {},
            key_count=row[11],
            row_count=row[12],
            raw_bytes=row[13],
            stored_bytes=row[14],
            point_in_time=bool(row[15]),
            format_version=row[16],
            redis_version=row[17],
            last_recovered_at=_parse(row[18]),
            recovery_count=row[19],
        )

    def _select(
        self, where: str, params: Sequence[Any], suffix: str = ""
    ) -> list[CheckpointMetadata]:
        with self._lock, _db_errors("reading the checkpoint catalog"):
            rows = self._conn.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM checkpoints WHERE {where} {suffix}", params
            ).fetchall()
        return [self._metadata(r) for r in rows]

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointMetadata | None:
        """One checkpoint by id, or ``None``."""
        found = self._select("checkpoint_id = ?", (checkpoint_id,))
        return found[0] if found else None

    def list_checkpoints(
        self,
        task_id: str | None = None,
        *,
        status: CheckpointStatus | None = None,
        limit: int | None = None,
    ) -> list[CheckpointMetadata]:
        """Checkpoints, newest first, optionally of one task and one status."""
        clauses, params = ["1 = 1"], []
        if task_id is not None:
            clauses.append("task_id = ?")
            params.append(task_id)
        if status is not None:
            clauses.append("status = ?")
            params.append(CheckpointStatus(status).value)
        suffix = "ORDER BY seq DESC" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._select(" AND ".join(clauses), params, suffix)

    def usable_checkpoints(self, task_id: str) -> list[CheckpointMetadata]:
        """The task's checkpoints that recovery may use, newest first."""
        return self._select(
            "task_id = ? AND status IN (?, ?)", (task_id, *_USABLE), "ORDER BY seq DESC"
        )

    def _newest_usable(self, db: sqlite3.Connection, task_id: str) -> CheckpointMetadata | None:
        row = db.execute(
            f"SELECT {_CATALOG_COLUMNS} FROM checkpoints WHERE task_id = ? AND status IN (?, ?) "
            "ORDER BY seq DESC LIMIT 1",
            (task_id, *_USABLE),
        ).fetchone()
        return None if row is None else self._metadata(row)

    def commit_checkpoint(
        self,
        meta: CheckpointMetadata,
        manifest: Sequence[tuple[str, str]],
        blobs: dict[str, tuple[int, bytes]],
        *,
        unless_same: bool = True,
        trusted: Collection[str] = (),
    ) -> CheckpointMetadata:
        """Store a completed checkpoint in ONE transaction.

        ``manifest`` lists ``(kind, digest)`` in order; ``blobs`` maps digests to
        ``(raw size, compressed bytes)``; a digest without a blob must be stored
        already. With ``unless_same``, if the task's newest usable checkpoint has the
        same state hash (another process got there first), it is returned and nothing
        is written. A payload already stored is kept, unless
        it is not in ``trusted`` and fails its hash: then it is replaced by the intact
        copy in ``blobs``, which repairs every checkpoint sharing it. The returned
        metadata says how many bytes were added.
        """
        with self.atomic() as db, _db_errors(f"storing checkpoint {meta.checkpoint_id}"):
            newest = self._newest_usable(db, meta.task_id)
            if unless_same and newest is not None and newest.state_hash == meta.state_hash:
                return newest
            stored = 0
            for digest in dict.fromkeys(d for _, d in manifest):
                if digest not in blobs:
                    # Shared with an earlier checkpoint and known intact; it must still be here.
                    if not db.execute(
                        "SELECT 1 FROM payloads WHERE digest = ?", (digest,)
                    ).fetchone():
                        raise CorruptCheckpointError(
                            f"payload {digest[:12]} to be shared is no longer stored"
                        )
                    continue
                raw_size, data = blobs[digest]
                cursor = db.execute(
                    "INSERT INTO payloads (digest, raw_size, stored_size, data) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (digest) DO NOTHING",
                    (digest, raw_size, len(data), data),
                )
                if cursor.rowcount:
                    stored += len(data)
                elif digest not in trusted:
                    self.repair_payload(db, digest, data)
            db.executemany(
                "INSERT INTO checkpoint_payloads (checkpoint_id, ordinal, kind, digest) "
                "VALUES (?, ?, ?, ?)",
                [(meta.checkpoint_id, i, kind, d) for i, (kind, d) in enumerate(manifest)],
            )
            done = replace(meta, stored_bytes=stored)
            self._insert_catalog(db, done)
        return done

    def repair_payload(self, db: sqlite3.Connection, digest: str, intact: bytes) -> None:
        """Inside ``atomic()``: replace a stored payload by ``intact`` if it fails its hash."""
        (current,) = db.execute(
            "SELECT CAST(data AS BLOB) FROM payloads WHERE digest = ?", (digest,)
        ).fetchone()
        if bytes(current) == intact:
            return
        try:
            decompress_verified(digest, bytes(current))
        except CorruptCheckpointError:
            db.execute(
                "UPDATE payloads SET data = ?, stored_size = ? WHERE digest = ?",
                (intact, len(intact), digest),
            )

    def put_payload(self, db: sqlite3.Connection, digest: str, raw_size: int, data: bytes) -> int:
        """Inside ``atomic()``: store one payload unless stored; returns the bytes added."""
        cursor = db.execute(
            "INSERT INTO payloads (digest, raw_size, stored_size, data) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (digest) DO NOTHING",
            (digest, raw_size, len(data), data),
        )
        return len(data) if cursor.rowcount else 0

    def put_checkpoint(
        self, db: sqlite3.Connection, meta: CheckpointMetadata, manifest: Sequence[tuple[str, str]]
    ) -> None:
        """Inside ``atomic()``: the catalog row and manifest of a checkpoint whose payloads
        are stored already (in the same transaction)."""
        db.executemany(
            "INSERT INTO checkpoint_payloads (checkpoint_id, ordinal, kind, digest) "
            "VALUES (?, ?, ?, ?)",
            [(meta.checkpoint_id, i, kind, d) for i, (kind, d) in enumerate(manifest)],
        )
        self._insert_catalog(db, meta)

    def newest_usable(self, db: sqlite3.Connection, task_id: str) -> CheckpointMetadata | None:
        """Inside a transaction: the task's newest completed or recovered checkpoint."""
        return self._newest_usable(db, task_id)

    def _insert_catalog(self, db: sqlite3.Connection, m: CheckpointMetadata) -> None:
        db.execute(
            f"INSERT INTO checkpoints ({_CATALOG_COLUMNS}) VALUES ({', '.join('?' * 20)})",
            (
                m.checkpoint_id,
                m.task_id,
                m.trigger.value,
                m.status.value,
                m.state_hash,
                m.runtime_state_hash,
                m.durable_state_hash,
                _iso(m.created_at),
                _iso(m.completed_at),
                m.error,
                json.dumps(m.metadata, sort_keys=True),
                m.key_count,
                m.row_count,
                m.raw_bytes,
                m.stored_bytes,
                int(m.point_in_time),
                m.format_version,
                m.redis_version,
                _iso(m.last_recovered_at),
                m.recovery_count,
            ),
        )

    def record_failure(self, meta: CheckpointMetadata) -> None:
        """Keep a ``failed`` catalog row (no payloads) saying why a create failed."""
        with self.atomic() as db, _db_errors("recording a failed checkpoint"):
            self._insert_catalog(db, meta)

    def manifest(self, checkpoint_id: str) -> list[tuple[str, str]]:
        """``(kind, digest)`` of a checkpoint's payloads, in order."""
        with self._lock, _db_errors(f"reading checkpoint {checkpoint_id}"):
            rows = self._conn.execute(
                "SELECT kind, digest FROM checkpoint_payloads WHERE checkpoint_id = ? "
                "ORDER BY ordinal",
                (checkpoint_id,),
            ).fetchall()
        return [(str(k), str(d)) for k, d in rows]

    def load_payloads(self, digests: Iterable[str]) -> dict[str, bytes]:
        """Stored (compressed) bytes of the given payloads; missing ones are left out."""
        return {digest: data for digest, (_, data) in self.load_stored(digests).items()}

    def start_recovery(
        self, checkpoint_id: str, task_id: str, *, runtime: bool, durable: bool
    ) -> int:
        """Log, committed before anything is written, that a recovery begins; returns its id.

        A crash before :meth:`finish_recovery` leaves it ``started``, which the next
        recovery of the task reports (see :meth:`interrupted_recoveries`).
        """
        with self.atomic() as db, _db_errors("recording a recovery"):
            cursor = db.execute(
                "INSERT INTO recoveries (checkpoint_id, task_id, started_at, status, "
                "runtime_restored, durable_restored, keys_restored, rows_restored) "
                "VALUES (?, ?, ?, 'started', ?, ?, 0, 0)",
                (checkpoint_id, task_id, _iso(utcnow()), int(runtime), int(durable)),
            )
        return int(cursor.lastrowid or 0)

    def finish_recovery(
        self,
        db: sqlite3.Connection,
        recovery_id: int,
        checkpoint_id: str,
        *,
        keys: int,
        rows: int,
        notes: str | None,
    ) -> None:
        """Inside ``atomic()``: mark a recovery done and its checkpoint ``recovered``."""
        now = _iso(utcnow())
        db.execute(
            "UPDATE recoveries SET status = 'done', recovered_at = ?, keys_restored = ?, "
            "rows_restored = ?, notes = ? WHERE id = ?",
            (now, keys, rows, notes, recovery_id),
        )
        db.execute(
            "UPDATE checkpoints SET status = ?, last_recovered_at = ?, "
            "recovery_count = recovery_count + 1 WHERE checkpoint_id = ?",
            (CheckpointStatus.RECOVERED.value, now, checkpoint_id),
        )

    def fail_recovery(self, recovery_id: int, error: str) -> None:
        """Mark a recovery that raised as ``failed`` (nothing of it took effect)."""
        with self.atomic() as db, _db_errors("recording a failed recovery"):
            db.execute(
                "UPDATE recoveries SET status = 'failed', notes = ? WHERE id = ?",
                (error, recovery_id),
            )

    def interrupted_recoveries(self, task_id: str) -> list[tuple[int, str, str]]:
        """``(id, checkpoint id, started at)`` of the task's recoveries that never finished
        (the process died between writing Redis and committing)."""
        with self._lock, _db_errors("reading recoveries"):
            rows = self._conn.execute(
                "SELECT id, checkpoint_id, started_at FROM recoveries "
                "WHERE task_id = ? AND status = 'started' ORDER BY id",
                (task_id,),
            ).fetchall()
        return [(int(i), str(c), str(t)) for i, c, t in rows]

    def close_interrupted(self, db: sqlite3.Connection, ids: Sequence[int]) -> None:
        """Inside ``atomic()``: mark interrupted recoveries as such, once reported."""
        db.executemany(
            "UPDATE recoveries SET status = 'interrupted' WHERE id = ?", [(i,) for i in ids]
        )

    # -- retention ---------------------------------------------------------------------------

    def cleanup(
        self,
        cutoff: datetime,
        *,
        keep_last: int = 1,
        dry_run: bool = False,
        protect: Collection[str] = (),
    ) -> CleanupResult:
        """Remove checkpoints created before ``cutoff`` and payloads nothing references.

        Each task's ``keep_last`` newest usable checkpoints (at least one), and the
        checkpoints in ``protect``, are kept whatever their age. With ``dry_run`` the
        same work is done in a transaction that is rolled back, so the result tells
        exactly what would go.
        """
        keep_last = max(1, keep_last)
        result = CleanupResult([], 0, 0)
        try:
            with self.atomic() as db, _db_errors("cleaning up checkpoints"):
                result = self._cleanup(db, cutoff, keep_last, set(protect))
                if dry_run:
                    raise _Rollback
        except _Rollback:
            return result
        with self._lock, _db_errors("returning free pages"):
            self._conn.execute("PRAGMA incremental_vacuum")
        return result

    def _cleanup(
        self, db: sqlite3.Connection, cutoff: datetime, keep_last: int, protect: set[str]
    ) -> CleanupResult:
        doomed = [
            str(r[0])
            for r in db.execute(
                "SELECT checkpoint_id FROM checkpoints c WHERE created_at < ? AND NOT ("
                " status IN (?, ?) AND (SELECT COUNT(*) FROM checkpoints n WHERE"
                " n.task_id = c.task_id AND n.status IN (?, ?) AND n.seq > c.seq) < ?)"
                " ORDER BY seq",
                (_iso(cutoff), *_USABLE, *_USABLE, keep_last),
            ).fetchall()
            if str(r[0]) not in protect
        ]
        for start in range(0, len(doomed), 500):
            part = doomed[start : start + 500]
            marks = ", ".join("?" * len(part))
            db.execute(f"DELETE FROM checkpoint_payloads WHERE checkpoint_id IN ({marks})", part)
            db.execute(f"DELETE FROM checkpoints WHERE checkpoint_id IN ({marks})", part)
            db.execute(f"DELETE FROM recoveries WHERE checkpoint_id IN ({marks})", part)
        count, freed = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM payloads WHERE digest NOT IN "
            "(SELECT digest FROM checkpoint_payloads)"
        ).fetchone()
        db.execute(
            "DELETE FROM payloads WHERE digest NOT IN (SELECT digest FROM checkpoint_payloads)"
        )
        return CleanupResult(doomed, int(count), int(freed))

    # -- import, export, overview ------------------------------------------------------------

    def load_stored(self, digests: Iterable[str]) -> dict[str, tuple[int, bytes]]:
        """``digest -> (raw size, compressed bytes)`` for the given payloads; missing ones
        are left out. Read as BLOBs whatever a hand edit left in the column."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, tuple[int, bytes]] = {}
        with self._lock, _db_errors("reading payloads"):
            for start in range(0, len(wanted), 500):
                part = wanted[start : start + 500]
                rows = self._conn.execute(
                    "SELECT digest, raw_size, CAST(data AS BLOB) FROM payloads WHERE digest IN "
                    f"({', '.join('?' * len(part))})",
                    part,
                ).fetchall()
                found.update((str(d), (int(n), bytes(b))) for d, n, b in rows)
        return found

    def import_checkpoint(
        self,
        meta: CheckpointMetadata,
        manifest: Sequence[tuple[str, str]],
        blobs: dict[str, tuple[int, bytes]],
    ) -> CheckpointMetadata:
        """Add a verified checkpoint from elsewhere in ONE transaction; refuses a known id."""
        with self.atomic() as db, _db_errors(f"importing checkpoint {meta.checkpoint_id}"):
            if db.execute(
                "SELECT 1 FROM checkpoints WHERE checkpoint_id = ?", (meta.checkpoint_id,)
            ).fetchone():
                raise ValidationError(f"checkpoint {meta.checkpoint_id} already exists here")
            stored = 0
            for digest, (raw_size, data) in blobs.items():
                cursor = db.execute(
                    "INSERT INTO payloads (digest, raw_size, stored_size, data) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (digest) DO NOTHING",
                    (digest, raw_size, len(data), data),
                )
                stored += len(data) if cursor.rowcount else 0
            db.executemany(
                "INSERT INTO checkpoint_payloads (checkpoint_id, ordinal, kind, digest) "
                "VALUES (?, ?, ?, ?)",
                [(meta.checkpoint_id, i, kind, d) for i, (kind, d) in enumerate(manifest)],
            )
            done = replace(
                meta,
                status=CheckpointStatus.COMPLETED,
                stored_bytes=stored,
                last_recovered_at=None,
                recovery_count=0,
            )
            self._insert_catalog(db, done)
        return done

    def task_overview(self) -> dict[str, tuple[int, CheckpointMetadata | None]]:
        """Per task with checkpoints: (number of checkpoints, newest usable or ``None``)."""
        with self._lock, _db_errors("reading the checkpoint catalog"):
            counts = self._conn.execute(
                "SELECT task_id, COUNT(*) FROM checkpoints GROUP BY task_id"
            ).fetchall()
            newest = self._conn.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM checkpoints c WHERE status IN (?, ?) AND seq = "
                "(SELECT MAX(seq) FROM checkpoints n WHERE n.task_id = c.task_id"
                " AND n.status IN (?, ?))",
                (*_USABLE, *_USABLE),
            ).fetchall()
        by_task = {m.task_id: m for m in (self._metadata(r) for r in newest)}
        return {str(t): (int(n), by_task.get(str(t))) for t, n in counts}

    def payload_stats(self) -> tuple[int, int]:
        """``(number of payloads, stored bytes)`` in the store."""
        with self._lock, _db_errors("reading payload statistics"):
            row = self._conn.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM payloads"
            ).fetchone()
        return int(row[0]), int(row[1])
