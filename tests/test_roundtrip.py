"""Guarantee 1 (exact): after recovery every key is identical in type, bytes and TTL."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
import redis
from hypothesis import HealthCheck, given, settings

from cfn_checkpoint import CheckpointManager, KeyLayout
from cfn_checkpoint.image import packed_rows

from conftest import task_state, wipe
from strategies import task_states, write_state


def _ttls(client: redis.Redis, prefix: str) -> dict[bytes, int]:
    return {k: client.pttl(k) for k in client.scan_iter(match=prefix + "*", count=1000)}


#: One key every generated task has.
ANCHOR = ("agent", b"anchor")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(state=task_states, other=task_states, later=task_states)
def test_random_state_round_trips_exactly(
    redis_url: str,
    new_db_url: Callable[[], str],
    layout: KeyLayout,
    prefix: str,
    state: dict[Any, Any],
    other: dict[Any, Any],
    later: dict[Any, Any],
) -> None:
    # A fresh store per example: an earlier example with the same content would otherwise
    # be returned as the (idempotent) checkpoint, with the TTLs of its own capture.
    with CheckpointManager.open(redis_url, new_db_url(), layout=layout) as manager:
        _round_trip(manager, layout, prefix, state, other, later)


def _round_trip(
    manager: CheckpointManager,
    layout: KeyLayout,
    prefix: str,
    state: dict[Any, Any],
    other: dict[Any, Any],
    later: dict[Any, Any],
) -> None:
    client = manager.runtime.client
    wipe(client, prefix)
    state = {**state, ANCHOR: ("string", b"", None)}  # an empty task is refused, not checkpointed
    write_state(client, layout, "task-1", state)
    # Tasks whose ids share a prefix with task-1, and a key outside every namespace.
    write_state(client, layout, "task-10", other)
    write_state(client, layout, "task-1.x", other)
    client.set(prefix + "unrelated:task-1:x", b"keep")
    before = task_state(client, prefix)
    started = time.monotonic()
    ttl_before = _ttls(client, prefix)

    meta = manager.create_checkpoint("task-1")
    assert meta.key_count == len(state)

    # The task is damaged: everything deleted, then new keys written and old ones changed.
    manager.runtime.delete_task("task-1")
    write_state(client, layout, "task-1", later)
    result = manager.recover_from_checkpoint("task-1")

    assert result.success and result.keys_restored == len(state)
    after = task_state(client, prefix)
    assert after == before
    ttl_after = _ttls(client, prefix)
    elapsed_ms = (time.monotonic() - started) * 1000
    for key, pttl in ttl_after.items():
        if ttl_before[key] < 0:
            assert pttl < 0, key
        else:
            # At most what it had, at least that less the time the whole test took.
            assert ttl_before[key] - elapsed_ms - 5 <= pttl <= ttl_before[key], key


def test_hundreds_of_keys_and_large_values(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    state: dict[Any, Any] = {}
    for i in range(400):
        role = ("agent", "signal", "queue", "lock")[i % 4]
        state[(role, f"k{i}".encode())] = (
            "string",
            f'{{"n":{i}}}'.encode(),
            90_000 if i % 3 else None,
        )
    big = bytes(range(256)) * 4096  # 1 MiB, every byte value
    state[("agent", b"big")] = ("string", big * 3, None)
    state[("queue", b"long")] = ("list", [str(i).encode() for i in range(5_000)], None)
    state[("agent", b"wide")] = (
        "hash",
        {f"f{i}".encode(): b"\x00" * (i % 5) for i in range(3_001)},
        None,
    )
    state[("signal", b"many")] = ("set", {f"m{i}".encode() for i in range(2_500)}, 120_000)
    state[("signal", b"rank")] = ("zset", {f"z{i}".encode(): i / 7 for i in range(2_500)}, None)
    write_state(client, layout, "task-big", state)
    before = task_state(client, prefix)

    meta = manager.create_checkpoint("task-big")
    assert meta.key_count == len(state) and meta.point_in_time
    manager.runtime.delete_task("task-big")
    manager.recover_from_checkpoint("task-big")
    assert task_state(client, prefix) == before


def test_batched_capture_and_restore_beyond_atomic_size(
    redis_url: str, db_url: str, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    from cfn_checkpoint import CheckpointConfig

    config = CheckpointConfig(atomic_max_keys=50, batch_keys=7)
    state = {("agent", f"a{i}".encode()): ("string", str(i).encode(), None) for i in range(120)}
    write_state(client, layout, "task-wide", state)
    before = task_state(client, prefix)
    with CheckpointManager.open(redis_url, db_url, layout=layout, config=config) as mgr:
        meta = mgr.create_checkpoint("task-wide")
        assert meta.key_count == 120
        assert not meta.point_in_time  # the checkpoint says it was read in batches
        mgr.runtime.delete_task("task-wide")
        client.set(layout.key("agent", "task-wide", "stale"), b"x")
        result = mgr.recover_from_checkpoint("task-wide")
        assert not result.atomic and result.keys_removed == 1
    assert task_state(client, prefix) == before


def test_a_key_an_in_script_scan_named_twice_is_kept_once() -> None:
    """SCAN may name a key twice while Redis rehashes; the script then reads it twice."""
    a = [b"agent:t:a", b"string", -1, b"1"]
    b = [b"agent:t:b", b"list", 5_000, [b"x"]]
    c = [b"agent:t:c", b"dump:stream", -1, b"\x0f payload"]
    once = packed_rows([*b, *a, *c], 1_000)
    assert once.keys == [a[0], b[0], c[0]] and once.expiries == [-1, 5_000, -1]
    assert [msgpack.unpackb(row, raw=True) for row in once.rows] == [
        [a[0], b"string", b"1", False, False],
        [b[0], b"list", [b"x"], True, False],
        [c[0], b"dump", b"\x0f payload", False, b"stream"],  # the native type apart
    ]
    for twice in ([*b, *a, *c, *a], [*a, *b, *a, *c, *b], [*c, *c, *b, *a]):
        assert packed_rows(twice, 1_000) == once
    assert packed_rows([], 1_000) == ([], [], [], [])
    assert packed_rows([*a], 1_000).keys == [a[0]]
    # An expiry the capture clock has reached leaves no TTL: the instant is that clock.
    assert packed_rows([*b], 6_000).expiries == [6_000]
    with pytest.raises(ValueError, match="four items a key"):
        packed_rows([*a, b"x"], 1_000)
