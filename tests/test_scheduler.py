"""Periodic checkpoints: one per interval with a change, none without."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import redis

from cfn_checkpoint import CheckpointManager, KeyLayout, ValidationError
from cfn_checkpoint.scheduler import PeriodicCheckpointer, PeriodicOutcome


def test_rounds_store_only_changes(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    outcomes: list[PeriodicOutcome] = []
    w = manager.writer("t")
    w.put_agent("a", {"n": 0})
    manager.writer("u").put_agent("a", {"n": 0})
    scheduler = PeriodicCheckpointer(
        manager, interval=timedelta(seconds=1), on_outcome=outcomes.append
    )
    scheduler.run_once()  # both tasks: new
    scheduler.run_once()  # nothing changed
    w.put_agent("a", {"n": 1})
    scheduler.run_once()  # t changed
    created = [(o.task_id, o.created) for o in outcomes]
    assert created == [
        ("t", True),
        ("u", True),
        ("t", False),
        ("u", False),
        ("t", True),
        ("u", False),
    ]
    assert all(o.checkpoint and o.checkpoint.trigger == "periodic" for o in outcomes)
    assert len(manager.list_checkpoints("t")) == 2 and len(manager.list_checkpoints("u")) == 1


def test_background_thread_and_stop(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    seen = threading.Event()
    outcomes: list[PeriodicOutcome] = []

    def record(o: PeriodicOutcome) -> None:
        outcomes.append(o)
        seen.set()

    manager.writer("t").put_agent("a", {"n": 0})
    scheduler = manager.enable_periodic_checkpoints(
        interval=timedelta(milliseconds=50), tasks=["t"], on_outcome=record
    )
    assert seen.wait(5)
    scheduler.stop(timeout=5)
    count = len(outcomes)
    assert count >= 1 and outcomes[0].created
    assert [m.status for m in manager.list_checkpoints("t")] == ["completed"]


def test_invalid_arguments(manager: CheckpointManager) -> None:
    with pytest.raises(ValidationError, match="interval"):
        PeriodicCheckpointer(manager, interval=timedelta(0))
    with pytest.raises(ValidationError, match="task id"):
        PeriodicCheckpointer(manager, tasks=["a:b"])


def test_periodic_checkpoint_does_not_record_a_lost_runtime(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout
) -> None:
    manager.writer("t").put_agent("a", {"n": 0})
    manager.durable.record_audit_event("t", "started")
    good = manager.create_checkpoint("t", "periodic")
    manager.runtime.delete_task("t")  # Redis lost the task; its durable rows remain
    outcomes = PeriodicCheckpointer(manager, tasks=["t"]).run_once()
    assert outcomes[0].error is not None and "lost its runtime keys" in str(outcomes[0].error)
    assert manager.list_checkpoints("t")[0].checkpoint_id == good.checkpoint_id
    # A manual checkpoint is an explicit decision and is taken.
    assert manager.create_checkpoint("t", "manual").key_count == 0
