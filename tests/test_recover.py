"""Recovery: keys created later are removed, TTL policy, durable rows, other tiers."""

from __future__ import annotations

import time

import pytest
import redis

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    KeyLayout,
    TtlPolicy,
)

from conftest import task_state


def test_keys_created_after_the_checkpoint_are_removed(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    client.set(layout.key("agent", "t", "a"), b"1")
    manager.create_checkpoint("t")
    state = task_state(client, prefix)
    for role in ("agent", "signal", "queue", "lock"):
        client.set(layout.key(role, "t", "later"), b"x")
    result = manager.recover_from_checkpoint("t")
    assert result.keys_removed == 4
    assert task_state(client, prefix) == state


def test_expired_lock_is_not_brought_back_but_signal_gets_its_ttl_left(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    lock = layout.key("lock", "t", "l")
    signal = layout.key("signal", "t", "s")
    client.set(lock, b"owner", px=300)
    client.set(signal, b"go", px=300)
    manager.create_checkpoint("t")
    time.sleep(0.45)  # both TTLs have run out in Redis
    assert client.exists(lock, signal) == 0
    result = manager.recover_from_checkpoint("t")
    assert result.keys_expired == 1
    assert client.exists(lock) == 0  # a lock keeps its absolute expiry
    assert client.get(signal) == b"go"  # other keys get the TTL left at capture
    assert 0 < client.pttl(signal) <= 300


def test_live_lock_keeps_its_absolute_expiry(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    lock = layout.key("lock", "t", "l")
    client.set(lock, b"owner", px=5_000)
    manager.create_checkpoint("t")
    time.sleep(0.3)
    manager.recover_from_checkpoint("t")
    assert client.get(lock) == b"owner"
    assert client.pttl(lock) <= 4_700  # not reset to the TTL it had at capture


def test_ttl_policy_options(
    redis_url: str, db_url: str, client: redis.Redis, layout: KeyLayout
) -> None:
    config = CheckpointConfig(ttl_policy=TtlPolicy(locks="remaining", others="absolute"))
    lock = layout.key("lock", "t", "l")
    signal = layout.key("signal", "t", "s")
    with CheckpointManager.open(redis_url, db_url, layout=layout, config=config) as mgr:
        client.set(lock, b"owner", px=300)
        client.set(signal, b"go", px=300)
        mgr.create_checkpoint("t")
        time.sleep(0.45)
        mgr.recover_from_checkpoint("t")
    assert client.get(lock) == b"owner"
    assert client.exists(signal) == 0
    with pytest.raises(ValueError, match="TTL policy"):
        TtlPolicy(locks="forever")


def _rows(manager: CheckpointManager, task: str) -> dict[str, list[tuple[object, ...]]]:
    snap = manager.store.read_durable(task)
    return {name: table.rows for name, table in snap.tables.items()}


def test_durable_rows_restored_exactly_when_asked(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    d = manager.durable
    d.record_task_result("t", "coder", {"score": 1.5, "big": 12345678901234567890})
    d.record_agent_metric("t", "coder", "confidence", 0.1 + 0.2)
    d.record_audit_event("t", "started", agent_id="coder", details={"why": "\u00e9"})
    d.record_audit_event("other", "unrelated")
    d.put_skill("s1", name="search", version="1.0", metadata={"x": 1})
    client.set(layout.key("agent", "t", "a"), b"1")
    meta = manager.create_checkpoint("t")
    assert meta.row_count == 3
    rows = _rows(manager, "t")
    other = _rows(manager, "other")

    d.record_audit_event("t", "later")
    with manager.store.atomic() as db:
        db.execute("DELETE FROM task_results WHERE task_id = 't'")
        db.execute("UPDATE agent_metrics SET value = 99 WHERE task_id = 't'")

    runtime_only = manager.recover_from_checkpoint("t")
    assert not runtime_only.durable_state_restored and _rows(manager, "t") != rows

    result = manager.recover_from_checkpoint("t", restore_durable=True, restore_runtime=False)
    assert result.durable_state_restored and not result.runtime_state_restored
    assert result.rows_restored == 3
    assert _rows(manager, "t") == rows
    assert _rows(manager, "other") == other


def test_skill_metadata_is_shared_not_copied(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    for i in range(300):
        manager.durable.put_skill(f"skill-{i}", name=f"skill {i}", metadata={"doc": "x" * 200})
    client.set(layout.key("agent", "t", "a"), b"1")
    first = manager.create_checkpoint("t")
    client.set(layout.key("agent", "t", "a"), b"2")
    second = manager.create_checkpoint("t")
    # The second checkpoint stores the changed key, not the 300 skills again.
    assert second.stored_bytes < first.stored_bytes / 5


def test_empty_task_is_refused_not_checkpointed(manager: CheckpointManager) -> None:
    from cfn_checkpoint import CheckpointNotFoundError

    with pytest.raises(CheckpointNotFoundError, match="nothing to checkpoint"):
        manager.create_checkpoint("no-such-task")
    assert manager.list_checkpoints() == []


CRASHING_RECOVERY = """
import os, signal, sys
from cfn_checkpoint import CheckpointManager, KeyLayout
redis_url, db_url, prefix = sys.argv[1:4]
layout = KeyLayout(prefix=prefix, cluster=redis_url.startswith("redis+cluster:"))
mgr = CheckpointManager.open(redis_url, db_url, layout=layout)
def die_before_commit(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)  # after Redis was written, before the commit
mgr.store.finish_recovery = die_before_commit
mgr.recover_from_checkpoint("t", restore_durable=True)
"""


def test_recovery_killed_before_its_commit_is_reported_next_time(
    manager: CheckpointManager,
    client: redis.Redis,
    layout: KeyLayout,
    redis_url: str,
    db_url: str,
    prefix: str,
) -> None:
    import subprocess
    import sys

    client.set(layout.key("agent", "t", "a"), b"checkpointed")
    manager.durable.record_audit_event("t", "step1")
    checkpoint = manager.create_checkpoint("t")
    client.set(layout.key("agent", "t", "a"), b"later")
    manager.durable.record_audit_event("t", "step2")
    child = subprocess.run(
        [sys.executable, "-c", CRASHING_RECOVERY, redis_url, db_url, prefix],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -9, child.stderr
    client.delete(f"{prefix}cfn-checkpoint:lock:{{t}}")  # the dead child's lock (else: TTL)
    # Torn: Redis was written, the durable transaction never committed.
    assert client.get(layout.key("agent", "t", "a")) == b"checkpointed"
    assert len(manager.store.read_durable("t").tables["audit_trail"].rows) == 2
    assert [c for _, c, _ in manager.store.interrupted_recoveries("t")] == [
        checkpoint.checkpoint_id
    ]
    result = manager.recover_from_checkpoint("t", restore_durable=True)
    assert any("never finished" in note for note in result.errors)
    assert len(manager.store.read_durable("t").tables["audit_trail"].rows) == 1
    assert manager.store.interrupted_recoveries("t") == []
