"""A restore written in one MULTI/EXEC (runtime/transaction.py), against real Redis.

On one server a restore writes the task's keys in a transaction whose first command
deletes the task's other keys; the RESTORE script is the way when the transaction is
refused. Both must leave exactly the same keys, values and TTLs.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from cfn_checkpoint import EmbeddedRedis, KeyLayout, TtlPolicy
from cfn_checkpoint.errors import RestoreError
from cfn_checkpoint.image import DecodedRows
from cfn_checkpoint.model import RedisType, RuntimeEntry
from cfn_checkpoint.runtime.redis_runtime import RedisRuntime
from cfn_checkpoint.runtime.transaction import Refused, transaction

LAYOUT = KeyLayout()
KEY = LAYOUT.key


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as running:
        yield running


@pytest.fixture()
def admin(server: EmbeddedRedis) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    client.flushall()
    try:
        yield client
    finally:
        client.flushall()
        client.close()


def _stream_dump(client: redis.Redis) -> bytes:
    client.xadd("scratch", {b"f": b"v"})
    payload = client.dump("scratch")
    client.delete("scratch")
    assert isinstance(payload, bytes)
    return payload


def _entries(client: redis.Redis) -> list[RuntimeEntry]:
    return [
        RuntimeEntry(KEY("agent", "t", "plain"), RedisType.STRING, b"v" * 300),
        RuntimeEntry(KEY("agent", "t", "empty"), RedisType.STRING, b""),
        RuntimeEntry(KEY("lock", "t", "l"), RedisType.STRING, b"owner", 600_000),
        RuntimeEntry(KEY("queue", "t", "q"), RedisType.LIST, [b"a", b"b", b"a"]),
        RuntimeEntry(KEY("queue", "t", "long"), RedisType.LIST, [b"%d" % i for i in range(2_345)]),
        RuntimeEntry(KEY("queue", "t", "ttl"), RedisType.LIST, [b"x"], 500_000),
        RuntimeEntry(KEY("queue", "t", "none"), RedisType.LIST, []),
        RuntimeEntry(KEY("agent", "t", "h"), RedisType.HASH, [(b"f1", b"1"), (b"f2", b"")]),
        RuntimeEntry(KEY("agent", "t", "s"), RedisType.SET, [b"m1", b"m2"], 400_000),
        RuntimeEntry(KEY("agent", "t", "z"), RedisType.ZSET, [(b"a", b"1.5"), (b"b", b"-2")]),
        RuntimeEntry(
            KEY("signal", "t", "st"), RedisType.DUMP, _stream_dump(client), None, "stream"
        ),
    ]


def _seed(client: redis.Redis) -> None:
    """The task as a crash left it: stale keys, keys of the checkpoint holding other
    values and types, and another task's key."""
    client.set(KEY("agent", "t", "stale"), b"x")
    client.rpush(KEY("agent", "t", "plain"), b"a list now")
    client.set(KEY("queue", "t", "q"), b"a string now", px=900_000)
    client.rpush(KEY("queue", "t", "none"), b"left over")
    client.sadd(KEY("agent", "t", "h"), b"x")
    client.set(KEY("agent", "other", "k"), b"kept")


def _state(client: redis.Redis) -> dict[bytes, tuple[bytes | None, bool]]:
    """Every key: its DUMP (type and value, byte for byte) and whether it expires."""
    return {key: (client.dump(key), client.pttl(key) > 0) for key in sorted(client.keys())}


def _execs(client: redis.Redis) -> int:
    stats = client.info("commandstats").get("cmdstat_exec", {})
    return int(stats.get("calls", 0))


@pytest.mark.parametrize("atomic", [True, False], ids=["one step", "in batches"])
def test_a_transaction_restores_what_the_script_restores(admin: redis.Redis, atomic: bool) -> None:
    """In one step (a MULTI/EXEC, or the RESTORE script) or, for a task above
    ``atomic_max_keys``, in batches of ``batch_keys`` (a MULTI/EXEC or a script each)."""
    entries = _entries(admin)
    now = RedisRuntime(admin).server_time_ms()
    limits = {} if atomic else {"atomic_max_keys": 5, "batch_keys": 4}
    results = {}
    for way in ("transaction", "script"):
        admin.flushall()
        _seed(admin)
        runtime = RedisRuntime(admin)
        runtime._transactions = way == "transaction"
        execs = _execs(admin)
        stats = runtime.restore("t", entries, now, **limits)
        steps = 1 if atomic else 3  # 11 keys, 4 a batch
        assert _execs(admin) == execs + (steps if way == "transaction" else 0)
        assert (stats.keys_written, stats.keys_removed, stats.atomic) == (
            len(entries),
            1,
            atomic,
        )
        results[way] = _state(admin)
        assert 0 < admin.pttl(KEY("lock", "t", "l")) <= 600_000
        assert admin.lrange(KEY("queue", "t", "long"), 0, -1) == entries[4].value
        assert admin.zrange(KEY("agent", "t", "z"), 0, -1, withscores=True) == [
            (b"b", -2.0),
            (b"a", 1.5),
        ]
    assert results["transaction"] == results["script"]
    assert KEY("queue", "t", "none") not in results["transaction"]
    assert KEY("agent", "t", "stale") not in results["transaction"]
    assert results["transaction"][KEY("agent", "other", "k")][0] is not None


def _as_rows(entries: list[RuntimeEntry], captured_at_ms: int) -> DecodedRows:
    """``entries`` as a decoded checkpoint holds them: a plain string or list as its
    stored row, anything else as its entry."""
    ordered = sorted(entries)
    rows: list[object] = []
    for e in ordered:
        plain = e.type in (RedisType.STRING, RedisType.LIST) and e.native_type is None
        kind = e.type.value.encode()
        rows.append([e.key, kind, e.value, e.pttl_ms is not None, False] if plain else e)
    expiries = [None if e.pttl_ms is None else captured_at_ms + e.pttl_ms for e in ordered]
    return DecodedRows([e.key for e in ordered], rows, expiries, captured_at_ms)


@pytest.mark.parametrize("atomic", [True, False], ids=["one step", "in batches"])
def test_rows_of_a_checkpoint_restore_as_their_entries_do(admin: redis.Redis, atomic: bool) -> None:
    """A recovery writes the decoded rows without making entries of them: the same
    keys, values, TTLs and counts as the entries (transaction) and the script, with a
    lock whose TTL ran out still in Redis (deleted, counted as removed), in one step
    or, for a task above ``atomic_max_keys``, in batches."""
    captured = RedisRuntime(admin).server_time_ms() - 2_000
    lapsed = KEY("lock", "t", "gone")
    entries = [*_entries(admin), RuntimeEntry(lapsed, RedisType.STRING, b"x", 1_000)]
    limits = {} if atomic else {"atomic_max_keys": 5, "batch_keys": 4}
    results = {}
    for way in ("rows", "entries", "script"):
        admin.flushall()
        _seed(admin)
        admin.set(lapsed, b"still here")
        runtime = RedisRuntime(admin)
        runtime._transactions = way != "script"
        source = _as_rows(entries, captured) if way == "rows" else entries
        execs = _execs(admin)
        stats = runtime.restore("t", source, captured, **limits)
        steps = 1 if atomic else 3  # 12 keys, 4 a batch
        assert _execs(admin) == execs + (0 if way == "script" else steps)
        assert (stats.keys_written, stats.keys_removed, stats.keys_expired, stats.atomic) == (
            len(entries) - 1,
            2,
            1,
            atomic,
        )
        results[way] = _state(admin)
    assert results["rows"] == results["entries"] == results["script"]
    assert lapsed not in results["rows"]
    rows = _as_rows(entries, captured)
    assert rows.entries() == sorted(entries) and len(rows) == len(entries)


def test_rows_holding_another_tasks_key_write_nothing(admin: redis.Redis) -> None:
    now = RedisRuntime(admin).server_time_ms()
    foreign = KEY("agent", "other", "x")
    entries = [RuntimeEntry(KEY("agent", "t", "a"), RedisType.STRING, b"v")]
    rows = _as_rows([*entries, RuntimeEntry(foreign, RedisType.STRING, b"v")], now)
    with pytest.raises(RestoreError, match="agent:other:x' does not belong to task t"):
        RedisRuntime(admin).restore("t", rows, now)
    assert admin.dbsize() == 0


def test_rows_in_batches_do_not_check_a_dump_whose_ttl_ran_out(admin: redis.Redis) -> None:
    """A payload this server cannot read refuses a restore only if it would be written:
    one whose TTL ran out is left out, in batches as in one step."""
    captured = RedisRuntime(admin).server_time_ms() - 10_000
    plain = [RuntimeEntry(KEY("agent", "t", f"k{i}"), RedisType.STRING, b"v") for i in range(6)]
    unreadable = RuntimeEntry(
        KEY("signal", "t", "old"), RedisType.DUMP, b"\x15not a dump", 1_000, "stream"
    )
    policy = TtlPolicy("absolute", "absolute")
    for limits in ({}, {"atomic_max_keys": 4, "batch_keys": 3}):
        admin.flushall()
        rows = _as_rows([*plain, unreadable], captured)
        stats = RedisRuntime(admin).restore("t", rows, captured, ttl_policy=policy, **limits)
        assert (stats.keys_written, stats.keys_expired, stats.atomic) == (6, 1, not limits)
    admin.flushall()
    with pytest.raises(RestoreError, match="cannot be restored"):
        fresh = _as_rows([*plain, unreadable._replace(pttl_ms=60_000)], captured)
        RedisRuntime(admin).restore("t", fresh, captured, atomic_max_keys=4, batch_keys=3)
    assert admin.dbsize() == 0


@pytest.mark.parametrize("limits", [{}, {"atomic_max_keys": 1, "batch_keys": 1}])
def test_rows_out_of_order_are_checked_key_by_key(
    admin: redis.Redis, limits: dict[str, int]
) -> None:
    """Rows not made by decoding a checkpoint may be in any order: the bisection
    cannot vouch for their prefixes, so each key is checked."""
    now = RedisRuntime(admin).server_time_ms()
    foreign, a, b = b"zz:other:x", KEY("agent", "t", "a"), KEY("agent", "t", "b")
    rows = DecodedRows(
        [foreign, a, b],
        [[key, b"string", b"v", False, False] for key in (foreign, a, b)],
        [None, None, None],
        now,
    )
    with pytest.raises(RestoreError, match="zz:other:x' does not belong to task t"):
        RedisRuntime(admin).restore("t", rows, now, **limits)
    assert admin.dbsize() == 0
    unordered = DecodedRows(
        [b, a], [[k, b"string", b"v", False, False] for k in (b, a)], [None, None], now
    )
    assert RedisRuntime(admin).restore("t", unordered, now, **limits).keys_written == 2
    assert admin.mget(a, b) == [b"v", b"v"]


def test_a_user_denied_multi_gets_the_script(admin: redis.Redis, server: EmbeddedRedis) -> None:
    admin.execute_command("ACL", "SETUSER", "nomulti", "on", ">pw", "~*", "+@all", "-multi")
    limited = redis.Redis.from_url(server.url, username="nomulti", password="pw")
    try:
        entries = _entries(admin)
        _seed(admin)
        runtime = RedisRuntime(limited)
        stats = runtime.restore("t", entries, RedisRuntime(admin).server_time_ms())
        assert (stats.keys_written, stats.keys_removed, stats.atomic) == (len(entries), 1, True)
        assert runtime._transactions is False  # not tried again by this runtime
        assert admin.get(KEY("agent", "t", "plain")) == b"v" * 300
        assert not admin.exists(KEY("agent", "t", "stale"))
    finally:
        limited.close()
        admin.execute_command("ACL", "DELUSER", "nomulti")


def test_rows_in_batches_for_a_user_denied_multi_get_the_script(
    admin: redis.Redis, server: EmbeddedRedis
) -> None:
    """Each batch falls back to the RESTORE script, which also deletes the batch's keys
    whose TTL has run out: the same state and counts as the transactions give."""
    admin.execute_command("ACL", "SETUSER", "nomulti2", "on", ">pw", "~*", "+@all", "-multi")
    limited = redis.Redis.from_url(server.url, username="nomulti2", password="pw")
    try:
        captured = RedisRuntime(admin).server_time_ms() - 2_000
        lapsed = KEY("lock", "t", "gone")
        entries = [*_entries(admin), RuntimeEntry(lapsed, RedisType.STRING, b"x", 1_000)]
        states = []
        for client in (admin, limited):
            admin.flushall()
            _seed(admin)
            admin.set(lapsed, b"still here")
            runtime = RedisRuntime(client)
            rows = _as_rows(entries, captured)
            stats = runtime.restore("t", rows, captured, atomic_max_keys=5, batch_keys=4)
            assert (stats.keys_written, stats.keys_removed, stats.keys_expired) == (11, 2, 1)
            assert runtime._transactions is (client is admin)
            states.append(_state(admin))
        assert states[0] == states[1] and lapsed not in states[1]
    finally:
        limited.close()
        admin.execute_command("ACL", "DELUSER", "nomulti2")


def _user(admin: redis.Redis, server: EmbeddedRedis, name: str, *rules: str) -> redis.Redis:
    admin.execute_command("ACL", "SETUSER", name, "reset", "on", ">pw", *rules)
    return redis.Redis.from_url(server.url, username=name, password="pw")


def test_a_command_refused_when_queued_aborts_the_whole_transaction(
    admin: redis.Redis, server: EmbeddedRedis
) -> None:
    limited = _user(admin, server, "norpush", "~*", "+@all", "-rpush")
    try:
        with pytest.raises(Refused) as refused:
            transaction(limited, [], [("SET", "a", "1"), ("RPUSH", "b", "x")])
        assert isinstance(refused.value.args[0], redis.exceptions.NoPermissionError)
        assert admin.dbsize() == 0
        assert limited.set("c", "1") and limited.get("c") == b"1"  # a clean connection
    finally:
        limited.close()
        admin.execute_command("ACL", "DELUSER", "norpush")


@pytest.mark.parametrize("discard", ["+discard", "-discard"])
def test_a_refused_probe_runs_nothing_and_leaves_no_multi_open(
    admin: redis.Redis, server: EmbeddedRedis, discard: str
) -> None:
    limited = _user(admin, server, "noscan2", "~*", "+@all", "-scan", discard)
    try:
        with pytest.raises(Refused):
            transaction(limited, [("SCAN", 0, "COUNT", 1)], [("SET", "a", "1")])
        assert admin.dbsize() == 0
        assert limited.set("c", "1") is True  # not queued: no MULTI is open
        assert limited.get("c") == b"1" and limited.get("a") is None
    finally:
        limited.close()
        admin.execute_command("ACL", "DELUSER", "noscan2")


@pytest.mark.parametrize(
    "rules",
    [
        ("~*", "+@all", "-del", "-unlink"),
        ("~agent:*", "~queue:*", "~signal:*", "+@all"),  # not the task's locks
    ],
    ids=["no DEL", "no lock keys"],
)
def test_a_user_who_may_not_delete_a_stale_key_gets_nothing_written(
    admin: redis.Redis, server: EmbeddedRedis, rules: tuple[str, ...]
) -> None:
    """The script inside the transaction would be refused the DEL as it ran, after the
    writes were queued: the probes see it first, and the RESTORE script, refused before
    it writes, reports it. The task is left as it was."""
    limited = _user(admin, server, "nodel", *rules)
    try:
        admin.set(KEY("agent", "t", "a"), b"old")
        admin.set(KEY("lock", "t", "stale"), b"x")
        before = _state(admin)
        runtime = RedisRuntime(limited)
        entries = [
            RuntimeEntry(KEY("agent", "t", "a"), RedisType.STRING, b"new"),
            RuntimeEntry(KEY("agent", "t", "b"), RedisType.STRING, b"new"),
        ]
        with pytest.raises(RestoreError, match="refused a command while writing"):
            runtime.restore("t", entries, RedisRuntime(admin).server_time_ms())
        assert _state(admin) == before
        assert runtime._transactions is False
    finally:
        limited.close()
        admin.execute_command("ACL", "DELUSER", "nodel")


def test_a_refusal_other_than_an_acls_keeps_the_transaction(admin: redis.Redis) -> None:
    """Out of memory refuses the queued writes (and then the script's): the restore
    fails, and once memory is there again the next restore is a transaction again."""
    entries = [RuntimeEntry(KEY("agent", "t", "a"), RedisType.STRING, b"v" * 1000)]
    runtime = RedisRuntime(admin)
    now = runtime.server_time_ms()
    admin.config_set("maxmemory", 1)
    try:
        with pytest.raises(RestoreError, match="maxmemory"):
            runtime.restore("t", entries, now)
    finally:
        admin.config_set("maxmemory", 0)
    assert runtime._transactions is True
    execs = _execs(admin)
    runtime.restore("t", entries, now)
    assert _execs(admin) == execs + 1
    assert admin.get(KEY("agent", "t", "a")) == b"v" * 1000


def test_a_key_given_twice_is_written_as_the_script_writes_it(admin: redis.Redis) -> None:
    """Not from a checkpoint (keys there are unique): the script writes the entries in
    order, the last one staying; the transaction is not used for them."""
    key = KEY("queue", "t", "q")
    entries = [
        RuntimeEntry(key, RedisType.LIST, [b"first"]),
        RuntimeEntry(key, RedisType.LIST, [b"last"]),
    ]
    execs = _execs(admin)
    RedisRuntime(admin).restore("t", entries, RedisRuntime(admin).server_time_ms())
    assert admin.lrange(key, 0, -1) == [b"last"]
    assert _execs(admin) == execs


def test_many_queued_replies_are_counted_across_reads(admin: redis.Redis) -> None:
    """30,000 commands: their ``+QUEUED`` replies (270 kB) arrive over several reads,
    split anywhere, and are counted without being parsed one by one."""
    commands = [("SET", b"k%d" % i, b"%d" % i) for i in range(30_000)]
    got = transaction(admin, [], [*commands, ("INCR", "k7")])
    assert got is not None and len(got) == 30_001
    assert got[-1] == 8
    assert admin.dbsize() == 30_000 and admin.get("k29999") == b"29999"


@pytest.mark.parametrize("where", [0, 12_345, 29_999])
def test_a_refusal_among_many_queued_commands_aborts_all(admin: redis.Redis, where: int) -> None:
    """A command refused as it is queued (here: no key given), first, in the middle of
    the ``+QUEUED`` replies or last: nothing runs, and the connection is clean."""
    commands: list[tuple[object, ...]] = [("SET", b"k%d" % i, b"v") for i in range(30_000)]
    commands[where] = ("GET",)
    with pytest.raises(Refused, match="wrong number of arguments"):
        transaction(admin, [], commands)
    assert admin.dbsize() == 0
    assert admin.set("c", "1") and admin.get("c") == b"1"


def test_a_batch_written_with_a_ttl_of_zero_gets_none(admin: redis.Redis) -> None:
    """``write_entries`` takes TTLs planned already: 0 or less (or an entry's own TTL
    of 0 with -1 given) writes the key without one, as the RESTORE script does."""
    runtime = RedisRuntime(admin)
    a, b, c = KEY("agent", "t", "a"), KEY("agent", "t", "b"), KEY("lock", "t", "c")
    writes = [
        (RuntimeEntry(a, RedisType.STRING, b"va", 5_000), 0),
        (RuntimeEntry(b, RedisType.STRING, b"vb", 0), -1),
        (RuntimeEntry(c, RedisType.STRING, b"vc", 5_000), 3_000),
    ]
    execs = _execs(admin)
    assert runtime.write_entries("t", writes) == 3
    assert _execs(admin) == execs + 1
    assert admin.mget(a, b, c) == [b"va", b"vb", b"vc"]
    assert (admin.pttl(a), admin.pttl(b)) == (-1, -1) and 0 < admin.pttl(c) <= 3_000


def test_a_batch_holding_another_tasks_key_writes_nothing(admin: redis.Redis) -> None:
    writes = [
        (RuntimeEntry(KEY("agent", "t", "a"), RedisType.STRING, b"v"), -1),
        (RuntimeEntry(KEY("agent", "other", "a"), RedisType.STRING, b"v"), -1),
    ]
    with pytest.raises(RestoreError, match="does not belong to task t"):
        RedisRuntime(admin).write_entries("t", writes)
    assert admin.dbsize() == 0


def test_a_command_failing_as_it_runs_is_returned_in_place(admin: redis.Redis) -> None:
    got = transaction(admin, [], [("SET", "a", "1"), ("LPUSH", "a", "x"), ("SET", "b", "2")])
    assert got is not None
    assert got[0] is True or got[0] == b"OK"
    assert isinstance(got[1], redis.ResponseError) and "WRONGTYPE" in str(got[1])
    assert admin.get("b") == b"2"  # EXEC runs every command; the caller reports the error
    assert admin.ping()


def test_a_client_that_decodes_replies_is_declined(server: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        assert transaction(client, [], [("SET", "a", "1")]) is None
        assert client.get("a") is None
    finally:
        client.close()


def test_a_server_gone_is_a_connection_error() -> None:
    with EmbeddedRedis() as gone:
        client = redis.Redis.from_url(gone.url)
        client.ping()
    with pytest.raises(redis.ConnectionError):
        transaction(client, [], [("SET", "a", "1")])
    client.close()
