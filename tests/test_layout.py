"""Task ids never reach another task's keys."""

from __future__ import annotations

import pytest
import redis

from cfn_checkpoint import CheckpointManager, KeyLayout, ValidationError, validate_task_id
from cfn_checkpoint.layout import escape_glob

from conftest import task_state


@pytest.mark.parametrize(
    "bad",
    ["", "a:b", "task-1*", "*", "?", "task[1]", "a\\b", "a b", "{x}", "é", "x" * 201, "a\nb"],
)
def test_ambiguous_ids_are_refused_with_a_clear_error(bad: str) -> None:
    with pytest.raises(ValidationError) as info:
        validate_task_id(bad)
    assert "\n" not in str(info.value)
    assert "task id" in str(info.value)


def test_refused_ids_never_reach_redis(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    client.set(layout.key("agent", "task-1", "a"), b"1")
    before = task_state(client, prefix)
    for bad in ("*", "task-1*", "task-?", "task-[1]", "task-1:sub", "\\"):
        with pytest.raises(ValidationError):
            manager.create_checkpoint(bad)
        with pytest.raises(ValidationError):
            manager.recover_from_checkpoint(bad)
    assert task_state(client, prefix) == before
    assert manager.list_checkpoints() == []


def test_prefix_sharing_ids_are_isolated(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, prefix: str
) -> None:
    ids = ["task-1", "task-10", "task-1.0", "task-1-", "task-", "task-1_x"]
    for task in ids:
        for role in ("agent", "signal", "queue", "lock"):
            client.set(layout.key(role, task, "k"), task.encode())
    client.set(layout.key("agent", "task-1", "sub:deep"), b"nested")  # still task-1's key
    client.set(f"{prefix}other:task-1:k", b"not a namespace")
    before = task_state(client, prefix)

    meta = manager.create_checkpoint("task-1")
    assert meta.key_count == 5
    manager.runtime.delete_task("task-1")
    for task in ids[1:]:
        assert client.get(layout.key("agent", task, "k")) == task.encode()
    assert manager.runtime.task_ids() == set(ids[1:])
    manager.recover_from_checkpoint("task-1")
    assert task_state(client, prefix) == before


def test_escape_glob() -> None:
    assert escape_glob(b"a*b?c[d]e\\f") == b"a\\*b\\?c\\[d\\]e\\\\f"


def test_layout_keys_and_cluster_hash_tag() -> None:
    plain = KeyLayout()
    assert plain.key("agent", "t1", "coder") == b"agent:t1:coder"
    assert plain.key("signal", "t1", "go") == b"swarm:t1:go"
    tagged = KeyLayout(cluster=True)
    assert tagged.key("lock", "t1", "x") == b"lock:{t1}:x"
    assert tagged.task_of(b"queue:{t1}:q") == "t1"
    assert plain.task_of(b"queue:t1:q") == "t1"
    assert plain.task_of(b"queue:t1") is None
    assert plain.task_of(b"nope:t1:q") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"agent": "a:b"}, {"agent": "x", "signal": "x"}, {"prefix": "p*"}, {"queue": ""}],
)
def test_bad_layouts_are_refused(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        KeyLayout(**kwargs)  # type: ignore[arg-type]
