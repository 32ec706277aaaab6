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
        db.execute("UPDATE payloads SET data = X'00' WHERE digest = ?", (digest,))
    current = task_state(client, prefix)
    with pytest.raises(CorruptCheckpointError):
        streamed.recover_from_checkpoint("big", bad.checkpoint_id)
    assert task_state(client, prefix) == current  # nothing was written
    result = streamed.recover_from_checkpoint("big")
    assert result.checkpoint_id == good.checkpoint_id and result.errors
