"""Canonical encoding, content hashing and compression of checkpoint payloads.

A checkpoint is stored as content-addressed payloads:

* ``runtime`` chunks: the task's keys sorted by name, each as
  ``[key, type, value, has_ttl, native_type]``, cut into chunks at keys whose CRC
  ends in six zero bits (content-defined, so inserting one key only changes the
  chunk it falls in and unchanged chunks are shared between checkpoints);
* one ``ttl`` payload: the capture clock and each key's TTL left, in key order.
  TTLs tick down, so they are kept out of the content hash: an unchanged task
  hashes the same a minute later;
* one ``durable`` payload: the task's rows, table by table, in primary-key order;
* one ``skills`` payload: the global skill metadata, shared by every checkpoint
  taken while it did not change.

Every payload is msgpack (binary-safe, exact for integers, floats and bytes),
named by the SHA-256 of its encoded bytes, and stored zstandard-compressed. A
payload is verified against its name whenever it is loaded.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zstandard

from .errors import CorruptCheckpointError
from .model import FORMAT_VERSION, RedisType, RuntimeEntry, TableRows

#: A chunk ends after a key whose CRC32 has these low bits all zero (about 64 keys).
_CHUNK_MASK = 0x3F
#: A chunk also ends once it holds this many encoded bytes.
_CHUNK_MAX_BYTES = 4 << 20


@dataclass(frozen=True, slots=True)
class Payload:
    """Encoded bytes and their content hash (hex SHA-256)."""

    kind: str
    digest: str
    raw: bytes


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(raw: bytes, digest: str) -> Any:
    try:
        return msgpack.unpackb(raw, raw=False, strict_map_key=False, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CorruptCheckpointError(f"payload {digest[:12]} cannot be decoded: {exc}") from exc


def digest_of(raw: bytes) -> str:
    """The content hash used to name a payload."""
    return hashlib.sha256(raw).hexdigest()


def make_payload(kind: str, obj: Any) -> Payload:
    """Encode ``obj`` canonically and name it by its hash."""
    raw = _pack(obj)
    return Payload(kind, digest_of(raw), raw)


def compress(raw: bytes, level: int) -> bytes:
    """Compress one payload for storage."""
    return zstandard.ZstdCompressor(level=level).compress(raw)


def decompress_verified(digest: str, stored: bytes) -> bytes:
    """Decompress a stored payload and check it against its hash."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored)
    except zstandard.ZstdError as exc:
        raise CorruptCheckpointError(
            f"payload {digest[:12]} cannot be decompressed: {exc}"
        ) from exc
    if digest_of(raw) != digest:
        raise CorruptCheckpointError(f"payload {digest[:12]} does not match its content hash")
    return raw


# -- runtime ---------------------------------------------------------------------------------


def _entry_row(entry: RuntimeEntry) -> list[Any]:
    value = entry.value
    if entry.type in (RedisType.HASH, RedisType.ZSET):
        value = [list(pair) for pair in value]
    return [entry.key, entry.type.value, value, entry.pttl_ms is not None, entry.native_type]


def encode_runtime(entries: Sequence[RuntimeEntry], captured_at_ms: int) -> list[Payload]:
    """Runtime chunks followed by one ``ttl`` payload. ``entries`` must be sorted by key."""
    payloads: list[Payload] = []
    chunk: list[list[Any]] = []
    size = 0
    for entry in entries:
        row = _entry_row(entry)
        chunk.append(row)
        size += len(entry.key) + _approx_size(entry.value)
        if (zlib.crc32(entry.key) & _CHUNK_MASK) == 0 or size >= _CHUNK_MAX_BYTES:
            payloads.append(make_payload("runtime", chunk))
            chunk, size = [], 0
    if chunk:
        payloads.append(make_payload("runtime", chunk))
    ttls = [entry.pttl_ms for entry in entries]
    payloads.append(make_payload("ttl", [captured_at_ms, ttls]))
    return payloads


def _approx_size(value: Any) -> int:
    if isinstance(value, bytes):
        return len(value)
    if isinstance(value, list | tuple):
        return sum(_approx_size(v) for v in value) + 2 * len(value)
    return 8


def decode_runtime(
    chunks: Iterable[tuple[str, bytes]], ttl: tuple[str, bytes]
) -> tuple[list[RuntimeEntry], int]:
    """Entries and the capture clock from verified ``(digest, raw)`` payloads."""
    captured_at_ms, ttls = _unpack(ttl[1], ttl[0])
    entries: list[RuntimeEntry] = []
    for digest, raw in chunks:
        for row in _unpack(raw, digest):
            key, type_name, value, has_ttl, native = row
            try:
                rtype = RedisType(type_name)
            except ValueError as exc:
                raise CorruptCheckpointError(
                    f"payload {digest[:12]} holds unknown type {type_name!r}"
                ) from exc
            if rtype in (RedisType.HASH, RedisType.ZSET):
                value = [tuple(pair) for pair in value]
            entries.append(RuntimeEntry(key, rtype, value, 0 if has_ttl else None, native))
    if len(ttls) != len(entries):
        raise CorruptCheckpointError(
            f"TTL payload {ttl[0][:12]} lists {len(ttls)} keys, the chunks {len(entries)}"
        )
    out = []
    for entry, pttl in zip(entries, ttls, strict=True):
        if (pttl is None) != (entry.pttl_ms is None):
            raise CorruptCheckpointError(f"TTL payload {ttl[0][:12]} disagrees with its chunks")
        out.append(RuntimeEntry(entry.key, entry.type, entry.value, pttl, entry.native_type))
    return out, int(captured_at_ms)


def expiries_moved(old_ttl: bytes, new_ttl: bytes, *, tolerance_ms: int) -> bool:
    """Whether any key's expiry instant differs between two ``ttl`` payloads of the same
    key list by more than ``tolerance_ms`` (a TTL that merely ticked down keeps its
    instant: capture clock + TTL left)."""
    old_at, old = _unpack(old_ttl, "ttl")
    new_at, new = _unpack(new_ttl, "ttl")
    if len(old) != len(new):
        return True
    for a, b in zip(old, new, strict=True):
        if (a is None) != (b is None):
            return True
        if a is not None and abs((old_at + a) - (new_at + b)) > tolerance_ms:
            return True
    return False


# -- durable ---------------------------------------------------------------------------------


def encode_tables(kind: str, tables: dict[str, TableRows]) -> Payload:
    """One payload holding several tables, sorted by table name."""
    body = [[name, t.columns, [list(r) for r in t.rows]] for name, t in sorted(tables.items())]
    return make_payload(kind, body)


def decode_tables(digest: str, raw: bytes) -> dict[str, TableRows]:
    """The tables of a verified durable or skills payload."""
    return {
        name: TableRows(list(columns), [tuple(r) for r in rows])
        for name, columns, rows in _unpack(raw, digest)
    }


# -- hashes ----------------------------------------------------------------------------------


def state_hashes(payloads: Sequence[Payload]) -> tuple[str, str, str]:
    """``(state, runtime, durable)`` hashes over the content payloads (TTLs left out)."""
    runtime = [p.digest for p in payloads if p.kind == "runtime"]
    durable = [p.digest for p in payloads if p.kind in ("durable", "skills")]
    runtime_hash = digest_of(_pack(["runtime", FORMAT_VERSION, runtime]))
    durable_hash = digest_of(_pack(["durable", FORMAT_VERSION, durable]))
    state_hash = digest_of(_pack([FORMAT_VERSION, runtime_hash, durable_hash]))
    return state_hash, runtime_hash, durable_hash
