"""Guarantee 6 (idempotent): an unchanged task returns the existing checkpoint, stores nothing."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from cfn_checkpoint import CheckpointManager, KeyLayout


def _seed(client: redis.Redis, layout: KeyLayout) -> None:
    k = layout.key
    client.set(k("agent", "t", "a1"), b'{"status":"running"}')
    client.set(k("signal", "t", "go"), b"1", px=60_000)
    client.rpush(k("queue", "t", "q"), b"x", b"y")
    client.set(k("lock", "t", "l"), b"owner-1", px=30_000)
    client.hset(k("agent", "t", "h"), mapping={b"f": b"v"})


def _stored(manager: CheckpointManager) -> tuple[int, int]:
    return manager.store.payload_stats()


def test_unchanged_task_with_ttls_ticking_returns_same_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    _seed(client, layout)
    manager.durable.record_task_result("t", "a1", {"ok": True})
    first = manager.create_checkpoint("t", "iteration_boundary")
    stored = _stored(manager)
    time.sleep(0.05)  # TTLs tick down
    again = manager.create_checkpoint("t", "periodic")
    assert again.checkpoint_id == first.checkpoint_id
    assert _stored(manager) == stored
    assert len(manager.list_checkpoints("t")) == 1


Change = Callable[[redis.Redis, KeyLayout], object]

CHANGES: dict[str, Change] = {
    "value": lambda c, k: c.set(k.key("agent", "t", "a1"), b'{"status":"done"}'),
    "same bytes, other type": lambda c, k: (
        c.delete(k.key("queue", "t", "q")),
        c.sadd(k.key("queue", "t", "q"), b"x", b"y"),
    ),
    "ttl added": lambda c, k: c.pexpire(k.key("agent", "t", "a1"), 100_000),
    "ttl removed": lambda c, k: c.persist(k.key("signal", "t", "go")),
    "new key": lambda c, k: c.set(k.key("signal", "t", "new"), b""),
    "key removed": lambda c, k: c.delete(k.key("agent", "t", "h")),
    "list order": lambda c, k: (
        c.delete(k.key("queue", "t", "q")),
        c.rpush(k.key("queue", "t", "q"), b"y", b"x"),
    ),
    "hash field": lambda c, k: c.hset(k.key("agent", "t", "h"), b"g", b""),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_any_runtime_change_makes_a_new_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, change: str
) -> None:
    _seed(client, layout)
    first = manager.create_checkpoint("t")
    CHANGES[change](client, layout)
    second = manager.create_checkpoint("t")
    assert second.checkpoint_id != first.checkpoint_id
    assert second.state_hash != first.state_hash
    assert [m.checkpoint_id for m in manager.list_checkpoints("t")] == [
        second.checkpoint_id,
        first.checkpoint_id,
    ]


def test_durable_change_makes_a_new_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    _seed(client, layout)
    first = manager.create_checkpoint("t")
    manager.durable.record_agent_metric("t", "a1", "tokens", 12.0)
    second = manager.create_checkpoint("t")
    assert second.checkpoint_id != first.checkpoint_id
    assert second.runtime_state_hash == first.runtime_state_hash
    assert second.durable_state_hash != first.durable_state_hash


def test_change_back_is_not_confused_with_an_older_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    _seed(client, layout)
    a = manager.create_checkpoint("t")
    client.set(layout.key("agent", "t", "a1"), b"other")
    b = manager.create_checkpoint("t")
    client.set(layout.key("agent", "t", "a1"), b'{"status":"running"}')
    c = manager.create_checkpoint("t")
    # State A again, after B: a new newest checkpoint, so recovery brings back A's state.
    assert c.checkpoint_id not in (a.checkpoint_id, b.checkpoint_id)
    assert c.state_hash == a.state_hash
    assert c.stored_bytes < a.stored_bytes  # payloads shared with A are not stored again


def test_renewed_ttl_makes_a_new_checkpoint_that_shares_the_content(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    """A renewed lock keeps its content but moves its expiry instant: that is a change,
    or recovery would bring back the old, passed deadline."""
    lock = layout.key("lock", "t", "l")
    client.set(layout.key("agent", "t", "a"), b"1")
    client.set(lock, b"owner", px=400)
    first = manager.create_checkpoint("t")
    time.sleep(0.3)
    client.pexpire(lock, 60_000)  # the owner renews its lock
    second = manager.create_checkpoint("t")
    assert second.checkpoint_id != first.checkpoint_id
    assert second.state_hash == first.state_hash
    assert second.stored_bytes < 200  # only the new TTL list was stored
    time.sleep(0.2)  # past the first deadline
    manager.runtime.delete_task("t")
    result = manager.recover_from_checkpoint("t")
    assert result.checkpoint_id == second.checkpoint_id and result.keys_expired == 0
    assert client.get(lock) == b"owner" and client.pttl(lock) > 50_000


def test_same_hash_or_set_in_another_order_is_unchanged(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    h, s = layout.key("agent", "t", "h"), layout.key("agent", "t", "s")
    client.hset(h, mapping={b"z": b"1", b"a": b"2", b"\xff": b"3"})
    client.sadd(s, b"b", b"a", b"\x00")
    first = manager.create_checkpoint("t")
    client.hdel(h, b"z")
    client.hset(h, b"z", b"1")  # same content, another internal order
    client.srem(s, b"b")
    client.sadd(s, b"b")
    assert manager.create_checkpoint("t").checkpoint_id == first.checkpoint_id
    manager.runtime.delete_task("t")
    manager.recover_from_checkpoint("t")  # written back in sorted order
    assert manager.create_checkpoint("t").checkpoint_id == first.checkpoint_id


def test_capture_kept_in_memory_is_tied_to_the_newest_checkpoint(
    manager: CheckpointManager,
    client: redis.Redis,
    layout: KeyLayout,
    redis_url: str,
    db_url: str,
) -> None:
    """A manager keeps what it last read of a task, and an identical read returns the
    newest checkpoint without packing a key. Only while that checkpoint is the newest:
    after another worker's checkpoint, the same read is a change back, and stored."""
    _seed(client, layout)
    first = manager.create_checkpoint("t")
    assert manager.create_checkpoint("t").checkpoint_id == first.checkpoint_id
    with CheckpointManager.open(redis_url, db_url, layout=layout) as other:
        agent = layout.key("agent", "t", "a1")
        client.set(agent, b"other worker's state")
        second = other.create_checkpoint("t")
        client.set(agent, b'{"status":"running"}')  # back to the first state
    third = manager.create_checkpoint("t")
    assert third.checkpoint_id not in (first.checkpoint_id, second.checkpoint_id)
    assert third.state_hash == first.state_hash
    assert manager.create_checkpoint("t").checkpoint_id == third.checkpoint_id
    manager.durable.record_agent_metric("t", "a1", "tokens", 1.0)  # runtime read unchanged
    fourth = manager.create_checkpoint("t")
    assert fourth.checkpoint_id != third.checkpoint_id
    assert fourth.runtime_state_hash == third.runtime_state_hash
