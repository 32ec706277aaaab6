"""A script's reply read as bytes, so that one equal to a reply read before is known
without being parsed.

An unchanged task reads exactly as at its last checkpoint. Parsing the capture's reply
into Python objects (hiredis) costs about 3 ms at 10,000 keys and comparing them with
the objects kept from the last capture 1 ms more; comparing the bytes as they come off
the socket costs a few tenths of a millisecond, and the reply is then never parsed.

Only the first item of a capture's reply, the server clock, differs from one read to
the next; it is an integer of the same number of digits for centuries. A reply whose
bytes agree with the expected reply's everywhere else, and whose clock is digits of
the same length, is framed exactly like it (RESP gives every element its length or its
end), so it is complete exactly when it is as long, and until then more bytes must
come. A reply that differs anywhere is parsed from all its bytes, as redis-py would.

This reads one connection of redis-py's pool directly (its socket), so it is used only
where that is plain: one server, RESP2 or RESP3, no decoding, no client-side cache. Anywhere
else :func:`call_script` returns None and the caller calls the script as usual.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
from redis._parsers import BaseParser
from redis.commands.core import Script
from redis.exceptions import InvalidResponse, NoScriptError

from ..pieces import Pieces

#: Bytes asked of the socket at a time.
_READ_SIZE = 1 << 18
#: The type hiredis (3.2 and later) gives a RESP3 push message.
_PUSH: type | None = getattr(hiredis, "PushNotification", None)


@dataclass(frozen=True, slots=True)
class RawReply:
    """A script's reply and its bytes."""

    #: The reply parsed, or None when its bytes equal the expected reply's but for the
    #: clock: ``data`` is then the expected reply's bytes (with the expected clock).
    value: list[Any] | None
    #: The bytes as read, in pieces: joining 3.6 MB (10,000 keys) would cost 0.6 ms.
    data: Pieces
    #: The reply's first item, the server clock when it is a capture's reply (None if
    #: the first item is not an integer).
    clock: int | None


def clock_span(data: Pieces) -> tuple[int, int] | None:
    """Where the digits of a reply's first item, an integer, lie in its bytes
    (``*<n>\r\n:<digits>\r\n``, in its first piece); None for any other reply."""
    first = data[0] if data else b""
    if not first.startswith(b"*"):
        return None
    start = first.find(b"\r\n") + 3
    end = first.find(b"\r\n", start)
    if start < 3 or first[start - 1 : start] != b":" or end < 0 or not first[start:end].isdigit():
        return None
    return start, end


def call_script(
    client: redis.Redis | Any, script: Script, args: list[Any], expected: Pieces | None = None
) -> RawReply | None:
    """Run ``script`` (declaring no keys) with ``args`` on one connection of ``client``
    and read its reply as bytes; None when ``client`` cannot be read so.

    When the reply equals ``expected`` but for its clock (see the module's text), it
    is not parsed. An error reply is raised as redis-py raises it; a script Redis does
    not know yet is loaded and the call made again. A lost connection or a timeout is
    raised as redis-py's ``ConnectionError`` or ``TimeoutError``, with the connection
    closed: the caller may call again the usual way, with redis-py's retries.
    """
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return None
    if client.get_encoder().decode_responses or client.get_cache() is not None:
        return None
    pool = client.connection_pool
    conn: Any = pool.get_connection()  # redis-py's connections are untyped
    try:
        if str(getattr(conn, "protocol", None) or 2) not in ("2", "3"):
            return None
        for attempt in (1, 2):
            conn.send_command("EVALSHA", script.sha, 0, *args)
            sock = getattr(conn, "_sock", None)
            if not isinstance(sock, socket.socket):
                conn.disconnect()  # sent, but its reply cannot be read here: not used again
                return None
            reply = _read(sock, expected, getattr(conn, "_parser", None))
            if isinstance(reply.value, NoScriptError) and attempt == 1:
                script.sha = client.script_load(script.script)
                continue
            if isinstance(reply.value, redis.ResponseError):
                raise reply.value
            return reply
        raise AssertionError("unreachable")  # pragma: no cover
    except BaseException:
        conn.disconnect()
        raise
    finally:
        pool.release(conn)


def _read(sock: socket.socket, expected: Pieces | None, parser: Any) -> RawReply:
    """One reply from ``sock``: compared with ``expected`` as it comes, parsed once it
    differs (or at once when nothing is expected). A RESP3 push message read before it
    (a notification the server sends unasked) goes to redis-py's ``parser`` as it would
    have, and its bytes stay in ``data``: a reply so read matches nothing later."""
    span = None if expected is None else clock_span(expected)
    size = 0 if expected is None else expected.size()
    starts = [] if expected is None else expected.starts()
    pieces: list[bytes] = []
    got = 0
    reader: Any = None
    while True:
        try:
            piece = sock.recv(_READ_SIZE)
        except TimeoutError as exc:
            raise redis.TimeoutError("Timeout reading from the Redis socket") from exc
        except OSError as exc:
            raise redis.ConnectionError(f"Error reading from the Redis socket: {exc}") from exc
        if not piece:
            raise redis.ConnectionError("Connection closed by server.")
        pieces.append(piece)
        at, got = got, got + len(piece)
        if span is not None and expected is not None:
            if got <= size and _agrees(expected, starts, span, piece, at):
                if got == size:
                    start, end = span
                    return RawReply(None, expected, int(pieces[0][start:end]))
                continue
            span = None  # it differs: parse it, from its first byte
        if reader is None:
            reader = hiredis.Reader(
                protocolError=InvalidResponse, replyError=BaseParser.parse_error
            )
            for earlier in pieces[:-1]:
                reader.feed(earlier)
        reader.feed(piece)
        value = reader.gets()
        while _PUSH is not None and isinstance(value, _PUSH):
            handle = getattr(parser, "handle_push_response", None)
            if handle is not None:
                handle(value)
            value = reader.gets()
        if value is False:
            continue
        if reader.has_data():
            raise InvalidResponse("Redis sent more than one reply to one command")
        first = value[0] if isinstance(value, list) and value else None
        return RawReply(value, Pieces(pieces), first if isinstance(first, int) else None)


def _agrees(
    expected: Pieces, starts: list[int], span: tuple[int, int], piece: bytes, at: int
) -> bool:
    """Whether ``piece``, read at offset ``at``, agrees with ``expected``: equal bytes,
    but digits of the clock. The first piece read must hold the whole clock and the
    line end after it (it does: they are the first few dozen bytes of the reply)."""
    start, end = span
    if at:
        return expected.equal_at(starts, piece, at)
    return (
        len(piece) >= end + 2
        and expected.equal_at(starts, memoryview(piece)[:start], 0)
        and piece[start:end].isdigit()
        and expected.equal_at(starts, memoryview(piece)[end:], end)
    )
