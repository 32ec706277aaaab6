"""Tasks above stream_min_keys are checkpointed and recovered a batch at a time."""

from __future__ import annotations

from typing import Any

import pytest
import redis

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    CorruptCheckpointError,
    KeyLayout,
    RestoreError,
)

from conftest import task_state
from strategies import write_state

SMALL = CheckpointConfig(stream_min_keys=40, atomic_max_keys=30, batch_keys=7)


def _state(n: int, version: int = 0) -> dict[Any, Any]:
    state: dict[Any, Any] = {}
    for i in range(n):
        role = ("agent", "signal", "queue", "lock")[i % 4]
        kind = ("string", "list", "hash", "set", "zset")[i % 5]
        value: Any = {
            "string": f'{{"n":{i},"v":{version}}}'.encode(),
            "list": [b"a", str(i).encode(), b""],
            "hash": {b"f": str(i).encode(), b"": b"\xff"},
            "set": {b"x", str(i).encode()},
            "zset": {b"m": float(i), b"n": -1.5},
        }[kind]
        state[(role, f"k{i:03d}".encode())] = (kind, value, 600_000 if i % 3 else None)
    return state


@pytest.fixture()
def streamed(redis_url: str, db_url: str, layout: KeyLayout) -> CheckpointManager:
    manager = CheckpointManager.open(redis_url, db_url, layout=layout, config=SMALL)
    yield manager  # type: ignore[misc]
    manager.close()


def test_large_task_round_trips_in_batches(
    streamed: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    client = streamed.runtime.client
    write_state(client, layout, "big", _state(120))
    write_state(client, layout, "other", _state(5))
    before = task_state(client, prefix)
    meta = streamed.create_checkpoint("big")
    assert meta.key_count == 120 and not meta.point_in_time
    assert "delta" not in [k for k, _ in streamed.store.manifest(meta.checkpoint_id)]
    assert streamed.create_checkpoint("big").checkpoint_id == meta.checkpoint_id  # unchanged
    streamed.runtime.delete_task("big")
    client.set(layout.key("agent", "big", "stale"), b"x")
    result = streamed.recover_from_checkpoint("big", restore_durable=True)
    assert result.keys_restored == 120 and not result.atomic
    assert task_state(client, prefix) == before
    # The same checkpoint also loads whole (show, diff, export) and verifies.
    assert len(streamed.load_checkpoint(meta.checkpoint_id).entries) == 120


def test_damaged_large_checkpoint_is_refused_before_writing(
    streamed: CheckpointManager, layout: KeyLayout, prefix: str
) -> None:
    client = streamed.runtime.client
    write_state(client, layout, "big", _state(80))
    good = streamed.create_checkpoint("big")
    write_state(client, layout, "big", _state(80, version=1))
    bad = streamed.create_checkpoint("big")
    with streamed.store.atomic() as db:
        (digest,) = db.execute(
            "SELECT digest FROM checkpoint_payloads WHERE checkpoint_id = ? AND kind = 'base' "
            "AND digest NOT IN (SELECT digest FROM checkpoint_payloads WHERE checkpoint_id = ?) "
            "ORDER BY ordinal DESC LIMIT 1",
            (bad.checkpoint_id, good.checkpoint_id),
        ).fetchone()
        db.execute("UPDATE payloads SET data = ? WHERE digest = ?", (b"\x00", digest))
    current = task_state(client, prefix)
    with pytest.raises(CorruptCheckpointError):
        streamed.recover_from_checkpoint("big", bad.checkpoint_id)
    assert task_state(client, prefix) == current  # nothing was written
    result = streamed.recover_from_checkpoint("big")
    assert result.checkpoint_id == good.checkpoint_id and result.errors


def test_damaged_newest_large_checkpoint_is_not_returned_as_unchanged(
    streamed: CheckpointManager, layout: KeyLayout, prefix: str, redis_url: str, db_url: str
) -> None:
    client = streamed.runtime.client
    write_state(client, layout, "big", _state(80))
    first = streamed.create_checkpoint("big")
    with streamed.store.atomic() as db:
        db.execute(
            "UPDATE payloads SET data = ? WHERE digest = (SELECT digest FROM "
            "checkpoint_payloads WHERE checkpoint_id = ? AND kind = 'base' LIMIT 1)",
            (b"\x00", first.checkpoint_id),
        )
    expected = task_state(client, prefix)
    with CheckpointManager.open(redis_url, db_url, layout=layout, config=SMALL) as fresh:
        again = fresh.create_checkpoint("big")  # unchanged, but the newest is damaged
        assert again.checkpoint_id != first.checkpoint_id
        fresh.verify_checkpoint(first.checkpoint_id)  # repaired by the new one
        fresh.runtime.delete_task("big")
        fresh.recover_from_checkpoint("big")
        assert task_state(client, prefix) == expected


def test_stream_from_newer_redis_is_refused_before_the_large_task_is_touched(
    redis7_url: str, redis62_url: str, tmp_path: Any, prefix: str
) -> None:
    layout = KeyLayout(prefix=prefix)
    db = f"sqlite:///{tmp_path / 'x.db'}"
    with CheckpointManager.open(redis7_url, db, layout=layout, config=SMALL) as source:
        write_state(source.runtime.client, layout, "big", _state(60))
        source.runtime.client.xadd(layout.key("signal", "big", "events"), {b"k": b"v"})
        meta = source.create_checkpoint("big")
        source.runtime.delete_task("big")
    with CheckpointManager.open(redis62_url, db, layout=layout, config=SMALL) as target:
        write_state(target.runtime.client, layout, "big", _state(61, version=9))
        before = task_state(target.runtime.client, prefix)
        with pytest.raises(RestoreError, match="nothing was written"):
            target.recover_from_checkpoint("big", meta.checkpoint_id)
        assert task_state(target.runtime.client, prefix) == before
        target.runtime.delete_task("big")


def test_large_task_with_a_stream_that_expires_recovers(
    streamed: CheckpointManager, layout: KeyLayout, prefix: str
) -> None:
    """A stream (kept as a DUMP payload) with a TTL in a streamed task: its payload is
    checked against the server before writing, and it comes back with its TTL."""
    client = streamed.runtime.client
    write_state(client, layout, "big", _state(60))
    events = layout.key("queue", "big", "events")
    client.xadd(events, {b"k": b"v"})
    client.pexpire(events, 600_000)
    before = task_state(client, prefix)
    meta = streamed.create_checkpoint("big")
    assert meta.key_count == 61 and not meta.point_in_time
    streamed.runtime.delete_task("big")
    result = streamed.recover_from_checkpoint("big")
    assert result.success and result.keys_restored == 61
    assert task_state(client, prefix) == before
    assert 0 < client.pttl(events) <= 600_000


def test_a_streamed_keyframe_cuts_its_chunks_where_a_whole_one_does(
    streamed: CheckpointManager, redis_url: str, layout: KeyLayout, tmp_path: Any
) -> None:
    """A task crossing ``stream_min_keys`` keeps its chunk names: the streamed create
    cuts where a whole keyframe does (a row whose digest begins with ten zero bits, or 1 MiB),
    though it reads the keys a batch at a time."""
    client = streamed.runtime.client
    write_state(client, layout, "big", _state(3_000))
    client.set(layout.key("agent", "big", "large"), b"x" * (1_200_000))  # cut by size too
    taken = streamed.create_checkpoint("big")
    with CheckpointManager.open(
        redis_url, f"sqlite:///{tmp_path}/whole.db", layout=layout
    ) as whole:
        frame = whole.create_checkpoint("big")
        assert frame.point_in_time and not taken.point_in_time
        chunks = [d for k, d in whole.store.manifest(frame.checkpoint_id) if k == "base"]
    assert len(chunks) >= 2  # by digest and by size
    assert [d for k, d in streamed.store.manifest(taken.checkpoint_id) if k == "base"] == chunks
