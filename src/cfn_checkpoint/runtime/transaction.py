"""Commands run in one MULTI/EXEC transaction, sent and read in bulk.

A recovery on one server could write the task's keys from a Lua script, but every
value then enters Lua: at 10,000 keys (3.3 MB) Redis spent about 9 ms taking the values
into the script and unpacking them, and the script's own loop about as much again,
against about 6 ms for the writes themselves. In a transaction the values go from the
socket straight into the commands, as a pipeline's do, and the whole is just as atomic:
no other client's command runs between MULTI's commands.

redis-py's pipeline costs a few microseconds of Python per command; here the commands
are packed by hiredis and sent as one buffer, and the replies read with one hiredis
reader. Used only where that is plain, as in :mod:`.reply`: one server, RESP2 or RESP3,
no decoding, no client-side cache.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any, NamedTuple

import hiredis
import redis

from ..pieces import INCOMPLETE, resp_reader
from .reply import next_reply, plain_connection, receive

__all__ = ["Prepacked", "Refused", "transaction"]


class Prepacked(NamedTuple):
    """Commands packed already (RESP), sent as they are inside the transaction."""

    data: bytes
    #: How many commands ``data`` holds.
    commands: int


class Refused(Exception):
    """The server refused a probe, MULTI, or a command as it was queued: nothing of the
    transaction ran. ``args[0]`` is the refusal, as redis-py's exception."""


def transaction(
    client: redis.Redis | Any,
    probes: Sequence[tuple[Any, ...]],
    commands: Sequence[tuple[Any, ...] | Prepacked],
) -> list[Any] | None:
    """Run ``commands`` (each a command, or several packed already) in one MULTI/EXEC
    on one connection of ``client``, after ``probes``: EXEC's replies, one a command,
    an error reply in place as redis-py's exception (the commands before and after it
    ran).

    ``probes`` are commands that must each succeed before anything is queued: what a
    command of the transaction will do inside a script, which no queue-time check sees
    (a SCAN; a DEL of a key under each prefix the script may delete from), sent with
    MULTI in one round trip. None when the client cannot be read so (nothing sent).
    :class:`Refused` when a probe, MULTI or a queued command is refused: nothing of
    the transaction ran (EXEC runs nothing then; after a refused probe the
    connection is closed, which ends its MULTI). A lost connection or a timeout is
    raised as redis-py raises it, with the connection closed; if EXEC was sent, it may
    have run.
    """
    conn = plain_connection(client)
    if conn is None:
        return None
    try:
        return _run(conn, probes, commands)
    except BaseException:
        conn.disconnect()  # a reply may be left unread, or MULTI open: not used again
        raise
    finally:
        client.connection_pool.release(conn)


def _run(
    conn: Any, probes: Sequence[tuple[Any, ...]], commands: Sequence[tuple[Any, ...] | Prepacked]
) -> list[Any] | None:
    first = [*probes, ("MULTI",)]
    conn.send_packed_command([b"".join(map(hiredis.pack_command, first))])
    sock = getattr(conn, "_sock", None)
    if not isinstance(sock, socket.socket):
        conn.disconnect()  # sent, but its replies cannot be read here: not used again
        return None
    reader = resp_reader()
    parser = getattr(conn, "_parser", None)
    refused = [r for r in _replies(sock, reader, parser, len(first)) if isinstance(r, Exception)]
    if refused:
        raise Refused(refused[0])  # the caller closes the connection: MULTI ends with it
    packed: list[bytes] = []
    count = 0
    for command in commands:
        if isinstance(command, Prepacked):
            packed.append(command.data)
            count += command.commands
        else:
            packed.append(hiredis.pack_command(command))
            count += 1
    packed.append(hiredis.pack_command(("EXEC",)))
    conn.send_packed_command([b"".join(packed)])
    replies = _queued_then_exec(sock, reader, parser, count)
    executed = replies[-1]
    if not isinstance(executed, list):  # EXECABORT: a command was refused when queued
        queued = [r for r in replies[:-1] if isinstance(r, Exception)]
        raise Refused(queued[0] if queued else executed)
    return executed


#: A command's reply inside MULTI, as it is sent and as it is read.
_QUEUED = b"+QUEUED\r\n"
_QUEUED_VALUE = b"QUEUED"


def _queued_then_exec(sock: socket.socket, reader: Any, parser: Any, queued: int) -> list[Any]:
    """The replies to ``queued`` commands sent inside MULTI, then EXEC's: as
    :func:`_replies`, but a run of ``+QUEUED`` replies is counted by comparing bytes,
    not read one by one (10,000 keys: about 4,500 of them, which cost a Python call
    each). At the first other byte the rest is read by :func:`_replies`, as is all of
    it when ``reader`` holds part of a reply already (a push message after MULTI's)."""
    if reader.has_data():
        return _replies(sock, reader, parser, queued + 1)
    tail = b""
    skipped = 0
    while skipped < queued:
        buf = tail + receive(sock)
        whole = min(queued - skipped, len(buf) // len(_QUEUED))
        if buf[: whole * len(_QUEUED)] != _QUEUED * whole:
            whole = 0
            while whole < queued - skipped and buf.startswith(_QUEUED, whole * len(_QUEUED)):
                whole += 1
        skipped += whole
        tail = buf[whole * len(_QUEUED) :]
        if skipped < queued and not _QUEUED.startswith(tail[: len(_QUEUED)]):
            break  # another reply (a refusal, a push): read as it comes
    reader.feed(tail)
    return [_QUEUED_VALUE] * skipped + _replies(sock, reader, parser, queued - skipped + 1)


def _replies(sock: socket.socket, reader: Any, parser: Any, count: int) -> list[Any]:
    """The next ``count`` replies on ``sock``; push messages go to ``parser``."""
    out: list[Any] = []
    pushes = [0]
    while True:
        value = next_reply(reader, parser, pushes)
        while value is not INCOMPLETE:
            out.append(value)
            if len(out) == count:
                return out
            value = next_reply(reader, parser, pushes)
        reader.feed(receive(sock))
