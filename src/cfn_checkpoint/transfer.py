"""Export and import of single checkpoints as portable, integrity-checked files.

File layout::

    b"CFNCKPT\\x01"                 magic and file-format version
    msgpack header                   {"format", "checkpoint": catalog row, "manifest", "payloads"}
    msgpack payload x N              [digest, raw size, zstd bytes]
    32 bytes                         SHA-256 of everything before it

The trailer catches truncation and tampering of the file as a whole; each payload
is checked against its own hash, and the state hash against the catalog row, so
a file that passes restores exactly what was exported. Payloads are copied as
stored (compressed), so the file is no larger than the checkpoint's storage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

import msgpack

from .contents import CheckpointContents, verify_contents
from .errors import CorruptCheckpointError, ValidationError
from .model import CheckpointMetadata, CheckpointStatus, CheckpointTrigger

MAGIC = b"CFNCKPT\x01"
EXPORT_FORMAT = 1
_TRAILER = 32


def metadata_to_dict(meta: CheckpointMetadata) -> dict[str, Any]:
    """A catalog row as JSON-friendly values (ISO-8601 times, plain strings)."""
    out = asdict(meta)
    for key, value in out.items():
        if isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, CheckpointTrigger | CheckpointStatus):
            out[key] = value.value
    return out


def metadata_from_dict(data: Mapping[str, Any]) -> CheckpointMetadata:
    """The inverse of :func:`metadata_to_dict`."""
    fields = dict(data)
    for key in ("created_at", "completed_at", "last_recovered_at"):
        if fields.get(key) is not None:
            fields[key] = datetime.fromisoformat(fields[key])
    fields["trigger"] = CheckpointTrigger(fields["trigger"])
    fields["status"] = CheckpointStatus(fields["status"])
    return CheckpointMetadata(**fields)


def write_export(
    out: BinaryIO,
    meta: CheckpointMetadata,
    manifest: Sequence[tuple[str, str]],
    stored: Mapping[str, tuple[int, bytes]],
) -> int:
    """Write one checkpoint; ``stored`` maps digest to (raw size, compressed bytes).

    Returns the number of bytes written.
    """
    digest = hashlib.sha256()
    written = 0

    def put(chunk: bytes) -> None:
        nonlocal written
        digest.update(chunk)
        out.write(chunk)
        written += len(chunk)

    unique = list(dict.fromkeys(d for _, d in manifest))
    put(MAGIC)
    header = {
        "format": EXPORT_FORMAT,
        "checkpoint": metadata_to_dict(meta),
        "manifest": [list(pair) for pair in manifest],
        "payloads": len(unique),
    }
    put(msgpack.packb(header, use_bin_type=True))
    for d in unique:
        raw_size, data = stored[d]
        put(msgpack.packb([d, raw_size, data], use_bin_type=True))
    out.write(digest.digest())
    return written + _TRAILER


def read_export(
    path: Path,
) -> tuple[CheckpointContents, list[tuple[str, str]], dict[str, tuple[int, bytes]]]:
    """Read and fully verify an export file.

    Returns the verified contents, the manifest and the stored payloads (digest ->
    (raw size, compressed bytes)) ready to be inserted as they are.
    """
    try:
        blob = path.read_bytes()
    except OSError as exc:
        raise ValidationError(f"cannot read export file {path}: {exc.strerror}") from exc
    if not blob.startswith(MAGIC[:7]):
        raise ValidationError(f"{path} is not a cfn-checkpoint export file")
    if not blob.startswith(MAGIC):
        raise ValidationError(f"{path} uses an export format this version cannot read")
    if len(blob) < len(MAGIC) + _TRAILER or (
        hashlib.sha256(blob[:-_TRAILER]).digest() != blob[-_TRAILER:]
    ):
        raise CorruptCheckpointError(f"export file {path} is truncated or altered")
    try:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(blob[len(MAGIC) : -_TRAILER])
        header = next(unpacker)
        meta = metadata_from_dict(header["checkpoint"])
        manifest = [(str(k), str(d)) for k, d in header["manifest"]]
        stored: dict[str, tuple[int, bytes]] = {}
        for _ in range(int(header["payloads"])):
            d, raw_size, data = next(unpacker)
            stored[str(d)] = (int(raw_size), bytes(data))
    except (StopIteration, KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise CorruptCheckpointError(f"export file {path} is malformed: {exc}") from exc
    contents = verify_contents(meta, manifest, {d: data for d, (_, data) in stored.items()})
    return contents, manifest, stored
