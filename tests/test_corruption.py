"""Guarantee 4 (verified): corrupt payloads are detected and recovery falls back."""

from __future__ import annotations

import pytest
import redis

from cfn_checkpoint import CheckpointManager, CorruptCheckpointError, KeyLayout

from conftest import task_state


def _flip(manager: CheckpointManager, digest: str, offset: int = 8) -> None:
    with manager.store.atomic() as db:
        (data,) = db.execute("SELECT data FROM payloads WHERE digest = ?", (digest,)).fetchone()
        data = bytearray(data)
        data[min(offset, len(data) - 1)] ^= 0xFF
        db.execute("UPDATE payloads SET data = ? WHERE digest = ?", (bytes(data), digest))


def _unique_digests(manager: CheckpointManager, checkpoint_id: str) -> list[str]:
    """Payloads of one checkpoint that no other checkpoint shares."""
    with manager.store.reading() as db:
        rows = db.execute(
            "SELECT digest FROM checkpoint_payloads WHERE checkpoint_id = ? AND digest NOT IN "
            "(SELECT digest FROM checkpoint_payloads WHERE checkpoint_id != ?)",
            (checkpoint_id, checkpoint_id),
        ).fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("offset", [0, 8, 10_000])
def test_flipped_bytes_fall_back_to_previous_intact_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str, offset: int
) -> None:
    agent = layout.key("agent", "t", "a")
    client.set(agent, b"v1" * 5000)
    old = manager.create_checkpoint("t")
    state_old = task_state(client, prefix)
    client.set(agent, b"v2" * 5000)
    new = manager.create_checkpoint("t")

    for digest in _unique_digests(manager, new.checkpoint_id):
        _flip(manager, digest, offset)

    with pytest.raises(CorruptCheckpointError, match=new.checkpoint_id):
        manager.load_checkpoint(new.checkpoint_id)
    with pytest.raises(CorruptCheckpointError):
        manager.recover_from_checkpoint("t", new.checkpoint_id)

    manager.runtime.delete_task("t")
    result = manager.recover_from_checkpoint("t")
    assert result.success and result.checkpoint_id == old.checkpoint_id
    assert any(new.checkpoint_id in e and "corrupt" in e for e in result.errors)
    assert any("fell back" in e for e in result.errors)
    assert task_state(client, prefix) == state_old


def test_every_checkpoint_corrupt_is_an_error(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    client.set(layout.key("agent", "t", "a"), b"v1")
    only = manager.create_checkpoint("t")
    for digest in _unique_digests(manager, only.checkpoint_id):
        _flip(manager, digest)
    with pytest.raises(CorruptCheckpointError, match="every checkpoint"):
        manager.recover_from_checkpoint("t")
    assert client.get(layout.key("agent", "t", "a")) == b"v1"  # nothing was touched


def test_missing_payload_and_tampered_catalog_are_detected(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    client.set(layout.key("agent", "t", "a"), b"v1")
    meta = manager.create_checkpoint("t")
    with manager.store.atomic() as db:
        db.execute(
            "UPDATE checkpoints SET state_hash = ? WHERE checkpoint_id = ?",
            ("0" * 64, meta.checkpoint_id),
        )
    with pytest.raises(CorruptCheckpointError, match="state hash"):
        manager.load_checkpoint(meta.checkpoint_id)
    with manager.store.atomic() as db:
        db.execute("DELETE FROM payloads")
    with pytest.raises(CorruptCheckpointError, match="missing payload"):
        manager.load_checkpoint(meta.checkpoint_id)
