"""How the command shows checkpoints, keys, rows and differences: table rows and JSON.

JSON is exact: sizes in bytes, times in ISO-8601 UTC, TTLs in milliseconds, bytes as
the string when they are UTF-8 and ``{"base64": ...}`` when not. Tables are for
people: sizes and ages rounded, values made safe for a terminal.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from ._render import (
    PRETTY_LIMIT,
    bytes_json,
    cap_lines,
    count,
    cut_utf8,
    dedup_percent,
    human_age,
    human_size,
    one_line,
    plain_json,
    pretty_text,
    printable,
    seconds_since,
    show_bytes,
    utf8_prefix,
)
from .diff import Change, KeyChange, RecoveryPlan, RowChange, StateDiff
from .errors import CorruptCheckpointError
from .layout import KeyLayout
from .model import CheckpointMetadata, RecoveryResult, RedisType, RuntimeEntry, TaskSummary
from .transfer import metadata_to_dict

#: How each role's namespace is called in output.
NAMESPACE_LABELS = {"agent": "agents", "signal": "signals", "queue": "queues", "lock": "locks"}
#: Columns of ``list`` (and of other checkpoint tables).
CHECKPOINT_COLUMNS = (
    "checkpoint",
    "task",
    "trigger",
    "status",
    "age",
    "keys",
    "rows",
    "stored",
    "dedup",
)
CHECKPOINT_RIGHT = ("age", "keys", "rows", "stored", "dedup")
#: Symbols of a change in ``diff``.
SYMBOLS = {Change.ADDED: "+", Change.REMOVED: "-", Change.CHANGED: "~"}


# -- checkpoints -----------------------------------------------------------------------------


def dedup_ratio(meta: CheckpointMetadata) -> float:
    """``1 - stored_bytes / raw_bytes``, at least 0: the share of the checkpoint's encoded
    state it did not add to the store (shared with other checkpoints, or compressed away)."""
    if meta.raw_bytes <= 0:
        return 0.0
    return max(0.0, 1 - meta.stored_bytes / meta.raw_bytes)


def dedup_text(meta: CheckpointMetadata) -> str:
    """:func:`dedup_ratio` for a table: ``100%`` only when the checkpoint stored nothing."""
    return dedup_percent(meta.stored_bytes, meta.raw_bytes)


def checkpoint_json(meta: CheckpointMetadata, now: datetime | None = None) -> dict[str, Any]:
    """A catalog row as JSON, with ``age_seconds`` and ``dedup_ratio`` (exact) added."""
    out = plain_json(metadata_to_dict(meta))
    assert isinstance(out, dict)
    out["age_seconds"] = round(seconds_since(meta.created_at, now), 3)
    out["dedup_ratio"] = dedup_ratio(meta)
    return out


def checkpoint_row(meta: CheckpointMetadata, now: datetime | None = None) -> list[str]:
    """A row of :data:`CHECKPOINT_COLUMNS`."""
    return [
        meta.checkpoint_id,
        meta.task_id,
        meta.trigger.value,
        meta.status.value,
        human_age(seconds_since(meta.created_at, now)),
        str(meta.key_count),
        str(meta.row_count),
        human_size(meta.stored_bytes),
        dedup_text(meta),
    ]


def _when(moment: datetime | None, now: datetime | None) -> str:
    if moment is None:
        return "-"
    return f"{moment.isoformat(timespec='seconds')} ({human_age(seconds_since(moment, now))} ago)"


def checkpoint_fields(meta: CheckpointMetadata, now: datetime | None = None) -> list[list[str]]:
    """``[label, value]`` pairs describing one checkpoint, for ``show`` and friends."""
    capture = "point in time" if meta.point_in_time else "read in batches, not point in time"
    recovered = (
        f"{meta.recovery_count} times, last {_when(meta.last_recovered_at, now)}"
        if meta.recovery_count
        else "never"
    )
    return [
        ["checkpoint", meta.checkpoint_id],
        ["task", meta.task_id],
        ["trigger", meta.trigger.value],
        ["status", meta.status.value],
        ["created", _when(meta.created_at, now)],
        ["completed", _when(meta.completed_at, now)],
        ["keys", f"{meta.key_count} ({capture})"],
        ["rows", str(meta.row_count)],
        [
            "size",
            f"{human_size(meta.raw_bytes)} encoded, {human_size(meta.stored_bytes)} stored "
            f"(dedup {dedup_text(meta)})",
        ],
        ["redis", meta.redis_version or "-"],
        ["format", str(meta.format_version)],
        ["recovered", recovered],
        ["metadata", one_line(json.dumps(meta.metadata, sort_keys=True, ensure_ascii=False))],
        ["error", one_line(meta.error) if meta.error else "-"],
        ["state hash", meta.state_hash],
    ]


def task_json(summary: TaskSummary, now: datetime | None = None) -> dict[str, Any]:
    """One task of ``tasks`` as JSON."""
    return {
        "task_id": summary.task_id,
        "live_keys": summary.live_keys,
        "checkpoints": summary.checkpoints,
        "newest": None if summary.newest is None else checkpoint_json(summary.newest, now),
    }


def task_row(summary: TaskSummary, now: datetime | None = None) -> list[str]:
    """One task of ``tasks``: task, live keys, checkpoints, newest, its status and age."""
    newest = summary.newest
    return [
        summary.task_id,
        str(summary.live_keys),
        str(summary.checkpoints),
        newest.checkpoint_id if newest else "-",
        newest.status.value if newest else "-",
        human_age(seconds_since(newest.created_at, now)) if newest else "-",
    ]


def recovery_json(result: RecoveryResult) -> dict[str, Any]:
    """A :class:`RecoveryResult` as JSON."""
    return {
        "success": result.success,
        "checkpoint_id": result.checkpoint_id,
        "task_id": result.task_id,
        "runtime_state_restored": result.runtime_state_restored,
        "durable_state_restored": result.durable_state_restored,
        "keys_restored": result.keys_restored,
        "keys_removed": result.keys_removed,
        "keys_expired": result.keys_expired,
        "rows_restored": result.rows_restored,
        "atomic": result.atomic,
        "errors": list(result.errors),
        "timestamp": result.timestamp.isoformat(),
    }


def recovery_line(result: RecoveryResult) -> str:
    """What a recovery did, in one line."""
    parts = []
    if result.runtime_state_restored:
        atomic = "atomically" if result.atomic else "in batches"
        parts.append(
            f"{count(result.keys_restored, 'key')} written, {result.keys_removed} removed, "
            f"{result.keys_expired} left out (TTL ran out), {atomic}"
        )
    if result.durable_state_restored:
        parts.append(f"{count(result.rows_restored, 'durable row')} restored")
    return f"recovered task {result.task_id} from checkpoint {result.checkpoint_id}: " + "; ".join(
        parts
    )


def plan_json(
    plan: RecoveryPlan, task_id: str, tiers: Sequence[str], max_bytes: int | None = None
) -> dict[str, Any]:
    """A recovery dry run as JSON (values cut to ``max_bytes``)."""
    return {
        "dry_run": True,
        "task_id": task_id,
        "checkpoint": checkpoint_json(plan.checkpoint),
        "tiers": list(tiers),
        "changes": diff_json(plan.changes, max_bytes),
        "expired_keys": [bytes_json(k) for k in plan.expired_keys],
        "notes": list(plan.notes),
    }


def verify_json(
    results: Sequence[tuple[CheckpointMetadata, CorruptCheckpointError | None]],
) -> dict[str, Any]:
    """What ``verify`` found, as JSON."""
    return {
        "checked": len(results),
        "corrupt": sum(1 for _, e in results if e is not None),
        "results": [
            {
                "checkpoint_id": m.checkpoint_id,
                "task_id": m.task_id,
                "ok": e is None,
                "error": None if e is None else e.message,
            }
            for m, e in results
        ],
    }


# -- keys and values -------------------------------------------------------------------------


def entry_type(entry: RuntimeEntry) -> str:
    """The Redis type of a key (``stream`` rather than ``dump`` for DUMP payloads)."""
    if entry.type is RedisType.DUMP:
        return entry.native_type or "dump"
    return entry.type.value


def entry_size(entry: RuntimeEntry) -> int:
    """Bytes of a key's value: the string, or the sum of its members (fields and values)."""
    if entry.type in (RedisType.STRING, RedisType.DUMP):
        return len(entry.value)
    if entry.type in (RedisType.HASH, RedisType.ZSET):
        return sum(len(a) + len(b) for a, b in entry.value)
    return sum(len(item) for item in entry.value)


def value_json(entry: RuntimeEntry, max_bytes: int | None = None) -> tuple[Any, bool]:
    """A key's value as exact JSON (a string, a list, or ``[field, value]`` pairs), and
    whether it was cut: with ``max_bytes``, a string keeps its first ``max_bytes`` bytes
    (whole characters when it is UTF-8) and a collection its first elements that fit."""
    if entry.type in (RedisType.STRING, RedisType.DUMP):
        raw = entry.value
        if max_bytes is None or len(raw) <= max_bytes:
            return bytes_json(raw), False
        head = raw[:max_bytes]
        text = utf8_prefix(head) if _is_utf8(raw) else None
        return (bytes_json(head) if text is None else text), True
    pairs = entry.type in (RedisType.HASH, RedisType.ZSET)
    out: list[Any] = []
    budget = max_bytes
    for element in entry.value:
        size = len(element[0]) + len(element[1]) if pairs else len(element)
        if budget is not None:
            if size > budget:
                return out, True
            budget -= size
        if pairs:
            out.append([bytes_json(element[0]), bytes_json(element[1])])
        else:
            out.append(bytes_json(element))
    return out, False


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def entry_json(
    entry: RuntimeEntry, *, value: bool = True, max_bytes: int | None = None
) -> dict[str, Any]:
    """A key as JSON: key, type, TTL (ms, ``null`` for none), size, and the value
    (``"truncated": true`` added when ``max_bytes`` cut it)."""
    out: dict[str, Any] = {
        "key": bytes_json(entry.key),
        "type": entry_type(entry),
        "ttl_ms": entry.pttl_ms,
        "size": entry_size(entry),
    }
    if value:
        out["value"], truncated = value_json(entry, max_bytes)
        if truncated:
            out["truncated"] = True
    return out


def entry_row(entry: RuntimeEntry) -> list[str]:
    """A key for a table: key, type, TTL, size."""
    ttl = "-" if entry.pttl_ms is None else human_age(entry.pttl_ms / 1000)
    return [one_line(show_bytes(entry.key)), entry_type(entry), ttl, human_size(entry_size(entry))]


def value_view(entry: RuntimeEntry, max_bytes: int | None = None) -> tuple[list[str], bool]:
    """A key's value for reading and for line diffs: JSON strings indented, one line per
    list item, set member, hash field or sorted-set member; with ``max_bytes``, at most
    that many bytes of it and then ``… (truncated, N bytes in all)``. Returns the lines
    and whether the value was cut."""
    size = entry_size(entry)
    if entry.type is RedisType.STRING:
        raw = entry.value
        if max_bytes is None or len(raw) <= max(PRETTY_LIMIT, max_bytes):
            return cap_lines(pretty_text(raw).splitlines() or [""], max_bytes, size)
        # Too big to parse for a few bytes of it: its start, as it is.
        head = raw[: max_bytes + 4]
        text = utf8_prefix(head)
        shown = repr(head) if text is None else printable(text)
        return cap_lines(shown.splitlines(), max_bytes, size, cut=True)
    if entry.type is RedisType.DUMP:
        digest = hashlib.sha256(entry.value).hexdigest()[:12]
        size_text = human_size(len(entry.value))
        return [f"<{entry_type(entry)}: DUMP payload, {size_text}, {digest}>"], False
    return cap_lines(_element_lines(entry), max_bytes, size)


def _element_lines(entry: RuntimeEntry) -> Iterator[str]:
    if entry.type is RedisType.LIST:
        for i, item in enumerate(entry.value):
            yield f"[{i}] {one_line(show_bytes(item))}"
    elif entry.type is RedisType.SET:
        for member in entry.value:
            yield one_line(show_bytes(member))
    else:
        for a, b in entry.value:
            yield f"{one_line(show_bytes(a))}: {one_line(show_bytes(b))}"


def namespace_counts(
    layout: KeyLayout, task_id: str, entries: Sequence[RuntimeEntry]
) -> dict[str, dict[str, int]]:
    """Keys and bytes per namespace (``agents``, ``signals``, ``queues``, ``locks``)."""
    counts = {label: {"keys": 0, "bytes": 0} for label in NAMESPACE_LABELS.values()}
    for entry in entries:
        role = layout.role_of(task_id, entry.key)
        label = NAMESPACE_LABELS.get(role or "", "other")
        slot = counts.setdefault(label, {"keys": 0, "bytes": 0})
        slot["keys"] += 1
        slot["bytes"] += entry_size(entry)
    return counts


def find_entry(
    layout: KeyLayout, task_id: str, entries: Sequence[RuntimeEntry], raw: bytes
) -> list[RuntimeEntry]:
    """The keys ``raw`` may mean: the full key, the key without the layout's prefix, or
    the part after the task's prefix in any namespace (``coder`` for ``agent:t1:coder``)."""
    wanted = {raw, layout.prefix.encode() + raw}
    wanted.update(p + raw for p in layout.task_prefixes(task_id))
    exact = [e for e in entries if e.key == raw]
    return exact or [e for e in entries if e.key in wanted]


# -- differences -----------------------------------------------------------------------------


def _cut_cell(value: Any, max_bytes: int | None) -> tuple[Any, bool]:
    """A row value with text or bytes longer than ``max_bytes`` cut to that many bytes."""
    if max_bytes is None:
        return value, False
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        return (raw[:max_bytes], True) if len(raw) > max_bytes else (raw, False)
    if isinstance(value, str):
        cut = cut_utf8(value, max_bytes)
        return cut, len(cut) < len(value)
    return value, False


def _row_dict(
    columns: Sequence[str], row: Sequence[Any] | None, max_bytes: int | None, cut: set[str]
) -> dict[str, Any] | None:
    if row is None:
        return None
    cells = {}
    for column, value in zip(columns, row, strict=False):
        cells[column], truncated = _cut_cell(value, max_bytes)
        if truncated:
            cut.add(column)
    out = plain_json(cells)
    assert isinstance(out, dict)
    return out


def key_change_json(change: KeyChange, max_bytes: int | None = None) -> dict[str, Any]:
    """One changed key as JSON, with both sides in full (or cut to ``max_bytes``)."""
    return {
        "key": bytes_json(change.key),
        "change": change.change.value,
        "detail": change.detail,
        "old": None if change.old is None else entry_json(change.old, max_bytes=max_bytes),
        "new": None if change.new is None else entry_json(change.new, max_bytes=max_bytes),
    }


def row_change_json(change: RowChange, max_bytes: int | None = None) -> dict[str, Any]:
    """One changed durable row as JSON, with both sides as column -> value objects; with
    ``max_bytes``, longer text and bytes are cut and ``"truncated"`` names their columns."""
    cut: set[str] = set()
    out = {
        "table": change.table,
        "row_id": plain_json(change.row_id),
        "change": change.change.value,
        "old": _row_dict(change.columns, change.old, max_bytes, cut),
        "new": _row_dict(change.columns, change.new, max_bytes, cut),
    }
    if cut:
        out["truncated"] = [c for c in change.columns if c in cut]
    return out


def diff_json(diff: StateDiff, max_bytes: int | None = None) -> dict[str, Any]:
    """A :class:`StateDiff` as JSON: counts, keys and rows (values cut to ``max_bytes``)."""
    return {
        "empty": diff.empty,
        "counts": diff.counts(),
        "keys": [key_change_json(c, max_bytes) for c in diff.keys],
        "rows": [row_change_json(c, max_bytes) for c in diff.rows],
    }


def changed_columns(change: RowChange) -> list[str]:
    """Columns whose values differ between the two sides of a row."""
    if change.old is None or change.new is None:
        return []
    return [c for c, a, b in zip(change.columns, change.old, change.new, strict=False) if a != b]


def key_change_row(change: KeyChange, verbs: Mapping[Change, str]) -> list[str]:
    """A changed key for a table: symbol, what happens, key, type, detail."""
    entry = change.new or change.old
    assert entry is not None
    return [
        SYMBOLS[change.change],
        verbs[change.change],
        one_line(show_bytes(change.key)),
        entry_type(entry),
        change.detail,
    ]


def row_change_row(change: RowChange, verbs: Mapping[Change, str]) -> list[str]:
    """A changed row for a table: symbol, what happens, table, id, columns that differ."""
    return [
        SYMBOLS[change.change],
        verbs[change.change],
        change.table,
        one_line(str(change.row_id)),
        ", ".join(changed_columns(change)),
    ]


def _row_lines(
    columns: Sequence[str], row: Sequence[Any] | None, max_bytes: int | None
) -> list[str]:
    if row is None:
        return []
    lines = []
    for column, value in zip(columns, row, strict=False):
        text = one_line(json.dumps(plain_json(value), ensure_ascii=False))
        size = len(value) if isinstance(value, bytes) else len(text.encode("utf-8"))
        shown, _ = cap_lines([f"{column}: {text}"], max_bytes, size)
        lines += shown
    return lines


def unified(old: list[str], new: list[str], old_name: str, new_name: str) -> list[str]:
    """A unified diff of two line lists (no trailing newlines), with its header."""
    return [
        line.rstrip("\n")
        for line in difflib.unified_diff(old, new, old_name, new_name, lineterm="", n=3)
    ]


def key_value_diff(
    change: KeyChange, old_label: str, new_label: str, max_bytes: int | None = None
) -> list[str]:
    """The value diff of a changed key, each side cut to ``max_bytes``; empty when only
    its TTL presence changed."""
    parts = {p.strip() for p in change.detail.split(",")}
    if change.old is None or change.new is None or not parts & {"value", "type"}:
        return []
    name = one_line(show_bytes(change.key))
    old_lines, old_cut = value_view(change.old, max_bytes)
    new_lines, new_cut = value_view(change.new, max_bytes)
    lines = unified(old_lines, new_lines, f"{name} ({old_label})", f"{name} ({new_label})")
    if lines:
        return lines
    if old_cut or new_cut:
        return [f"--- {name}: the values differ after the first {max_bytes} bytes shown"]
    return [f"--- {name}: the values differ only in JSON formatting or key order"]


def row_value_diff(
    change: RowChange, old_label: str, new_label: str, max_bytes: int | None = None
) -> list[str]:
    """The column-by-column diff of a changed row, each value cut to ``max_bytes``."""
    if change.change is not Change.CHANGED:
        return []
    name = f"{change.table} {one_line(str(change.row_id))}"
    lines = unified(
        _row_lines(change.columns, change.old, max_bytes),
        _row_lines(change.columns, change.new, max_bytes),
        f"{name} ({old_label})",
        f"{name} ({new_label})",
    )
    return lines or [f"--- {name}: the values differ after the first {max_bytes} bytes shown"]
