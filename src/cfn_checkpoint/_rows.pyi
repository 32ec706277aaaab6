"""The C part of the row codec (``_rows.c``): see :mod:`cfn_checkpoint.image`."""

from typing import Any

def scan(raw: bytes, offset: int = 0, /) -> tuple[list[bytes], list[bytes]]:
    """The key and the bytes of each row of a msgpack stream of rows, from ``offset`` on.
    Raises ValueError ("malformed row" for one that is not ``[key (bytes), 4 more]``)."""

def classify(rows: list[Any], expiries: list[int | None], /) -> list[int]:
    """The indexes of the items that are not plain rows as stored (a string's or a list's
    bytes, no native type) whose TTL flag agrees with their expiry."""

def pack(flat: list[Any], now_ms: int, /) -> tuple[list[bytes], list[int], list[bytes]]:
    """A capture's rows in key order, packed as :func:`cfn_checkpoint.image.packed_rows`
    packs them: the keys, their expiry instants, the rows. ValueError for a key read
    twice or an item of another type than a capture gives."""

def restore(
    rows: list[Any],
    expiries: list[int | None],
    captured_at_ms: int,
    elapsed_locks: int,
    elapsed_others: int,
    lock_prefix: bytes,
    /,
) -> tuple[bytes, int, list[int], list[int]]:
    """The RESP of the commands that write the plain rows (as
    :func:`~cfn_checkpoint.runtime.commands.restore_commands` makes them), how many
    commands, the indexes of rows whose TTL ran out, and those of the other items."""
