"""Commands put into RESP for the socket, a large ``bytes`` argument sent as it is.

With hiredis, redis-py packs every command into one new bytes object. A recovery's
RESTORE script takes the task's values in one argument (3.3 MB at 10,000 keys of the
benchmark's workload), and copying it into the packed command took about 3 ms, a
twentieth of the whole recovery. Here a ``bytes`` argument longer than :data:`LARGE`
is not copied: it goes to the socket as its own chunk (redis-py sends a packed
command's chunks one after the other, and a pipeline sends a ``memoryview`` chunk as
it is), and hiredis packs only the arguments around it. The bytes on the wire are the
same. A command holding a ``bytearray`` or a ``memoryview`` is left to redis-py's own
packer, whose handling of them differs between its versions (and a ``bytearray``
sent by reference could change while it is sent).
"""

from __future__ import annotations

from typing import Any

import hiredis
from redis.connection import HiredisRespSerializer
from redis.exceptions import DataError

__all__ = ["LARGE", "CommandPacker"]

#: ``bytes`` arguments longer than this many bytes are sent without being copied.
LARGE = 1 << 16

_Chunk = bytes | memoryview


class CommandPacker:
    """redis-py's command packer (``command_packer=``): redis-py's hiredis packing, but
    for ``bytes`` arguments longer than :data:`LARGE`."""

    def __init__(self) -> None:
        self._stock = HiredisRespSerializer()

    def pack(self, *args: Any) -> list[_Chunk]:
        """The chunks that, sent in order, make the RESP command ``args``."""
        # As redis-py: a first argument of several words ("CONFIG GET") is several.
        if isinstance(args[0], str):
            split = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            split = (*args[0].split(), *args[1:])
        else:
            split = args
        # One pass finds every argument that is not plain short bytes.
        odd = [i for i, a in enumerate(split) if a.__class__ is not bytes or len(a) > LARGE]
        if any(isinstance(split[i], bytearray | memoryview) for i in odd):
            return list(self._stock.pack(*args))
        large = [i for i in odd if isinstance(split[i], bytes) and len(split[i]) > LARGE]
        try:
            if not large:  # as redis-py packs a command without buffers
                return [hiredis.pack_command(split)]
            return _chunks(split, large)
        except TypeError as exc:  # as redis-py reports an argument hiredis refuses
            raise DataError(exc) from exc


def _chunks(parts: tuple[Any, ...], large: list[int]) -> list[_Chunk]:
    chunks: list[_Chunk] = [b"*%d\r\n" % len(parts)]
    start = 0
    for i in [*large, len(parts)]:
        if start < i:
            packed = hiredis.pack_command(parts[start:i])
            chunks.append(memoryview(packed)[packed.index(b"\r\n") + 2 :])  # its own *<n>
        if i < len(parts):
            arg = parts[i]
            chunks += (b"$%d\r\n" % len(arg), arg, b"\r\n")
        start = i + 1
    return chunks
