"""The runtime tier: reading and writing one task's keys in Redis, one server or a cluster.

On a Redis Cluster a script may touch only the keys it declares, all in one slot. Under
the cluster layout (``agent:{<task>}:...``) a task's keys share one slot, so it keeps
every guarantee of a single server: its keys are listed on the node serving that slot
(:data:`~cfn_checkpoint.runtime.scripts.SLOT_KEYS`) and read, or written, in one script.
Under the reference layout they spread over slots and nodes: they are read and written
one slot at a time (one script per slot, pipelined per node), so such a capture is not
point in time (the checkpoint says so) and such a restore is not atomic.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from operator import attrgetter, lt, methodcaller
from typing import Any

import msgpack
import redis
from redis.cluster import RedisCluster
from redis.commands.core import Script
from redis.crc import key_slot
from redis.exceptions import NoPermissionError

from ..errors import CheckpointError, RestoreError, StoreUnavailableError
from ..image import DecodedRows, Packed, Snapshot, gc_paused, packed_rows
from ..layout import KeyLayout, escape_glob, validate_task_id
from ..model import RedisType, RuntimeEntry, TtlPolicy
from ..pieces import Pieces
from . import scripts
from .commands import AS_GIVEN, Restoring, TtlClock, items_of, restore_commands
from .connection import REDIS_ERRORS, RedisClient, connect, redact_url, redis_errors
from .reply import RawReply, call_scripts
from .transaction import Refused, transaction
from .watch import KeyWatch, WatchPool

__all__ = [
    "REDIS_ERRORS",
    "RedisClient",
    "RedisRuntime",
    "RestoreStats",
    "connect",
    "redact_url",
    "redis_errors",
]

#: Redis types read natively; every other type is kept as a DUMP payload.
_NATIVE = {"string", "list", "hash", "set", "zset"}
#: Packs restore specs for Redis's cmsgpack, which reads bytes as raw strings, not bin.
_SPEC_PACKER = msgpack.Packer(use_bin_type=False)
#: How often capture re-reads when keys appear meanwhile.
_CAPTURE_ATTEMPTS = 3
#: How often a read or write of one Redis Cluster slot is tried again with keys of the task
#: that appeared between listing and running. Each try is one script call, and it fails
#: only for keys created in that window (one round trip), so busy tasks get a few more.
_SLOT_ATTEMPTS = 10
#: Keys of the listings kept, in all (:meth:`RedisRuntime.task_keys`): a task streamed in
#: batches (200,000 keys and more) is not kept; its listing and sorted keys take about 2
#: pointers a key, and the keys themselves.
_LISTINGS_MAX_KEYS = 200_000
#: SCAN's COUNT inside a script: it blocks Redis for the whole walk anyway, so fewer,
#: larger pages only save calls (a client SCAN pages by ``scan_count``, not to hold
#: Redis up).
_SCRIPT_SCAN_COUNT = 10_000
#: Keys one SCAN page returns when estimating the share of a database a task not seen
#: before holds (inside the capture script; about 1 us a key to list the whole database).
_SAMPLE_KEYS = 1_000
#: Script calls sent in one pipeline when a task's keys spread over many slots.
_PIPELINE_CALLS = 1000


class _Declined(Enum):
    """Why :data:`~.scripts.CAPTURE_SCAN` read nothing."""

    TOO_MANY = "the task has more keys than may be read at once"
    COSTLY = "the database is too large to scan inside the script"


_TOO_MANY, _COSTLY = _Declined.TOO_MANY, _Declined.COSTLY


@dataclass(frozen=True, slots=True)
class RestoreStats:
    """What a runtime restore wrote."""

    keys_written: int
    keys_removed: int
    keys_expired: int
    atomic: bool


def _one_call_snapshot(
    task_id: str, read: RawReply, raw: bool, expected: tuple[Pieces, ...] | None
) -> Snapshot:
    """The point-in-time snapshot of one capture script's reply read as bytes: found as
    ``expected`` (nothing parsed), or parsed, with its bytes when ``raw`` (and no push
    message came with them)."""
    if read.value is None:
        assert read.clock is not None and expected is not None  # the expected reply's
        return Snapshot(task_id, None, read.clock, True, raw=expected, as_expected=True)
    kept = (read.data,) if raw and read.data is not None else None
    return Snapshot(task_id, read.value[1:], int(read.value[0]), point_in_time=True, raw=kept)


class RedisRuntime:
    """One Redis server or Redis Cluster (a client to it) and the key layout of its tasks."""

    def __init__(
        self,
        client: RedisClient,
        *,
        layout: KeyLayout | None = None,
        scan_count: int = 10_000,
        scan_in_script_max_keys: int = 10_000,
        exact_scan_max_keys: int = 1_000_000,
    ) -> None:
        """``layout`` defaults to the reference layout on one server and to the cluster
        layout (task in a hash tag) on a Redis Cluster."""
        self.client = client
        #: True when ``client`` is a :class:`redis.cluster.RedisCluster`.
        self.cluster = isinstance(client, RedisCluster)
        self.layout = layout or KeyLayout(cluster=self.cluster)
        #: SCAN's COUNT for listings from the client: each call walks about this many
        #: entries of the keyspace (a few ms of Redis at 10,000), so fewer round trips.
        self.scan_count = scan_count
        #: Largest database (in keys) whose task keys every capture finds with a SCAN
        #: inside its Lua script. That scan walks the whole keyspace and blocks Redis
        #: meanwhile (about 0.5-0.75 us per key measured here: some 7 ms at 10,000 keys).
        self.scan_in_script_max_keys = scan_in_script_max_keys
        #: Largest database whose whole keyspace a restore, or a capture whose reads
        #: keep missing new keys, walks inside its script to be exact (0.5 s at 1,000,000
        #: keys here). Above it they list the task's keys from the client first.
        self.exact_scan_max_keys = exact_scan_max_keys
        self._watches = None if isinstance(client, RedisCluster) else WatchPool(client)
        self._capture = Script(client, scripts.CAPTURE)
        self._capture_scan = Script(client, scripts.CAPTURE_SCAN)
        self._restore = Script(client, scripts.RESTORE)
        #: Whether a restore on one server may write in a MULTI/EXEC: until one is refused.
        self._transactions = True
        self._delete = Script(client, scripts.DELETE)
        self._slot_keys = Script(client, scripts.SLOT_KEYS)
        self._clock = Script(client, scripts.CLOCK)
        #: The last listing of the tasks listed most recently: the keys as SCAN gave
        #: them, and sorted (see :meth:`task_keys`), by scan pattern and prefixes.
        self._listings: OrderedDict[
            tuple[bytes, tuple[bytes, ...]], tuple[list[bytes], list[bytes]]
        ] = OrderedDict()
        self._listed_keys = 0  # in the listings kept
        #: Keys of the listings kept, in all (see :data:`_LISTINGS_MAX_KEYS`).
        self.listings_max_keys = _LISTINGS_MAX_KEYS
        self._listings_lock = threading.Lock()

    @property
    def point_in_time(self) -> bool:
        """Whether a task's keys can be read (and written) in one atomic step: always on
        one server; on a cluster only under the cluster layout (one slot per task)."""
        return not self.cluster or self.layout.cluster

    def version(self) -> str:
        """The server's ``redis_version`` (on a cluster: of one node)."""
        with redis_errors("reading the server version"):
            info: dict[str, Any] = self.client.info("server")
        return str(info.get("redis_version", ""))

    def server_time_ms(self, task_id: str | None = None) -> int:
        """The server clock in ms since the epoch (the clock TTL deadlines are kept in).

        On a cluster, the clock of the node serving ``task_id``'s hash tag: under the
        cluster layout, the node its keys and capture clock live on.
        """
        with redis_errors("reading the server clock"):
            if self.cluster and task_id is not None:
                return int(self._clock(keys=[_tag(task_id)], args=[]))
            seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- discovery ---------------------------------------------------------------------------

    def task_keys(self, task_id: str) -> list[bytes]:
        """Every key of ``task_id`` in the four namespaces, sorted. Uses SCAN, never KEYS
        (every primary's, on a cluster), or under the cluster layout on a cluster
        ``CLUSTER GETKEYSINSLOT`` of the task's one slot."""
        prefixes = self.layout.task_prefixes(validate_task_id(task_id))
        with redis_errors(f"listing the keys of task {task_id}"):
            if self.cluster and self.layout.cluster:
                return sorted(set(self._slot_keys(keys=[_tag(task_id)], args=list(prefixes))))
            pattern = self.layout.scan_pattern(task_id)
            scanned = self._scan(pattern)
        # A task's keys seldom change, and SCAN gives them in the same order until they
        # do (or Redis rehashes): the sorted list made of an equal listing is taken
        # again, a comparison (3 ms at 100,000 keys) in place of a sort (32 ms).
        memo = (pattern, prefixes)
        with self._listings_lock:
            last = self._listings.get(memo)
        if last is not None and last[0] == scanned:
            with self._listings_lock, suppress(KeyError):
                self._listings.move_to_end(memo)
            return list(last[1])
        keys = sorted(filter(methodcaller("startswith", prefixes), scanned))
        # Sorted as SCAN gave them, then checked: a third faster at 100,000 keys than
        # sorting a set of them (34 against 52 ms). A key named twice sits next to itself.
        if not all(map(lt, keys, keys[1:])):
            keys = list(dict.fromkeys(keys))
        self._keep_listing(memo, scanned, keys)
        return list(keys)

    def _keep_listing(
        self, memo: tuple[bytes, tuple[bytes, ...]], scanned: list[bytes], keys: list[bytes]
    ) -> None:
        """Keep a listing for :meth:`task_keys` in place of the task's last one, dropping
        the least recently used beyond ``listings_max_keys`` keys in all."""
        with self._listings_lock:
            old = self._listings.pop(memo, None)
            if old is not None:
                self._listed_keys -= len(old[0])
            if len(scanned) > self.listings_max_keys:
                return
            self._listings[memo] = (scanned, keys)
            self._listed_keys += len(scanned)
            while self._listed_keys > self.listings_max_keys:
                _, (dropped, _) = self._listings.popitem(last=False)
                self._listed_keys -= len(dropped)

    def _scan(self, pattern: bytes) -> list[bytes]:
        """Every key matching ``pattern`` (a key may come twice), on every primary of a
        cluster; on one server a page at a time (a Python step per key costs more than
        the rest of the listing)."""
        if self.cluster:
            return list(self.client.scan_iter(match=pattern, count=self.scan_count))
        listed: list[Any] = []  # bytes: the client does not decode
        cursor = 0
        while True:
            cursor, page = self.client.scan(cursor, match=pattern, count=self.scan_count)
            listed += page
            if not cursor:
                return listed

    def task_ids(self) -> set[str]:
        """Ids of every task that has at least one runtime key."""
        return set(self.task_key_counts())

    def task_key_counts(self) -> dict[str, int]:
        """Number of runtime keys of every task that has any (one SCAN per namespace)."""
        counts: dict[str, int] = {}
        seen: set[bytes] = set()  # SCAN may return a key twice
        with redis_errors("listing tasks"):
            for namespace in self.layout.namespaces():
                pattern = escape_glob(f"{self.layout.prefix}{namespace}:".encode()) + b"*"
                for key in self._scan(pattern):
                    task = self.layout.task_of(key)
                    if task is not None and key not in seen:
                        seen.add(key)
                        counts[task] = counts.get(task, 0) + 1
        return counts

    # -- capture -----------------------------------------------------------------------------

    def capture(
        self,
        task_id: str,
        *,
        atomic_max_keys: int = 50_000,
        batch_keys: int = 1_000,
        expected_keys: int = 0,
        raw: bool = False,
        batch_raw: bool = False,
        expected: tuple[Pieces, ...] | None = None,
    ) -> Snapshot:
        """Read every key of ``task_id``, atomically when it has at most ``atomic_max_keys``.

        On one server, with ``raw``, a read in one script call keeps its reply's bytes
        (:attr:`Snapshot.raw`); with ``batch_raw`` or ``expected``, so does a read in
        batches (one call at a time, rather than one pipeline: see :meth:`_read_raw`).
        Given ``expected`` (such bytes, from an earlier read), replies equal to them but
        for their clocks are not parsed, and the snapshot says so
        (:attr:`Snapshot.as_expected`).

        While the database holds at most ``scan_in_script_max_keys`` keys, or at most
        twice the ``expected_keys`` the task is thought to have (its last checkpoint, or
        for a task never checkpointed, an estimate from one page of SCAN: then the scan
        costs no more than the read that blocks Redis anyway), one Lua
        script finds the keys (SCAN) and reads them: a true point-in-time read, even
        with writers creating keys meanwhile. On larger databases the keys are found
        with SCAN from the client and read in one script, while Redis reports every
        key changed under the task's prefixes from before the listing to after the read
        (:class:`~cfn_checkpoint.runtime.watch.KeyWatch`): if one of them was not read,
        the read is repeated with it too (after three tries the in-script scan reads
        the task, up to ``exact_scan_max_keys``). A server or user that cannot watch
        gets a second SCAN instead, blind to a key created and deleted between the
        two listings. A task larger
        than ``atomic_max_keys`` is read in batches and marked not point-in-time.

        On a Redis Cluster no script may scan, so the keys are always listed first.
        Under the cluster layout the read itself then checks, at the instant it runs,
        that the slot holds no key of the task it was not given (``CLUSTER
        GETKEYSINSLOT`` names keys without touching them); if it does, nothing is read
        and the read is repeated with those keys too. Under the reference layout the
        keys are read one slot at a time and listed again afterwards: the snapshot is
        not point in time and says it was read ``node_by_node``.
        """
        scanned = False
        if not self.cluster and expected_keys <= atomic_max_keys:
            # The script itself checks that the scan is cheap: DBSIZE, and for a task
            # not checkpointed before (its size unknown) a sample of the keyspace
            # rather than a listing of the whole database.
            found = self._scan_read(
                task_id,
                atomic_max_keys,
                cheap=self._scan_limit(expected_keys),
                sample=0 if expected_keys else _SAMPLE_KEYS,
                raw=raw,
                expected=expected,
            )
            if isinstance(found, Snapshot):
                return found
            scanned = found is _TOO_MANY
        # On one server, every change under the task's prefixes from before the listing
        # on is reported (a cluster checks its slot instead).
        watch = None
        if self._watches is not None:
            watch = self._watches.watch(self.layout.task_prefixes(task_id))
        try:
            return self._capture_listed(
                task_id,
                atomic_max_keys,
                batch_keys,
                scanned,
                watch,
                raw=raw,
                batch_raw=batch_raw,
                expected=expected,
            )
        except BaseException:
            if watch is not None:
                watch.broken = True  # it may hold a half-read reply: not kept
            raise
        finally:
            if watch is not None and self._watches is not None:
                self._watches.release(watch)

    def close(self) -> None:
        """Close the client and any connection kept for watching keys."""
        if self._watches is not None:
            self._watches.close()
        self.client.close()

    def _capture_listed(
        self,
        task_id: str,
        atomic_max_keys: int,
        batch_keys: int,
        scanned: bool,
        watch: KeyWatch | None,
        *,
        raw: bool = False,
        batch_raw: bool = False,
        expected: tuple[Pieces, ...] | None = None,
    ) -> Snapshot:
        """:meth:`capture` from the listing of the task's keys on."""
        keys = self.task_keys(task_id)
        if (
            not self.cluster
            and not scanned
            and len(keys) <= atomic_max_keys
            and self._small_database(len(keys))
        ):
            # The task turns out to fill most of the database (a first checkpoint, or it
            # grew): one script finds and reads its keys, with no second listing.
            found = self._scan_read(task_id, atomic_max_keys, raw=raw, expected=expected)
            if isinstance(found, Snapshot):
                return found
        if self.cluster and self.layout.cluster:
            for _ in range(_SLOT_ATTEMPTS):
                if len(keys) > atomic_max_keys:
                    break
                if not keys:  # listed in one step on the task's node: empty at that instant
                    return Snapshot(task_id, [], self.server_time_ms(task_id), True)
                now_ms, read = self._read_slot(task_id, keys)
                if isinstance(read, set):
                    keys = sorted(set(keys) | read)  # keys of the task that came meanwhile
                    continue
                return Snapshot(task_id, read, now_ms, True)
        known = set(keys)
        for _ in range(0 if self.cluster and self.layout.cluster else _CAPTURE_ATTEMPTS):
            if len(keys) > atomic_max_keys:
                break
            if watch is not None:
                # Keys changed up to now (the listing included) are read too: only those
                # that change shortly before or while the read runs make it try again.
                before = watch.changes()
                if before is not None and not before <= known:
                    known |= before
                    keys = sorted(known)
                    if len(keys) > atomic_max_keys:
                        break
            snapshot = self._read_snapshot(task_id, keys, raw, expected)
            later = None if watch is None else watch.changes()
            if later is None:  # no watch, or it lost track: list the keys again
                later = set(self.task_keys(task_id))
            if later <= known:
                return snapshot
            known |= later
            keys = sorted(known)
        else:
            if not self.cluster and len(keys) <= atomic_max_keys and self._exact_scan():
                # Keys kept appearing after the listing: one script finds and reads
                # them (blocking Redis for a scan of the database) rather than read a
                # task of this size in batches.
                found = self._scan_read(task_id, atomic_max_keys, raw=raw, expected=expected)
                if isinstance(found, Snapshot):
                    return found
        batches: list[Any] = []
        clock = 0
        if not self.cluster:
            calls: list[tuple[Sequence[bytes], list[Any]]] = [
                (keys[i : i + batch_keys], []) for i in range(0, len(keys), batch_keys)
            ]
            if batch_raw or expected is not None:
                batched = self._read_raw(task_id, calls, expected)
                if batched is not None:
                    return batched
            # One server: every batch's script in one pipeline (they run back to back).
            with redis_errors("reading task keys"), gc_paused():
                answers = self._call_many(self._capture, calls)
            for answer in answers:
                clock = clock or int(answer[0])  # TTLs count from the first batch's clock
                batches.extend(answer[1:])
        else:
            for start in range(0, len(keys), batch_keys):
                batch_ms, batch, _ = self._read(keys[start : start + batch_keys])
                clock = clock or batch_ms
                batches.extend(batch)
        clock = clock or self.server_time_ms(task_id)
        return Snapshot(task_id, batches, clock, False, not self.point_in_time)

    def _read_raw(
        self,
        task_id: str,
        calls: Sequence[tuple[Sequence[bytes], list[Any]]],
        expected: tuple[Pieces, ...] | None,
    ) -> Snapshot | None:
        """The batches of a task read one script call at a time, each reply's bytes kept
        and compared with ``expected`` (the bytes of the same batches, read before)
        before it is parsed; None if the client cannot be read so, or the connection
        failed (the caller then reads them the usual way).

        One round trip a batch rather than one pipeline: a pipeline's replies come back
        to back, and where one ends is known only by parsing it, which is what an
        unchanged batch is spared. At 100,000 keys here the batches took 14 ms longer
        when they were parsed and 28 ms less when they were found as expected, so the
        caller asks for it only for a task found unchanged before (see
        :meth:`~cfn_checkpoint.memo.CaptureMemo.keep`).
        """
        reads = self._call_raw(self._capture, calls, expected, "reading task keys")
        if reads is None:
            return None
        clock = reads[0].clock if reads else None
        if clock is None:
            clock = self.server_time_ms(task_id)
        if expected is not None and all(read.value is None for read in reads):
            return Snapshot(
                task_id, None, clock, False, not self.point_in_time, expected, as_expected=True
            )
        flat: list[Any] = []
        data: list[Pieces] = []
        for read in reads:
            if read.value is None:  # found as expected: its bytes are the expected ones
                assert read.data is not None
                flat.extend(read.data.parse()[1:])
            else:
                flat.extend(read.value[1:])
            if read.data is not None:
                data.append(read.data)
        kept = tuple(data) if len(data) == len(reads) else None  # none where pushes came
        return Snapshot(task_id, flat, clock, False, not self.point_in_time, kept)

    def read_batches(self, keys: Sequence[bytes], batch_keys: int) -> Iterator[tuple[int, Packed]]:
        """Read ``keys`` (sorted) a batch at a time, for tasks too large to hold at once.

        Yields ``(capture clock, packed)``: the keys still there as rows (see
        :func:`~cfn_checkpoint.image.packed_rows`), every TTL counted from the first
        batch's clock.
        """
        first_ms = 0
        for start in range(0, len(keys), batch_keys):
            batch_ms, batch, _ = self._read(keys[start : start + batch_keys])
            first_ms = first_ms or batch_ms
            yield first_ms, packed_rows(batch, first_ms)

    def write_entries(self, task_id: str, writes: Sequence[tuple[RuntimeEntry, int]]) -> int:
        """Write one batch of ``(entry, TTL ms or -1)`` (not atomic with other batches):
        on one server in one MULTI/EXEC, the values never entering Lua (see
        :meth:`_write_transaction`), else, or when that is refused, by RESTORE. A TTL
        of 0 or less writes the key without one. A key not of ``task_id`` is refused
        (:class:`RestoreError`) before anything is written."""
        # Their TTLs planned already: as given.
        planned = [
            entry if entry.pttl_ms == (ttl if ttl > 0 else None) else _ttl(entry, ttl)
            for entry, ttl in writes
        ]
        return self._write_batch(task_id, planned, AS_GIVEN)[0]

    def _scan_read(
        self,
        task_id: str,
        max_keys: int,
        *,
        cheap: int | None = None,
        sample: int = 0,
        raw: bool = False,
        expected: tuple[Pieces, ...] | None = None,
    ) -> Snapshot | _Declined:
        """The task's keys read by :data:`~.scripts.CAPTURE_SCAN`, or why it read
        nothing: :data:`_TOO_MANY` keys found (more than ``max_keys``), or
        :data:`_COSTLY`: a database above ``cheap`` keys, unless ``sample`` > 0 and the
        sample puts the task at half of it or more, and at most ``max_keys``;
        ``cheap=None``: whatever the database's size. ``raw`` and ``expected``: see
        :meth:`capture`."""
        pattern = self.layout.scan_pattern(task_id)
        limit = -1 if cheap is None else cheap  # -1: not checked
        args: list[Any] = [pattern, max_keys, _SCRIPT_SCAN_COUNT, limit, sample]
        args.extend(self.layout.task_prefixes(task_id))
        action = f"reading the keys of task {task_id}"
        reads = None
        if raw or expected is not None:
            reads = self._call_raw(self._capture_scan, [([], args)], expected, action)
        read = None if reads is None else reads[0]
        if read is not None:
            reply = read.value
        else:
            with redis_errors(action), gc_paused():
                reply = self._capture_scan(keys=[], args=args)
        if reply is not None and len(reply) == 3 and reply[1] in (-1, -2):  # keys are bytes
            return _TOO_MANY if reply[1] == -1 else _COSTLY
        if read is not None:
            return _one_call_snapshot(task_id, read, raw, expected)
        return Snapshot(task_id, reply[1:], int(reply[0]), point_in_time=True)

    def _call_raw(
        self,
        script: Script,
        calls: Sequence[tuple[Sequence[bytes], list[Any]]],
        expected: tuple[Pieces, ...] | None,
        action: str,
    ) -> list[RawReply] | None:
        """``script`` called once per ``(keys, args)`` in ``calls``, each reply read as
        bytes and compared with ``expected`` when that holds one reply per call (else
        the keys came or went: nothing to compare); None if the client cannot be read so
        or the connection failed (the caller then calls again the usual way, with
        redis-py's retries)."""
        if expected is not None and len(expected) != len(calls):
            expected = None
        with redis_errors(action), gc_paused():
            try:
                return call_scripts(self.client, script, calls, expected)
            except (redis.ConnectionError, redis.TimeoutError):
                return None

    def _read_snapshot(
        self, task_id: str, keys: Sequence[bytes], raw: bool, expected: tuple[Pieces, ...] | None
    ) -> Snapshot:
        """``keys`` read by :data:`~.scripts.CAPTURE` (see :meth:`_read`); on one server,
        with ``raw`` or ``expected``, with its reply's bytes (see :meth:`capture`)."""
        if not self.cluster and (raw or expected is not None):
            reads = self._call_raw(self._capture, [(keys, [])], expected, "reading task keys")
            if reads is not None:
                return _one_call_snapshot(task_id, reads[0], raw, expected)
        now_ms, replies, steps = self._read(keys)
        return Snapshot(task_id, replies, now_ms, steps <= 1, steps > 1)

    def _read(self, keys: Sequence[bytes]) -> tuple[int, list[Any], int]:
        """``(clock, replies, script calls)``: one call, or on a cluster one per slot.

        Calls on several slots run at about the same moment (one pipeline per node), and
        each reply's expiry instants are on its own node's clock. The clock returned is
        the earliest of them, and each node's instants are moved onto it (by that node's
        lead), so a TTL is never taken as later than it was (by at most the time the
        pipeline took), whatever the skew between the nodes' clocks.
        """
        groups = self._by_slot(keys)
        if len(groups) <= 1:
            with redis_errors("reading task keys"), gc_paused():
                reply = self._capture(keys=list(keys), args=[])
            return int(reply[0]), list(reply[1:]), 1
        calls: list[tuple[list[bytes], list[Any]]] = [(group, []) for group in groups]
        with redis_errors("reading task keys"), gc_paused():
            answers = self._call_many(self._capture, calls)
        clock = min(int(answer[0]) for answer in answers)
        flat: list[Any] = []
        for answer in answers:
            lead = int(answer[0]) - clock
            if lead:
                for i in range(3, len(answer), 4):  # each key's expiry
                    if answer[i] >= 0:
                        answer[i] -= lead
            flat.extend(answer[1:])
        return clock, flat, len(calls)

    def _read_slot(self, task_id: str, keys: Sequence[bytes]) -> tuple[int, list[Any] | set[bytes]]:
        """Read ``keys`` (all in the task's slot) in one script that first checks the slot
        holds no other key of the task: ``(clock, replies)``, or ``(clock, missed keys)``
        with nothing read."""
        args: list[Any] = ["slot", *self.layout.task_prefixes(task_id)]
        with redis_errors("reading task keys"), gc_paused():
            reply = self._capture(keys=list(keys), args=args)
        if len(reply) == 3 and reply[1] == -1:  # a key is bytes, never -1
            return int(reply[0]), set(reply[2])
        return int(reply[0]), reply[1:]

    def _split_by_slot(
        self, stale: Sequence[bytes], writes: Sequence[tuple[RuntimeEntry, int]]
    ) -> list[tuple[list[bytes], list[tuple[RuntimeEntry, int]]]]:
        """``(stale, writes)`` split by cluster slot, in one pass; one part on one server."""
        if not self.cluster or not (stale or writes):
            return [(list(stale), list(writes))]
        parts: dict[int, tuple[list[bytes], list[tuple[RuntimeEntry, int]]]] = {}
        for key in stale:
            parts.setdefault(key_slot(key), ([], []))[0].append(key)
        for item in writes:
            parts.setdefault(key_slot(item[0].key), ([], []))[1].append(item)
        return list(parts.values())

    def _by_slot(self, keys: Sequence[bytes]) -> list[list[bytes]]:
        """``keys`` grouped by cluster slot (in first-seen order); one group on one server."""
        if not self.cluster or not keys:
            return [list(keys)]
        groups: dict[int, list[bytes]] = {}
        for key in keys:
            groups.setdefault(key_slot(key), []).append(key)
        return list(groups.values())

    def _call_many(
        self, script: Script, calls: Sequence[tuple[Sequence[bytes], Sequence[Any]]]
    ) -> list[Any]:
        """Run ``script`` once per ``(keys, args)`` (each call's keys in one slot), through
        pipelines: one round trip (per node, on a cluster) per :data:`_PIPELINE_CALLS`
        calls.

        redis-py's cluster pipeline sends each call to the node serving its slot and
        follows MOVED/ASK redirects. A node that does not know the script yet gets it
        loaded and the call repeated.
        """
        out: list[Any] = []
        for start in range(0, len(calls), _PIPELINE_CALLS):
            chunk = calls[start : start + _PIPELINE_CALLS]
            pipe = self.client.pipeline(transaction=False)
            for keys, args in chunk:
                pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
            for (keys, args), answer in zip(chunk, pipe.execute(raise_on_error=False), strict=True):
                if isinstance(answer, redis.exceptions.NoScriptError):
                    answer = script(keys=list(keys), args=list(args))  # loads it, then runs it
                elif isinstance(answer, Exception):
                    raise answer
                out.append(answer)
        return out

    # -- restore -----------------------------------------------------------------------------

    def restore(
        self,
        task_id: str,
        entries: Sequence[RuntimeEntry] | DecodedRows,
        captured_at_ms: int,
        *,
        ttl_policy: TtlPolicy | None = None,
        atomic_max_keys: int = 50_000,
        batch_keys: int = 1_000,
    ) -> RestoreStats:
        """Make the task's keys exactly ``entries`` (or the rows of a checkpoint, see
        :class:`~cfn_checkpoint.image.DecodedRows`): others of the task are removed.

        Atomic (one Lua script) when the keys involved number at most
        ``atomic_max_keys``; in batches otherwise. On one server that script finds the
        task's keys itself (SCAN) on a database of up to ``exact_scan_max_keys`` keys.
        On a Redis Cluster under the cluster
        layout the script also checks that no key of the task appeared since the keys
        were listed (else they are listed again, up to three times, and nothing is
        written until the list is whole); under the reference layout the task is
        written one slot at a time, never atomically.
        """
        with gc_paused():  # a tuple or list per key, all alive until the write is sent
            return self._restore_all(
                task_id, entries, captured_at_ms, ttl_policy, atomic_max_keys, batch_keys
            )

    def _restore_all(
        self,
        task_id: str,
        source: Sequence[RuntimeEntry] | DecodedRows,
        captured_at_ms: int,
        ttl_policy: TtlPolicy | None,
        atomic_max_keys: int,
        batch_keys: int,
    ) -> RestoreStats:
        prefixes = self.layout.task_prefixes(task_id)
        clock = self.ttl_clock(task_id, captured_at_ms, ttl_policy)
        checked = False
        if not self.cluster and self._transactions and len(source) <= atomic_max_keys:
            # The fast way (see there): its commands made in one pass over the entries,
            # which checks their prefixes too. Counted before lapsed keys are left out,
            # so that no commands are made for a task far too large to write at once.
            restoring = restore_commands(task_id, prefixes, source, clock)
            self.check_dumps(task_id, restoring.dumps)
            checked = True
            size = self.dbsize()
            fits = size <= min(self.exact_scan_max_keys, atomic_max_keys - restoring.written)
            if fits:
                done = self._write_transaction(task_id, source, restoring)
                if done is not None:
                    return RestoreStats(*done, len(restoring.lapsed), True)
        if (
            isinstance(source, DecodedRows)
            and not self.cluster
            and self._transactions
            and source.expiries.count(None) > atomic_max_keys
        ):  # too large for one step even if every key with a TTL had lapsed
            return self._restore_in_batches(task_id, source, clock, batch_keys)
        entries = source.entries() if isinstance(source, DecodedRows) else source
        for entry in entries:
            if not entry.key.startswith(prefixes):
                raise RestoreError(
                    f"checkpoint key {entry.key!r} does not belong to task {task_id}"
                )
        writes, lapsed = clock.split(entries)
        if not checked:
            self.check_dumps(task_id, [entry for entry, _ in writes])
        too_large = len(writes) > atomic_max_keys
        size = 0 if self.cluster or too_large else self.dbsize()
        if not self.cluster and not too_large and size <= self.exact_scan_max_keys:
            # Stale keys are found by a SCAN inside the atomic step itself: listing them
            # first would let a key created between the listing and the write survive,
            # next to keys restored from another moment.
            done = self._write_scanning(task_id, writes, atomic_max_keys - len(writes))
            if done is not None:
                return RestoreStats(*done, len(lapsed), True)
            too_large = True  # with the keys to delete; nothing was written
        keep = {entry.key for entry, _ in writes}
        stale = [key for key in self.task_keys(task_id) if key not in keep]
        for _ in range(_SLOT_ATTEMPTS if self.cluster else 1):
            if too_large or len(stale) + len(writes) > atomic_max_keys or not self.point_in_time:
                break
            if self.cluster and not stale and not writes:
                return RestoreStats(0, 0, len(lapsed), True)  # nothing there, nothing to write
            guard = task_id if self.cluster else None
            written, removed, missed = self._write(stale, writes, guard_task=guard)
            if not missed:
                return RestoreStats(written, removed, len(lapsed), True)
            stale = sorted(set(stale) | missed)  # keys of the task that came meanwhile
        else:
            raise RestoreError(
                f"keys of task {task_id} kept appearing while it was being restored "
                f"({_SLOT_ATTEMPTS} tries); nothing was written. Stop what writes to the "
                "task and recover again"
            )
        removed = 0
        for start in range(0, len(stale), batch_keys):
            removed += self._delete_keys(stale[start : start + batch_keys], RestoreError)
        written = 0
        for start in range(0, len(writes), batch_keys):
            written += self.write_entries(task_id, writes[start : start + batch_keys])
        return RestoreStats(written, removed, len(lapsed), False)

    def _restore_in_batches(
        self, task_id: str, rows: DecodedRows, clock: TtlClock, batch_keys: int
    ) -> RestoreStats:
        """On one server, a checkpoint's rows too many for one atomic step: the task's
        other keys deleted, then the rows written ``batch_keys`` at a time, each batch
        one MULTI/EXEC (see :meth:`_write_batch`), without making an entry of each
        row (at 100,000 keys that, and the passes over the entries, took about 150
        ms). Not atomic."""
        prefixes = self.layout.task_prefixes(task_id)
        if not rows.all_under(prefixes):  # or not in order: then checked key by key
            for key in rows.keys:
                if not key.startswith(prefixes):
                    raise RestoreError(f"checkpoint key {key!r} does not belong to task {task_id}")
        written_dumps, _ = clock.split(rows.dumps())  # not those whose TTL ran out
        self.check_dumps(task_id, [entry for entry, _ in written_dumps])
        listed = self.task_keys(task_id)  # after a crash: none (then no set is made)
        keep = set(rows.keys) if listed else set()
        stale = [key for key in listed if key not in keep]
        removed = 0
        for start in range(0, len(stale), batch_keys):
            removed += self._delete_keys(stale[start : start + batch_keys], RestoreError)
        written = expired = 0
        for start in range(0, len(rows), batch_keys):
            done = self._write_batch(task_id, rows.slice(start, start + batch_keys), clock)
            written, removed, expired = written + done[0], removed + done[1], expired + done[2]
        return RestoreStats(written, removed, expired, False)

    def _write_batch(
        self, task_id: str, batch: Sequence[RuntimeEntry] | DecodedRows, clock: TtlClock
    ) -> tuple[int, int, int]:
        """Write one batch (not atomic with other batches) with the TTLs of ``clock``,
        deleting the keys whose TTL has run out: ``(written, deleted, lapsed)``. On one
        server in one MULTI/EXEC, the values never entering Lua (see
        :meth:`_write_transaction`), else, or when that is refused, by RESTORE."""
        with gc_paused():
            prefixes = self.layout.task_prefixes(task_id)
            restoring = restore_commands(task_id, prefixes, batch, clock)
            gone = [entry.key for entry in restoring.lapsed]
            replies = None
            if restoring.commands is not None:
                head = [(b"DEL", *gone)] if gone else []
                replies = self._transact("writing task keys", [], [*head, *restoring.commands])
            if replies is not None:
                return restoring.written, int(replies[0]) if gone else 0, len(gone)
            entries = batch.entries() if isinstance(batch, DecodedRows) else batch
            writes, _ = clock.split(entries)
            written, removed, _ = self._write(gone, writes)
            return written, removed, len(gone)

    def dbsize(self) -> int:
        """Keys in the whole database, or the whole cluster (O(1) on each server)."""
        with redis_errors("counting keys"):
            if self.cluster:
                return int(self.client.dbsize(target_nodes=RedisCluster.PRIMARIES))
            return int(self.client.dbsize())

    def _scan_limit(self, task_keys: int) -> int:
        """The largest database (keys) a SCAN inside a script is cheap enough for: a
        small one, or one not much larger than the task (whose keys the script blocks
        Redis to read anyway). :data:`~.scripts.CAPTURE_SCAN` applies the same rule to
        a sampled estimate."""
        return max(self.scan_in_script_max_keys, 2 * task_keys)

    def _scan_is_cheap(self, size: int, task_keys: int) -> bool:
        """Whether a SCAN inside a script is cheap enough on a database of ``size`` keys
        (see :meth:`_scan_limit`)."""
        return size <= self._scan_limit(task_keys)

    def _exact_scan(self) -> bool:
        """Whether the database is small enough (``exact_scan_max_keys``) for a restore, or
        a capture of a task whose keys keep appearing, to scan inside its script."""
        return self.dbsize() <= self.exact_scan_max_keys

    def _small_database(self, task_keys: int = 0) -> bool:
        """:meth:`_scan_is_cheap` for the database's size now."""
        return self._scan_is_cheap(self.dbsize(), task_keys)

    def plan_ttls(
        self,
        task_id: str,
        entries: Sequence[RuntimeEntry],
        captured_at_ms: int,
        ttl_policy: TtlPolicy | None = None,
    ) -> tuple[list[tuple[RuntimeEntry, int]], list[RuntimeEntry]]:
        """What a restore now would write: ``(entry, TTL ms or -1)`` pairs, and the entries
        left out because their TTL has run out under the policy."""
        return self.ttl_clock(task_id, captured_at_ms, ttl_policy).split(entries)

    def ttl_clock(
        self, task_id: str, captured_at_ms: int, ttl_policy: TtlPolicy | None = None
    ) -> TtlClock:
        """The TTLs a restore of ``task_id``'s keys captured at ``captured_at_ms`` sets now."""
        elapsed = max(0, self.server_time_ms(task_id) - captured_at_ms)
        lock_prefix = self.layout.task_prefix("lock", task_id)
        return TtlClock(elapsed, ttl_policy or TtlPolicy(), lock_prefix)

    def check_dumps(self, task_id: str, entries: Sequence[RuntimeEntry]) -> None:
        """Refuse, before anything is written, DUMP payloads this server cannot read.

        A script that fails half-way keeps its earlier writes, so a payload from a
        newer Redis (a stream taken on 7.x, restored on 6.2) is tried on a scratch key
        first. The scratch key carries the task's hash tag, so it shares the slot.
        """
        if RedisType.DUMP not in set(map(_entry_type, entries)):  # most tasks: no bytecode a key
            return
        scratch = f"{self.layout.prefix}cfn-checkpoint:scratch:{{{task_id}}}".encode()
        for entry in entries:
            if entry.type is not RedisType.DUMP:
                continue
            try:
                self.client.restore(scratch, 0, entry.value, replace=True)
            except redis.ResponseError as exc:
                raise RestoreError(
                    f"key {entry.key!r} ({entry.native_type}) cannot be restored on Redis "
                    f"{self.version()}: {exc}; nothing was written"
                ) from exc
            except redis.RedisError as exc:
                with redis_errors("checking a DUMP payload"):
                    raise exc
            finally:
                with redis_errors("checking a DUMP payload"):
                    self.client.delete(scratch)

    def _write(
        self,
        stale: Sequence[bytes],
        writes: Sequence[tuple[RuntimeEntry, int]],
        *,
        guard_task: str | None = None,
    ) -> tuple[int, int, set[bytes]]:
        """Delete ``stale`` and write ``writes`` in one RESTORE script, or on a cluster one
        per slot: ``(written, removed, missed)``. ``missed`` holds the keys of the task
        that ``guard_task`` (cluster layout) found in its slot but not in ``stale`` or
        ``writes``; when there are any, nothing was written."""
        calls: list[tuple[list[bytes], list[Any]]] = []
        for dropped, written in self._split_by_slot(stale, writes):
            with gc_paused():
                args: list[Any] = [len(dropped), _SPEC_PACKER.pack(_specs(written))]
            if guard_task is not None:
                args.append("slot")
                args.extend(self.layout.task_prefixes(guard_task))
            calls.append(([*dropped, *(entry.key for entry, _ in written)], args))
        with redis_errors("writing task keys", RestoreError):
            if len(calls) == 1:
                answers = [self._restore(keys=calls[0][0], args=calls[0][1])]
            else:
                answers = self._call_many(self._restore, calls)
        missed = {key for written, keys in answers if int(written) < 0 for key in keys}
        if missed:
            return 0, 0, missed
        return sum(int(w) for w, _ in answers), sum(int(r) for _, r in answers), set()

    def _write_transaction(
        self, task_id: str, entries: Sequence[RuntimeEntry] | DecodedRows, restoring: Restoring
    ) -> tuple[int, int] | None:
        """On one server, send ``restoring``'s commands (which write ``entries``, see
        :func:`~.commands.restore_commands`) in one MULTI/EXEC whose first command, the
        :data:`~.scripts.DROP_TASK` script, deletes every key of ``task_id`` its own SCAN
        finds: ``(written, removed)``, ``removed`` counting the keys deleted that were
        not written again. None, with nothing written, when it cannot be done so (see
        :meth:`_transact`); the caller then writes with the RESTORE script, which
        reports what was refused.

        A command the script runs is not checked as it is queued, and one refused as
        the script runs would leave the writes after it done. So a SCAN, and a DEL of a
        randomly named key (no task's) under each of the task's prefixes, are sent
        first: an ACL denying DEL, or the keys of a role, refuses those. An ACL allowing
        a prefix but only some keys under it could still refuse the script's DEL of a
        key as it runs, after the writes were queued (see ``docs/internals.md``).

        A recovery of 10,000 keys took 54.8 ms this way against 64.9 ms by the RESTORE
        script (medians), as the values never enter Lua (see :mod:`~.transaction`)."""
        pattern = self.layout.scan_pattern(task_id)
        prefixes = self.layout.task_prefixes(task_id)
        if restoring.commands is None:
            return None
        drop = ("EVAL", scripts.DROP_TASK, 0, pattern, _SCRIPT_SCAN_COUNT, *prefixes)
        token = secrets.token_hex(8).encode()
        probes: list[tuple[Any, ...]] = [("SCAN", 0, "MATCH", pattern, "COUNT", 1)]
        probes += [("DEL", prefix + b"cfn-checkpoint-probe-" + token) for prefix in prefixes]
        replies = self._transact(
            f"writing the keys of task {task_id}", probes, [drop, *restoring.commands]
        )
        if replies is None:
            return None
        deleted = replies[0]
        if not deleted:  # after a crash: no key of the task was left
            return restoring.written, 0
        keys = entries.keys if isinstance(entries, DecodedRows) else map(_key, entries)
        written = set(keys) - {entry.key for entry in restoring.lapsed}
        return restoring.written, len(set(deleted) - written)  # SCAN may repeat a key

    def _transact(
        self, action: str, probes: list[tuple[Any, ...]], commands: list[tuple[Any, ...]]
    ) -> list[Any] | None:
        """``commands`` in one MULTI/EXEC after ``probes`` (see
        :func:`~.transaction.transaction`): their replies. None, with nothing written,
        on a cluster, when refused (after an ACL's refusal, NOPERM, this runtime does
        not try again; after another, such as OOM or LOADING, it tries next time), or
        when the connection failed. A command that failed as it ran is raised, as a
        :class:`RestoreError`: the others were done."""
        if self.cluster or not self._transactions:
            return None
        try:
            with redis_errors(action, RestoreError):
                replies = transaction(self.client, probes, commands)
        except StoreUnavailableError:  # connection lost or timed out: that call only
            return None
        except Refused as refused:
            if isinstance(refused.args[0], NoPermissionError):
                self._transactions = False
            return None
        if replies is None:
            self._transactions = False
            return None
        failed = [reply for reply in replies if isinstance(reply, Exception)]
        if failed:
            with redis_errors(action, RestoreError):
                raise failed[0]
        return replies

    def _write_scanning(
        self, task_id: str, writes: Sequence[tuple[RuntimeEntry, int]], max_extra: int
    ) -> tuple[int, int] | None:
        """On one server, write ``writes`` in one RESTORE script that first deletes every
        other key of ``task_id`` its own SCAN finds: ``(written, removed)``, or None, with
        nothing written, when those other keys number more than ``max_extra``."""
        pattern = self.layout.scan_pattern(task_id)
        with gc_paused():
            args: list[Any] = [0, _SPEC_PACKER.pack(_specs(writes))]
        args.extend(("scan", pattern, _SCRIPT_SCAN_COUNT, max_extra))
        args.extend(self.layout.task_prefixes(task_id))
        with redis_errors(f"writing the keys of task {task_id}", RestoreError):
            written, removed = self._restore(keys=[entry.key for entry, _ in writes], args=args)
        return None if int(written) == -2 else (int(written), int(removed))

    def _delete_keys(
        self, keys: Sequence[bytes], refused: type[CheckpointError] = StoreUnavailableError
    ) -> int:
        """Delete ``keys`` (one script, or on a cluster one per slot); returns how many."""
        groups = self._by_slot(keys)
        with redis_errors("removing task keys", refused):
            if len(groups) == 1:
                return int(self._delete(keys=groups[0], args=[]))
            return sum(int(n) for n in self._call_many(self._delete, [(g, []) for g in groups]))

    def delete_task(self, task_id: str) -> int:
        """Remove every runtime key of ``task_id`` (what a crash or a flush would do)."""
        keys = self.task_keys(task_id)
        removed = 0
        for start in range(0, len(keys), 1000):
            removed += self._delete_keys(keys[start : start + 1000])
        return removed


def _tag(task_id: str) -> bytes:
    """The task's hash tag as a key name: it hashes to the slot of every key of the task
    under the cluster layout (and of its lock, under any layout)."""
    return b"{" + validate_task_id(task_id).encode() + b"}"


def _pairs(flat: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _ttl(entry: RuntimeEntry, ttl: int) -> RuntimeEntry:
    """``entry`` with the TTL ``ttl`` ms (0 or less: none, as a write with TTL -1)."""
    return entry._replace(pttl_ms=ttl if ttl > 0 else None)


_TYPE_NAMES = {t: t.value for t in RedisType}
_entry_type = attrgetter("type")
_key = attrgetter("key")


def _specs(writes: Sequence[tuple[RuntimeEntry, int]]) -> list[Any]:
    """RESTORE's flat specs: ``type, pttl, value`` for a string or a DUMP payload (most
    keys, inline), ``type, pttl, n, item1 .. itemN`` for the other types."""
    out: list[Any] = []
    add, names, one_item = out.extend, _TYPE_NAMES, _ONE_ITEM
    for e, pttl in writes:
        if e.type in one_item:
            add((names[e.type], pttl, e.value))
        else:
            items = items_of(e)
            add((names[e.type], pttl, len(items)))
            add(items)
    return out


_ONE_ITEM = frozenset((RedisType.STRING, RedisType.DUMP))
