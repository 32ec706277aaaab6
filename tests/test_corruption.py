"""Guarantee 4 (verified): corrupt payloads are detected and recovery falls back."""

from __future__ import annotations

import random
import struct

import pytest
import redis

from cfn_checkpoint import CheckpointManager, CorruptCheckpointError, KeyLayout, codec

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


def test_a_header_claiming_a_huge_size_is_corruption_not_a_crash(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    """A damaged zstandard header can claim any content size (here 16 TiB): that is a
    corrupt payload, and recovery falls back, rather than a MemoryError."""
    agent = layout.key("agent", "t", "a")
    client.set(agent, b"v1")
    old = manager.create_checkpoint("t")
    state_old = task_state(client, prefix)
    client.set(agent, b"v2")
    new = manager.create_checkpoint("t")
    # Magic, a header with an 8-byte content size and one segment, the size, a block.
    huge = b"\x28\xb5\x2f\xfd\xe0" + struct.pack("<Q", 1 << 44) + b"\x01\x00\x00"
    for digest in _unique_digests(manager, new.checkpoint_id):
        with manager.store.atomic() as db:
            db.execute("UPDATE payloads SET data = ? WHERE digest = ?", (huge, digest))
    with pytest.raises(CorruptCheckpointError, match="cannot be decompressed"):
        manager.load_checkpoint(new.checkpoint_id)
    manager.runtime.delete_task("t")
    result = manager.recover_from_checkpoint("t")
    assert result.success and result.checkpoint_id == old.checkpoint_id
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


def _digests_of_kind(manager: CheckpointManager, checkpoint_id: str, kind: str) -> list[str]:
    return [d for k, d in manager.store.manifest(checkpoint_id) if k == kind]


def test_corrupt_shared_skills_payload_does_not_block_recovery_and_is_repaired(
    redis_url: str, db_url: str, layout: KeyLayout, prefix: str
) -> None:
    """The skills payload is shared by every checkpoint of every task."""
    with CheckpointManager.open(redis_url, db_url, layout=layout) as manager:
        client = manager.runtime.client
        manager.durable.put_skill("s1", name="search", metadata={"doc": "x" * 500})
        client.set(layout.key("agent", "t1", "a"), b"1")
        client.set(layout.key("agent", "t2", "a"), b"2")
        c1 = manager.create_checkpoint("t1")
        manager.create_checkpoint("t2")
        (skills,) = _digests_of_kind(manager, c1.checkpoint_id, "skills")
        state = task_state(client, prefix)
    with CheckpointManager.open(redis_url, db_url, layout=layout) as fresh:
        _flip(fresh, skills)
        client = fresh.runtime.client
        # Recovery never writes skills back, so it does not need them.
        for task in ("t1", "t2"):
            fresh.runtime.delete_task(task)
            assert fresh.recover_from_checkpoint(task).errors == []
        assert task_state(client, prefix) == state
        # An unchanged task does not return its damaged newest checkpoint: a new one
        # stores an intact copy of the shared payload, which repairs the old ones too.
        again = fresh.create_checkpoint("t1")
        assert again.checkpoint_id != c1.checkpoint_id and again.state_hash == c1.state_hash
        fresh.verify_checkpoint(c1.checkpoint_id)
        assert all(error is None for _, error in fresh.verify_all())


def test_changed_task_repairs_a_damaged_payload_it_shares(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    client.set(layout.key("agent", "t", "big"), b"same" * 2000)
    client.set(layout.key("agent", "t", "small"), b"1")
    first = manager.create_checkpoint("t")
    (durable,) = _digests_of_kind(manager, first.checkpoint_id, "durable")
    _flip(manager, durable)
    manager._verified.clear()  # as a new process would start: nothing verified yet
    client.set(layout.key("agent", "t", "small"), b"2")
    manager.create_checkpoint("t")
    manager.verify_checkpoint(first.checkpoint_id)  # repaired by the second create


def test_cleanup_keeps_the_intact_fallback_when_the_newest_is_damaged(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    from datetime import timedelta

    client.set(layout.key("agent", "t", "a"), b"old" * 1000)
    old = manager.create_checkpoint("t")
    state = task_state(client, prefix)
    manager.runtime.delete_task("t")
    manager.recover_from_checkpoint("t")  # leaves a recoveries row for `old`
    client.set(layout.key("agent", "t", "a"), b"new" * 1000)
    new = manager.create_checkpoint("t")
    for digest in _unique_digests(manager, new.checkpoint_id):
        _flip(manager, digest)
    manager._verified.clear()
    assert manager.cleanup_old_checkpoints(older_than=timedelta(0)) == 0
    assert {m.checkpoint_id for m in manager.list_checkpoints("t")} == {
        old.checkpoint_id,
        new.checkpoint_id,
    }
    manager.runtime.delete_task("t")
    assert manager.recover_from_checkpoint("t").checkpoint_id == old.checkpoint_id
    assert task_state(client, prefix) == state


def test_a_payload_is_checked_against_the_name_it_was_given() -> None:
    """Keyframe chunks are named by their compressed bytes, other payloads by their raw
    ones; each verifies by its own rule, and bytes that fit neither are refused, even
    a valid recompression of the right content under a name of compressed bytes."""
    words = random.Random(7).choices([b"agent", b"done", b"queue", b"step", b"42"], k=20_000)
    raw = b" ".join(words)
    chunk = codec.stored_payload("base", raw, 1)
    assert chunk.stored is not None and chunk.digest == codec.digest_of(chunk.stored)
    assert codec.decompress_verified(chunk.digest, chunk.stored) == raw
    other = codec.make_payload("durable", [["t", ["id"], [[1]]]])
    assert other.stored is None
    assert codec.decompress_verified(other.digest, codec.compress(other.raw, 3)) == other.raw
    recompressed = codec.compress(raw, 19)
    assert recompressed != chunk.stored
    with pytest.raises(CorruptCheckpointError, match="does not match its content hash"):
        codec.decompress_verified(chunk.digest, recompressed)
    with pytest.raises(CorruptCheckpointError, match="does not match its content hash"):
        codec.decompress_verified(other.digest, codec.compress(other.raw + b"x", 3))
