"""Bytes read in pieces (a reply off a socket), kept and compared without being joined."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate
from typing import Any

import hiredis
from redis._parsers import BaseParser
from redis.exceptions import InvalidResponse


class Pieces(tuple[bytes, ...]):
    """Bytes in pieces, compared with other bytes by offset without being joined."""

    __slots__ = ()

    def size(self) -> int:
        """The number of bytes."""
        return sum(map(len, self))

    def starts(self) -> list[int]:
        """Where each piece begins."""
        return [0, *accumulate(map(len, self[:-1]))]

    def equal_at(self, starts: list[int], data: bytes | memoryview, at: int) -> bool:
        """Whether ``data`` equals these bytes from offset ``at`` on (``starts``: see
        :meth:`starts`); False past their end."""
        view = memoryview(data)
        i = bisect_right(starts, at) - 1
        done = 0
        while done < len(view):
            if i >= len(self):
                return False
            piece = self[i]
            local = at + done - starts[i]
            take = min(len(piece) - local, len(view) - done)
            if not piece.startswith(view[done : done + take], local):
                return False
            done += take
            i += 1
        return True

    def parse(self) -> Any:
        """The one reply these bytes hold, parsed as when they were read (see
        :func:`resp_reader`)."""
        reader = resp_reader()
        for piece in self:
            reader.feed(piece)
        value = reader.gets()
        if value is INCOMPLETE or reader.has_data():
            raise ValueError("these bytes do not hold exactly one reply")
        return value


#: What a reader gives while a reply is not complete (a reply may itself be False: a
#: RESP3 boolean).
INCOMPLETE = object()


def resp_reader() -> Any:
    """A hiredis reader of RESP2 and RESP3 replies, giving bytes (no decoding) and error
    replies as redis-py's exceptions, as redis-py's own parser does."""
    return hiredis.Reader(
        protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=INCOMPLETE
    )
