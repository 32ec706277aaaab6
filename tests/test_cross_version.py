"""Guarantee 9 (portable): a checkpoint taken on Redis 7 restores on 6.2, and back."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfn_checkpoint import CheckpointManager, KeyLayout, RestoreError

from conftest import server_version, task_state, wipe
from strategies import kinds, write_state

CORE = ("string", "list", "hash", "set", "zset")

core_states = st.dictionaries(
    st.tuples(
        st.sampled_from(("agent", "signal", "queue", "lock")), st.binary(min_size=1, max_size=8)
    ),
    st.sampled_from(CORE).flatmap(
        lambda kind: st.tuples(st.just(kind), kinds[kind], st.one_of(st.none(), st.just(600_000)))
    ),
    max_size=30,
)


@pytest.mark.parametrize("direction", ["7 to 6.2", "6.2 to 7"])
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(state=core_states)
def test_checkpoint_restores_on_the_other_version(
    redis7_url: str,
    redis62_url: str,
    tmp_path: Path,
    prefix: str,
    direction: str,
    state: dict[Any, Any],
) -> None:
    source_url, target_url = (
        (redis7_url, redis62_url) if direction == "7 to 6.2" else (redis62_url, redis7_url)
    )
    assert server_version(source_url) != server_version(target_url)
    layout = KeyLayout(prefix=prefix)
    db = f"sqlite:///{tmp_path / secrets.token_hex(4)}.db"  # a fresh store per example
    with CheckpointManager.open(source_url, db, layout=layout) as source:
        wipe(source.runtime.client, prefix)
        state = {**state, ("agent", b"anchor"): ("string", b"", None)}  # never an empty task
        write_state(source.runtime.client, layout, "task-x", state)
        expected = task_state(source.runtime.client, prefix)
        meta = source.create_checkpoint("task-x")
        wipe(source.runtime.client, prefix)
    with CheckpointManager.open(target_url, db, layout=layout) as target:
        wipe(target.runtime.client, prefix)
        target.runtime.client.set(layout.key("agent", "task-x", "stale"), b"x")
        target.recover_from_checkpoint("task-x", meta.checkpoint_id)
        assert task_state(target.runtime.client, prefix) == expected
        wipe(target.runtime.client, prefix)


def test_stream_from_newer_redis_fails_cleanly_on_older(
    redis7_url: str, redis62_url: str, tmp_path: Path, prefix: str
) -> None:
    """Streams travel as DUMP payloads: 7 -> 6.2 is refused before anything is written."""
    layout = KeyLayout(prefix=prefix)
    db = f"sqlite:///{tmp_path / 'cross.db'}"
    with CheckpointManager.open(redis7_url, db, layout=layout) as source:
        source.runtime.client.xadd(layout.key("signal", "t", "events"), {b"k": b"v"})
        source.runtime.client.set(layout.key("agent", "t", "a"), b"1")
        meta = source.create_checkpoint("t")
        wipe(source.runtime.client, prefix)
    with CheckpointManager.open(redis62_url, db, layout=layout) as target:
        client = target.runtime.client
        client.set(layout.key("agent", "t", "a"), b"current")
        before = task_state(client, prefix)
        with pytest.raises(RestoreError, match="stream"):
            target.recover_from_checkpoint("t", meta.checkpoint_id)
        assert task_state(client, prefix) == before
        wipe(client, prefix)
