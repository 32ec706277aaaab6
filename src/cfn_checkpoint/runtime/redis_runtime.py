"""The runtime tier: reading and writing one task's keys in Redis."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgpack
import redis
from redis.commands.core import Script

from ..errors import CheckpointError, RestoreError, StoreUnavailableError, ValidationError
from ..image import Snapshot
from ..layout import KeyLayout, escape_glob, validate_task_id
from ..model import RedisType, RuntimeEntry, TtlPolicy
from . import scripts

#: Redis types read natively; every other type is kept as a DUMP payload.
_NATIVE = {"string", "list", "hash", "set", "zset"}
#: Packs restore specs and known digests for Redis's cmsgpack, which reads bytes as raw
#: strings, not bin.
_SPEC_PACKER = msgpack.Packer(use_bin_type=False)
_KNOWN_PACKER = _SPEC_PACKER
#: How often capture re-reads when keys appear while it runs.
_CAPTURE_ATTEMPTS = 3


@contextlib.contextmanager
def redis_errors(
    action: str, refused: type[CheckpointError] = StoreUnavailableError
) -> Iterator[None]:
    """Turn redis-py errors into :class:`CheckpointError`: an unreachable server into
    :class:`StoreUnavailableError`, a refused command (OOM, NOPERM, a script error)
    into ``refused``."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"Redis unavailable while {action}: {exc}") from exc
    except redis.AuthenticationError as exc:
        raise StoreUnavailableError(f"Redis refused the credentials while {action}: {exc}") from exc
    except redis.ResponseError as exc:
        raise refused(f"Redis refused a command while {action}: {exc}") from exc


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    try:
        parsed = urlsplit(url)
        if parsed.password is None:
            return url
    except ValueError:  # unparseable: say nothing of it that could be a secret
        return "<unparseable URL>"
    user = parsed.username or ""
    host = parsed.netloc.rsplit("@", 1)[1]
    return urlunsplit(parsed._replace(netloc=f"{user}:***@{host}"))


def connect(url: str, *, socket_timeout: float = 60.0) -> redis.Redis:
    """A client for ``url`` (``redis://``, ``rediss://`` or ``unix://``) that fails fast."""
    redact_url(url)  # fails early, and safely, on an unparseable URL
    if "://" not in url:
        raise ValidationError(f"malformed Redis URL {redact_url(url)!r}: no scheme")
    try:
        client = redis.Redis.from_url(
            url,
            socket_connect_timeout=5.0,
            socket_timeout=socket_timeout,
            decode_responses=False,
        )
    except ValueError as exc:
        raise ValidationError(f"malformed Redis URL {redact_url(url)!r}: {exc}") from exc
    with redis_errors(f"connecting to {redact_url(url)}"):
        client.ping()
    return client


@dataclass(frozen=True, slots=True)
class RestoreStats:
    """What a runtime restore wrote."""

    keys_written: int
    keys_removed: int
    keys_expired: int
    atomic: bool


class RedisRuntime:
    """One Redis server (or a client to one) and the key layout of the tasks in it."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        layout: KeyLayout | None = None,
        scan_count: int = 1000,
        scan_in_script_max_keys: int = 10_000,
    ) -> None:
        self.client = client
        self.layout = layout or KeyLayout()
        self.scan_count = scan_count
        #: Largest database (in keys) whose task keys capture and restore find with a SCAN
        #: inside their Lua script. That scan walks the whole keyspace and blocks Redis
        #: meanwhile (about 0.5-0.75 us per key measured here: some 7 ms at 10,000 keys).
        self.scan_in_script_max_keys = scan_in_script_max_keys
        self._capture = Script(client, scripts.CAPTURE)
        self._capture_scan = Script(client, scripts.CAPTURE_SCAN)
        self._restore = Script(client, scripts.RESTORE)
        self._delete = Script(client, scripts.DELETE)

    def version(self) -> str:
        """The server's ``redis_version``."""
        with redis_errors("reading the server version"):
            info: dict[str, Any] = self.client.info("server")
        return str(info.get("redis_version", ""))

    def server_time_ms(self) -> int:
        """The server clock in ms since the epoch (the clock TTL deadlines are kept in)."""
        with redis_errors("reading the server clock"):
            seconds, micros = self.client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    # -- discovery ---------------------------------------------------------------------------

    def task_keys(self, task_id: str) -> list[bytes]:
        """Every key of ``task_id`` in the four namespaces, sorted. Uses SCAN, never KEYS."""
        prefixes = self.layout.task_prefixes(validate_task_id(task_id))
        pattern = self.layout.scan_pattern(task_id)
        found: set[bytes] = set()
        with redis_errors(f"listing the keys of task {task_id}"):
            for key in self.client.scan_iter(match=pattern, count=self.scan_count):
                if key.startswith(prefixes):
                    found.add(key)
        return sorted(found)

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
                for key in self.client.scan_iter(match=pattern, count=self.scan_count):
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
        known: Mapping[bytes, bytes] | None = None,
    ) -> Snapshot:
        """Read every key of ``task_id``, atomically when it has at most ``atomic_max_keys``.

        While the database holds at most ``scan_in_script_max_keys`` keys, or at most
        twice the ``expected_keys`` the task is thought to have (its last checkpoint:
        then the scan costs no more than the read that blocks Redis anyway), one Lua
        script finds the keys (SCAN) and reads them: a true point-in-time read, even
        with writers creating keys meanwhile. On larger databases the keys are found
        with SCAN from the client, read in one script, and a second SCAN checks that
        no key appeared in between (the read is repeated if one did). A task larger
        than ``atomic_max_keys`` is read in batches and marked not point-in-time.

        Redis builds each key's row and digest. Keys whose digest ``known`` already
        maps them to are not sent (their row is ``None``); batches ignore ``known``.
        """
        version = self.version()
        blob = _KNOWN_PACKER.pack(dict(known)) if known else b""
        if self._small_database(expected_keys) and expected_keys <= atomic_max_keys:
            found = self._scan_read(task_id, atomic_max_keys, blob)
            if found is not None:
                return _snapshot(task_id, found[0], found[1], True, version)
        keys = self.task_keys(task_id)
        for _ in range(_CAPTURE_ATTEMPTS):
            if len(keys) > atomic_max_keys:
                break
            now_ms, rows = self._read(keys, blob)
            later = self.task_keys(task_id)
            if set(later) <= set(keys):
                return _snapshot(task_id, now_ms, rows, True, version)
            keys = sorted(set(keys) | set(later))
        replies: list[Any] = []
        clock = 0
        for batch_clock, batch in self.read_batches(keys, batch_keys):
            clock = batch_clock  # the same for every batch: the first one's
            replies.extend(batch)
        return _snapshot(task_id, clock or self.server_time_ms(), replies, False, version)

    def read_batches(
        self, keys: Sequence[bytes], batch_keys: int
    ) -> Iterator[tuple[int, list[Any]]]:
        """Read ``keys`` (sorted) a batch at a time, for tasks too large to hold at once.

        Yields ``(capture clock, replies)``: ``{key, digest, pttl, row, size}`` per key
        still there, every TTL shifted onto the first batch's clock.
        """
        first_ms = 0
        for start in range(0, len(keys), batch_keys):
            batch_ms, batch = self._read(keys[start : start + batch_keys], b"")
            if not first_ms:
                first_ms = batch_ms
            elif batch_ms != first_ms:
                # TTLs are kept relative to one capture clock: shift this batch's onto it.
                shift = batch_ms - first_ms
                batch = [r if r[2] < 0 else [r[0], r[1], r[2] + shift, *r[3:]] for r in batch]
            yield first_ms, batch

    def write_entries(self, task_id: str, writes: Sequence[tuple[RuntimeEntry, int]]) -> int:
        """Write one batch of ``(entry, TTL ms or -1)`` (not atomic with other batches)."""
        return self._write([], writes)[0]

    def _scan_read(self, task_id: str, max_keys: int, known: bytes) -> tuple[int, Any] | None:
        args: list[Any] = [self.layout.scan_pattern(task_id), max_keys, self.scan_count, known]
        args.extend(self.layout.task_prefixes(task_id))
        with redis_errors(f"reading the keys of task {task_id}"):
            reply = self._capture_scan(keys=[], args=args)
        if len(reply) == 3 and not isinstance(reply[1], list) and int(reply[1]) == -1:
            return None
        return int(reply[0]), reply[1:]

    def _read(self, keys: Sequence[bytes], known: bytes) -> tuple[int, Any]:
        with redis_errors("reading task keys"):
            reply = self._capture(keys=list(keys), args=[known])
        return int(reply[0]), reply[1:]

    # -- restore -----------------------------------------------------------------------------

    def restore(
        self,
        task_id: str,
        entries: Sequence[RuntimeEntry],
        captured_at_ms: int,
        *,
        ttl_policy: TtlPolicy | None = None,
        atomic_max_keys: int = 50_000,
        batch_keys: int = 1_000,
    ) -> RestoreStats:
        """Make the task's keys exactly ``entries``: others of the task are removed.

        Atomic (one Lua script) when the keys involved number at most
        ``atomic_max_keys``; in batches otherwise.
        """
        prefixes = self.layout.task_prefixes(task_id)
        for entry in entries:
            if not entry.key.startswith(prefixes):
                raise RestoreError(
                    f"checkpoint key {entry.key!r} does not belong to task {task_id}"
                )
        writes, lapsed = self.plan_ttls(task_id, entries, captured_at_ms, ttl_policy)
        self.check_dumps(task_id, [entry for entry, _ in writes])
        if len(writes) <= atomic_max_keys and self._small_database(len(writes)):
            # Stale keys are found by the script itself: nothing created meanwhile survives.
            written, removed = self._write([], writes, scan_task=task_id)
            return RestoreStats(written, removed, len(lapsed), True)
        keep = {entry.key for entry, _ in writes}
        stale = [key for key in self.task_keys(task_id) if key not in keep]
        if len(stale) + len(writes) <= atomic_max_keys:
            written, removed = self._write(stale, writes)
            return RestoreStats(written, removed, len(lapsed), True)
        removed = 0
        for start in range(0, len(stale), batch_keys):
            with redis_errors("removing task keys", RestoreError):
                removed += int(self._delete(keys=stale[start : start + batch_keys], args=[]))
        written = 0
        for start in range(0, len(writes), batch_keys):
            written += self._write([], writes[start : start + batch_keys])[0]
        return RestoreStats(written, removed, len(lapsed), False)

    def dbsize(self) -> int:
        """Keys in the whole database (O(1) on the server)."""
        with redis_errors("counting keys"):
            return int(self.client.dbsize())

    def _small_database(self, task_keys: int = 0) -> bool:
        """Whether a SCAN inside a script is cheap enough: the database is small, or not
        much larger than the task (whose keys the script blocks Redis to read anyway)."""
        with redis_errors("counting keys"):
            size = int(self.client.dbsize())
        return size <= max(self.scan_in_script_max_keys, 2 * task_keys)

    def plan_ttls(
        self,
        task_id: str,
        entries: Sequence[RuntimeEntry],
        captured_at_ms: int,
        ttl_policy: TtlPolicy | None = None,
    ) -> tuple[list[tuple[RuntimeEntry, int]], list[RuntimeEntry]]:
        """What a restore now would write: ``(entry, TTL ms or -1)`` pairs, and the entries
        left out because their TTL has run out under the policy."""
        policy = ttl_policy or TtlPolicy()
        elapsed = max(0, self.server_time_ms() - captured_at_ms)
        lock_prefix = self.layout.task_prefix("lock", task_id)
        writes: list[tuple[RuntimeEntry, int]] = []
        lapsed: list[RuntimeEntry] = []
        for entry in entries:
            pttl = entry.pttl_ms
            if pttl is None:
                writes.append((entry, -1))
                continue
            lock = entry.key.startswith(lock_prefix)
            if (policy.locks if lock else policy.others) == "absolute":
                pttl -= elapsed
            if pttl <= 0:
                lapsed.append(entry)
            else:
                writes.append((entry, pttl))
        return writes, lapsed

    def check_dumps(self, task_id: str, entries: Sequence[RuntimeEntry]) -> None:
        """Refuse, before anything is written, DUMP payloads this server cannot read.

        A script that fails half-way keeps its earlier writes, so a payload from a
        newer Redis (a stream taken on 7.x, restored on 6.2) is tried on a scratch key
        first. The scratch key carries the task's hash tag, so it shares the slot.
        """
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
        scan_task: str | None = None,
    ) -> tuple[int, int]:
        keys: list[bytes] = list(stale)
        keys.extend(entry.key for entry, _ in writes)
        specs = [[entry.type.value, pttl, _items(entry)] for entry, pttl in writes]
        args: list[Any] = [len(stale), _SPEC_PACKER.pack(specs)]
        if scan_task is not None:
            args.extend((self.layout.scan_pattern(scan_task), self.scan_count))
            args.extend(self.layout.task_prefixes(scan_task))
        with redis_errors("writing task keys", RestoreError):
            written, removed = self._restore(keys=keys, args=args)
        return int(written), int(removed)

    def delete_task(self, task_id: str) -> int:
        """Remove every runtime key of ``task_id`` (what a crash or a flush would do)."""
        keys = self.task_keys(task_id)
        removed = 0
        with redis_errors(f"deleting the keys of task {task_id}"):
            for start in range(0, len(keys), 1000):
                removed += int(self._delete(keys=keys[start : start + 1000], args=[]))
        return removed


def _snapshot(
    task_id: str, now_ms: int, replies: list[Any], point_in_time: bool, version: str
) -> Snapshot:
    """A snapshot from the scripts' ``{key, digest, pttl, row or nil, size}`` replies."""
    replies = sorted(replies, key=lambda r: r[0])
    keys = [r[0] for r in replies]
    digests = [r[1] for r in replies]
    pttls = [None if r[2] < 0 else r[2] for r in replies]
    rows = [r[3] for r in replies]
    size = sum(r[4] for r in replies)
    return Snapshot(task_id, keys, digests, pttls, rows, now_ms, point_in_time, version, size)


def _pairs(flat: Sequence[bytes]) -> list[tuple[bytes, bytes]]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _items(entry: RuntimeEntry) -> list[bytes]:
    if entry.type in (RedisType.STRING, RedisType.DUMP):
        return [entry.value]
    if entry.type in (RedisType.LIST, RedisType.SET):
        return list(entry.value)
    if entry.type == RedisType.HASH:
        return [part for pair in entry.value for part in pair]
    if entry.type == RedisType.ZSET:
        return [part for member, score in entry.value for part in (score, member)]
    raise CheckpointError(f"cannot restore a key of type {entry.type}")
