"""Guarantees 2 and 5: capture is point in time, restore is never seen half-done."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import redis

from cfn_checkpoint import CheckpointManager, EmbeddedRedis, KeyLayout
from cfn_checkpoint.errors import CheckpointError, StoreUnavailableError
from cfn_checkpoint.model import RedisType, RuntimeEntry
from cfn_checkpoint.runtime.commands import Restoring
from cfn_checkpoint.runtime.redis_runtime import RedisRuntime

from conftest import redis_binary, redis_client, require


def test_capture_is_point_in_time_under_concurrent_writers(
    manager: CheckpointManager, redis_url: str, layout: KeyLayout, runtime_kind: str
) -> None:
    """A writer moves value between keys and adds keys in MULTI/EXEC transactions:
    every checkpoint must see a state that existed at one instant.

    On a Redis Cluster no script may look for keys it was not given, so a writer that
    creates a key of the task in every round trip can outrun the listing; the capture
    then says it is not point in time (read in batches).
    """
    manager.runtime.scan_in_script_max_keys = 1_000_000  # whatever else the server holds
    a, b, counter = (layout.key("agent", "t", n) for n in ("a", "b", "counter"))
    writer = redis_client(redis_url)
    writer.mset({a: b"100", b: b"0", counter: b"0"})
    stop = threading.Event()

    def write() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            pipe = writer.pipeline(transaction=True)
            pipe.decrby(a, 1)
            pipe.incrby(b, 1)
            pipe.set(counter, str(i))
            pipe.set(layout.key("queue", "t", f"item-{i}"), b"x")
            pipe.execute()

    thread = threading.Thread(target=write)
    thread.start()
    try:
        checked = 0
        while checked < 25:
            meta = manager.create_checkpoint("t")
            loaded = manager.load_checkpoint(meta.checkpoint_id)
            values = {e.key: e.value for e in loaded.entries}
            assert meta.point_in_time or runtime_kind == "cluster"
            assert int(values[a]) + int(values[b]) == 100
            n = int(values[counter])
            items = {k for k in values if b":item-" in k}
            if meta.point_in_time:
                assert items == {layout.key("queue", "t", f"item-{i}") for i in range(1, n + 1)}
            checked += 1
    finally:
        stop.set()
        thread.join()
        writer.close()


def test_nobody_reads_a_half_restored_task(
    manager: CheckpointManager, redis_url: str, layout: KeyLayout
) -> None:
    manager.runtime.scan_in_script_max_keys = 1_000_000
    keys = [layout.key("agent", "t", f"k{i:03d}") for i in range(200)]
    client = manager.runtime.client
    client.mset({k: b"old" for k in keys})
    checkpoint = manager.create_checkpoint("t")
    reader = redis_client(redis_url)
    seen: set[frozenset[bytes]] = set()
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.add(frozenset(v or b"<missing>" for v in reader.mget(keys)))

    thread = threading.Thread(target=read)
    thread.start()
    try:
        for _ in range(15):
            client.mset({k: b"new" for k in keys})
            manager.recover_from_checkpoint("t", checkpoint.checkpoint_id)
    finally:
        stop.set()
        thread.join()
        reader.close()
    # Every read saw all keys old or all keys new: never a mix, never a gap.
    assert seen <= {frozenset({b"old"}), frozenset({b"new"})}
    assert frozenset({b"old"}) in seen


def test_large_database_path_scans_from_the_client_and_stays_exact(
    manager: CheckpointManager, layout: KeyLayout, prefix: str
) -> None:
    """Above ``scan_in_script_max_keys`` keys are found by client SCAN, then read atomically."""
    from conftest import task_state

    client = manager.runtime.client
    for i in range(30):
        client.set(layout.key("agent", "t", f"a{i}"), str(i).encode(), px=60_000)
        client.rpush(layout.key("queue", "t", f"q{i}"), b"x", str(i).encode())
    before = task_state(client, prefix)
    manager.runtime.scan_in_script_max_keys = 0
    meta = manager.create_checkpoint("t")
    assert meta.point_in_time and meta.key_count == 60
    manager.runtime.delete_task("t")
    manager.recover_from_checkpoint("t")
    assert task_state(client, prefix) == before


class _WriterBeforeRestore(RedisRuntime):
    """A runtime whose every write of task keys (a MULTI/EXEC, or a RESTORE script when
    ``transaction`` is False or the transaction declines) is preceded by another client
    creating a key of task ``t``: a writer in the last moment before the write, after
    anything the recovery could have listed."""

    def __init__(
        self,
        client: redis.Redis,
        writer: redis.Redis,
        late: bytes,
        exact_scan: int,
        transaction: bool,
    ) -> None:
        # Any database is too large for the capture's in-script scan.
        super().__init__(client, scan_in_script_max_keys=0, exact_scan_max_keys=exact_scan)
        self._writer, self._late, self._transaction = writer, late, transaction
        script = self._restore

        def run(keys: list[bytes], args: list[object]) -> object:
            writer.set(late, b"created meanwhile")
            return script(keys=keys, args=args)

        self._restore = run  # type: ignore[assignment]

    def _write_transaction(
        self, task_id: str, entries: Sequence[RuntimeEntry], restoring: Restoring
    ) -> tuple[int, int] | None:
        if not self._transaction:
            return None
        self._writer.set(self._late, b"created meanwhile")
        return super()._write_transaction(task_id, entries, restoring)


@pytest.mark.parametrize("transaction", [True, False], ids=["transaction", "script"])
def test_a_key_created_just_before_the_restore_writes_does_not_survive(
    transaction: bool,
) -> None:
    """Up to ``exact_scan_max_keys`` keys in the database, far above the capture's
    in-script limit, the restore finds the task's keys inside its atomic step (the
    MULTI/EXEC's first command, or the RESTORE script), so a key created after the
    recovery started is gone with the rest. Above it the keys are listed first, and
    such a key survives (the documented price of the limit)."""
    layout = KeyLayout()
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        writer = redis.Redis.from_url(server.url)
        try:
            client.mset({layout.key("agent", f"other-{i}", "k"): b"kept" for i in range(50)})
            kept = layout.key("agent", "t", "kept")
            now = RedisRuntime(client).server_time_ms()
            entries = [RuntimeEntry(kept, RedisType.STRING, b"restored")]
            late = layout.key("signal", "t", "late")
            for exact_scan, survives in ((51, False), (50, True)):
                client.set(kept, b"old")
                client.delete(late)
                runtime = _WriterBeforeRestore(client, writer, late, exact_scan, transaction)
                stats = runtime.restore("t", entries, now)
                assert (stats.keys_written, stats.keys_removed, stats.atomic) == (
                    1,
                    0 if survives else 1,
                    True,
                )
                assert client.get(kept) == b"restored"
                assert client.exists(late) == survives
                assert len(runtime.task_keys("other-7")) == 1
        finally:
            writer.close()
            client.close()


def _queue_of(client: redis.Redis, count: int) -> tuple[bytes, list[RuntimeEntry]]:
    """Task ``t`` holding ``count`` queue keys (``n000``...), and a checkpoint of one
    other key: ``(that key, the checkpoint's entries)``."""
    layout = KeyLayout()
    client.mset({layout.key("queue", "t", f"n{i:03d}"): b"new" for i in range(count)})
    kept = layout.key("agent", "t", "kept")
    return kept, [RuntimeEntry(kept, RedisType.STRING, b"restored")]


def test_a_task_too_large_for_one_restore_script_is_written_in_batches() -> None:
    """The in-script scan counts the task's keys not in the checkpoint before writing:
    more than ``atomic_max_keys`` allows and nothing is written by it; the task is then
    written in batches and the result says it was not atomic."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            kept, entries = _queue_of(client, 30)
            runtime = RedisRuntime(client)
            now = runtime.server_time_ms()
            # The script counts 30 keys to delete, more than 20 - 1 allows: it writes nothing.
            assert runtime._write_scanning("t", [(entries[0], -1)], 19) is None
            assert len(runtime.task_keys("t")) == 30 and not client.exists(kept)
            stats = runtime.restore("t", entries, now, atomic_max_keys=20, batch_keys=7)
            assert (stats.keys_written, stats.keys_removed, stats.atomic) == (1, 30, False)
            assert runtime.task_keys("t") == [kept]
            _queue_of(client, 19)
            stats = runtime.restore("t", entries, now, atomic_max_keys=20)
            assert (stats.keys_written, stats.keys_removed, stats.atomic) == (1, 19, True)
            assert runtime.task_keys("t") == [kept]
        finally:
            client.close()


class _Draining(RedisRuntime):
    """A runtime whose listings of task ``t`` come after a consumer took 20 of its keys."""

    def task_keys(self, task_id: str) -> list[bytes]:
        self.client.delete(*(KeyLayout().key("queue", "t", f"n{i:03d}") for i in range(20)))
        return super().task_keys(task_id)


def test_a_restore_the_script_found_too_large_stays_batched() -> None:
    """Once the script has found more keys than one script may take, the restore goes
    in batches and says so, even if keys are deleted before it lists them: a listing
    followed by one unguarded script would let a key created in between survive."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            kept, entries = _queue_of(client, 30)
            runtime = _Draining(client)
            stats = runtime.restore("t", entries, runtime.server_time_ms(), atomic_max_keys=20)
            assert (stats.keys_written, stats.keys_removed, stats.atomic) == (1, 10, False)
            assert runtime.task_keys("t") == [kept]
        finally:
            client.close()


class _KeysKeepAppearing(RedisRuntime):
    """A runtime on which a key of task ``t`` is created just before each read of
    listed keys (``before``), and deleted just after it unless ``keep``."""

    def __init__(
        self, client: redis.Redis, exact_scan: int, *, reads: int = 1_000, keep: bool = True
    ) -> None:
        super().__init__(client, scan_in_script_max_keys=0, exact_scan_max_keys=exact_scan)
        self.reads = 0
        self._left = reads
        self._keep = keep

    def _read(self, keys: Sequence[bytes]) -> tuple[int, list[Any], int]:
        self.reads += 1
        if self._left <= 0:
            return super()._read(keys)
        self._left -= 1
        late = KeyLayout().key("queue", "t", f"new-{id(self)}-{self.reads}")
        self.client.set(late, b"x")
        try:
            return super()._read(keys)
        finally:
            if not self._keep:
                self.client.delete(late)


def _task_and_others(client: redis.Redis) -> None:
    """Task ``t`` of 20 keys in a database of 120: larger than a script may scan."""
    layout = KeyLayout()
    client.mset({layout.key("agent", "t", f"a{i}"): b"v" for i in range(20)})
    client.mset({layout.key("agent", f"other-{i}", "k"): b"v" for i in range(100)})


def test_a_task_whose_keys_keep_appearing_is_still_read_at_one_instant() -> None:
    """When each read of the listed keys misses a key created meanwhile, the capture
    gives up after three and reads with one script that finds the keys itself: point
    in time, rather than a task under ``atomic_max_keys`` read in batches. On a
    database above ``exact_scan_max_keys`` it reads in batches and says so."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            _task_and_others(client)
            runtime = _KeysKeepAppearing(client, 1_000)
            snapshot = runtime.capture("t", expected_keys=20)
            assert snapshot.point_in_time and runtime.reads == 3
            assert [e.key for e in snapshot.entries] == sorted(
                client.scan_iter(match=b"*:t:*", count=1_000)
            )
            runtime = _KeysKeepAppearing(client, 100)
            assert not runtime.capture("t", expected_keys=20).point_in_time
        finally:
            client.close()


def test_a_key_that_lived_only_around_the_read_is_not_missed() -> None:
    """A key created after the listing and deleted right after the read existed when
    the read ran: a second listing could not see it, but Redis reports the change
    (``CLIENT TRACKING``), so the read is made again, with it. A Redis user denied
    ``CLIENT``, or the invalidation channel, falls back to listing again (and misses
    it, the documented limit)."""
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "noclient", "on", ">pw", "~*", "&*", "+@all")
        admin.execute_command("ACL", "SETUSER", "noclient", "-client")
        admin.execute_command("ACL", "SETUSER", "nochannel", "on", ">pw", "~*", "+@all")
        admin.execute_command("ACL", "SETUSER", "nochannel", "resetchannels")
        users = [
            redis.Redis.from_url(server.url, username=u, password="pw")
            for u in ("noclient", "nochannel")
        ]
        try:
            _task_and_others(admin)
            watched = _KeysKeepAppearing(admin, 1_000, reads=1, keep=False)
            snapshot = watched.capture("t", expected_keys=20)
            assert snapshot.point_in_time and watched.reads == 2
            assert len(snapshot.entries) == 20  # the key was gone when it was read again
            for user in users:
                listed = _KeysKeepAppearing(user, 1_000, reads=1, keep=False)
                snapshot = listed.capture("t", expected_keys=20)
                assert snapshot.point_in_time and listed.reads == 1
        finally:
            for user in users:
                user.close()
            admin.close()


class _Hooked(RedisRuntime):
    """A runtime (any database too large for the capture's in-script scan) that calls
    ``after_listing`` after each listing of task keys and ``after_read`` after each
    read of listed keys, counting both."""

    def __init__(
        self,
        client: redis.Redis,
        after_listing: Callable[[int], None] = lambda n: None,
        after_read: Callable[[int], None] = lambda n: None,
    ) -> None:
        super().__init__(client, scan_in_script_max_keys=0)
        self.listings = self.reads = 0
        self._after_listing, self._after_read = after_listing, after_read

    def task_keys(self, task_id: str) -> list[bytes]:
        listed = super().task_keys(task_id)
        self.listings += 1
        self._after_listing(self.listings)
        return listed

    def _read(self, keys: Sequence[bytes]) -> tuple[int, list[Any], int]:
        read = super()._read(keys)
        self.reads += 1
        self._after_read(self.reads)
        return read


def test_a_key_created_after_the_listing_and_gone_after_the_read_is_read() -> None:
    """The watch starts before the listing: a key created after the listing (kept past
    the read, then deleted) is read, though neither listing could name it. So it is
    with a client whose connections run health checks (the watch's must not: a check
    would swallow a change and reconnect without the tracking)."""
    layout = KeyLayout()
    late = layout.key("signal", "t", "late")
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(f"{server.url}?health_check_interval=1")
        try:
            _task_and_others(client)

            def create(n: int) -> None:
                client.set(late, b"x")
                time.sleep(1.2)  # longer than the health check interval

            runtime = _Hooked(client, create, lambda n: client.delete(late))
            snapshot = runtime.capture("t", expected_keys=20)
            assert snapshot.point_in_time and (runtime.listings, runtime.reads) == (1, 1)
            assert late in [e.key for e in snapshot.entries] and not client.exists(late)
        finally:
            client.close()


def test_keys_that_come_and_go_during_the_listing_cost_no_second_read() -> None:
    """Keys changed while the task is listed (here created and deleted again, and one
    of the same name in another database: Redis tracks names, not databases) are read
    with the listed ones; only a change while the read runs makes it try again."""
    layout = KeyLayout()
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        other_db = redis.Redis.from_url(server.url, db=1)
        try:
            _task_and_others(client)

            def churn(n: int) -> None:
                for i in range(5):
                    client.set(layout.key("queue", "t", f"job-{i}"), b"x")
                    client.delete(layout.key("queue", "t", f"job-{i}"))
                other_db.set(layout.key("agent", "t", "elsewhere"), b"x")

            runtime = _Hooked(client, churn)
            snapshot = runtime.capture("t", expected_keys=20)
            assert snapshot.point_in_time and (runtime.listings, runtime.reads) == (1, 1)
            assert len(snapshot.entries) == 20
        finally:
            other_db.close()
            client.close()


def test_a_flush_during_the_capture_makes_it_list_again() -> None:
    """A flush comes as a change naming no key (a replica loading its master's data
    too): the watch cannot tell what changed after it, so the keys are listed again."""
    layout = KeyLayout()
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            _task_and_others(client)

            def flush(n: int) -> None:
                if n == 1:
                    client.flushdb()
                    _task_and_others(client)
                    client.set(layout.key("agent", "t", "new"), b"x")

            runtime = _Hooked(client, after_read=flush)
            snapshot = runtime.capture("t", expected_keys=20)
            assert snapshot.point_in_time and runtime.listings == 3
            assert len(snapshot.entries) == 21
        finally:
            client.close()


def _named_clients(admin: redis.Redis, name: str, expected: int) -> int:
    """Connections named ``name``, once Redis has seen closed ones go (it notices on
    its next read of them; waits up to 5 s for ``expected``)."""
    deadline = time.monotonic() + 5
    while True:
        count = sum(1 for c in admin.client_list() if c.get("name") == name)
        if count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def test_the_watch_connection_is_kept_and_closed_with_the_runtime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One connection serves the watches of successive captures, and goes with the
    runtime. A user Redis refuses the watch is told once, in the log."""
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "nochannel", "on", ">pw", "~*", "+@all")
        admin.execute_command("ACL", "SETUSER", "nochannel", "resetchannels")
        try:
            _task_and_others(admin)
            named = redis.Redis.from_url(server.url, client_name="watched")
            runtime = RedisRuntime(named, scan_in_script_max_keys=0)
            for _ in range(4):
                assert runtime.capture("t", expected_keys=20).point_in_time
            assert _named_clients(admin, "watched", 2) == 2  # the client's and the watch's
            runtime.close()
            assert _named_clients(admin, "watched", 0) == 0

            def fail(n: int) -> None:
                if n == 1:
                    raise redis.ConnectionError("lost in the middle of a capture")

            runtime = _Hooked(redis.Redis.from_url(server.url, client_name="watched"), fail)
            with pytest.raises(redis.ConnectionError, match="middle of a capture"):
                runtime.capture("t", expected_keys=20)
            assert _named_clients(admin, "watched", 1) == 1  # the watch is not kept
            assert runtime.capture("t", expected_keys=20).point_in_time
            assert _named_clients(admin, "watched", 2) == 2
            # A kept connection the server dropped meanwhile is replaced, not taken for
            # a refusal: the watch still names a key only it can see.
            own = runtime.client.client_id()
            for c in admin.client_list():
                if c.get("name") == "watched" and int(c["id"]) != own:
                    admin.client_kill_filter(_id=int(c["id"]))
            late = KeyLayout().key("signal", "t", "late")
            runtime._after_listing = lambda n: admin.set(late, b"x")
            runtime._after_read = lambda n: admin.delete(late)
            snapshot = runtime.capture("t", expected_keys=20)
            assert late in [e.key for e in snapshot.entries]
            assert runtime._watches is not None and runtime._watches.refused is None
            runtime.close()
            runtime.capture("t", expected_keys=20)  # closed: no watch kept or made
            assert _named_clients(admin, "watched", 1) == 1
            runtime.client.close()
            limited = redis.Redis.from_url(server.url, username="nochannel", password="pw")
            runtime = RedisRuntime(limited, scan_in_script_max_keys=0)
            with caplog.at_level("WARNING", logger="cfn_checkpoint.runtime.watch"):
                for _ in range(3):
                    assert runtime.capture("t", expected_keys=20).point_in_time
            told = [r for r in caplog.records if "CLIENT TRACKING" in r.getMessage()]
            assert len(told) == 1 and "permissions" in told[0].getMessage()
            denied = [e for e in admin.acl_log() if e["username"] == "nochannel"]
            assert [e["count"] for e in denied] == [1]  # asked once, not per capture
            runtime.close()
        finally:
            admin.close()


def _scan_calls(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_scan", {})
    return int(stats.get("calls", 0))


def test_a_new_task_is_sized_from_a_sample_not_by_listing_the_database() -> None:
    """A task's first capture, on a database above ``scan_in_script_max_keys``, estimates
    the task's size from one SCAN page. A task holding most of the database is then
    found and read by one script (no listing); a small one is listed from the client
    first. Both read every key, point in time."""
    layout = KeyLayout()
    with EmbeddedRedis() as server:  # its own server: SCAN calls are counted server-wide
        client = redis.Redis.from_url(server.url)
        try:
            runtime = RedisRuntime(client, scan_count=100, scan_in_script_max_keys=100)
            client.mset({layout.key("agent", "big", f"k{i}"): b"v" for i in range(2_000)})
            client.mset({layout.key("queue", "small", f"k{i}"): b"v" for i in range(20)})
            client.mset({f"other:{i}": b"x" for i in range(200)})
            for task, keys, listed in (("big", 2_000, False), ("small", 20, True)):
                before = _scan_calls(client)
                snapshot = runtime.capture(task)
                calls = _scan_calls(client) - before
                assert len(snapshot.packed.keys) == keys and snapshot.point_in_time
                # The sample and the script's own scan; a listing takes 100 keys a call.
                assert (calls > 3) is listed, (task, calls)
        finally:
            client.close()


@pytest.mark.parametrize(
    ("scan_max", "expected", "atomic_max", "in_script", "point_in_time"),
    [
        (100, 0, 50_000, False, True),  # the sample puts the task at a fifth of the keys
        (100, 200, 50_000, True, True),  # known to be large: the database is at most twice it
        (100, 50, 50_000, False, True),  # known to be small: the database is too large
        (1_000, 0, 50_000, True, True),  # a small database: no sample
        (100, 0, 30, False, False),  # the sample puts it above what may be read at once
        (1_000, 0, 30, False, False),  # the scan finds more than may be read at once
    ],
)
def test_the_capture_script_decides_whether_to_scan(
    scan_max: int, expected: int, atomic_max: int, in_script: bool, point_in_time: bool
) -> None:
    """Inside its script, a capture finds the task's keys itself only while that is
    cheap: the database (DBSIZE) at most ``scan_in_script_max_keys`` or twice the task,
    whose size is the caller's ``expected_keys`` or, for a task not seen before, an
    estimate from a sample of the keyspace. Otherwise it reads nothing, and the keys are
    listed from the client (SCAN calls of ``scan_count`` keys each). Either way every key
    is read."""
    layout = KeyLayout()
    with EmbeddedRedis() as server:  # its own server: SCAN calls are counted server-wide
        client = redis.Redis.from_url(server.url)
        try:
            client.mset({layout.key("agent", "t", f"k{i}"): b"v" for i in range(50)})
            client.mset({f"other:{i}": b"x" for i in range(200)})
            runtime = RedisRuntime(client, scan_count=10, scan_in_script_max_keys=scan_max)
            before = _scan_calls(client)
            snapshot = runtime.capture("t", expected_keys=expected, atomic_max_keys=atomic_max)
            listed = _scan_calls(client) - before > 3  # a listing takes 25 calls or more
            assert len(snapshot.packed.keys) == 50
            assert (listed, snapshot.point_in_time) == (not in_script, point_in_time)
        finally:
            client.close()


@pytest.mark.parametrize("version", ["7", "6.2"])
def test_a_user_without_scan_gets_one_line_naming_it(version: str) -> None:
    """Sizing a new task (inside the capture script), listing its keys and a restore's
    in-script scan need SCAN: a Redis user denied it gets a clear one-line error naming
    SCAN (Redis 7 and 6.2 raise script errors differently), whether the database is
    small enough to scan inside the script or not, and the task's keys are left as
    they were."""
    layout = KeyLayout()
    binary = redis_binary(version)
    require(binary is not None, f"no redis-server {version} here")
    with EmbeddedRedis(binary=binary) as server:
        assert server.version().startswith(version), server.version()
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "noscan", "on", ">pw", "~*", "+@all", "-scan")
        admin.mset({f"other:{i}": b"x" for i in range(200)})
        admin.mset({layout.key("agent", "t", f"k{i}"): b"v" for i in range(50)})
        limited = redis.Redis.from_url(server.url, username="noscan", password="pw")
        try:
            for in_script, expected in ((100, 0), (100, 50), (1_000, 0), (0, 50)):
                runtime = RedisRuntime(limited, scan_in_script_max_keys=in_script)
                with pytest.raises(StoreUnavailableError) as caught:
                    runtime.capture("t", expected_keys=expected)
                message = str(caught.value)
                assert "keys of task t" in message, message
                assert "(SCAN)" in message or "'scan'" in message, message
                assert "\n" not in message
            entry = RuntimeEntry(layout.key("agent", "t", "k0"), RedisType.STRING, b"new")
            with pytest.raises(CheckpointError) as refused:
                RedisRuntime(limited).restore("t", [entry], 0)
            assert "(SCAN)" in str(refused.value) and "\n" not in str(refused.value)
            assert admin.dbsize() == 250 and admin.get(entry.key) == b"v"
        finally:
            limited.close()
            admin.close()


def _denied(client: redis.Redis, command: str) -> int:
    """How many calls of ``command`` ACLs refused (ACL LOG: Redis 6.2 and 7 alike)."""
    return sum(int(entry["count"]) for entry in client.acl_log() if entry["object"] == command)


def test_a_user_denied_mget_is_read_key_by_key() -> None:
    """Strings are read by MGET; a Redis user an ACL denies it gets the same capture,
    and the refused MGET is tried once per script, not once per 1,000 keys."""
    layout = KeyLayout()
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "nomget", "on", ">pw", "~*", "+@all", "-mget")
        admin.mset({layout.key("agent", "t", f"k{i:04d}"): b"v%d" % i for i in range(2_400)})
        admin.set(layout.key("agent", "t", "empty"), b"")
        admin.rpush(layout.key("queue", "t", "q"), b"a", b"b")
        admin.hset(layout.key("agent", "t", "h"), mapping={b"f": b"1"})
        admin.set(layout.key("lock", "t", "l"), b"owner", px=600_000)
        limited = redis.Redis.from_url(server.url, username="nomget", password="pw")
        try:
            expected = RedisRuntime(admin).capture("t").packed
            # The in-script scan, then a read of listed keys (a database too large to scan).
            for in_script in (100_000, 0):
                runtime = RedisRuntime(limited, scan_in_script_max_keys=in_script)
                before = _denied(admin, "mget")
                got = runtime.capture("t").packed
                assert _denied(admin, "mget") == before + 1
                assert (got.keys, got.rows) == (expected.keys, expected.rows)
                assert len(got.keys) == 2_404
        finally:
            limited.close()
            admin.close()


def test_strings_without_a_ttl_are_restored_by_mset_or_key_by_key_if_denied() -> None:
    """Strings without a TTL are written by MSET: the keys come back exact, and an old
    TTL on such a key is gone, as SET would leave it. A Redis user an ACL denies MSET
    gets the same result: the MSET queued in the restore's transaction is refused
    (which aborts the transaction whole), then the RESTORE script's first MSET, and the
    script writes key by key; each MSET is tried once, not once per 1,000 keys."""
    layout = KeyLayout()
    key = layout.key
    entries = [
        RuntimeEntry(key("agent", "t", f"k{i:04d}"), RedisType.STRING, b"v%d" % i)
        for i in range(2_500)  # two full MSETs and a part
    ]
    entries += [
        RuntimeEntry(key("agent", "t", "empty"), RedisType.STRING, b""),
        RuntimeEntry(key("lock", "t", "l"), RedisType.STRING, b"owner", 600_000),
        RuntimeEntry(key("queue", "t", "q"), RedisType.LIST, [b"a", b"b"]),
    ]
    with EmbeddedRedis() as server:
        admin = redis.Redis.from_url(server.url)
        admin.execute_command("ACL", "SETUSER", "nomset", "on", ">pw", "~*", "+@all", "-mset")
        limited = redis.Redis.from_url(server.url, username="nomset", password="pw")
        try:
            for client, refused in ((admin, 0), (limited, 2)):
                admin.flushall()
                admin.set(key("agent", "t", "k0007"), b"old", px=600_000)
                admin.set(key("agent", "t", "stale"), b"x")
                admin.set(key("agent", "other", "k"), b"kept")
                before = _denied(admin, "mset")
                now = RedisRuntime(admin).server_time_ms()
                stats = RedisRuntime(client).restore("t", entries, now)
                assert _denied(admin, "mset") == before + refused
                assert (stats.keys_written, stats.keys_removed, stats.atomic) == (2_503, 1, True)
                read = RedisRuntime(admin).capture("t")
                assert read.entries == [
                    e._replace(pttl_ms=None if e.pttl_ms is None else read.entries[i].pttl_ms)
                    for i, e in enumerate(sorted(entries))
                ]
                assert admin.pttl(key("agent", "t", "k0007")) == -1  # the old TTL is gone
                assert 0 < admin.pttl(key("lock", "t", "l")) <= 600_000
                assert admin.get(key("agent", "other", "k")) == b"kept"
        finally:
            limited.close()
            admin.close()


class _RehashingRuntime(RedisRuntime):
    """A runtime whose SCAN names every key twice, as SCAN may while Redis rehashes."""

    def _scan(self, pattern: bytes) -> list[bytes]:
        listed = super()._scan(pattern)
        return listed + listed[::-1]


def test_a_key_scan_names_twice_is_listed_once() -> None:
    layout = KeyLayout()
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            keys = [layout.key(role, "t", f"k{i}") for role in ("agent", "lock") for i in range(50)]
            client.mset(dict.fromkeys(keys, b"v"))
            client.set(layout.key("agent", "t2", "other"), b"v")  # another task's key
            listed = _RehashingRuntime(client).task_keys("t")
            assert listed == sorted(keys)
            assert RedisRuntime(client).task_keys("t") == sorted(keys)
        finally:
            client.close()


def test_a_listing_equal_to_the_last_reuses_its_sorted_keys() -> None:
    """``task_keys`` sorts a listing only when SCAN gave another than last time: a key
    added, removed or renamed is seen at once, a caller changing the list it got
    changes nothing kept, another layout's namespaces are not mixed up, and beyond a
    number of keys in all the least recently used listings are dropped."""
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            layout = KeyLayout()
            runtime = RedisRuntime(client, layout=layout)
            names = [layout.key("agent", "t", f"k{i:03d}") for i in range(50)]
            client.mset({name: b"v" for name in names})
            first = runtime.task_keys("t")
            assert first == sorted(names)
            first.clear()  # the caller's own list
            assert runtime.task_keys("t") == sorted(names)
            client.set(layout.key("lock", "t", "new"), b"x")
            assert layout.key("lock", "t", "new") in runtime.task_keys("t")
            client.delete(names[7])
            client.rename(names[8], layout.key("queue", "t", "renamed"))
            again = runtime.task_keys("t")
            assert names[7] not in again and names[8] not in again
            assert again == sorted(again) and layout.key("queue", "t", "renamed") in again
            for i in range(20):  # other tasks: kept too, within the limit of keys
                client.set(layout.key("agent", f"o{i}", "k"), b"v")
                assert runtime.task_keys(f"o{i}") == [layout.key("agent", f"o{i}", "k")]
            listed = sum(len(scanned) for scanned, _ in runtime._listings.values())
            assert len(runtime._listings) == 21 and runtime._listed_keys == listed
            assert runtime.task_keys("t") == again
            # Another layout on the same runtime (same scan pattern, other namespaces).
            runtime.layout = KeyLayout(agent="worker")
            client.set(runtime.layout.key("agent", "t", "w"), b"v")
            got = runtime.task_keys("t")
            assert runtime.layout.key("agent", "t", "w") in got
            assert not [k for k in got if k.startswith(layout.task_prefixes("t")[0])]
            # Beyond the limit the least recently used listings go, not the one in use.
            runtime.listings_max_keys = 60
            runtime.layout = layout
            assert runtime.task_keys("t") == again
            client.set(layout.key("agent", "o99", "k"), b"v")
            runtime.task_keys("o99")
            kept = [prefixes[0] for _, prefixes in runtime._listings]
            assert layout.task_prefixes("t")[0] in kept and runtime._listed_keys <= 60
        finally:
            client.close()
