"""Storage formats: a store written by an earlier format still verifies and recovers.

``tests/data/format3.db`` and ``tests/data/format4.db`` were written by formats 3 and 4
(see ``format3_store.py``) with the same two checkpoints. This version writes format 5,
which differs from 4 only in how keyframe chunks are named (the SHA-256 of their
compressed bytes rather than of their raw ones); 4 differs from 3 only in how rows are
digested.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    EmbeddedRedis,
    KeyLayout,
    codec,
    image,
)
from cfn_checkpoint.errors import UnreadableFormatError
from cfn_checkpoint.model import FORMAT_VERSION, READABLE_FORMATS

from conftest import task_state, wipe
from format3_store import FIRST, PREFIX, SECOND, TASK, write

DATA = Path(__file__).parent / "data"
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


@pytest.fixture(params=[3, 4], ids=["format3", "format4"])
def old_format(request: pytest.FixtureRequest) -> int:
    """The storage format of the store :func:`store` copies."""
    return int(request.param)


@pytest.fixture()
def store(tmp_path: Path, old_format: int) -> str:
    """A copy of a store an earlier format wrote (tests may damage or add to it)."""
    copy = tmp_path / f"format{old_format}.db"
    shutil.copy(DATA / f"format{old_format}.db", copy)
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
def test_older_checkpoints_verify_and_recover_exactly(
    redis_url: str, store: str, old_format: int, client: redis.Redis, config: CheckpointConfig
) -> None:
    """Streamed (a large task's path), a keyframe's format-3 rows are digested the
    format-3 way too; a delta is never streamed. Chunks named by their raw bytes
    verify as such."""
    with CheckpointManager.open(redis_url, store, layout=LAYOUT, config=config) as manager:
        first, second = sorted(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
        assert (first.format_version, second.format_version) == (old_format, old_format)
        assert [error for _, error in manager.verify_all(TASK)] == [None, None]
        for meta, state in ((first, FIRST), (second, SECOND)):  # a keyframe, then a delta
            wipe(client, PREFIX)
            result = manager.recover_from_checkpoint(TASK, meta.checkpoint_id)
            assert result.success and result.keys_restored == len(state)
            assert task_state(client, PREFIX) == expected(state)


def test_the_next_checkpoint_after_an_older_format_is_a_new_keyframe(
    redis_url: str, store: str, client: redis.Redis
) -> None:
    with CheckpointManager.open(redis_url, store, layout=LAYOUT) as manager:
        first, newest = sorted(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
        write(client, SECOND)  # the state of the newest (older format) checkpoint
        taken = manager.create_checkpoint(TASK)
        # The same state, but an older checkpoint is neither reused nor a delta's base:
        # its row digests or chunk names are not this format's.
        assert taken.checkpoint_id != newest.checkpoint_id
        assert taken.format_version == FORMAT_VERSION
        assert "delta" not in _kinds(manager, taken.checkpoint_id)
        assert manager.create_checkpoint(TASK).checkpoint_id == taken.checkpoint_id
        wipe(client, PREFIX)
        manager.recover_from_checkpoint(TASK)
        assert task_state(client, PREFIX) == expected(SECOND)


def test_rows_stay_the_same_bytes_but_chunks_are_named_anew(
    redis_url: str, store: str, old_format: int, client: redis.Redis
) -> None:
    """Formats 3 to 5 pack rows alike: the raw chunks are equal, but a format-5 chunk
    is named by its compressed bytes, so it is stored anew once."""
    with CheckpointManager.open(redis_url, store, layout=LAYOUT) as manager:
        first = min(manager.list_checkpoints(TASK), key=lambda m: m.created_at)
        write(client, FIRST)
        taken = manager.create_checkpoint(TASK)
        assert taken.format_version == FORMAT_VERSION == 5
        new, old = _chunks(manager, taken.checkpoint_id), _chunks(manager, first.checkpoint_id)
        assert len(new) == len(old) == 1 and new != old
        stored = manager.store.load_payloads(new + old)
        assert codec.decompress_verified(new[0], stored[new[0]]) == codec.decompress_verified(
            old[0], stored[old[0]]
        )
        assert codec.digest_of(stored[new[0]]) == new[0]
        assert codec.digest_of(codec.decompress_verified(old[0], stored[old[0]])) == old[0]
        # Format 4 digests rows as format 5 does; format 3 does not.
        assert (taken.runtime_state_hash == first.runtime_state_hash) is (old_format == 4)


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
        "formats 3, 4 and 5"
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
