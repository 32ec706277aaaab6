"""Checkpoints of tasks too large to hold in memory at once (``stream_min_keys`` and up).

Create reads the task a batch at a time (not point in time: the checkpoint says so)
and writes each 1 MiB chunk of rows as soon as it is full, all in one durable
transaction, keeping only the running runtime hash and the TTLs. Such a checkpoint
is always a keyframe. Recovery first checks every payload and the runtime hash in
one pass, then removes the task's keys and writes the rows back chunk by chunk.
Memory stays bounded by a batch and a chunk, plus the task's key names and TTLs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import msgpack

from .codec import (
    Payload,
    decompress_verified,
    encode_tables,
    make_payload,
    state_hashes,
    stored_payload,
)
from .contents import check_format
from .durable.schema import SKILL_TABLE
from .durable.sql import utcnow
from .errors import CorruptCheckpointError, RestoreError
from .image import CHUNK_MAX_BYTES, ends_chunk, entry_of, row_digester
from .model import CheckpointMetadata, CheckpointStatus, RuntimeEntry

if TYPE_CHECKING:
    from .manager import CheckpointManager


class _Same(Exception):
    """Rolls the transaction back: the task is unchanged."""


def create_streamed(
    manager: CheckpointManager,
    meta: CheckpointMetadata,
    keys: Sequence[bytes],
    newest: CheckpointMetadata | None,
) -> CheckpointMetadata:
    """Checkpoint a large task; ``meta`` carries id, task, trigger, times and metadata."""
    cfg = manager.config
    store = manager.store
    durable = store.read_durable(meta.task_id)
    durable_payload = encode_tables("durable", durable.tables)
    skills_payload = encode_tables("skills", {SKILL_TABLE: durable.skills})
    runtime = hashlib.sha256()
    expiring: list[list[Any]] = []
    manifest: list[tuple[str, str]] = []
    chunk: list[bytes] = []
    count = row_bytes = stored = 0
    captured_at = 0
    level = cfg.compression_level

    def put(db: Any, payload: Payload) -> None:
        nonlocal stored
        data = payload.to_store(level)
        added = store.put_payload(db, payload.digest, len(payload.raw), data)
        if not added and payload.digest not in manager._verified:
            store.repair_payload(db, payload.digest, data)  # a damaged stored copy is replaced
        stored += added
        manifest.append((payload.kind, payload.digest))

    def flush(db: Any) -> None:
        nonlocal chunk
        put(db, stored_payload("base", b"".join(chunk), level))
        chunk = []

    # Checked before writing: the writes below repair damaged payloads they share, and a
    # check made after them would see the repair that a rollback then undoes.
    newest_intact = newest is not None and _intact(manager, newest)
    try:
        with store.atomic() as db:
            size = 0
            for clock, packed in manager.runtime.read_batches(keys, cfg.batch_keys):
                captured_at = clock  # the first batch's, for all
                for key, digest, expiry, row in zip(*packed, strict=True):
                    runtime.update(digest)
                    count += 1
                    row_bytes += len(row)
                    if expiry >= 0:
                        expiring.append([key, expiry])
                    chunk.append(row)
                    size += len(row)
                    if ends_chunk(digest) or size >= CHUNK_MAX_BYTES:
                        flush(db)
                        size = 0
            if chunk:
                flush(db)
            runtime_hash = runtime.hexdigest()
            state_hash, durable_hash = state_hashes(
                runtime_hash, durable_payload.digest, skills_payload.digest
            )
            if newest_intact and newest is not None and newest.state_hash == state_hash:
                raise _Same
            ttl = make_payload("ttl", [captured_at, expiring])
            for p in (ttl, durable_payload, skills_payload):
                put(db, p)
            done = CheckpointMetadata(
                checkpoint_id=meta.checkpoint_id,
                task_id=meta.task_id,
                trigger=meta.trigger,
                status=CheckpointStatus.COMPLETED,
                state_hash=state_hash,
                runtime_state_hash=runtime_hash,
                durable_state_hash=durable_hash,
                created_at=meta.created_at,
                completed_at=utcnow(),
                metadata=meta.metadata,
                key_count=count,
                row_count=durable.row_count,
                raw_bytes=row_bytes + len(durable_payload.raw) + len(skills_payload.raw),
                stored_bytes=stored,
                point_in_time=False,
                redis_version=manager.runtime.version(),
            )
            store.put_checkpoint(db, done, manifest)
    except _Same:
        assert newest is not None
        return newest
    manager._trust(d for _, d in manifest)
    return done


def _intact(manager: CheckpointManager, meta: CheckpointMetadata) -> bool:
    """Whether every payload of a checkpoint passes its hash (checked one at a time)."""
    for _, digest in manager.store.manifest(meta.checkpoint_id):
        if digest in manager._verified:
            continue
        try:
            _load(manager, digest, f"checkpoint {meta.checkpoint_id}")
        except CorruptCheckpointError:
            return False
        manager._trust([digest])
    return True


def streamable(manifest: Sequence[tuple[str, str]]) -> bool:
    """Whether a checkpoint can be recovered chunk by chunk (a keyframe)."""
    return not any(kind in ("delta", "basettl") for kind, _ in manifest)


def _rows(digest: str, raw: bytes) -> Iterator[bytes]:
    """The bytes of each row of a base chunk, without decoding them."""
    unpacker = msgpack.Unpacker(raw=True)
    unpacker.feed(raw)
    start = 0
    try:
        while True:
            try:
                unpacker.skip()
            except msgpack.OutOfData:
                return
            end = unpacker.tell()
            yield raw[start:end]
            start = end
    except CorruptCheckpointError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptCheckpointError(f"payload {digest[:12]} cannot be decoded: {exc}") from exc


def check_streamed(
    manager: CheckpointManager, meta: CheckpointMetadata
) -> tuple[list[tuple[str, str]], list[RuntimeEntry]]:
    """Verify a large keyframe checkpoint in one pass, before anything is written.

    Returns its manifest and its DUMP entries (streams and module types), which the
    target server must be able to read. A key outside the task under this layout is
    refused here too.
    """
    manifest = manager.store.manifest(meta.checkpoint_id)
    name = f"checkpoint {meta.checkpoint_id}"
    prefixes = manager.layout.task_prefixes(meta.task_id)
    check_format(meta)
    version = meta.format_version
    digester = row_digester(version)
    runtime = hashlib.sha256()
    dumps: list[RuntimeEntry] = []
    count = 0
    for kind, digest in manifest:
        if kind != "base":
            continue
        raw = _load(manager, digest, name)
        for row in _rows(digest, raw):
            runtime.update(digester(row))
            count += 1
            obj = msgpack.unpackb(row, raw=True)
            if not isinstance(obj, list) or not obj or not isinstance(obj[0], bytes):
                raise CorruptCheckpointError(f"{name}: payload {digest[:12]} has a bad row")
            if not obj[0].startswith(prefixes):
                raise RestoreError(
                    f"checkpoint key {obj[0]!r} does not belong to task {meta.task_id}"
                )
            if obj[1] == b"dump":
                # Only the payload is checked (its TTL comes from the ttl payload when
                # the row is written): any TTL stands in for one the row says it has.
                dumps.append(entry_of(obj, 0 if obj[3] else None))
    durable = [d for k, d in manifest if k == "durable"]
    skills = [d for k, d in manifest if k == "skills"]
    if len(durable) != 1 or len(skills) != 1:
        raise CorruptCheckpointError(f"{name} has a malformed manifest")
    if runtime.hexdigest() != meta.runtime_state_hash:
        raise CorruptCheckpointError(f"{name}: its runtime keys do not match their hash")
    if state_hashes(runtime.hexdigest(), durable[0], skills[0], version)[0] != meta.state_hash:
        raise CorruptCheckpointError(f"{name} does not match its state hash")
    if count != meta.key_count:
        raise CorruptCheckpointError(
            f"{name} holds {count} keys, its catalog row says {meta.key_count}"
        )
    return manifest, dumps


def _load(manager: CheckpointManager, digest: str, name: str) -> bytes:
    stored = manager.store.load_payloads([digest])
    if digest not in stored:
        raise CorruptCheckpointError(f"{name} is missing payload {digest[:12]}")
    try:
        return decompress_verified(digest, stored[digest])
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{name}: {exc}") from exc


def restore_streamed(
    manager: CheckpointManager,
    meta: CheckpointMetadata,
    manifest: Sequence[tuple[str, str]],
    dumps: Sequence[RuntimeEntry],
) -> tuple[int, int, int]:
    """Write a verified large checkpoint back; returns (written, removed, expired)."""
    name = f"checkpoint {meta.checkpoint_id}"
    runtime = manager.runtime
    runtime.check_dumps(meta.task_id, dumps)  # refused here, before the task is touched
    (ttl_digest,) = [d for k, d in manifest if k == "ttl"]
    captured_at, pairs = msgpack.unpackb(_load(manager, ttl_digest, name), raw=False)
    expiries = {bytes(k): int(x) for k, x in pairs}
    prefixes = manager.layout.task_prefixes(meta.task_id)
    removed = runtime.delete_task(meta.task_id)
    written = expired = 0
    for kind, digest in manifest:
        if kind != "base":
            continue
        entries: list[RuntimeEntry] = []
        for row in _rows(digest, _load(manager, digest, name)):
            obj = msgpack.unpackb(row, raw=True)
            key = obj[0]
            if not key.startswith(prefixes):
                raise RestoreError(f"checkpoint key {key!r} does not belong to task {meta.task_id}")
            expiry = expiries.get(key)
            entries.append(entry_of(obj, None if expiry is None else expiry - captured_at))
        writes, lapsed = runtime.plan_ttls(
            meta.task_id, entries, captured_at, manager.config.ttl_policy
        )
        expired += len(lapsed)
        for start in range(0, len(writes), manager.config.batch_keys):
            written += runtime.write_entries(
                meta.task_id, writes[start : start + manager.config.batch_keys]
            )
    return written, removed, expired
