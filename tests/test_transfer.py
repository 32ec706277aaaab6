"""Export and import: one file restores on another store and another Redis version."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from cfn_checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    KeyLayout,
    ValidationError,
)
from cfn_checkpoint.transfer import MAGIC

from conftest import task_state


def _seed(manager: CheckpointManager, client: redis.Redis, layout: KeyLayout) -> None:
    w = manager.writer("t")
    w.put_agent("coder", {"step": 1, "blob": "x" * 5000})
    w.set_signal("phase", "build", ttl_ms=600_000)
    w.push_queue("jobs", b"\xff\x00", "")
    client.zadd(layout.key("signal", "t", "z"), {b"m": 1.25})
    manager.durable.record_task_result("t", "coder", {"ok": True})
    manager.durable.put_skill("s", name="search")


def test_export_import_into_a_fresh_store_on_another_redis_version(
    redis7_url: str, redis62_url: str, tmp_path: Path, prefix: str, new_db_url: Callable[[], str]
) -> None:
    layout = KeyLayout(prefix=prefix)
    source_db, target_db = new_db_url(), new_db_url()
    export = tmp_path / "cp.cfn"
    with CheckpointManager.open(redis7_url, source_db, layout=layout) as source:
        client = source.runtime.client
        _seed(source, client, layout)
        expected = task_state(client, prefix)
        rows = source.store.read_durable("t").tables
        meta = source.create_checkpoint("t", "manual", {"why": "move"})
        size = source.export_checkpoint(meta.checkpoint_id, export)
        assert size == export.stat().st_size
        source.runtime.delete_task("t")
    with CheckpointManager.open(redis62_url, target_db, layout=layout) as target:
        imported = target.import_checkpoint(export)
        assert imported.checkpoint_id == meta.checkpoint_id
        assert imported.state_hash == meta.state_hash and imported.metadata == {"why": "move"}
        result = target.recover_from_checkpoint("t", restore_durable=True)
        assert result.checkpoint_id == meta.checkpoint_id
        assert task_state(target.runtime.client, prefix) == expected
        assert target.store.read_durable("t").tables == rows
        target.runtime.delete_task("t")
        with pytest.raises(ValidationError, match="already exists"):
            target.import_checkpoint(export)


@pytest.mark.parametrize("damage", ["truncate", "flip", "append", "empty"])
def test_damaged_export_files_are_refused_and_nothing_is_stored(
    manager: CheckpointManager,
    client: redis.Redis,
    layout: KeyLayout,
    tmp_path: Path,
    redis_url: str,
    new_db_url: Callable[[], str],
    damage: str,
) -> None:
    _seed(manager, client, layout)
    meta = manager.create_checkpoint("t")
    path = tmp_path / "cp.cfn"
    manager.export_checkpoint(meta.checkpoint_id, path)
    blob = path.read_bytes()
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        middle = len(blob) // 2
        blob = blob[:middle] + bytes([blob[middle] ^ 1]) + blob[middle + 1 :]
    elif damage == "append":
        blob += b"x"
    else:
        blob = MAGIC
    path.write_bytes(blob)
    with CheckpointManager.open(redis_url, new_db_url(), layout=layout) as fresh:
        with pytest.raises(CorruptCheckpointError, match="truncated or altered"):
            fresh.import_checkpoint(path)
        assert fresh.list_checkpoints() == []
        assert fresh.store.payload_stats() == (0, 0)


def test_not_an_export_file(manager: CheckpointManager, tmp_path: Path) -> None:
    junk = tmp_path / "junk.cfn"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(ValidationError, match="not a cfn-checkpoint export file"):
        manager.import_checkpoint(junk)
    with pytest.raises(ValidationError, match="cannot read export file"):
        manager.import_checkpoint(tmp_path / "missing.cfn")


def test_export_to_an_unwritable_place_leaves_nothing(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, tmp_path: Path
) -> None:
    _seed(manager, client, layout)
    meta = manager.create_checkpoint("t")
    with pytest.raises(ValidationError, match="cannot write export file"):
        manager.export_checkpoint(meta.checkpoint_id, tmp_path / "no-such-dir" / "cp.cfn")
    assert not any("partial" in p.name for p in tmp_path.rglob("*"))


def test_tampering_that_rewrites_the_trailer_is_still_caught(
    manager: CheckpointManager, client: redis.Redis, layout: KeyLayout, tmp_path: Path
) -> None:
    """The trailer only guards against accidents; every payload is checked on its own."""
    import hashlib

    _seed(manager, client, layout)
    meta = manager.create_checkpoint("t")
    path = tmp_path / "cp.cfn"
    manager.export_checkpoint(meta.checkpoint_id, path)
    body = bytearray(path.read_bytes()[:-32])
    body[-10] ^= 0x01  # inside the last payload's compressed bytes
    path.write_bytes(bytes(body) + hashlib.sha256(bytes(body)).digest())
    with pytest.raises(CorruptCheckpointError, match=meta.checkpoint_id):
        manager.import_checkpoint(path)


def _forge(path: Path, **changes: object) -> None:
    """Rewrite header fields of an export file and recompute its trailer (a deliberate forgery)."""
    import hashlib

    import msgpack

    blob = path.read_bytes()
    body = blob[len(MAGIC) : -32]
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(body)
    header = next(unpacker)
    offset = unpacker.tell()
    header["checkpoint"].update(changes)
    new_body = MAGIC + msgpack.packb(header, use_bin_type=True) + body[offset:]
    path.write_bytes(new_body + hashlib.sha256(new_body).digest())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"checkpoint_id": "cp_evil\x1b[31m\nINJECTED"}, "checkpoint id"),
        ({"checkpoint_id": "../../etc/x"}, "checkpoint id"),
        ({"task_id": "victim"}, "not a key of task victim"),
    ],
)
def test_forged_export_headers_are_refused(
    manager: CheckpointManager,
    client: redis.Redis,
    layout: KeyLayout,
    tmp_path: Path,
    changes: dict[str, object],
    message: str,
) -> None:
    _seed(manager, client, layout)
    meta = manager.create_checkpoint("t")
    path = tmp_path / "cp.cfn"
    manager.export_checkpoint(meta.checkpoint_id, path)
    _forge(path, **changes)
    with pytest.raises(ValidationError, match=message):
        manager.import_checkpoint(path)
    assert [m.checkpoint_id for m in manager.list_checkpoints()] == [meta.checkpoint_id]


def test_an_import_under_the_other_key_layout_says_which_to_use(
    redis_url: str, tmp_path: Path, prefix: str, new_db_url: Callable[[], str]
) -> None:
    """A checkpoint taken under the cluster layout, imported where the reference layout
    is in use (a CLI without --key-layout and no Redis to tell), is refused with a hint."""
    export = tmp_path / "cp.cfn"
    cluster = KeyLayout(prefix=prefix, cluster=True)
    with CheckpointManager.open(redis_url, new_db_url(), layout=cluster) as source:
        source.writer("t").put_agent("coder", {"step": 1})
        source.export_checkpoint(source.create_checkpoint("t").checkpoint_id, export)
    reference = KeyLayout(prefix=prefix)
    with CheckpointManager.open(
        redis_url, new_db_url(), layout=reference, lazy_runtime=True
    ) as target:
        with pytest.raises(ValidationError, match="use --key-layout cluster"):
            target.import_checkpoint(export)
        assert target.list_checkpoints() == []
    with CheckpointManager.open(redis_url, new_db_url(), layout=cluster, lazy_runtime=True) as ok:
        assert ok.import_checkpoint(export).task_id == "t"
