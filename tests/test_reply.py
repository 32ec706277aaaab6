"""Capture replies read as bytes and compared before they are parsed (runtime/reply.py).

Against a real Redis 7 (its PEXPIRETIME gives a key's expiry the same every read; on
6.2 it is worked out from PTTL and may move by a millisecond, and a reply is then
parsed, which tests of "as expected" cannot tell from a fault): an unchanged task's
reply is recognised without being parsed, and
any difference (a value, a TTL, a key more or less) makes it parsed, exactly as redis-py
parses it. The framing cases a server seldom produces on demand (a reply whose first
bytes come alone, a push message ahead of it, bytes after it) are fed through a real
socket pair.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.commands.core import Script

from cfn_checkpoint import CheckpointConfig, CheckpointManager, EmbeddedRedis, KeyLayout
from cfn_checkpoint.image import Snapshot
from cfn_checkpoint.pieces import Pieces
from cfn_checkpoint.runtime.redis_runtime import RedisClient, RedisRuntime
from cfn_checkpoint.runtime.reply import _read, call_script, clock_span

from conftest import redis_binary, require, wipe

TASK = "t"


@pytest.fixture()
def own_layout(redis7_url: str, prefix: str) -> Iterator[KeyLayout]:
    layout = KeyLayout(prefix=prefix)
    yield layout
    client = redis.Redis.from_url(redis7_url)
    wipe(client, prefix)
    client.close()


def _own_redis7() -> EmbeddedRedis:
    """A Redis 7 of this test's own (SCRIPT FLUSH, a busy script or a database holding
    only the task would disturb the shared one)."""
    binary = redis_binary("7")
    require(binary is not None, "no Redis 7 here: install redis-server 7")
    return EmbeddedRedis(binary=binary)


def _runtime(url: str, layout: KeyLayout, timeout: float = 3) -> RedisRuntime:
    # A hang (a reply waited for that never comes) fails fast instead of in 10 s.
    return RedisRuntime(redis.Redis.from_url(url, socket_timeout=timeout), layout=layout)


def _fill(client: RedisClient, layout: KeyLayout) -> None:
    client.set(layout.key("agent", TASK, "a"), b'{"step": 1}')
    client.set(layout.key("signal", TASK, "done"), b"1", px=600_000)
    client.rpush(layout.key("queue", TASK, "q"), b"x", b"y")
    client.hset(layout.key("agent", TASK, "h"), mapping={b"f": b"v"})
    client.sadd(layout.key("agent", TASK, "s"), b"m")


def test_a_reply_equal_but_for_its_clock_is_not_parsed(
    redis7_url: str, own_layout: KeyLayout
) -> None:
    runtime = _runtime(redis7_url, own_layout)
    _fill(runtime.client, own_layout)
    plain = _runtime(redis7_url, own_layout).capture(TASK)  # read as redis-py reads
    first = _settled(runtime)
    assert first.raw is not None and first.packed == plain.packed
    time.sleep(0.005)  # a later clock
    again = runtime.capture(TASK, raw=True, expected=first.raw)
    assert again.as_expected and again.raw is first.raw
    assert again._flat is None and again.has_keys  # nothing parsed to know that
    assert again.captured_at_ms > first.captured_at_ms  # its own clock, read from the bytes
    assert again.flat == first.flat  # parsed when asked for
    runtime.client.close()


def _settled(runtime: RedisRuntime, **options: Any) -> Snapshot:
    """A capture read with its bytes, once two reads in a row agree: while Redis rehashes
    its key table after writes, SCAN may return the same keys in another order."""
    read = runtime.capture(TASK, raw=True, **options)
    for _ in range(50):
        again = runtime.capture(TASK, raw=True, expected=read.raw, **options)
        if again.as_expected:
            return read
        read = again
        time.sleep(0.01)
    raise AssertionError("two reads of an unchanged task never agreed")


CHANGES: dict[str, Callable[[RedisClient, KeyLayout], object]] = {
    "a value, same length": lambda c, lay: c.set(lay.key("agent", TASK, "a"), b'{"step": 2}'),
    "a value, longer": lambda c, lay: c.set(lay.key("agent", TASK, "a"), b'{"step": 12}'),
    "a TTL set": lambda c, lay: c.pexpire(lay.key("agent", TASK, "a"), 600_000),
    "a TTL renewed": lambda c, lay: c.pexpire(lay.key("signal", TASK, "done"), 900_000),
    "a key more": lambda c, lay: c.set(lay.key("agent", TASK, "b"), b"new"),
    "a key less": lambda c, lay: c.delete(lay.key("queue", TASK, "q")),
    "every key gone": lambda c, lay: c.delete(*c.keys(lay.prefix.encode() + b"*")),
    "a list item": lambda c, lay: c.rpush(lay.key("queue", TASK, "q"), b"z"),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_reply_that_differs_anywhere_is_parsed(
    redis7_url: str, own_layout: KeyLayout, change: str
) -> None:
    runtime = _runtime(redis7_url, own_layout)
    _fill(runtime.client, own_layout)
    first = _settled(runtime)
    CHANGES[change](runtime.client, own_layout)
    again = runtime.capture(TASK, raw=True, expected=first.raw)
    assert not again.as_expected and again.raw is not first.raw
    assert again.packed == _runtime(redis7_url, own_layout).capture(TASK).packed
    assert again.packed != first.packed
    assert again.has_keys == (change != "every key gone")
    runtime.client.close()


def test_a_task_without_keys_reads_as_expected(redis7_url: str, own_layout: KeyLayout) -> None:
    runtime = _runtime(redis7_url, own_layout)
    first = runtime.capture(TASK, raw=True)
    again = runtime.capture(TASK, raw=True, expected=first.raw)
    assert again.as_expected and not again.has_keys and again.flat == []
    runtime.client.close()


def test_a_task_read_in_batches_is_compared_batch_by_batch(
    redis7_url: str, own_layout: KeyLayout
) -> None:
    """A task larger than ``atomic_max_keys`` is read a batch at a time, each batch's
    reply compared with the same batch's bytes from before."""
    runtime = _runtime(redis7_url, own_layout)
    _fill(runtime.client, own_layout)
    options: dict[str, Any] = {"atomic_max_keys": 3, "batch_keys": 2, "expected_keys": 5}
    assert runtime.capture(TASK, raw=True, **options).raw is None  # pipelined: no bytes
    first = runtime.capture(TASK, batch_raw=True, **options)
    assert first.raw is not None and len(first.raw) == 3 and not first.point_in_time
    plain = _runtime(redis7_url, own_layout).capture(TASK, **options)
    assert first.packed == plain.packed
    again = runtime.capture(TASK, raw=True, expected=first.raw, **options)
    assert again.as_expected and again.raw is first.raw and again._flat is None
    assert again.flat == first.flat and again.has_keys
    runtime.client.set(own_layout.key("signal", TASK, "done"), b"2", keepttl=True)
    changed = runtime.capture(TASK, raw=True, expected=first.raw, **options)
    assert not changed.as_expected and changed.raw is not None
    # The batches that read as before keep the bytes from before; the changed one, its own.
    assert changed.raw[0] is first.raw[0] and changed.raw[2] is not first.raw[2]
    assert changed.packed == _runtime(redis7_url, own_layout).capture(TASK, **options).packed
    runtime.client.set(own_layout.key("agent", TASK, "b"), b"new")  # the batches shift
    more = runtime.capture(TASK, raw=True, expected=changed.raw, **options)
    assert not more.as_expected and len(more.packed.keys) == 6
    assert more.packed == _runtime(redis7_url, own_layout).capture(TASK, **options).packed
    runtime.client.close()


def test_a_task_listed_first_is_compared_too(redis7_url: str, own_layout: KeyLayout) -> None:
    """In a database too large to scan inside the script (the usual case: many tasks),
    the task's keys are listed, then read by one script call: its reply is kept and
    compared as bytes as well."""
    runtime = RedisRuntime(
        redis.Redis.from_url(redis7_url, socket_timeout=3),
        layout=own_layout,
        scan_in_script_max_keys=10,
    )
    client = runtime.client
    _fill(client, own_layout)
    client.mset({own_layout.key("agent", "other", f"k{i}"): b"x" for i in range(100)})
    first = runtime.capture(TASK, raw=True, expected_keys=5)
    assert first.raw is not None and first.point_in_time and len(first.packed.keys) == 5
    again = runtime.capture(TASK, raw=True, expected_keys=5, expected=first.raw)
    assert again.as_expected and again.raw is first.raw and again.flat == first.flat
    client.set(own_layout.key("queue", TASK, "q2"), b"new")
    more = runtime.capture(TASK, raw=True, expected_keys=5, expected=first.raw)
    assert not more.as_expected and len(more.packed.keys) == 6 and more.raw is not None
    assert more.packed == _runtime(redis7_url, own_layout).capture(TASK).packed
    client.close()


def test_a_task_found_to_fill_the_database_is_read_as_bytes_too() -> None:
    """A task that grew since its last checkpoint (1 key then) looks too small for a
    scan inside the script; listed, it fills the database, and one script scans and
    reads it: that read keeps its bytes as well."""
    layout = KeyLayout()
    with _own_redis7() as server:
        runtime = RedisRuntime(redis.Redis.from_url(server.url), scan_in_script_max_keys=10)
        runtime.client.mset({layout.key("agent", TASK, f"k{i}"): b"v" for i in range(20)})
        first = _settled(runtime, expected_keys=1)
        assert first.raw is not None and first.point_in_time and len(first.packed.keys) == 20
        again = runtime.capture(TASK, raw=True, expected_keys=1, expected=first.raw)
        assert again.as_expected and again.flat == first.flat
        runtime.client.close()


def test_a_lost_connection_is_replaced_and_the_read_made_again(
    redis7_url: str, own_layout: KeyLayout
) -> None:
    runtime = _runtime(redis7_url, own_layout)
    _fill(runtime.client, own_layout)
    first = _settled(runtime)
    own_id = runtime.client.client_id()  # the pool's one connection, used by the capture
    admin = redis.Redis.from_url(redis7_url)
    admin.client_kill_filter(_id=str(own_id))
    admin.close()
    again = runtime.capture(TASK, raw=True, expected=first.raw)
    assert again.as_expected and again.flat == first.flat
    runtime.client.close()


def test_a_script_redis_has_forgotten_is_loaded_again() -> None:
    """On a server of its own: SCRIPT FLUSH would disturb other tests."""
    layout = KeyLayout()
    with _own_redis7() as server:
        runtime = _runtime(server.url, layout)
        _fill(runtime.client, layout)
        first = _settled(runtime)
        before = runtime.capture(TASK, raw=True, expected=first.raw)
        assert before.as_expected  # the task reads the same bytes before the flush
        runtime.client.script_flush()
        again = runtime.capture(TASK, raw=True, expected=first.raw)
        # Read by the raw reader, not redis-py's fallback, and equal: then as expected.
        assert again.raw is not None, "the raw read gave up and redis-py read the reply"
        assert again.flat == first.flat
        assert again.as_expected, f"equal items, other bytes: {again.raw!r} != {first.raw!r}"
        runtime.client.script_flush()
        runtime.client.set(layout.key("agent", TASK, "a"), b"changed")
        assert runtime.capture(TASK, raw=True, expected=first.raw).flat != first.flat
        runtime.client.close()


@contextmanager
def _busy(url: str, seconds: float) -> Iterator[None]:
    """Redis kept busy for ``seconds`` (from just before the block) by a script on
    another connection."""
    spin = (
        "local function us(t) return t[1] * 1000000 + t[2] end "
        "local start = us(redis.call('TIME')) "
        "repeat until us(redis.call('TIME')) - start >= tonumber(ARGV[1])"
    )
    busy = redis.Redis.from_url(url)
    worker = threading.Thread(target=busy.eval, args=(spin, 0, int(seconds * 1_000_000)))
    worker.start()
    time.sleep(0.1)  # the script is running
    try:
        yield
    finally:
        worker.join()
        busy.close()


def test_a_reply_that_does_not_come_in_time_is_a_timeout() -> None:
    """A script on another connection keeps Redis busy past the socket timeout: the
    read gives up with redis-py's TimeoutError, and the connection is closed, so the
    late reply is never taken for the next call's."""
    with _own_redis7() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=0.3)
        script = Script(client, "return {1, 'x'}")
        client.script_load(script.script)
        with _busy(server.url, 1.5), pytest.raises(redis.TimeoutError):
            call_script(client, script, [])
        read = call_script(client, script, [])
        assert read is not None and read.value == [1, b"x"]
        client.close()


def test_an_error_reply_is_raised_as_redis_py_raises_it(redis7_url: str) -> None:
    client = redis.Redis.from_url(redis7_url)
    own_id = client.client_id()
    refused = Script(client, "return redis.error_reply('ERR no thanks')")
    with pytest.raises(redis.ResponseError, match="no thanks"):
        call_script(client, refused, [])
    assert client.client_id() == own_id  # the connection stays: it read the whole reply
    # redis-py counts LOADING (a restarted server still reading its data) as a lost
    # connection, which its retries wait out: so does the caller's fallback.
    loading = Script(client, "return redis.error_reply('LOADING Redis is loading the dataset')")
    with pytest.raises(redis.BusyLoadingError):
        call_script(client, loading, [])
    client.close()


def test_a_read_that_fails_is_made_again_through_redis_py() -> None:
    """A capture whose bytes do not come in time (another client's script keeps Redis
    busy) is asked again the usual way, which waits for it: the capture succeeds, read
    by redis-py, so nothing is kept as bytes."""
    layout = KeyLayout()
    with _own_redis7() as server:
        runtime = _runtime(server.url, layout, timeout=0.6)
        _fill(runtime.client, layout)
        first = _settled(runtime)
        with _busy(server.url, 1.0):
            again = runtime.capture(TASK, raw=True, expected=first.raw)
        assert not again.as_expected and again.raw is None
        assert again.packed == first.packed
        runtime.client.close()


def test_a_script_is_loaded_again_on_the_connection_already_held() -> None:
    """With a pool of one connection, loading the script on another one would wait for
    the pool's timeout."""
    layout = KeyLayout()
    with _own_redis7() as server:
        pool = redis.BlockingConnectionPool.from_url(server.url, max_connections=1, timeout=5)
        runtime = RedisRuntime(redis.Redis(connection_pool=pool), layout=layout)
        _fill(runtime.client, layout)
        first = _settled(runtime)
        runtime.client.script_flush()
        started = time.monotonic()
        again = runtime.capture(TASK, raw=True, expected=first.raw)
        assert again.as_expected and time.monotonic() - started < 2
        runtime.client.close()


def test_clients_read_otherwise_are_left_to_redis_py(redis7_url: str) -> None:
    script_text = "return {1}"
    for options in ({"decode_responses": True}, {"single_connection_client": True}):
        client = redis.Redis.from_url(redis7_url, **options)
        assert call_script(client, Script(client, script_text), []) is None
        client.close()


# -- framing, through a socket pair ------------------------------------------------------------

REPLY = b"*3\r\n:1700000000000\r\n$3\r\nabc\r\n*2\r\n$1\r\nx\r\n:-1\r\n"
LATER = REPLY.replace(b"1700000000000", b"1700000000123")


class _Pushes:
    def __init__(self) -> None:
        self.seen: list[Any] = []

    def handle_push_response(self, response: Any) -> None:
        self.seen.append(response)


def _feed(
    parts: list[bytes],
    expected: Pieces | None,
    parser: Any = None,
    *,
    close: bool = False,
    with_clean: bool = False,
) -> Any:
    """What :func:`_read` makes of ``parts`` sent one at a time (then the connection
    closed, with ``close``): the reply, and with ``with_clean`` whether nothing was
    left unread after it."""
    ours, theirs = socket.socketpair()
    ours.settimeout(2)

    def send() -> None:
        for part in parts:
            theirs.sendall(part)
            time.sleep(0.02)  # each part its own recv
        if close:
            theirs.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        reply, clean = _read(ours, expected, parser)
        return reply if not with_clean else (reply, clean)
    finally:
        sender.join()
        ours.close()
        theirs.close()


def test_the_clock_is_found_only_where_a_capture_reply_has_it() -> None:
    assert clock_span(Pieces([REPLY])) == (5, 18)
    assert clock_span(Pieces([b"*1\r\n$1\r\nx\r\n"])) is None
    assert clock_span(Pieces([b"*1\r\n:17"])) is None  # the line does not end in it
    assert clock_span(Pieces([b":5\r\n"])) is None
    assert clock_span(Pieces()) is None


@pytest.mark.parametrize("cut", [1, 7, 18, 19, 20, 30, len(REPLY) - 1])
def test_a_reply_in_any_pieces_matches_or_is_parsed(cut: int) -> None:
    expected = Pieces([REPLY[:24], REPLY[24:33], REPLY[33:]])  # kept in pieces of their own
    read = _feed([LATER[:cut], LATER[cut:]], expected)
    if cut >= 20:  # the clock and its line end came first: compared, not parsed
        assert read.value is None and read.clock == 1700000000123 and read.data is expected
    else:
        assert read.value == [1700000000123, b"abc", [b"x", -1]]
    other = LATER.replace(b"abc", b"abd")
    assert _feed([other[:cut], other[cut:]], expected).value == [1700000000123, b"abd", [b"x", -1]]
    shorter = b"*2\r\n:1700000000123\r\n$3\r\nabc\r\n"  # ends before the expected one
    assert _feed([shorter], expected).value == [1700000000123, b"abc"]
    longer = LATER.replace(b"*3", b"*4", 1) + b":7\r\n"  # a key more
    assert _feed([longer[:cut], longer[cut:]], expected).value == [
        1700000000123,
        b"abc",
        [b"x", -1],
        7,
    ]


def test_a_kept_reply_whose_first_piece_ends_inside_the_clock_is_never_matched() -> None:
    read = _feed([LATER], Pieces([REPLY[:11], REPLY[11:]]))
    assert read.value == [1700000000123, b"abc", [b"x", -1]]  # parsed: still right


def test_a_push_message_ahead_of_the_reply_goes_to_redis_py() -> None:
    push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    pushes = _Pushes()
    read = _feed([push + LATER], Pieces([REPLY]), pushes)
    assert read.value == [1700000000123, b"abc", [b"x", -1]]
    assert len(pushes.seen) == 1 and pushes.seen[0][0] == b"invalidate"
    assert read.data is None  # its bytes hold the push too: not for a later read to expect


def test_push_messages_right_after_the_reply_go_to_redis_py_too() -> None:
    push = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n"
    pushes = _Pushes()
    read, clean = _feed([LATER + push], Pieces([REPLY]), pushes, with_clean=True)
    assert read.value == [1700000000123, b"abc", [b"x", -1]] and clean
    assert len(pushes.seen) == 1 and read.data is None  # the next read expects nothing
    # Half a push after the reply: the reply is good, the connection is not (closed).
    read, clean = _feed([LATER + push[:12]], Pieces([REPLY]), pushes, with_clean=True)
    assert read.value == [1700000000123, b"abc", [b"x", -1]] and not clean


def test_a_reply_that_is_false_is_a_reply() -> None:
    """RESP3's false is a whole reply, not the reader's "not yet" (which would wait on
    the socket until its timeout)."""
    assert _feed([b"#f\r\n"], None).value is False


def test_bytes_that_are_not_one_reply_cannot_be_parsed_later() -> None:
    assert Pieces([REPLY]).parse() == [1700000000000, b"abc", [b"x", -1]]
    for bad in (REPLY[:-3], REPLY + b"+OK\r\n"):
        with pytest.raises(ValueError, match="exactly one reply"):
            Pieces([bad]).parse()


def test_bytes_after_the_reply_are_a_protocol_error() -> None:
    with pytest.raises(redis.exceptions.InvalidResponse, match="more than one reply"):
        _feed([LATER + b"+OK\r\n"], None)


def test_a_connection_closed_mid_reply_is_a_connection_error() -> None:
    with pytest.raises(redis.ConnectionError, match="closed"):
        _feed([LATER[:25]], Pieces([REPLY]), close=True)
    with pytest.raises(redis.ConnectionError, match="closed"):
        _feed([LATER[:25]], None, close=True)


def test_an_unchanged_task_whose_durable_rows_changed_is_recorded_whole(
    redis7_url: str, own_layout: KeyLayout, tmp_path: Path
) -> None:
    """The runtime reads as kept (its reply not parsed), the durable rows do not: the
    new checkpoint's runtime keys come from the kept bytes, and recover exactly."""
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    with CheckpointManager.open(redis7_url, url, layout=own_layout) as mgr:
        client = mgr.runtime.client
        assert isinstance(client, redis.Redis)
        _fill(client, own_layout)
        first = mgr.create_checkpoint(TASK)
        assert mgr._memo.expected(TASK, first.checkpoint_id) is not None
        assert mgr.create_checkpoint(TASK).checkpoint_id == first.checkpoint_id
        mgr.durable.record_audit_event(TASK, "step", agent_id="a1")
        second = mgr.create_checkpoint(TASK)
        assert second.checkpoint_id != first.checkpoint_id
        assert second.runtime_state_hash == first.runtime_state_hash
        assert second.key_count == first.key_count == 5
        before = {k: client.dump(k) for k in client.keys(own_layout.prefix.encode() + b"*")}
        client.delete(*before)
        mgr.recover_from_checkpoint(TASK, second.checkpoint_id)
        after = {k: client.dump(k) for k in client.keys(own_layout.prefix.encode() + b"*")}
        assert after == before


def test_a_task_read_in_batches_comes_to_be_compared_as_bytes(
    redis7_url: str, own_layout: KeyLayout, tmp_path: Path
) -> None:
    """Through the manager: a batched task's first re-checkpoint found unchanged asks
    the next capture for its bytes; from then on an unchanged one parses nothing, and a
    change is still recorded and recovers exactly."""
    config = CheckpointConfig(atomic_max_keys=3, batch_keys=2)
    url = f"sqlite:///{tmp_path / 'cp.db'}"
    with CheckpointManager.open(redis7_url, url, layout=own_layout, config=config) as mgr:
        client = mgr.runtime.client
        _fill(client, own_layout)
        first = mgr.create_checkpoint(TASK)
        memo = mgr._memo
        for wants, has_bytes in ((True, False), (True, True), (True, True)):
            assert mgr.create_checkpoint(TASK).checkpoint_id == first.checkpoint_id
            assert memo.wants_bytes(TASK, first.checkpoint_id) == wants
            assert (memo.expected(TASK, first.checkpoint_id) is not None) == has_bytes
        client.set(own_layout.key("agent", TASK, "a"), b'{"step": 2}')
        second = mgr.create_checkpoint(TASK)
        assert second.checkpoint_id != first.checkpoint_id
        assert memo.expected(TASK, second.checkpoint_id) is None  # changed: items again
        keys = client.keys(own_layout.prefix.encode() + b"*")
        before = {k: client.dump(k) for k in keys}
        client.delete(*keys)
        mgr.recover_from_checkpoint(TASK, second.checkpoint_id)
        assert {k: client.dump(k) for k in keys} == before
