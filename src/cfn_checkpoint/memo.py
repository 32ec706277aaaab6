"""Captures kept in memory, so an unchanged task is recognised without packing a key.

A capture's flat reply (see :class:`~cfn_checkpoint.image.Snapshot`) holds every key's
value and expiry instant as read. If a later capture of the task is equal to the one
kept for its newest checkpoint, the task's runtime state is that checkpoint's: no row
needs packing or hashing. A capture read on one server may be kept as its replies'
bytes (smaller than the objects), which the next capture is told to expect: the
runtime then compares the bytes as they arrive and parses nothing when they agree
(see :mod:`~cfn_checkpoint.runtime.reply`, and :meth:`CaptureMemo.keep` for when).
Any other capture is kept as objects. What is kept is bounded by an estimate of the
memory it takes, over all tasks, and is safe to use from several threads.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from .image import Snapshot
from .pieces import Pieces

#: Estimated bytes a Python object in a reply takes besides its content (a ``bytes`` is
#: 33 plus allocator rounding, an ``int`` 28-32, and each slot of a list holding it 8).
_PER_OBJECT = 40
_PER_LIST = 56
#: ... and what a piece of a reply's bytes takes besides them (a ``bytes`` header, the
#: allocator's, a slot in its tuple: 59 measured for a reply of 229 bytes).
_PER_PIECE = 128


@dataclass(frozen=True, slots=True)
class _Kept:
    checkpoint_id: str
    #: The replies' bytes, or the reply's items.
    raw: tuple[Pieces, ...] | None
    flat: list[Any] | None
    size: int
    #: Kept as items, and a later capture compared equal to them: the next capture is
    #: worth reading as bytes even where that costs more (see :meth:`CaptureMemo.keep`).
    wants_bytes: bool = False


class CaptureMemo:
    """For each task, the capture that matched its newest checkpoint (least recently
    used dropped first once the estimate passes ``max_bytes``; 0 keeps nothing)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._kept: OrderedDict[str, _Kept] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    @property
    def size(self) -> int:
        """The estimated bytes kept now."""
        return self._size

    def _get(self, task_id: str, checkpoint_id: str, *, touch: bool = False) -> _Kept | None:
        """What is kept for ``checkpoint_id``, if anything; ``touch``: and it is now the
        most recently used."""
        with self._lock:
            kept = self._kept.get(task_id)
            if kept is None or kept.checkpoint_id != checkpoint_id:
                return None
            if touch:
                self._kept.move_to_end(task_id)
            return kept

    def expected(self, task_id: str, checkpoint_id: str) -> tuple[Pieces, ...] | None:
        """The reply bytes kept for ``checkpoint_id``, if it was kept so: what a capture
        of an unchanged task reads as, but for its clocks."""
        kept = self._get(task_id, checkpoint_id)
        return None if kept is None else kept.raw

    def wants_bytes(self, task_id: str, checkpoint_id: str) -> bool:
        """Whether the next capture of the task should come with its replies' bytes even
        where that costs more: bytes are kept for ``checkpoint_id`` (the last capture
        read as expected), or items that a later capture matched."""
        kept = self._get(task_id, checkpoint_id)
        return kept is not None and (kept.raw is not None or kept.wants_bytes)

    def matches(self, task_id: str, checkpoint_id: str, snapshot: Snapshot) -> bool:
        """Whether ``snapshot`` reads exactly as the capture kept for ``checkpoint_id``.

        A snapshot read :attr:`~Snapshot.as_expected` matches the bytes it was told
        to expect (those kept: see :meth:`expected`). Otherwise, when items are kept
        and they are equal, ``snapshot`` takes the kept ones in place of its own, so
        its own are freed at once: a large reply left alive would cost the cyclic
        collector a walk over all its objects. Then, if ``snapshot`` came with its
        replies' bytes, those are kept from now on instead; if not, the next capture
        is asked to bring them (:meth:`wants_bytes`).
        """
        kept = self._get(task_id, checkpoint_id, touch=True)
        if kept is None:
            return False
        if kept.raw is not None:
            return snapshot.as_expected and snapshot.raw is kept.raw
        if kept.flat is None or kept.flat != snapshot.flat:
            return False
        snapshot.share(kept.flat)
        if snapshot.raw is not None:
            self._store(task_id, checkpoint_id, snapshot.raw, None, estimate(snapshot))
        else:
            self._store(task_id, checkpoint_id, None, kept.flat, kept.size, wants_bytes=True)
        return True

    def keep(self, task_id: str, checkpoint_id: str, snapshot: Snapshot) -> None:
        """Keep ``snapshot`` as what ``checkpoint_id``'s runtime state reads as.

        As its replies' bytes when it has them and was read in one call (a point-in-time
        read, where bytes cost nothing more) or as expected; otherwise as its items. A
        task read in batches is read as bytes one call at a time, which costs more than
        one pipeline when the bytes differ (14 ms at 100,000 keys here, and a round
        trip a batch over a network): a task whose captures keep changing is read the
        cheaper way, and only one found unchanged again is read as bytes.
        """
        if snapshot.raw is not None and snapshot.kept_as_bytes:
            self._store(task_id, checkpoint_id, snapshot.raw, None, estimate(snapshot))
        else:
            self._store(task_id, checkpoint_id, None, snapshot.flat, estimate(snapshot, raw=False))

    def _store(
        self,
        task_id: str,
        checkpoint_id: str,
        raw: tuple[Pieces, ...] | None,
        flat: list[Any] | None,
        size: int,
        *,
        wants_bytes: bool = False,
    ) -> None:
        with self._lock:
            old = self._kept.pop(task_id, None)
            if old is not None:
                self._size -= old.size
            if size > self.max_bytes:
                return
            self._kept[task_id] = _Kept(checkpoint_id, raw, flat, size, wants_bytes)
            self._size += size
            while self._size > self.max_bytes:
                _, dropped = self._kept.popitem(last=False)
                self._size -= dropped.size


def estimate(snapshot: Snapshot, *, raw: bool = True) -> int:
    """Bytes that keeping ``snapshot``'s reply takes, estimated from above: its bytes
    and a fixed cost a piece when it has them (and ``raw``); otherwise its rows' bytes
    plus a fixed cost per Python object (measured with tracemalloc: 0.5-0.85 of this on
    tasks of small hash fields and of JSON strings)."""
    if raw and snapshot.raw is not None:
        return sum(reply.size() + _PER_PIECE * len(reply) for reply in snapshot.raw)
    row_bytes, lists, items = snapshot.sizes
    return row_bytes + _PER_OBJECT * (len(snapshot.flat) + items) + _PER_LIST * lists
