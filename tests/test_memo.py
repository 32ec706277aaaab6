"""The captures a manager keeps to recognise an unchanged task (memo.py)."""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cfn_checkpoint import CheckpointConfig, CheckpointManager, EmbeddedRedis, KeyLayout
from cfn_checkpoint.image import Snapshot, gc_paused
from cfn_checkpoint.memo import CaptureMemo, estimate
from cfn_checkpoint.pieces import Pieces


def _snapshot(value: bytes, expiry: int = -1) -> Snapshot:
    flat = [b"agent:t:a", b"string", expiry, value, b"queue:t:q", b"list", -1, [b"x"]]
    return Snapshot("t", flat, 1_000, True)


def test_a_capture_matches_only_its_checkpoint_and_an_equal_read() -> None:
    memo = CaptureMemo(1 << 20)
    kept = _snapshot(b"v")
    memo.keep("t", "cp1", kept)
    again = _snapshot(b"v")
    assert memo.matches("t", "cp1", again)
    assert again.flat is kept.flat  # the new, equal reply is let go at once
    other = _snapshot(b"w")
    own = other.flat
    assert not memo.matches("t", "cp1", other) and other.flat is own
    assert not memo.matches("t", "cp2", _snapshot(b"v"))  # a newer checkpoint
    assert not memo.matches("t", "cp1", _snapshot(b"w"))  # another value
    assert not memo.matches("t", "cp1", _snapshot(b"v", expiry=5_000))  # a TTL set
    assert not memo.matches("u", "cp1", _snapshot(b"v"))  # another task


def test_a_capture_read_as_bytes_is_kept_as_bytes_and_matched_by_the_runtime() -> None:
    """Kept as its replies' bytes, a capture is what the next one is told to expect; the
    runtime, not the memo, compares them (a snapshot read ``as_expected`` holds them)."""
    memo = CaptureMemo(1 << 20)
    one = b"*5\r\n:1000\r\n$9\r\nagent:t:a\r\n$6\r\nstring\r\n"
    raw = (Pieces([one, b":-1\r\n$1\r\nv\r\n"]), Pieces([b"*1\r\n:1001\r\n"]))
    kept = Snapshot("t", None, 1_000, True, raw=raw)
    assert kept.flat == [b"agent:t:a", b"string", -1, b"v"] and kept.has_keys
    memo.keep("t", "cp1", kept)
    assert memo.size == estimate(kept) == sum(r.size() for r in raw) + 3 * 128
    assert memo.expected("t", "cp1") is raw
    assert memo.expected("t", "cp2") is None and memo.expected("u", "cp1") is None
    assert memo.matches("t", "cp1", Snapshot("t", None, 2_000, True, raw=raw, as_expected=True))
    equal_bytes = tuple(Pieces([b"".join(r)]) for r in raw)  # not found as expected
    assert not memo.matches("t", "cp1", Snapshot("t", None, 2_000, True, raw=equal_bytes))
    assert not memo.matches("t", "cp1", _snapshot(b"v"))  # objects never match bytes
    empty = (Pieces([b"*1\r\n:1000\r\n"]), Pieces([b"*1\r\n:1000\r\n"]))
    assert not Snapshot("t", None, 1_000, True, raw=empty).has_keys


def test_a_task_read_in_batches_is_read_as_bytes_once_found_unchanged() -> None:
    """Bytes of a task read in batches cost a round trip a batch: they are kept only
    once a capture of it was found unchanged, and given up when it changes again."""
    memo = CaptureMemo(1 << 20)
    flat = _snapshot(b"v").flat
    raw = (Pieces([_reply(flat[:4])]), Pieces([_reply(flat[4:])]))
    batched = Snapshot("t", None, 1_000, False, raw=raw)  # read one call a batch
    assert not batched.kept_as_bytes
    memo.keep("t", "cp1", batched)
    assert memo.expected("t", "cp1") is None and not memo.wants_bytes("t", "cp1")
    assert memo.size == estimate(batched, raw=False) > estimate(batched)  # as items
    assert memo.matches("t", "cp1", Snapshot("t", list(flat), 2_000, False))  # pipelined
    assert memo.wants_bytes("t", "cp1") and not memo.wants_bytes("t", "cp2")
    assert memo.expected("t", "cp1") is None
    read = Snapshot("t", None, 3_000, False, raw=raw)  # asked for its bytes, and equal
    assert memo.matches("t", "cp1", read)
    assert memo.expected("t", "cp1") is raw and memo.size == estimate(read)
    assert memo.wants_bytes("t", "cp1")
    memo.keep("t", "cp2", Snapshot("t", None, 4_000, False, raw=raw))  # changed since
    assert memo.expected("t", "cp2") is None and not memo.wants_bytes("t", "cp2")
    memo.keep("t", "cp3", Snapshot("t", None, 5_000, False, raw=raw, as_expected=True))
    assert memo.expected("t", "cp3") is raw  # read as expected: bytes are kept


def _reply(flat: list[object]) -> bytes:
    """The RESP2 bytes of a capture reply holding ``flat`` after a clock."""

    def one(item: object) -> bytes:
        if isinstance(item, bytes):
            return b"$%d\r\n%b\r\n" % (len(item), item)
        if isinstance(item, int):
            return b":%d\r\n" % item
        assert isinstance(item, list)
        return b"*%d\r\n" % len(item) + b"".join(map(one, item))

    return one([1_000, *flat])


def test_what_is_kept_stays_within_its_bound_least_recently_used_first() -> None:
    one = estimate(_snapshot(b"v"))
    assert one > len(b"agent:t:a")  # objects count, not only their bytes
    memo = CaptureMemo(2 * one)
    memo.keep("a", "cp", _snapshot(b"v"))
    memo.keep("b", "cp", _snapshot(b"v"))
    assert memo.matches("a", "cp", _snapshot(b"v"))  # "a" is now the most recent
    memo.keep("c", "cp", _snapshot(b"v"))
    assert memo.size == 2 * one
    assert not memo.matches("b", "cp", _snapshot(b"v"))
    assert memo.matches("a", "cp", _snapshot(b"v")) and memo.matches("c", "cp", _snapshot(b"v"))
    memo.keep("a", "cp", _snapshot(b"v" * 10 * one))  # too large: dropped, not kept
    assert memo.size == one and not memo.matches("a", "cp", _snapshot(b"v"))
    off = CaptureMemo(0)
    off.keep("a", "cp", _snapshot(b"v"))
    assert off.size == 0 and not off.matches("a", "cp", _snapshot(b"v"))


def test_threads_keep_and_match_at_once() -> None:
    memo = CaptureMemo(3 * estimate(_snapshot(b"v")))
    errors: list[BaseException] = []

    def work(task: str) -> None:
        try:
            for i in range(3_000):
                memo.keep(task, f"cp{i % 3}", _snapshot(b"v"))
                memo.matches(task, f"cp{i % 3}", _snapshot(b"v"))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert memo.size == sum(k.size for k in memo._kept.values()) <= memo.max_bytes


def test_an_unchanged_read_then_a_change_is_still_recorded(
    redis_url: str, db_url: str, layout: KeyLayout
) -> None:
    for memo_bytes in (0, 64 << 20):  # without and with the kept capture: the same answers
        config = CheckpointConfig(capture_memo_bytes=memo_bytes)
        with CheckpointManager.open(redis_url, db_url, layout=layout, config=config) as mgr:
            agent = layout.key("agent", f"m{memo_bytes}", "a")
            mgr.runtime.client.set(agent, b"1")
            first = mgr.create_checkpoint(f"m{memo_bytes}")
            assert mgr.create_checkpoint(f"m{memo_bytes}").checkpoint_id == first.checkpoint_id
            mgr.runtime.client.set(agent, b"2")
            second = mgr.create_checkpoint(f"m{memo_bytes}")
            assert second.checkpoint_id != first.checkpoint_id
            mgr.runtime.client.pexpire(agent, 600_000)  # a TTL alone is a change too
            third = mgr.create_checkpoint(f"m{memo_bytes}")
            assert third.checkpoint_id != second.checkpoint_id
            assert mgr.create_checkpoint(f"m{memo_bytes}").checkpoint_id == third.checkpoint_id


def test_collector_pauses_overlap_and_restore_what_was_there() -> None:
    """``gc_paused`` sections may overlap (threads): the collector comes back on when the
    last one ends, and stays off if it was off to begin with."""
    assert gc.isenabled()
    first, second = gc_paused(), gc_paused()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert not gc.isenabled()  # the second section is still running
    second.__exit__(None, None, None)
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()  # the caller's choice is kept
    finally:
        gc.enable()


def test_a_section_that_raises_turns_the_collector_back_on() -> None:
    with pytest.raises(KeyError), gc_paused():
        raise KeyError("boom")
    assert gc.isenabled()


def test_the_collector_runs_while_a_create_or_a_recovery_waits_on_the_store(
    tmp_path: Path,
) -> None:
    """The pause is process-wide, so it must not last while a call waits on the store:
    here another connection holds SQLite's write lock while a create, then a recovery,
    waits for it, and the collector must be on nearly all that time."""
    layout = KeyLayout()
    path = tmp_path / "cp.db"
    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        try:
            client.mset({layout.key("agent", "t", f"k{i}"): b"x" * 50 for i in range(300)})
            with CheckpointManager.open(server.url, f"sqlite:///{path}") as manager:
                first = manager.create_checkpoint("t")
                client.set(layout.key("agent", "t", "k1"), b"changed")
                blocker = sqlite3.connect(path, isolation_level=None)
                calls: list[Callable[[], object]] = [
                    lambda: manager.create_checkpoint("t"),
                    lambda: manager.recover_from_checkpoint("t", first.checkpoint_id),
                ]
                for call in calls:
                    blocker.execute("BEGIN IMMEDIATE")
                    worker = threading.Thread(target=call)
                    worker.start()
                    samples = []
                    for _ in range(100):  # a second, while the call cannot finish
                        samples.append(gc.isenabled())
                        time.sleep(0.01)
                    assert worker.is_alive()  # still waiting for the write lock
                    blocker.execute("COMMIT")
                    worker.join()
                    assert samples.count(False) <= 10, samples.count(False)
                blocker.close()
        finally:
            client.close()
