"""Guarantee 7 (retention is safe) and guarantee 10 (recoverable again)."""

from __future__ import annotations

from datetime import timedelta

import redis

from cfn_checkpoint import CheckpointManager, KeyLayout

from conftest import task_state


def _all_payload_digests(manager: CheckpointManager) -> set[str]:
    with manager.store.reading() as db:
        return {r[0] for r in db.execute("SELECT digest FROM payloads")}


def _referenced(manager: CheckpointManager) -> set[str]:
    with manager.store.reading() as db:
        return {r[0] for r in db.execute("SELECT digest FROM checkpoint_payloads")}


def test_cleanup_removes_old_checkpoints_and_unreferenced_bytes(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    key = layout.key("agent", "t", "a")
    for i in range(5):
        client.set(key, f"state-{i}".encode() * 1000)
        client.set(layout.key("agent", "u", "a"), f"other-{i}".encode())
        manager.create_checkpoint("t")
        manager.create_checkpoint("u")
    newest_t = manager.list_checkpoints("t")[0]
    newest_u = manager.list_checkpoints("u")[0]
    state = task_state(client, prefix)

    assert manager.cleanup_old_checkpoints() == 0  # all younger than 7 days
    removed = manager.cleanup_old_checkpoints(older_than=timedelta(0))

    assert removed == 8
    assert [m.checkpoint_id for m in manager.list_checkpoints()] == [
        newest_u.checkpoint_id,
        newest_t.checkpoint_id,
    ]
    # Every stored payload is referenced, and every reference is stored.
    assert _all_payload_digests(manager) == _referenced(manager)
    with manager.store.reading() as db:
        orphans = db.execute(
            "SELECT COUNT(*) FROM checkpoint_payloads WHERE checkpoint_id NOT IN "
            "(SELECT checkpoint_id FROM checkpoints)"
        ).fetchone()[0]
    assert orphans == 0
    manager.runtime.delete_task("t")
    manager.recover_from_checkpoint("t")
    assert task_state(client, prefix) == state


def test_keep_last_and_failed_rows(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    for i in range(4):
        client.set(layout.key("agent", "t", "a"), str(i).encode())
        manager.create_checkpoint("t")
    assert manager.cleanup_old_checkpoints(older_than=timedelta(0), keep_last=2) == 2
    assert len(manager.list_checkpoints("t")) == 2


def test_recovering_twice_from_the_same_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    client.set(layout.key("agent", "t", "a"), b"1")
    client.rpush(layout.key("queue", "t", "q"), b'{"a":1}')
    meta = manager.create_checkpoint("t")
    state = task_state(client, prefix)
    for _ in range(2):
        client.set(layout.key("agent", "t", "a"), b"changed")
        result = manager.recover_from_checkpoint("t", meta.checkpoint_id)
        assert result.success
        assert task_state(client, prefix) == state
    again = manager.get_checkpoint(meta.checkpoint_id)
    assert again.status == "recovered" and again.recovery_count == 2
    # A recovered checkpoint is still the one recovery picks by default.
    client.delete(layout.key("agent", "t", "a"))
    assert manager.recover_from_checkpoint("t").checkpoint_id == meta.checkpoint_id
    assert task_state(client, prefix) == state


def test_a_state_that_comes_back_after_its_payload_was_cleaned_up(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    """A payload the manager wrote earlier and a cleanup (here, or another worker's)
    removed since is written again when the state comes back, not reported as gone."""
    client.set(layout.key("agent", "t", "a"), b"1")
    manager.durable.record_task_result("t", "a", {"r": 1})
    first = manager.create_checkpoint("t")
    extra = manager.durable.record_task_result("t", "a", {"r": 2})
    manager.create_checkpoint("t")
    assert manager.cleanup_old_checkpoints(older_than=timedelta(0)) == 1
    with manager.store.atomic() as db:  # the durable rows are as at the first checkpoint
        db.execute("DELETE FROM task_results WHERE id = ?", (extra,))

    again = manager.create_checkpoint("t")

    assert again.state_hash == first.state_hash
    manager.verify_checkpoint(again.checkpoint_id)  # raises if a payload is missing
    assert _all_payload_digests(manager) == _referenced(manager)
