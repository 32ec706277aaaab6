"""A checkpoint's contents, decoded from its payloads and verified against every hash."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .codec import Payload, decode_tables, decompress_verified, state_hashes
from .durable.schema import SKILL_TABLE
from .errors import CorruptCheckpointError, UnreadableFormatError
from .image import DecodedRows, Keyframe, KeyIndex, decode_image
from .model import READABLE_FORMATS, CheckpointMetadata, RuntimeEntry, TableRows

#: Payload kinds that hold runtime keys.
RUNTIME_KINDS = frozenset({"base", "basettl", "delta", "ttl"})


@dataclass(frozen=True, slots=True)
class CheckpointContents:
    """A verified checkpoint: its catalog row, runtime keys and durable rows."""

    meta: CheckpointMetadata
    #: The runtime keys, as decoded (see :attr:`entries`).
    rows: DecodedRows
    #: Server clock (ms since the epoch) when the runtime keys were read.
    captured_at_ms: int
    tables: dict[str, TableRows]
    skills: TableRows
    #: The keyframe the runtime keys are stored against (itself, for a keyframe).
    keyframe: Keyframe
    #: Each runtime key's row digest and expiry instant in this checkpoint.
    current: KeyIndex

    @property
    def entries(self) -> list[RuntimeEntry]:
        """The runtime keys, in key order."""
        return self.rows.entries()


def verify_contents(
    meta: CheckpointMetadata,
    manifest: Sequence[tuple[str, str]],
    stored: Mapping[str, bytes],
    *,
    skills: bool = True,
) -> CheckpointContents:
    """Decode a checkpoint from its manifest and stored (compressed) payloads.

    Every payload is checked against its content hash, the rebuilt runtime keys and
    the payload names against the catalog row's hashes, and the key count; any
    mismatch raises :class:`CorruptCheckpointError` naming the checkpoint. With
    ``skills=False`` the skill metadata payload (global, never written back) is
    neither needed nor read, and ``skills`` comes back empty: recovery does not
    depend on it.
    """
    name = f"checkpoint {meta.checkpoint_id}"
    try:
        return _verify(meta, manifest, stored, name, skills)
    except CorruptCheckpointError as exc:
        if meta.checkpoint_id in str(exc):
            raise
        raise CorruptCheckpointError(f"{name}: {exc}") from exc


def check_format(meta: CheckpointMetadata) -> None:
    """Raise :class:`UnreadableFormatError` if this version cannot read ``meta``'s format."""
    if meta.format_version not in READABLE_FORMATS:
        *rest, last = map(str, READABLE_FORMATS)
        readable = f"{', '.join(rest)} and {last}" if rest else last
        raise UnreadableFormatError(
            f"checkpoint {meta.checkpoint_id} uses storage format {meta.format_version}; "
            f"this version reads formats {readable}"
        )


def _verify(
    meta: CheckpointMetadata,
    manifest: Sequence[tuple[str, str]],
    stored: Mapping[str, bytes],
    name: str,
    skills: bool,
) -> CheckpointContents:
    check_format(meta)
    try:
        (durable,) = [d for k, d in manifest if k == "durable"]
        (skill_digest,) = [d for k, d in manifest if k == "skills"]
    except ValueError as exc:
        raise CorruptCheckpointError(f"{name} has a malformed manifest") from exc
    if any(k not in RUNTIME_KINDS | {"durable", "skills"} for k, _ in manifest):
        raise CorruptCheckpointError(f"{name} has a malformed manifest")
    wanted = [(k, d) for k, d in manifest if skills or k != "skills"]
    missing = [d for _, d in wanted if d not in stored]
    if missing:
        raise CorruptCheckpointError(f"{name} is missing payload {missing[0][:12]}")
    payloads = [Payload(k, d, decompress_verified(d, stored[d])) for k, d in wanted]
    version = meta.format_version
    image = decode_image([p for p in payloads if p.kind in RUNTIME_KINDS], version)
    if image.runtime_hash != meta.runtime_state_hash:
        raise CorruptCheckpointError(f"{name}: its runtime keys do not match their hash")
    if state_hashes(image.runtime_hash, durable, skill_digest, version)[0] != meta.state_hash:
        raise CorruptCheckpointError(f"{name} does not match its state hash")
    if len(image.rows) != meta.key_count:
        raise CorruptCheckpointError(
            f"{name} holds {len(image.rows)} keys, its catalog row says {meta.key_count}"
        )
    by_digest = {p.digest: p.raw for p in payloads}
    tables = decode_tables(durable, by_digest[durable])
    skill_rows = TableRows([], [])
    if skills:
        skill_rows = decode_tables(skill_digest, by_digest[skill_digest]).get(
            SKILL_TABLE, skill_rows
        )
    return CheckpointContents(
        meta, image.rows, image.captured_at_ms, tables, skill_rows, image.keyframe, image.current
    )
