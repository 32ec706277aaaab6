"""Storage formats: a store written by an earlier format still verifies and recovers.

``tests/data/format3.db`` was written by format 3 (see ``format3_store.py``); this
version writes format 4, which differs only in how rows are digested.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cfn_checkpoint import CheckpointConfig, CheckpointManager, EmbeddedRedis, KeyLayout, image
from cfn_checkpoint.errors import UnreadableFormatError
from cfn_checkpoint.model import FORMAT_VERSION, READABLE_FORMATS

from conftest import task_state, wipe
from format3_store import FIRST, PREFIX, SECOND, TASK, write

FIXTURE = Path(__file__).parent / "data" / "format3.db"
LAYOUT = KeyLayout(prefix=PREFIX)
#: Small enough limits that the fixture's task (27 keys) takes the large-task paths.
STREAMED = CheckpointConfig(stream_min_keys=5, atomic_max_keys=4, batch_keys=3)


def expected(state: dict[tuple[str, str], tuple[str, Any, int | None]]) -> dict[bytes, Any]:
    """``state`` as :func:`conftest.task_state` reads it back."""
    out: dict[bytes, Any] = {}
    for (role, name), (kind, value, ttl) in state.items():
        if kind == "hash":
            value = sorted(value.items())
        elif kind == "set":
            value = sorted(value)
        elif kind == "zset":
            value = sorted(value.items(), key=lambda item: item[1])
        out[LAYOUT.key(role, TASK, name)] = (kind, value, ttl is not None)
    return out


@pytest.fixture()
def store(tmp_path: Path) -> str:
    """A copy of the format-3 store (tests may damage or add to it)."""
    copy = tmp_path / "format3.db"
    shutil.copy(FIXTURE, copy)
    return f"sqlite:///{copy}"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis server of this module's own: the stored checkpoints fix the key names, so
    tests in other workers must not share them."""
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture()
def client(redis_url: str) -> Iterator[redis.Redis]:
    """A client to this module's server, with the fixture task's keys removed before and
    after."""
    client = redis.Redis.from_url(redis_url)
    wipe(client, PREFIX)
    yield client
    wipe(client, PREFIX)
    client.close()


@pytest.mark.parametrize("config", [CheckpointConfig(), STREAMED], ids=["whole", "streamed"])
def test_format3_checkpoints_verify_and_recover_exactly(
    redis_url: str, store: str, client: redis.Redis, config: CheckpointConfig
) -> None:
    """Streamed (a large task's path), a keyframe's format-3 rows are digested the
    format-3 way too; a delta is never streamed."""
    with CheckpointManager.open(redis_url, store, layout=LAYOUT, config=config) as manager:
        first, second = sorted(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
        assert (first.format_version, second.format_version) == (3, 3)
        assert [error for _, error in manager.verify_all(TASK)] == [None, None]
        for meta, state in ((first, FIRST), (second, SECOND)):  # a keyframe, then a delta
            wipe(client, PREFIX)
            result = manager.recover_from_checkpoint(TASK, meta.checkpoint_id)
            assert result.success and result.keys_restored == len(state)
            assert task_state(client, PREFIX) == expected(state)


def test_the_next_checkpoint_after_format3_is_a_format4_keyframe(
    redis_url: str, store: str, client: redis.Redis
) -> None:
    with CheckpointManager.open(redis_url, store, layout=LAYOUT) as manager:
        first, newest = sorted(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
        write(client, SECOND)  # the state of the newest (format 3) checkpoint
        taken = manager.create_checkpoint(TASK)
        # The same state, but a format-3 checkpoint is neither reused nor a delta's base:
        # its row digests are not this format's.
        assert taken.checkpoint_id != newest.checkpoint_id
        assert taken.format_version == FORMAT_VERSION
        assert "delta" not in _kinds(manager, taken.checkpoint_id)
        assert manager.create_checkpoint(TASK).checkpoint_id == taken.checkpoint_id
        wipe(client, PREFIX)
        manager.recover_from_checkpoint(TASK)
        assert task_state(client, PREFIX) == expected(SECOND)


def test_format4_rows_are_format3_rows_so_chunks_are_shared(
    redis_url: str, store: str, client: redis.Redis
) -> None:
    with CheckpointManager.open(redis_url, store, layout=LAYOUT) as manager:
        first = min(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
        write(client, FIRST)
        taken = manager.create_checkpoint(TASK)
        assert taken.format_version == FORMAT_VERSION
        assert _chunks(manager, taken.checkpoint_id) == _chunks(manager, first.checkpoint_id)
        assert taken.runtime_state_hash != first.runtime_state_hash  # digested anew


def _kinds(manager: CheckpointManager, checkpoint_id: str) -> list[str]:
    return [kind for kind, _ in manager.store.manifest(checkpoint_id)]


def _chunks(manager: CheckpointManager, checkpoint_id: str) -> list[str]:
    return [d for kind, d in manager.store.manifest(checkpoint_id) if kind == "base"]


def test_a_format_this_version_cannot_read_is_named_and_not_fallen_back_from(
    redis_url: str, store: str, client: redis.Redis
) -> None:
    """A checkpoint a newer version wrote is not damage: a plain recover stops there
    rather than roll the task back to an older one, and nothing is written."""
    path = store.removeprefix("sqlite:///")
    with CheckpointManager.open(redis_url, store, layout=LAYOUT) as manager:
        first, newest = sorted(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
    with sqlite3.connect(path) as db:
        db.execute(
            "UPDATE checkpoints SET format_version = 9 WHERE checkpoint_id = ?",
            (newest.checkpoint_id,),
        )
    db.close()
    unreadable = (
        f"checkpoint {newest.checkpoint_id} uses storage format 9; this version reads "
        "formats 3 and 4"
    )
    for config in (CheckpointConfig(), STREAMED):
        with CheckpointManager.open(redis_url, store, layout=LAYOUT, config=config) as manager:
            with pytest.raises(
                UnreadableFormatError,
                match=f"^{unreadable}: not recovering an older checkpoint in its place",
            ):
                manager.recover_from_checkpoint(TASK)
            with pytest.raises(UnreadableFormatError, match=f"^{unreadable}$"):
                manager.recover_from_checkpoint(TASK, newest.checkpoint_id)
    assert task_state(client, PREFIX) == {}  # nothing written
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT COUNT(*) FROM recoveries").fetchone() == (0,)
    db.close()
    with CheckpointManager.open(redis_url, store, layout=LAYOUT) as manager:
        with pytest.raises(UnreadableFormatError, match=f"^{unreadable}$"):
            manager.verify_checkpoint(newest.checkpoint_id)
        verified = {m.checkpoint_id: error for m, error in manager.verify_all(TASK)}
        assert verified[first.checkpoint_id] is None
        assert str(verified[newest.checkpoint_id]) == unreadable
        # Named, the older checkpoint still recovers.
        manager.recover_from_checkpoint(TASK, first.checkpoint_id)
        assert task_state(client, PREFIX) == expected(FIRST)


def test_every_readable_format_has_its_row_digest() -> None:
    assert sorted(image._DIGESTERS) == sorted(READABLE_FORMATS)
    with pytest.raises(UnreadableFormatError, match="storage format 2 is not one"):
        image.row_digester(2)
