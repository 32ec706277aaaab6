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
where that is plain: one server, RESP2 or RESP3, no decoding, no client-side cache.
Anywhere else :func:`call_script` returns None and the caller calls the script as
usual. RESP3 push messages (notifications a server may send unasked, before or after
the reply) go to redis-py's parser, as they would have.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import hiredis
import redis
from redis.commands.core import Script
from redis.exceptions import InvalidResponse, NoScriptError

from ..pieces import INCOMPLETE, Pieces, resp_reader

#: Bytes asked of the socket at a time: below glibc's threshold for an allocation of
#: its own (128 KiB), so a piece shrunk to fit keeps no more than its bytes (one asked
#: for 256 KiB kept a whole page for a 200-byte reply).
_READ_SIZE = 1 << 16
#: The type hiredis gives a RESP3 push message (hiredis 3.2 and later).
_PUSH: type = hiredis.PushNotification


@dataclass(frozen=True, slots=True)
class RawReply:
    """A script's reply and its bytes."""

    #: The reply parsed, or None when its bytes equal the expected reply's but for the
    #: clock: ``data`` is then the expected reply's bytes (with the expected clock).
    value: Any
    #: The bytes as read, in pieces (joining 3.6 MB, 10,000 keys, would cost 0.6 ms);
    #: None when push messages came with them, whose bytes no later reply would hold.
    data: Pieces | None
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
    client: redis.Redis | Any,
    script: Script,
    args: Sequence[Any],
    expected: Pieces | None = None,
    *,
    keys: Sequence[Any] = (),
) -> RawReply | None:
    """Run ``script`` with ``keys`` and ``args`` and read its reply as bytes: see
    :func:`call_scripts`."""
    replies = call_scripts(client, script, [(keys, args)], [expected])
    return None if replies is None else replies[0]


def call_scripts(
    client: redis.Redis | Any,
    script: Script,
    calls: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    expected: Sequence[Pieces | None] | None = None,
) -> list[RawReply] | None:
    """Run ``script`` once per ``(keys, args)`` in ``calls``, one after the other on one
    connection of ``client``, and read each reply as bytes; None when ``client`` cannot
    be read so.

    A reply that equals its ``expected`` bytes but for its clock (see the module's text)
    is not parsed. An error reply is raised as redis-py raises it (the connection stays
    usable); a script Redis does not know is loaded on the same connection and called
    again. A lost connection, a timeout or a reply of another protocol is raised as
    redis-py raises it, with the connection closed (a late reply must not be read as
    the next command's): the caller may call again the usual way, with redis-py's
    retries. So are the errors redis-py counts as connection errors (``LOADING``: a
    restarted server still reading its data; ``NOAUTH``), which its retries handle.
    """
    conn = plain_connection(client)
    if conn is None:
        return None
    replies: list[RawReply] = []
    error = None
    try:
        for i, (keys, args) in enumerate(calls):
            want = None if expected is None else expected[i]
            call = ("EVALSHA", script.sha, len(keys), *keys, *args)
            reply = _call(conn, call, want)
            if reply is not None and isinstance(reply.value, NoScriptError):
                loaded = _call(conn, ("SCRIPT", "LOAD", script.script), None)
                if loaded is not None and isinstance(loaded.value, bytes):
                    script.sha = loaded.value.decode()
                    reply = _call(conn, ("EVALSHA", script.sha, *call[2:]), want)
                else:
                    reply = loaded
            if reply is None:
                return None
            if isinstance(reply.value, Exception):
                error = reply.value
                break
            replies.append(reply)
    finally:
        client.connection_pool.release(conn)
    if error is not None:
        raise error
    return replies


def plain_connection(client: redis.Redis | Any) -> Any:
    """A connection of ``client``'s pool whose socket can be read here (one server,
    RESP2 or RESP3, no decoding, no client-side cache), for the caller to release to
    ``client.connection_pool``; None for any other client."""
    if not isinstance(client, redis.Redis) or client.connection is not None:
        return None
    if client.get_encoder().decode_responses or client.get_cache() is not None:
        return None
    conn: Any = client.connection_pool.get_connection()  # redis-py's are untyped
    if str(getattr(conn, "protocol", None) or 2) not in ("2", "3"):
        client.connection_pool.release(conn)
        return None
    return conn


def _call(conn: Any, command: tuple[Any, ...], expected: Pieces | None) -> RawReply | None:
    """Send ``command`` on ``conn`` and read its reply (None: the connection has no plain
    socket to read, and is closed)."""
    try:
        conn.send_command(*command)
        sock = getattr(conn, "_sock", None)  # after sending: a reconnect makes a new one
        if not isinstance(sock, socket.socket):
            conn.disconnect()  # sent, but its reply cannot be read here: not used again
            return None
        reply, clean = _read(sock, expected, getattr(conn, "_parser", None))
    except BaseException:
        conn.disconnect()
        raise
    if not clean:
        conn.disconnect()  # part of a push message after the reply is left unread
    return reply


def _read(sock: socket.socket, expected: Pieces | None, parser: Any) -> tuple[RawReply, bool]:
    """One reply from ``sock``, and whether nothing was left after it: compared with
    ``expected`` as it comes, parsed once it differs (or at once when nothing is
    expected). Push messages around it go to redis-py's ``parser``, and the reply's
    bytes are then not given (they hold the pushes too)."""
    span = None if expected is None else clock_span(expected)
    size = 0 if expected is None else expected.size()
    starts = [] if expected is None else expected.starts()
    pieces: list[bytes] = []
    got = 0
    reader: Any = None
    pushes = [0]
    while True:
        piece = receive(sock)
        pieces.append(piece)
        at, got = got, got + len(piece)
        if span is not None and expected is not None:
            if got <= size and _agrees(expected, starts, span, piece, at):
                if got == size:
                    start, end = span
                    return RawReply(None, expected, int(pieces[0][start:end])), True
                continue
            span = None  # it differs: parse it, from its first byte
        if reader is None:
            reader = resp_reader()
            for earlier in pieces[:-1]:
                reader.feed(earlier)
        reader.feed(piece)
        value = next_reply(reader, parser, pushes)
        if value is INCOMPLETE:
            continue
        if next_reply(reader, parser, pushes) is not INCOMPLETE:
            raise InvalidResponse("Redis sent more than one reply to one command")
        first = value[0] if isinstance(value, list) and value else None
        clock = first if isinstance(first, int) else None
        data = None if pushes[0] else Pieces(pieces)
        return RawReply(value, data, clock), not reader.has_data()


def receive(sock: socket.socket) -> bytes:
    """The next bytes from ``sock`` (at most :data:`_READ_SIZE`)."""
    try:
        piece = sock.recv(_READ_SIZE)
    except TimeoutError as exc:
        raise redis.TimeoutError("Timeout reading from the Redis socket") from exc
    except OSError as exc:
        raise redis.ConnectionError(f"Error reading from the Redis socket: {exc}") from exc
    if not piece:
        raise redis.ConnectionError("Connection closed by server.")
    return piece


def next_reply(reader: Any, parser: Any, pushes: list[int]) -> Any:
    """The next reply ``reader`` holds that is not a push message (those go to
    ``parser``, counted in ``pushes[0]``), or :data:`INCOMPLETE`."""
    value = reader.gets()
    while isinstance(value, _PUSH):
        pushes[0] += 1
        handle = getattr(parser, "handle_push_response", None)
        if handle is not None:
            handle(value)
        value = reader.gets()
    return value


def _agrees(
    expected: Pieces, starts: list[int], span: tuple[int, int], piece: bytes, at: int
) -> bool:
    """Whether ``piece``, read at offset ``at``, agrees with ``expected``: equal bytes,
    but digits of the clock. The first piece read must hold the whole clock and the
    line end after it, or the reply is parsed: the first read of a reply gives its
    first few dozen bytes, unless the network splits them (then it is only slower)."""
    start, end = span
    if at:
        return expected.equal_at(starts, piece, at)
    return (
        len(piece) >= end + 2
        and expected.equal_at(starts, memoryview(piece)[:start], 0)
        and piece[start:end].isdigit()
        and expected.equal_at(starts, memoryview(piece)[end:], end)
    )
