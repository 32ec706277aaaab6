"""The durable store's SQL, written once for every backend.

:class:`SqlStore` holds every query the durable tier runs: domain rows, the
checkpoint catalog, payloads, recoveries, retention, import and export. A backend
(:class:`~cfn_checkpoint.durable.sqlite.SqliteStore`,
:class:`~cfn_checkpoint.durable.postgres.PostgresStore`) adds only what differs:
how it connects, begins and ends transactions, translates its driver's errors,
returns a generated id, and a few words of dialect. Queries use ``?`` placeholders;
a backend whose driver wants another style translates them in its
:class:`Connection`.
"""

from __future__ import annotations

import contextlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

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
from ..runtime.redis_runtime import redact_url
from .schema import MIGRATIONS, SKILL_TABLE, TASK_TABLES

_USABLE = tuple(s.value for s in USABLE_STATUSES)
_CATALOG_COLUMNS = (
    "checkpoint_id, task_id, trigger, status, state_hash, runtime_state_hash, "
    "durable_state_hash, created_at, completed_at, error, metadata, key_count, row_count, "
    "raw_bytes, stored_bytes, point_in_time, format_version, redis_version, "
    "last_recovered_at, recovery_count"
)
_INSERT_PAYLOAD = (
    "INSERT INTO payloads (digest, raw_size, stored_size, data) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (digest) DO NOTHING"
)
_INSERT_MANIFEST = (
    "INSERT INTO checkpoint_payloads (checkpoint_id, ordinal, kind, digest) VALUES (?, ?, ?, ?)"
)
#: Parameters per ``IN (...)`` list: below SQLite's and PostgreSQL's limits.
_CHUNK = 500


class Cursor(Protocol):
    """What a statement gives back: a DB-API cursor (``sqlite3``'s or psycopg's)."""

    @property
    def rowcount(self) -> int:
        """Rows the statement changed."""
        ...

    @property
    def description(self) -> Any:
        """Result columns; each one's name is its item 0."""
        ...

    def fetchone(self) -> Any:
        """The next row as a tuple, or ``None``."""
        ...

    def fetchall(self) -> Any:
        """The remaining rows, a list of tuples."""
        ...

    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """The handle :meth:`SqlStore.atomic` and :meth:`SqlStore.reading` give: statements
    run in that transaction. SQL takes ``?`` placeholders on every backend."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor:
        """Run one statement."""
        ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> Cursor:
        """Run one statement once per parameter row, in as few round trips as the driver can."""
        ...


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


def redact_durable_url(url: str) -> str:
    """``url`` with its password, in the authority or a ``password=`` query parameter,
    replaced by ``***``, for messages and logs."""
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", redact_url(url))


def _marks(count: int) -> str:
    return ", ".join("?" * count)


class SqlStore(ABC):
    """The durable tier: domain rows, the checkpoint catalog and content-addressed payloads.

    Safe to share between threads. Every public method runs in its own transaction,
    or, when called inside :meth:`atomic` / :meth:`reading` on the same thread, in
    that one. Methods taking a ``db`` handle must be called inside :meth:`atomic`.
    """

    #: The backend's name, for messages.
    backend: ClassVar[str]
    #: ``{autoinc}``, ``{blob}``, ``{real}`` of :data:`~.schema.MIGRATIONS` on this backend.
    column_types: ClassVar[dict[str, str]]
    #: The payload column read back as bytes whatever a hand edit left in it.
    blob_column: ClassVar[str] = "data"
    #: Appended to text that is ordered or compared: byte order on every backend.
    binary_collation: ClassVar[str] = ""
    #: Where the store is, for messages (a path, or a URL without its password).
    where: str

    # -- what a backend provides -------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Close the store's connections."""

    @abstractmethod
    def atomic(self) -> contextlib.AbstractContextManager[Connection]:
        """One write transaction (a savepoint when nested); rolled back on any error."""

    @abstractmethod
    def reading(self) -> contextlib.AbstractContextManager[Connection]:
        """One read transaction: every query inside sees the same snapshot."""

    @abstractmethod
    def _session(self) -> contextlib.AbstractContextManager[Connection]:
        """The open transaction of this thread, else a connection that autocommits."""

    @abstractmethod
    def _errors(self, action: str) -> contextlib.AbstractContextManager[None]:
        """Turn the driver's failures into :class:`StoreUnavailableError` saying ``action``."""

    @abstractmethod
    def _insert_id(self, db: Connection, sql: str, params: Sequence[Any]) -> int:
        """Run an ``INSERT`` into a table with an ``id`` column; returns the new id."""

    def _lock_task(self, db: Connection, task_id: str) -> None:
        """Inside ``atomic()``: hold the task's durable writes until the transaction ends.

        A no-op where a write transaction already excludes every other writer.
        """
        return None

    def _lock_payloads(self, db: Connection, *, exclusive: bool = False) -> None:
        """Inside ``atomic()``: writers of payloads share this; a cleanup holds it alone,
        so it never deletes a payload that a concurrent commit is about to reference.
        A no-op where a write transaction already excludes every other writer."""
        return None

    def _rows_restored(self, db: Connection, table: str) -> None:
        """Inside ``atomic()``: rows with explicit ids were written back into ``table``."""
        return None

    def _after_cleanup(self) -> None:
        """After a cleanup committed: give freed space back, where the backend can."""
        return None

    def _put_payloads(
        self, db: Connection, rows: Sequence[tuple[str, int, int, bytes]]
    ) -> set[str]:
        """Insert ``(digest, raw size, stored size, data)`` rows not stored yet; returns
        the digests that were new."""
        added: set[str] = set()
        for row in rows:
            if db.execute(_INSERT_PAYLOAD, row).rowcount:
                added.add(row[0])
        return added

    # -- schema ------------------------------------------------------------------------------

    def _check_version(self, current: int) -> int:
        if current > len(MIGRATIONS):
            raise StoreUnavailableError(
                f"{self.where} has schema version {current}, newer than this cfn-checkpoint "
                f"({len(MIGRATIONS)}); upgrade cfn-checkpoint"
            )
        return current

    def _apply_migrations(self, db: Connection) -> None:
        """Inside a transaction that excludes other migrators: apply what is missing."""
        db.execute(
            "CREATE TABLE IF NOT EXISTS cfn_schema_migrations "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        row = db.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
        current = self._check_version(int(row[0] or 0))
        for version, statements in enumerate(MIGRATIONS, start=1):
            if version <= current:
                continue
            for statement in statements:
                db.execute(statement.format(**self.column_types))
            db.execute(
                "INSERT INTO cfn_schema_migrations (version, applied_at) VALUES (?, ?)",
                (version, _iso(utcnow())),
            )

    def schema_version(self) -> int:
        """The highest migration applied."""
        with self._errors("reading the schema version"), self._session() as db:
            row = db.execute("SELECT MAX(version) FROM cfn_schema_migrations").fetchone()
        return int(row[0] or 0)

    # -- domain rows -------------------------------------------------------------------------

    def _insert(self, sql: str, params: Sequence[Any]) -> int:
        with self._errors("recording a durable row"), self.atomic() as db:
            return self._insert_id(db, sql, params)

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
        with self._errors("recording a skill"), self.atomic() as db:
            db.execute(
                "INSERT INTO skill_metadata (skill_id, name, version, metadata, updated_at) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (skill_id) DO UPDATE SET name = excluded.name,"
                " version = excluded.version, metadata = excluded.metadata,"
                " updated_at = excluded.updated_at",
                (skill_id, name, version, text, _iso(utcnow())),
            )

    def _table(self, db: Connection, sql: str, params: Sequence[Any]) -> TableRows:
        cursor = db.execute(sql, params)
        columns = [str(d[0]) for d in cursor.description]
        return TableRows(columns, [tuple(r) for r in cursor.fetchall()])

    def read_durable(self, task_id: str) -> DurableSnapshot:
        """The task's rows and the skill metadata, read in one transaction."""
        with self._errors(f"reading durable rows of task {task_id}"), self.reading() as db:
            tables = {
                name: self._table(
                    db, f"SELECT * FROM {name} WHERE task_id = ? ORDER BY id", (task_id,)
                )
                for name in TASK_TABLES
            }
            skills = self._table(
                db, f"SELECT * FROM {SKILL_TABLE} ORDER BY skill_id{self.binary_collation}", ()
            )
        return DurableSnapshot(task_id, tables, skills)

    def replace_task_rows(self, db: Connection, task_id: str, tables: dict[str, TableRows]) -> int:
        """Inside ``atomic()``: make the task's rows exactly ``tables``; returns rows written."""
        self._lock_task(db, task_id)
        written = 0
        for name in TASK_TABLES:
            db.execute(f"DELETE FROM {name} WHERE task_id = ?", (task_id,))
            table = tables.get(name)
            if table is None or not table.rows:
                continue
            columns = ", ".join(table.columns)
            db.executemany(
                f"INSERT INTO {name} ({columns}) VALUES ({_marks(len(table.columns))})",
                table.rows,
            )
            self._rows_restored(db, name)
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
        with self._errors("reading the checkpoint catalog"), self._session() as db:
            rows = db.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM checkpoints WHERE {where} {suffix}", params
            ).fetchall()
        return [self._metadata(r) for r in rows]

    def get_checkpoint(self, checkpoint_id: str) -> CheckpointMetadata | None:
        """One checkpoint by id, or ``None``."""
        if not isinstance(checkpoint_id, str):
            return None  # ids are text; PostgreSQL would refuse to compare, SQLite find none
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

    def _newest_usable(self, db: Connection, task_id: str) -> CheckpointMetadata | None:
        row = db.execute(
            f"SELECT {_CATALOG_COLUMNS} FROM checkpoints WHERE task_id = ? AND status IN (?, ?) "
            "ORDER BY seq DESC LIMIT 1",
            (task_id, *_USABLE),
        ).fetchone()
        return None if row is None else self._metadata(row)

    def _stored_digests(self, db: Connection, digests: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(digests), _CHUNK):
            part = digests[start : start + _CHUNK]
            found.update(
                str(r[0])
                for r in db.execute(
                    f"SELECT digest FROM payloads WHERE digest IN ({_marks(len(part))})", part
                ).fetchall()
            )
        return found

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
        is written; that check and the writes hold the task's durable lock. A payload
        already stored is kept, unless it is not in ``trusted`` and fails its hash:
        then it is replaced by the intact copy in ``blobs``, which repairs every
        checkpoint sharing it. The returned metadata says how many bytes were added.
        """
        with self._errors(f"storing checkpoint {meta.checkpoint_id}"), self.atomic() as db:
            self._lock_payloads(db)
            self._lock_task(db, meta.task_id)
            newest = self._newest_usable(db, meta.task_id)
            if unless_same and newest is not None and newest.state_hash == meta.state_hash:
                return newest
            digests = list(dict.fromkeys(d for _, d in manifest))
            # Shared with an earlier checkpoint and known intact; they must still be here.
            shared = [d for d in digests if d not in blobs]
            present = self._stored_digests(db, shared) if shared else set()
            for digest in shared:
                if digest not in present:
                    raise CorruptCheckpointError(
                        f"payload {digest[:12]} to be shared is no longer stored"
                    )
            fresh = [(d, blobs[d][0], len(blobs[d][1]), blobs[d][1]) for d in digests if d in blobs]
            added = self._put_payloads(db, fresh)
            stored = 0
            for digest, _, size, data in fresh:
                if digest in added:
                    stored += size
                elif digest not in trusted:
                    self.repair_payload(db, digest, data)
            db.executemany(
                _INSERT_MANIFEST,
                [(meta.checkpoint_id, i, kind, d) for i, (kind, d) in enumerate(manifest)],
            )
            done = replace(meta, stored_bytes=stored)
            self._insert_catalog(db, done)
        return done

    def repair_payload(self, db: Connection, digest: str, intact: bytes) -> None:
        """Inside ``atomic()``: replace a stored payload by ``intact`` if it fails its hash."""
        (current,) = db.execute(
            f"SELECT {self.blob_column} FROM payloads WHERE digest = ?", (digest,)
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

    def put_payload(self, db: Connection, digest: str, raw_size: int, data: bytes) -> int:
        """Inside ``atomic()``: store one payload unless stored; returns the bytes added."""
        self._lock_payloads(db)
        added = self._put_payloads(db, [(digest, raw_size, len(data), data)])
        return len(data) if added else 0

    def put_checkpoint(
        self, db: Connection, meta: CheckpointMetadata, manifest: Sequence[tuple[str, str]]
    ) -> None:
        """Inside ``atomic()``: the catalog row and manifest of a checkpoint whose payloads
        are stored already (in the same transaction)."""
        self._lock_payloads(db)
        self._lock_task(db, meta.task_id)
        db.executemany(
            _INSERT_MANIFEST,
            [(meta.checkpoint_id, i, kind, d) for i, (kind, d) in enumerate(manifest)],
        )
        self._insert_catalog(db, meta)

    def newest_usable(self, db: Connection, task_id: str) -> CheckpointMetadata | None:
        """Inside a transaction: the task's newest completed or recovered checkpoint."""
        return self._newest_usable(db, task_id)

    def _insert_catalog(self, db: Connection, m: CheckpointMetadata) -> None:
        db.execute(
            f"INSERT INTO checkpoints ({_CATALOG_COLUMNS}) VALUES ({_marks(20)})",
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
        with self._errors("recording a failed checkpoint"), self.atomic() as db:
            self._insert_catalog(db, meta)

    def manifest(self, checkpoint_id: str) -> list[tuple[str, str]]:
        """``(kind, digest)`` of a checkpoint's payloads, in order."""
        with self._errors(f"reading checkpoint {checkpoint_id}"), self._session() as db:
            rows = db.execute(
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
        with self._errors("recording a recovery"), self.atomic() as db:
            return self._insert_id(
                db,
                "INSERT INTO recoveries (checkpoint_id, task_id, started_at, status, "
                "runtime_restored, durable_restored, keys_restored, rows_restored) "
                "VALUES (?, ?, ?, 'started', ?, ?, 0, 0)",
                (checkpoint_id, task_id, _iso(utcnow()), int(runtime), int(durable)),
            )

    def finish_recovery(
        self,
        db: Connection,
        recovery_id: int,
        checkpoint_id: str,
        *,
        task_id: str,
        keys: int,
        rows: int,
        notes: str | None,
    ) -> None:
        """Inside ``atomic()``: mark a recovery done and its checkpoint ``recovered``."""
        self._lock_task(db, task_id)
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
        with self._errors("recording a failed recovery"), self.atomic() as db:
            db.execute(
                "UPDATE recoveries SET status = 'failed', notes = ? WHERE id = ?",
                (error, recovery_id),
            )

    def interrupted_recoveries(self, task_id: str) -> list[tuple[int, str, str]]:
        """``(id, checkpoint id, started at)`` of the task's recoveries that never finished
        (the process died between writing Redis and committing)."""
        with self._errors("reading recoveries"), self._session() as db:
            rows = db.execute(
                "SELECT id, checkpoint_id, started_at FROM recoveries "
                "WHERE task_id = ? AND status = 'started' ORDER BY id",
                (task_id,),
            ).fetchall()
        return [(int(i), str(c), str(t)) for i, c, t in rows]

    def close_interrupted(self, db: Connection, ids: Sequence[int]) -> None:
        """Inside ``atomic()``: mark interrupted recoveries as such, once reported."""
        if ids:
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
            with self._errors("cleaning up checkpoints"), self.atomic() as db:
                self._lock_payloads(db, exclusive=True)
                result = self._cleanup(db, cutoff, keep_last, set(protect))
                if dry_run:
                    raise _Rollback
        except _Rollback:
            return result
        with self._errors("returning free pages"):
            self._after_cleanup()
        return result

    def _cleanup(
        self, db: Connection, cutoff: datetime, keep_last: int, protect: set[str]
    ) -> CleanupResult:
        doomed = [
            str(r[0])
            for r in db.execute(
                f"SELECT checkpoint_id FROM checkpoints c WHERE created_at{self.binary_collation}"
                " < ? AND NOT ( status IN (?, ?) AND (SELECT COUNT(*) FROM checkpoints n WHERE"
                " n.task_id = c.task_id AND n.status IN (?, ?) AND n.seq > c.seq) < ?)"
                " ORDER BY seq",
                (_iso(cutoff), *_USABLE, *_USABLE, keep_last),
            ).fetchall()
            if str(r[0]) not in protect
        ]
        for start in range(0, len(doomed), _CHUNK):
            part = doomed[start : start + _CHUNK]
            marks = _marks(len(part))
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
        are left out. Read as bytes whatever a hand edit left in the column."""
        wanted = list(dict.fromkeys(digests))
        found: dict[str, tuple[int, bytes]] = {}
        with self._errors("reading payloads"), self._session() as db:
            for start in range(0, len(wanted), _CHUNK):
                part = wanted[start : start + _CHUNK]
                rows = db.execute(
                    f"SELECT digest, raw_size, {self.blob_column} FROM payloads "
                    f"WHERE digest IN ({_marks(len(part))})",
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
        with self._errors(f"importing checkpoint {meta.checkpoint_id}"), self.atomic() as db:
            self._lock_payloads(db)
            self._lock_task(db, meta.task_id)
            if db.execute(
                "SELECT 1 FROM checkpoints WHERE checkpoint_id = ?", (meta.checkpoint_id,)
            ).fetchone():
                raise ValidationError(f"checkpoint {meta.checkpoint_id} already exists here")
            added = self._put_payloads(
                db, [(d, raw, len(data), data) for d, (raw, data) in blobs.items()]
            )
            stored = sum(len(blobs[d][1]) for d in added)
            db.executemany(
                _INSERT_MANIFEST,
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
        with self._errors("reading the checkpoint catalog"), self.reading() as db:
            counts = db.execute(
                "SELECT task_id, COUNT(*) FROM checkpoints GROUP BY task_id"
            ).fetchall()
            newest = db.execute(
                f"SELECT {_CATALOG_COLUMNS} FROM checkpoints c WHERE status IN (?, ?) AND seq = "
                "(SELECT MAX(seq) FROM checkpoints n WHERE n.task_id = c.task_id"
                " AND n.status IN (?, ?))",
                (*_USABLE, *_USABLE),
            ).fetchall()
        by_task = {m.task_id: m for m in (self._metadata(r) for r in newest)}
        return {str(t): (int(n), by_task.get(str(t))) for t, n in counts}

    def payload_stats(self) -> tuple[int, int]:
        """``(number of payloads, stored bytes)`` in the store."""
        with self._errors("reading payload statistics"), self._session() as db:
            row = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(stored_size), 0) FROM payloads"
            ).fetchone()
        return int(row[0]), int(row[1])
