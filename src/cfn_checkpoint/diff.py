"""Differences between two task states: runtime keys and durable rows.

TTL values tick down, so keys are compared by type, value and whether they have a
TTL; a TTL that merely shrank is no difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from .model import CheckpointMetadata, RuntimeEntry, TableRows


class Change(StrEnum):
    """How one key or row differs."""

    ADDED = "added"
    REMOVED = "removed"
    CHANGED = "changed"


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A runtime key that differs; ``old``/``new`` is ``None`` where it does not exist."""

    key: bytes
    change: Change
    old: RuntimeEntry | None
    new: RuntimeEntry | None
    #: What changed: ``type``, ``value``, ``ttl added``, ``ttl removed`` (comma-separated).
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RowChange:
    """A durable row that differs, identified by its table and primary key."""

    table: str
    row_id: Any
    change: Change
    columns: list[str]
    old: tuple[Any, ...] | None
    new: tuple[Any, ...] | None


@dataclass(frozen=True, slots=True)
class StateDiff:
    """Every key and row that differs from ``old`` to ``new``."""

    keys: list[KeyChange]
    rows: list[RowChange]

    @property
    def empty(self) -> bool:
        """True when the two states are the same."""
        return not self.keys and not self.rows

    def counts(self) -> dict[str, int]:
        """Number of added, removed and changed keys and rows."""
        out: dict[str, int] = {}
        for prefix, items in (("keys", self.keys), ("rows", self.rows)):
            for change in Change:
                out[f"{prefix}_{change.value}"] = sum(1 for i in items if i.change is change)
        return out


def _key_detail(old: RuntimeEntry, new: RuntimeEntry) -> str:
    parts = []
    if old.type != new.type or old.native_type != new.native_type:
        parts.append("type")
    elif old.value != new.value:
        parts.append("value")
    if (old.pttl_ms is None) != (new.pttl_ms is None):
        parts.append("ttl removed" if new.pttl_ms is None else "ttl added")
    return ", ".join(parts)


def diff_keys(old: Sequence[RuntimeEntry], new: Sequence[RuntimeEntry]) -> list[KeyChange]:
    """Keys added, removed or changed from ``old`` to ``new``, sorted by key."""
    before = {e.key: e for e in old}
    after = {e.key: e for e in new}
    changes: list[KeyChange] = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a is None:
            changes.append(KeyChange(key, Change.ADDED, None, b))
        elif b is None:
            changes.append(KeyChange(key, Change.REMOVED, a, None))
        else:
            detail = _key_detail(a, b)
            if detail:
                changes.append(KeyChange(key, Change.CHANGED, a, b, detail))
    return changes


#: A TTL that would move by more than this (and by more than 1%) is reported by a plan.
TTL_MOVE_TOLERANCE_MS = 1_000


def _human_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1_000)):
        if ms >= size:
            return f"{ms / size:.3g}{unit}"
    return f"{ms}ms"


def ttl_moves(now: Sequence[RuntimeEntry], then: Sequence[RuntimeEntry]) -> list[KeyChange]:
    """Keys the same in content in both, whose TTL would move noticeably from ``now`` to
    ``then`` (a renewed lock cut back, a key about to expire given its old TTL)."""
    before = {e.key: e for e in now}
    moves = []
    for entry in then:
        old = before.get(entry.key)
        if old is None or old.pttl_ms is None or entry.pttl_ms is None or _key_detail(old, entry):
            continue
        gap = abs(old.pttl_ms - entry.pttl_ms)
        if gap > TTL_MOVE_TOLERANCE_MS and gap > 0.01 * max(old.pttl_ms, entry.pttl_ms):
            detail = f"ttl {_human_ms(old.pttl_ms)} -> {_human_ms(entry.pttl_ms)}"
            moves.append(KeyChange(entry.key, Change.CHANGED, old, entry, detail))
    return moves


def diff_rows(old: dict[str, TableRows], new: dict[str, TableRows]) -> list[RowChange]:
    """Rows added, removed or changed, table by table, keyed by the first column (``id``)."""
    changes: list[RowChange] = []
    for table in sorted(old.keys() | new.keys()):
        a = old.get(table, TableRows([], []))
        b = new.get(table, TableRows([], []))
        columns = b.columns or a.columns
        before = {row[0]: row for row in a.rows}
        after = {row[0]: row for row in b.rows}
        for row_id in sorted(before.keys() | after.keys(), key=repr):
            x, y = before.get(row_id), after.get(row_id)
            if x is None:
                changes.append(RowChange(table, row_id, Change.ADDED, columns, None, y))
            elif y is None:
                changes.append(RowChange(table, row_id, Change.REMOVED, columns, x, None))
            elif x != y:
                changes.append(RowChange(table, row_id, Change.CHANGED, columns, x, y))
    return changes


def diff_states(
    old_entries: Sequence[RuntimeEntry],
    old_tables: dict[str, TableRows],
    new_entries: Sequence[RuntimeEntry],
    new_tables: dict[str, TableRows],
) -> StateDiff:
    """The difference between two whole task states."""
    return StateDiff(diff_keys(old_entries, new_entries), diff_rows(old_tables, new_tables))


@dataclass(frozen=True, slots=True)
class RecoveryPlan:
    """What a recovery would change now, computed without changing anything."""

    checkpoint: CheckpointMetadata
    #: From the task as it is now to the task as the recovery would leave it.
    changes: StateDiff
    #: Keys of the checkpoint the TTL policy would leave out (their TTL ran out).
    expired_keys: list[bytes]
    #: Corrupt checkpoints skipped on the way, as recovery would report them.
    notes: list[str]
