"""The records cfn-checkpoint works with: triggers, statuses, metadata, snapshots, results."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any, NamedTuple

from .errors import ValidationError

#: Version of the stored checkpoint format (payload encoding and manifest).
FORMAT_VERSION = 5
#: Storage formats this version reads. 4 differs from 5 only in how keyframe chunks are
#: named (the SHA-256 of their raw bytes, not of their compressed ones), 3 from 4 only
#: in its row digests (SHA-1 in hex).
READABLE_FORMATS = (3, 4, 5)


class CheckpointTrigger(StrEnum):
    """Why a checkpoint was taken."""

    TASK_COMPLETION = "task_completion"
    ITERATION_BOUNDARY = "iteration_boundary"
    PERIODIC = "periodic"
    MANUAL = "manual"


class CheckpointStatus(StrEnum):
    """Where a checkpoint is in its life.

    ``completed`` and ``recovered`` checkpoints are both usable for recovery:
    recovering from a checkpoint never uses it up.
    """

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    RECOVERED = "recovered"


#: Statuses of checkpoints that recovery may use.
USABLE_STATUSES: tuple[CheckpointStatus, ...] = (
    CheckpointStatus.COMPLETED,
    CheckpointStatus.RECOVERED,
)


class RedisType(StrEnum):
    """Redis value types captured natively; anything else is kept as a DUMP payload."""

    STRING = "string"
    LIST = "list"
    HASH = "hash"
    SET = "set"
    ZSET = "zset"
    DUMP = "dump"


class RuntimeEntry(NamedTuple):
    """One Redis key of a task, byte-exact (a tuple: tasks have many keys).

    ``value`` depends on ``type``: ``bytes`` for a string or a DUMP payload,
    ``list[bytes]`` for a list (in order) or a set (sorted), ``list[tuple[bytes,
    bytes]]`` for a hash (sorted by field) or a sorted set (member, score as Redis
    prints it, in rank order). ``pttl_ms`` is the TTL left at capture, ``None``
    for a key without one.
    """

    key: bytes
    type: RedisType
    value: Any
    pttl_ms: int | None = None
    #: For DUMP entries: the server's original type name (``stream``, a module type).
    native_type: str | None = None


@dataclass(frozen=True, slots=True)
class TableRows:
    """Rows of one durable table: column names and the row tuples, in key order."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


@dataclass(frozen=True, slots=True)
class DurableSnapshot:
    """The durable rows of one task (and the global skill metadata it references)."""

    task_id: str
    tables: dict[str, TableRows]
    skills: TableRows

    @property
    def row_count(self) -> int:
        """Rows of the task itself, skill metadata not counted."""
        return sum(len(t.rows) for t in self.tables.values())


@dataclass(frozen=True, slots=True)
class CheckpointMetadata:
    """A row of the checkpoint catalog."""

    checkpoint_id: str
    task_id: str
    trigger: CheckpointTrigger
    status: CheckpointStatus
    state_hash: str
    runtime_state_hash: str
    durable_state_hash: str
    created_at: datetime
    completed_at: datetime | None = None
    error: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    key_count: int = 0
    row_count: int = 0
    #: Bytes of the encoded state before compression and deduplication.
    raw_bytes: int = 0
    #: Compressed bytes this checkpoint added to the store (0 when all were shared).
    stored_bytes: int = 0
    point_in_time: bool = True
    format_version: int = FORMAT_VERSION
    redis_version: str = ""
    last_recovered_at: datetime | None = None
    recovery_count: int = 0


@dataclass(slots=True)
class RecoveryResult:
    """What a recovery did."""

    success: bool
    checkpoint_id: str
    task_id: str
    runtime_state_restored: bool
    durable_state_restored: bool
    errors: list[str] = field(default_factory=list)
    timestamp: datetime = field(default_factory=lambda: datetime.now(UTC))
    keys_restored: int = 0
    keys_removed: int = 0
    rows_restored: int = 0
    #: Locks (or other keys) whose TTL had run out and were not brought back.
    keys_expired: int = 0
    #: True when the runtime keys were written in one atomic server-side step.
    atomic: bool = True


@dataclass(frozen=True, slots=True)
class TtlPolicy:
    """How TTLs come back on recovery.

    ``absolute`` keeps the key's original expiry instant: a key whose expiry has
    passed is not brought back. ``remaining`` gives the key the TTL it had left at
    capture, counted from the recovery.
    """

    locks: str = "absolute"
    others: str = "remaining"

    def __post_init__(self) -> None:
        for name in (self.locks, self.others):
            if name not in ("absolute", "remaining"):
                raise ValidationError(f"TTL policy must be 'absolute' or 'remaining', not {name!r}")


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    """Behaviour of a :class:`~cfn_checkpoint.CheckpointManager`; defaults follow the reference."""

    periodic_interval: timedelta = timedelta(minutes=5)
    retention_period: timedelta = timedelta(days=7)
    enable_auto_cleanup: bool = True
    ttl_policy: TtlPolicy = TtlPolicy()
    #: Tasks with at most this many keys are read and restored in one atomic step.
    atomic_max_keys: int = 50_000
    #: Keys per server-side step when a task is larger than ``atomic_max_keys``.
    batch_keys: int = 1_000
    #: On a database of at most this many keys, a capture finds the task's keys inside
    #: its Lua script: exactly point in time even while keys are being created, at the
    #: price of blocking Redis for the scan (about 7 ms at 10,000 keys here). On a
    #: larger database it SCANs from the client, while Redis reports the keys that
    #: change meanwhile (``CLIENT TRACKING``), and reads again if it missed one.
    scan_in_script_max_keys: int = 10_000
    #: On a database of at most this many keys, a restore finds the task's keys inside
    #: its Lua script, so no key created while it runs survives it (as does a capture
    #: whose reads keep missing new keys): it blocks Redis for the scan, about 0.5 s
    #: at 1,000,000 keys here. On a larger database the keys are listed from the client
    #: first, and a key created between that listing and the write survives.
    exact_scan_max_keys: int = 1_000_000
    #: Tasks with more keys than this are checkpointed and recovered a batch at a time,
    #: in bounded memory (always a full keyframe, never point in time).
    stream_min_keys: int = 200_000
    #: Seconds to wait for another create or recover of the same task.
    lock_timeout: float = 60.0
    #: zstandard compression level for payloads (see docs/benchmarks.md: level 1 packs as
    #: tight as 3 within 2% on task state, and a fifth faster).
    compression_level: int = 1
    #: Memory (estimated, over all tasks) for the last capture of each recently
    #: checkpointed task: a later capture equal to it is recognised as unchanged without
    #: packing or hashing a key. 0 keeps none.
    capture_memo_bytes: int = 64 << 20


@dataclass(frozen=True, slots=True)
class TaskState:
    """A task's runtime keys and durable rows (live, or as a checkpoint would restore them)."""

    task_id: str
    entries: list[RuntimeEntry]
    captured_at_ms: int
    tables: dict[str, TableRows]


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """One task as ``tasks()`` lists it."""

    task_id: str
    #: Runtime keys the task has in Redis now.
    live_keys: int
    #: Checkpoints of any status.
    checkpoints: int
    #: The newest completed or recovered checkpoint, if any.
    newest: CheckpointMetadata | None
