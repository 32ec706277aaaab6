"""Commands put into RESP for the socket, a large argument sent as it is.

With hiredis, redis-py packs every command into one new bytes object. A recovery's
RESTORE script takes the task's values in one argument (3.3 MB at 10,000 keys of the
benchmark's workload), and copying it into the packed command took about 3 ms, a
twentieth of the whole recovery. Here an argument longer than :data:`LARGE` is not
copied: it goes to the socket as its own chunk (redis-py sends a packed command's
chunks one after the other, and a pipeline sends a ``memoryview`` chunk as it is), and
hiredis packs only the arguments around it. The bytes on the wire are the same.
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.exceptions import DataError

__all__ = ["LARGE", "CommandPacker"]

#: Arguments longer than this many bytes are sent without being copied.
LARGE = 1 << 16

_Chunk = bytes | bytearray | memoryview


class CommandPacker:
    """redis-py's command packer (``command_packer=``): hiredis's packing, as redis-py
    does it, but for arguments longer than :data:`LARGE`."""

    def pack(self, *args: Any) -> list[_Chunk]:
        """The chunks that, sent in order, make the RESP command ``args``."""
        # As redis-py: a first argument of several words ("CONFIG GET") is several.
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        # One pass finds what hiredis cannot take as it is, and what is large.
        odd = [i for i, a in enumerate(args) if a.__class__ is not bytes or len(a) > LARGE]
        parts = list(args)
        large: list[int] = []
        for i in odd:
            arg = args[i]
            if isinstance(arg, bytes | bytearray | memoryview):
                if len(arg) > LARGE:
                    large.append(i)
                elif arg.__class__ is not bytes:
                    parts[i] = bytes(arg)
        try:
            if not large:
                return [hiredis.pack_command(tuple(parts))]
            return _chunks(parts, large)
        except TypeError as exc:  # as redis-py reports an argument hiredis refuses
            raise DataError(exc) from exc


def _chunks(parts: list[Any], large: list[int]) -> list[_Chunk]:
    chunks: list[_Chunk] = [b"*%d\r\n" % len(parts)]
    start = 0
    for i in [*large, len(parts)]:
        if start < i:
            packed = hiredis.pack_command(tuple(parts[start:i]))
            chunks.append(memoryview(packed)[packed.index(b"\r\n") + 2 :])  # its own *<n>
        if i < len(parts):
            arg = parts[i]
            size = arg.nbytes if isinstance(arg, memoryview) else len(arg)
            chunks += (b"$%d\r\n" % size, arg, b"\r\n")
        start = i + 1
    return chunks
