"""diff, recovery plans, verify and the task overview."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import redis

from cfn_checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    KeyLayout,
    StoreUnavailableError,
)
from cfn_checkpoint.diff import Change

from conftest import task_state


def _seed(manager: CheckpointManager, client: redis.Redis, layout: KeyLayout) -> None:
    w = manager.writer("t")
    w.put_agent("coder", {"step": 1})
    w.set_signal("phase", "build", ttl_ms=60_000)
    w.push_queue("jobs", "a", "b")
    client.hset(layout.key("agent", "t", "h"), mapping={b"f": b"1"})
    manager.durable.record_task_result("t", "coder", {"ok": True})


def test_diff_between_checkpoints_names_every_change(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    _seed(manager, client, layout)
    a = manager.create_checkpoint("t")
    w = manager.writer("t")
    w.put_agent("coder", {"step": 2})  # value
    client.delete(layout.key("queue", "t", "jobs"))
    client.sadd(layout.key("queue", "t", "jobs"), b"a")  # type
    client.persist(layout.key("signal", "t", "phase"))  # ttl removed
    w.put_agent("tester", {"step": 0})  # added
    client.delete(layout.key("agent", "t", "h"))  # removed
    manager.durable.record_audit_event("t", "more")
    b = manager.create_checkpoint("t")

    diff = manager.diff(a.checkpoint_id, b.checkpoint_id)
    by_key = {c.key: c for c in diff.keys}
    assert by_key[layout.key("agent", "t", "coder")].detail == "value"
    assert by_key[layout.key("queue", "t", "jobs")].detail == "type"
    assert by_key[layout.key("signal", "t", "phase")].detail == "ttl removed"
    assert by_key[layout.key("agent", "t", "tester")].change is Change.ADDED
    assert by_key[layout.key("agent", "t", "h")].change is Change.REMOVED
    assert len(diff.keys) == 5
    assert [(r.table, r.change) for r in diff.rows] == [("audit_trail", Change.ADDED)]
    assert manager.diff(a.checkpoint_id, a.checkpoint_id).empty


def test_live_diff_is_empty_right_after_a_recovery(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    _seed(manager, client, layout)
    client.set(layout.key("lock", "t", "short"), b"owner", px=200)
    a = manager.create_checkpoint("t")
    time.sleep(0.3)  # the lock's TTL runs out: recovery will leave it out, and so does diff
    manager.writer("t").put_agent("coder", {"step": 9})
    manager.durable.record_agent_metric("t", "coder", "tokens", 3.0)
    live = manager.diff(a.checkpoint_id)
    assert not live.empty
    assert {c.change for c in live.keys} == {Change.CHANGED}

    manager.recover_from_checkpoint("t", a.checkpoint_id, restore_durable=True)
    assert manager.diff(a.checkpoint_id).empty


def test_recovery_plan_matches_what_recovery_then_does_and_changes_nothing(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    _seed(manager, client, layout)
    a = manager.create_checkpoint("t")
    manager.writer("t").put_agent("coder", {"step": 5})
    client.set(layout.key("signal", "t", "later"), b"x")
    manager.durable.record_audit_event("t", "later")
    before = task_state(client, prefix)
    rows_before = manager.store.read_durable("t").tables

    plan = manager.plan_recovery("t", restore_durable=True)
    assert plan.checkpoint.checkpoint_id == a.checkpoint_id
    counts = plan.changes.counts()
    assert (counts["keys_changed"], counts["keys_removed"], counts["rows_removed"]) == (1, 1, 1)
    # From live to restored: the later signal goes, the later audit row goes.
    assert [c.change for c in plan.changes.keys if b"later" in c.key] == [Change.REMOVED]
    assert [c.change for c in plan.changes.rows] == [Change.REMOVED]
    assert task_state(client, prefix) == before
    assert manager.store.read_durable("t").tables == rows_before
    assert manager.get_checkpoint(a.checkpoint_id).recovery_count == 0

    result = manager.recover_from_checkpoint("t", restore_durable=True)
    assert result.keys_removed == 1 and result.rows_restored == 1
    assert manager.plan_recovery("t", restore_durable=True).changes.empty


def test_verify_all_reports_each_corrupt_checkpoint(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    client.set(layout.key("agent", "t", "a"), b"1")
    good = manager.create_checkpoint("t")
    client.set(layout.key("agent", "t", "a"), b"2" * 1000)
    bad = manager.create_checkpoint("t")
    assert manager.verify_checkpoint(good.checkpoint_id).checkpoint_id == good.checkpoint_id
    with manager.store.atomic() as db:
        db.execute(
            "UPDATE payloads SET data = ? WHERE digest IN (SELECT digest FROM "
            "checkpoint_payloads WHERE checkpoint_id = ? AND kind = 'delta')",
            (b"\x00", bad.checkpoint_id),
        )
    results = {m.checkpoint_id: e for m, e in manager.verify_all()}
    assert results[good.checkpoint_id] is None
    assert isinstance(results[bad.checkpoint_id], CorruptCheckpointError)
    with pytest.raises(CorruptCheckpointError):
        manager.verify_checkpoint(bad.checkpoint_id)


def test_tasks_lists_checkpointed_and_live_tasks(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    client.set(layout.key("agent", "only-checkpointed", "a"), b"1")
    cp = manager.create_checkpoint("only-checkpointed")
    manager.runtime.delete_task("only-checkpointed")
    for i in range(3):
        client.set(layout.key("queue", "only-live", f"q{i}"), b"x")
    summary = {s.task_id: s for s in manager.tasks()}
    assert set(summary) == {"only-checkpointed", "only-live"}
    assert summary["only-checkpointed"].live_keys == 0
    assert summary["only-checkpointed"].newest is not None
    assert summary["only-checkpointed"].newest.checkpoint_id == cp.checkpoint_id
    assert (summary["only-live"].live_keys, summary["only-live"].checkpoints) == (3, 0)
    assert summary["only-live"].newest is None


def test_cleanup_dry_run_reports_exactly_what_cleanup_removes(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    from datetime import timedelta

    for i in range(4):
        client.set(layout.key("agent", "t", "a"), str(i).encode() * 500)
        manager.create_checkpoint("t")
    stats = manager.store.payload_stats()
    planned = manager.cleanup(older_than=timedelta(0), dry_run=True)
    assert len(planned.checkpoint_ids) == 3 and planned.bytes_freed > 0
    assert manager.store.payload_stats() == stats and len(manager.list_checkpoints()) == 4
    done = manager.cleanup(older_than=timedelta(0))
    assert done == planned


def test_plan_reports_ttls_that_the_recovery_would_move(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    lock = layout.key("lock", "t", "l")
    signal = layout.key("signal", "t", "s")
    client.set(lock, b"tok", px=600_000)
    client.set(signal, b"2", px=600_000)
    manager.create_checkpoint("t")
    client.pexpire(lock, 5_000_000)  # renewed since: recovery would cut it back
    client.pexpire(signal, 1_000)  # about to expire: recovery would give it 10 minutes
    plan = manager.plan_recovery("t")
    details = {c.key: c.detail for c in plan.changes.keys}
    # About 10 minutes left of the checkpoint's TTLs (9.99m on a slow machine).
    back = r"-> (10|9\.\d\d)m"
    assert re.fullmatch(rf"ttl 1\.39h {back}", details[lock])  # the original deadline kept
    # 1,000 ms, or a few less if the capture ran in a later millisecond than PEXPIRE.
    assert re.fullmatch(rf"ttl (1s|\d{{1,3}}ms) {back}", details[signal])
    manager.recover_from_checkpoint("t")
    assert manager.plan_recovery("t").changes.empty


def test_store_only_work_goes_on_while_redis_is_down(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, db_url: str, tmp_path: Path
) -> None:
    client.set(layout.key("agent", "t", "a"), b"1")
    meta = manager.create_checkpoint("t")
    with CheckpointManager.open(
        "redis://127.0.0.1:1/0", db_url, layout=layout, lazy_runtime=True
    ) as offline:
        assert [m.checkpoint_id for m in offline.list_checkpoints()] == [meta.checkpoint_id]
        offline.verify_checkpoint(meta.checkpoint_id)
        offline.export_checkpoint(meta.checkpoint_id, tmp_path / "cp.cfn")
        assert offline.cleanup(dry_run=True).checkpoint_ids == []
        with pytest.raises(StoreUnavailableError):
            offline.recover_from_checkpoint("t")


def test_damaged_catalog_row_is_reported_as_corrupt(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    client.set(layout.key("agent", "t", "a"), b"1")
    meta = manager.create_checkpoint("t")
    with manager.store.atomic() as db:
        db.execute(
            "UPDATE checkpoints SET metadata = '{bad' WHERE checkpoint_id = ?",
            (meta.checkpoint_id,),
        )
    with pytest.raises(CorruptCheckpointError, match="catalog row"):
        manager.list_checkpoints()
