"""The commands that write a task's keys back on one server, as a restore's MULTI/EXEC
sends them (see ``RedisRuntime._write_transaction``), and the TTLs they set.

Where the C part of the row codec was built (``image.native``), the rows of a
checkpoint stored as plain strings and lists have their commands written as RESP
from the rows' bytes, in C (1.7 against 9.4 ms at 10,000 keys, made and packed in
Python); the other keys' commands follow them, made as below. Elsewhere they are
made in one pass over the entries, which also checks each key's prefix and plans its
TTL: at 10,000 keys a pass costs a few ms of Python, and three separate ones (the
prefix check, the TTL plan making an ``(entry, TTL)`` pair a key, the commands) took
8-9.5 ms against 3.3-4.8 ms for one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import itemgetter
from typing import Any, NamedTuple

from .. import image
from ..errors import CheckpointError, RestoreError
from ..image import PLAIN_TYPES, DecodedRows, plain_entry
from ..model import RedisType, RuntimeEntry, TtlPolicy
from .transaction import Prepacked

__all__ = ["AS_GIVEN", "Restoring", "TtlClock", "items_of", "restore_commands"]

_STRING, _DUMP, _LIST, _SET = RedisType.STRING, RedisType.DUMP, RedisType.LIST, RedisType.SET
_ADD = {
    RedisType.LIST: b"RPUSH",
    RedisType.SET: b"SADD",
    RedisType.HASH: b"HSET",
    RedisType.ZSET: b"ZADD",
}
_key = itemgetter(0)


@dataclass(frozen=True, slots=True)
class TtlClock:
    """The TTLs a restore sets now, for keys captured ``elapsed_ms`` ago on the server
    clock: under ``policy`` a key keeps its expiry instant (``absolute``: its TTL less
    the time elapsed) or the TTL it had left (``remaining``). Keys under
    ``lock_prefix`` follow the policy for locks."""

    elapsed_ms: int
    policy: TtlPolicy
    lock_prefix: bytes

    def split(
        self, entries: Sequence[RuntimeEntry]
    ) -> tuple[list[tuple[RuntimeEntry, int]], list[RuntimeEntry]]:
        """``(entry, TTL ms or -1)`` for each entry to write, and the entries left out
        because their TTL has run out."""
        writes: list[tuple[RuntimeEntry, int]] = []
        lapsed: list[RuntimeEntry] = []
        locks, others = self._absolute()
        for entry in entries:
            pttl = entry.pttl_ms
            if pttl is None:
                writes.append((entry, -1))
                continue
            if locks if entry.key.startswith(self.lock_prefix) else others:
                pttl -= self.elapsed_ms
            if pttl <= 0:
                lapsed.append(entry)
            else:
                writes.append((entry, pttl))
        return writes, lapsed

    def _absolute(self) -> tuple[bool, bool]:
        """Whether locks, and other keys, keep their expiry instant."""
        return self.policy.locks == "absolute", self.policy.others == "absolute"


#: TTLs exactly as the entries carry them (entries whose TTL was planned already).
AS_GIVEN = TtlClock(0, TtlPolicy("remaining", "remaining"), b"")


class Restoring(NamedTuple):
    """What a restore's transaction sends, and what it leaves out."""

    #: The commands, in order: DEL of the keys rebuilt by one command (1,000 a
    #: command), one MSET of the strings without a TTL, then a command a key (SET PX,
    #: RESTORE REPLACE, RPUSH / SADD / HSET / ZADD, each followed by PEXPIRE for a
    #: TTL). Rows as stored that the C part of the codec wrote come first, already
    #: packed, in that order; then the commands of the other keys, in that order.
    #: None when a key comes twice (never from a checkpoint): deleting first would
    #: merge them, where the RESTORE script writes the entries in order and the last
    #: one stays.
    commands: list[tuple[Any, ...] | Prepacked] | None
    #: How many keys the commands write.
    written: int
    #: The entries left out because their TTL has run out.
    lapsed: list[RuntimeEntry]
    #: The entries written from a DUMP payload (this server must be able to read them).
    dumps: list[RuntimeEntry]


def restore_commands(
    task_id: str,
    prefixes: tuple[bytes, ...],
    entries: Sequence[RuntimeEntry] | DecodedRows,
    clock: TtlClock,
) -> Restoring:
    """The commands that write ``entries`` (or rows decoded from a checkpoint, written
    without making an entry of each) with the TTLs of ``clock``, as the RESTORE
    script writes them. Raises :class:`RestoreError`, before anything is sent, for a
    key not under one of ``prefixes`` (the task's)."""
    if (
        isinstance(entries, DecodedRows)
        and image.native is not None
        and entries.in_order()
        and entries.all_under(prefixes)
    ):
        return _packed_commands(task_id, prefixes, entries, clock)
    return _commands(task_id, prefixes, entries, clock)


def _commands(
    task_id: str,
    prefixes: tuple[bytes, ...],
    entries: Sequence[RuntimeEntry] | DecodedRows,
    clock: TtlClock,
) -> Restoring:
    """:func:`restore_commands`, each command made in Python."""
    plain: list[bytes] = []
    rebuilt: list[bytes] = []
    out: list[tuple[Any, ...]] = []
    lapsed: list[RuntimeEntry] = []
    dumps: list[RuntimeEntry] = []
    add, lock_prefix, elapsed = out.append, clock.lock_prefix, clock.elapsed_ms
    locks, others = clock._absolute()
    if isinstance(entries, DecodedRows):
        items: Iterable[tuple[Any, int | None]] = zip(entries.rows, entries.expiries, strict=True)
        captured = entries.captured_at_ms
        unique = entries.in_order() or len(set(entries.keys)) == len(entries.keys)
        checked = entries.all_under(prefixes)  # else the key not under them is named
    else:
        items, captured, checked = zip(entries, repeat(None)), 0, False
        unique = len(set(map(_key, entries))) == len(entries)
    for item, expiry in items:
        if item.__class__ is bytes:  # a row as stored, not decoded (see DecodedRows)
            item = image._as_list(item)
        if item.__class__ is list:  # a row as stored: a plain string or list
            key, value = item[0], item[2]
            kind = PLAIN_TYPES[item[1]]
            pttl = None if expiry is None else expiry - captured
        else:
            key, kind, value, pttl, _ = item
        if not checked and not key.startswith(prefixes):
            raise RestoreError(f"checkpoint key {key!r} does not belong to task {task_id}")
        if pttl is not None:
            if locks if key.startswith(lock_prefix) else others:
                pttl -= elapsed
            if pttl <= 0:
                lapsed.append(_entry(item, expiry, captured))
                continue
        if kind is _STRING:
            if pttl is None:
                plain += (key, value)
            else:
                add((b"SET", key, value, b"PX", pttl))
        elif kind is _DUMP:
            dumps.append(item)
            add((b"RESTORE", key, pttl or 0, value, b"REPLACE"))
        else:
            rebuilt.append(key)
            values = value if kind is _LIST or kind is _SET else items_of(item)
            if values:  # none: the key stays deleted, as Redis keeps no empty one
                add((_ADD[kind], key, *values))
                if pttl is not None:
                    add((b"PEXPIRE", key, pttl))
    written = len(entries) - len(lapsed)
    if not unique:
        return Restoring(None, written, lapsed, dumps)
    head: list[tuple[Any, ...]] = [
        (b"DEL", *rebuilt[i : i + 1000]) for i in range(0, len(rebuilt), 1000)
    ]
    if plain:  # one MSET: refused by an ACL, it is refused once
        head.append((b"MSET", *plain))
    return Restoring(head + out, written, lapsed, dumps)


def _packed_commands(
    task_id: str, prefixes: tuple[bytes, ...], rows: DecodedRows, clock: TtlClock
) -> Restoring:
    """:func:`restore_commands` for rows whose keys are in order and under
    ``prefixes``: the rows as stored written by the C part of the codec, as RESP made
    from their bytes, the others (entries) as they are written otherwise."""
    assert image.native is not None
    locks, others = clock._absolute()
    try:
        data, count, lapsed_at, other_at = image.native.restore(
            rows.rows,
            rows.expiries,
            rows.captured_at_ms,
            clock.elapsed_ms if locks else 0,
            clock.elapsed_ms if others else 0,
            clock.lock_prefix,
        )
    except (TypeError, ValueError, OverflowError):
        # Never from a checkpoint decoded here: rows made by a caller, with a row as
        # bytes that is not plain, an expiry that is not an int or beyond 64 bits.
        return _commands(task_id, prefixes, rows, clock)
    captured = rows.captured_at_ms
    lapsed = [_entry(rows.rows[i], rows.expiries[i], captured) for i in lapsed_at]
    commands: list[tuple[Any, ...] | Prepacked] = [Prepacked(data, count)] if count else []
    dumps: list[RuntimeEntry] = []
    if other_at:
        rest = _commands(task_id, prefixes, rows.pick(other_at), clock)
        assert rest.commands is not None  # keys in order: each once
        commands += rest.commands
        lapsed = sorted(lapsed + rest.lapsed)  # in key order, as made in Python
        dumps = rest.dumps
    return Restoring(commands, len(rows) - len(lapsed), lapsed, dumps)


def _entry(item: Any, expiry: int | None, captured: int) -> RuntimeEntry:
    """An entry, or a row as stored (see :class:`DecodedRows`) made one."""
    as_stored = item.__class__ is list or item.__class__ is bytes
    entry: RuntimeEntry = plain_entry(item, expiry, captured) if as_stored else item
    return entry


def items_of(entry: RuntimeEntry) -> list[bytes]:
    """The items of a list or a set, a hash's fields and values, a sorted set's scores
    and members: as the command that rebuilds the key (and the RESTORE script) takes
    them."""
    kind = entry.type
    if kind is _LIST or kind is _SET:
        return list(entry.value)
    if kind is RedisType.HASH:
        return [part for pair in entry.value for part in pair]
    if kind is RedisType.ZSET:
        return [part for member, score in entry.value for part in (score, member)]
    raise CheckpointError(f"cannot restore a key of type {kind}")
