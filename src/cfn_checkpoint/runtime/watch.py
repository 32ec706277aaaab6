"""Which keys of a task change while it is listed and read, on one Redis server.

A task's keys are found with SCAN from the client on a database too large to scan
inside a script. A second listing after the read catches keys created meanwhile,
except one created after the first listing passed its place and deleted again before
the second reached it: the read missed a key that existed when it ran. Redis can
report every change under the task's prefixes instead (``CLIENT TRACKING`` in
broadcast mode): a key that exists when the read runs either stood still since the
watch began, and the listing, made after that, returned it (SCAN returns every key
present for the whole walk), or it changed, and the watch names it.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import redis

from .connection import REDIS_ERRORS

#: The channel Redis publishes invalidations on to a RESP2 connection redirected to it.
_CHANNEL = b"__redis__:invalidate"


class KeyWatch:
    """Every key under some prefixes that is created, changed, deleted or expires from
    :meth:`open` on, named by Redis on a connection of its own.

    That connection speaks RESP2, asks for broadcast invalidations of the prefixes
    redirected to itself (``CLIENT TRACKING ON REDIRECT <its id> BCAST PREFIX ...``)
    and subscribes to them. Redis sends a change to it before the reply to any command
    that connection sends later, so the keys :meth:`changed` returns include every
    change made before it was called.
    """

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._seen: set[bytes] = set()

    @classmethod
    def open(cls, client: redis.Redis, prefixes: Sequence[bytes]) -> KeyWatch | None:
        """A watch of ``prefixes`` on ``client``'s server, or None if it cannot watch: a
        user an ACL denies ``CLIENT TRACKING`` or the channel, or a proxy without it."""
        pool = client.connection_pool
        connection = pool.connection_class(**{**pool.connection_kwargs, "protocol": 2})
        args: list[Any] = []
        for prefix in prefixes:
            args += ["PREFIX", prefix]
        try:
            connection.connect()
            connection.send_command("CLIENT", "ID")
            own_id = connection.read_response()
            connection.send_command("CLIENT", "TRACKING", "ON", "REDIRECT", own_id, "BCAST", *args)
            connection.read_response()
            connection.send_command("SUBSCRIBE", _CHANNEL)
            connection.read_response()
        except REDIS_ERRORS:
            connection.disconnect()
            return None
        return cls(connection)

    def changed(self) -> set[bytes]:
        """The keys changed since the watch opened, up to this call (not to be changed).

        Raises a redis-py error if the connection is lost (Redis drops a subscriber
        that falls too far behind, for one).
        """
        token = secrets.token_hex(8).encode()
        self._connection.send_command("PING", token)
        while True:
            message = self._connection.read_response()
            if message[0] == b"pong" and message[1] == token:
                return self._seen
            if message[0] == b"message" and message[1] == _CHANNEL and message[2] is not None:
                # None: the database was flushed. Every key there was then is gone, and
                # each one created since comes in its own message.
                self._seen.update(message[2])

    def close(self) -> None:
        """Drop the connection (and with it the tracking)."""
        self._connection.disconnect()
