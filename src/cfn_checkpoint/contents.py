"""A checkpoint's contents, decoded from its payloads and verified against every hash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .codec import Payload, decode_runtime, decode_tables, decompress_verified, state_hashes
from .durable.schema import SKILL_TABLE
from .errors import CorruptCheckpointError
from .model import CheckpointMetadata, RuntimeEntry, TableRows


@dataclass(frozen=True, slots=True)
class CheckpointContents:
    """A verified checkpoint: its catalog row, runtime keys and durable rows."""

    meta: CheckpointMetadata
    entries: list[RuntimeEntry]
    #: Server clock (ms since the epoch) when the runtime keys were read.
    captured_at_ms: int
    tables: dict[str, TableRows]
    skills: TableRows


def verify_contents(
    meta: CheckpointMetadata,
    manifest: Sequence[tuple[str, str]],
    stored: Mapping[str, bytes],
    *,
    skills: bool = True,
) -> CheckpointContents:
    """Decode a checkpoint from its manifest and stored (compressed) payloads.

    Every payload is checked against its content hash, the state hash against the
    catalog row, and the key count against the catalog row; any mismatch raises
    :class:`CorruptCheckpointError` naming the checkpoint. With ``skills=False`` the
    skill metadata payload (global, never written back) is neither needed nor read,
    and ``skills`` comes back empty: recovery does not depend on it.
    """
    name = f"checkpoint {meta.checkpoint_id}"
    try:
        return _verify(meta, manifest, stored, name, skills)
    except CorruptCheckpointError as exc:
        if meta.checkpoint_id in str(exc):
            raise
        raise CorruptCheckpointError(f"{name}: {exc}") from exc


def _verify(
    meta: CheckpointMetadata,
    manifest: Sequence[tuple[str, str]],
    stored: Mapping[str, bytes],
    name: str,
    skills: bool,
) -> CheckpointContents:
    if not manifest:
        raise CorruptCheckpointError(f"{name} has no payloads")
    wanted = [(k, d) for k, d in manifest if skills or k != "skills"]
    missing = [d for _, d in wanted if d not in stored]
    if missing:
        raise CorruptCheckpointError(f"{name} is missing payload {missing[0][:12]}")
    # The state hash covers payload names only, so it is checked with or without skills.
    payloads = [
        Payload(k, d, decompress_verified(d, stored[d]) if (skills or k != "skills") else b"")
        for k, d in manifest
    ]
    if state_hashes(payloads)[0] != meta.state_hash:
        raise CorruptCheckpointError(f"{name} does not match its state hash")
    by_kind: dict[str, list[Payload]] = {}
    for p in payloads:
        by_kind.setdefault(p.kind, []).append(p)
    try:
        (ttl,) = by_kind["ttl"]
        (durable,) = by_kind["durable"]
        (skill_payload,) = by_kind["skills"]
    except (KeyError, ValueError) as exc:
        raise CorruptCheckpointError(f"{name} has a malformed manifest") from exc
    entries, captured_at_ms = decode_runtime(
        ((p.digest, p.raw) for p in by_kind.get("runtime", [])), (ttl.digest, ttl.raw)
    )
    if len(entries) != meta.key_count:
        raise CorruptCheckpointError(
            f"{name} holds {len(entries)} keys, its catalog row says {meta.key_count}"
        )
    tables = decode_tables(durable.digest, durable.raw)
    skill_rows = TableRows([], [])
    if skill_payload.raw:
        skill_rows = decode_tables(skill_payload.digest, skill_payload.raw).get(
            SKILL_TABLE, skill_rows
        )
    return CheckpointContents(meta, entries, captured_at_ms, tables, skill_rows)
