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
from typing import Any

import hiredis
import redis

from ..pieces import INCOMPLETE, resp_reader
from .reply import next_reply, receive

__all__ = ["transaction"]


def transaction(
    client: redis.Redis | Any, probe: tuple[Any, ...], commands: Sequence[tuple[Any, ...]]
) -> list[Any] | None:
    """Run ``commands`` in one MULTI/EXEC on one connection of ``client``, after
    ``probe``: EXEC's replies, an error reply in place as redis-py's exception.

    None, with nothing run but ``probe``, when the client cannot be read so, when
    ``probe`` or MULTI is refused (an ACL: the caller's other way reports it), or when
    a command is refused as it is queued (the transaction is then aborted whole). A
    lost connection or a timeout is raised as redis-py raises it, with the connection
    closed; if EXEC was sent, it may have run. ``probe`` is a command that must succeed
    before anything is written (a SCAN that a command of the transaction runs inside a
    script, say).
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
        return _run(conn, probe, commands)
    except BaseException:
        conn.disconnect()  # a reply may be left unread: not for the next command
        raise
    finally:
        pool.release(conn)


def _run(
    conn: Any, probe: tuple[Any, ...], commands: Sequence[tuple[Any, ...]]
) -> list[Any] | None:
    conn.send_packed_command([hiredis.pack_command(probe) + hiredis.pack_command(("MULTI",))])
    sock = getattr(conn, "_sock", None)
    if not isinstance(sock, socket.socket):
        conn.disconnect()  # sent, but its replies cannot be read here: not used again
        return None
    reader = resp_reader()
    parser = getattr(conn, "_parser", None)
    probed, multi = _replies(sock, reader, parser, 2)
    if isinstance(multi, Exception):
        return None
    if isinstance(probed, Exception):
        _replies(sock, reader, parser, 1, send=(conn, ("DISCARD",)))
        return None
    packed = [hiredis.pack_command(command) for command in commands]
    packed.append(hiredis.pack_command(("EXEC",)))
    conn.send_packed_command([b"".join(packed)])
    replies = _replies(sock, reader, parser, len(packed))
    executed = replies[-1]
    if not isinstance(executed, list):  # EXECABORT (a command was refused when queued)
        return None
    return executed


def _replies(
    sock: socket.socket,
    reader: Any,
    parser: Any,
    count: int,
    *,
    send: tuple[Any, tuple[Any, ...]] | None = None,
) -> list[Any]:
    """The next ``count`` replies on ``sock`` (after sending ``send``'s command on its
    connection); push messages go to ``parser``."""
    if send is not None:
        conn, command = send
        conn.send_packed_command([hiredis.pack_command(command)])
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
