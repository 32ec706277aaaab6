"""Which keys of a task change while it is listed and read, on one Redis server.

A task's keys are found with SCAN from the client on a database too large to scan
inside a script. A second listing after the read would catch keys created meanwhile,
except one created after the first listing passed its place and deleted again before
the second reached it: the read missed a key that existed when it ran. Redis can
report every change under the task's prefixes instead (``CLIENT TRACKING`` in
broadcast mode). A sync just before the read adds the keys changed so far to the
listed ones; a sync just after the read names every change made before the read (its
PING is read in a later turn of Redis's event loop than the read, and each turn's
changes are sent at its end). A key that exists when the read runs was then read: it
stood still since the watch began, and the listing, made after that, returned it
(SCAN returns every key present for the whole walk); or it changed, and one of the
two syncs named it (if only the second, the read is repeated with it).

Redis sends no change for a database replaced whole by ``SWAPDB``, nor for a write by
a module that opts out of it; a flush, or a replica loading its master's data, comes
as one message naming no key, after which the watch knows nothing more.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
from collections.abc import Sequence
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .connection import REDIS_ERRORS

log = logging.getLogger(__name__)

#: The channel Redis publishes invalidations on to a RESP2 connection redirected to it.
_CHANNEL = b"__redis__:invalidate"


class WatchLost(redis.ConnectionError):
    """The watch connection answered something a watch never gets: it is not used again."""


class KeyWatch:
    """Every key under some prefixes that changes (is created, written, deleted or
    expires) while the watch is open, named by Redis on a connection of its own.

    That connection speaks RESP2, asks for broadcast invalidations of the prefixes
    redirected to itself (``CLIENT TRACKING ON REDIRECT <its id> BCAST PREFIX ...``)
    and subscribes to them. Redis sends the changes of each turn of its event loop at
    the end of that turn, so :meth:`sync` returns every change made in a turn before
    the one in which its PING is read; a change made in that same turn comes with the
    next sync.
    """

    def __init__(self, connection: Any, own_id: int) -> None:
        self._connection = connection
        self._own_id = own_id
        #: Set once the watch cannot tell what changed (see :meth:`changes`).
        self.blind = False
        #: Set once the connection failed: it is not used again.
        self.broken = False

    @classmethod
    def connect(cls, client: redis.Redis) -> KeyWatch | None:
        """A watch connection to ``client``'s server, not yet watching; None if the
        server cannot be reached for it."""
        pool = client.connection_pool
        options = {**pool.connection_kwargs, "protocol": 2, "health_check_interval": 0}
        # A silent reconnect would drop the tracking: a lost connection is an error.
        options["retry"] = Retry(NoBackoff(), 0)
        connection = pool.connection_class(**options)
        try:
            connection.connect()
            connection.send_command("CLIENT", "ID")
            own_id = connection.read_response()
        except REDIS_ERRORS:
            connection.disconnect()
            return None
        return cls(connection, int(own_id))

    def start(self, prefixes: Sequence[bytes]) -> None:
        """Watch ``prefixes`` from now on (raises a redis-py error if Redis refuses:
        an ACL denying ``CLIENT`` or the channel, for one)."""
        args: list[Any] = ["CLIENT", "TRACKING", "ON", "REDIRECT", self._own_id, "BCAST"]
        for prefix in prefixes:
            args += ["PREFIX", prefix]
        connection = self._connection
        connection.send_command(*args)
        connection.read_response()
        connection.send_command("SUBSCRIBE", _CHANNEL)
        reply = connection.read_response()
        if not isinstance(reply, list) or reply[0] != b"subscribe":
            raise WatchLost(f"unexpected reply to SUBSCRIBE: {reply!r}")

    def sync(self) -> set[bytes] | None:
        """The keys changed since the last sync (or since :meth:`start`), up to now.

        None when Redis reported a change naming no key (a flush, or a replica loading
        its master's data): from then on the watch cannot tell what changed. Raises a
        redis-py error if the connection is lost (Redis drops a subscriber that falls
        too far behind, for one).
        """
        token = secrets.token_hex(8).encode()
        changed: set[bytes] | None = set()
        self._connection.send_command("PING", token)
        while True:
            message = self._connection.read_response()
            if not isinstance(message, list) or len(message) < 2:
                raise WatchLost(f"unexpected reply on the watch connection: {message!r}")
            if message[0] == b"pong" and message[1] == token:
                return changed
            if message[0] == b"message" and message[1] == _CHANNEL:
                if message[2] is None:
                    changed = None
                elif changed is not None:
                    changed.update(message[2])

    def changes(self) -> set[bytes] | None:
        """:meth:`sync`, or None, for good, from the first time it cannot tell (a flush,
        or the connection lost)."""
        if self.blind:
            return None
        try:
            changed = self.sync()
        except REDIS_ERRORS:
            self.blind = self.broken = True
            return None
        if changed is None:
            self.blind = True
        return changed

    def stop(self) -> None:
        """Stop watching (the connection can start again); raises a redis-py error if the
        connection cannot be reused."""
        connection = self._connection
        connection.send_command("UNSUBSCRIBE", _CHANNEL)
        while True:  # changes sent meanwhile come first
            reply = connection.read_response()
            if not isinstance(reply, list):
                raise WatchLost(f"unexpected reply to UNSUBSCRIBE: {reply!r}")
            if reply[0] == b"unsubscribe":
                break
        connection.send_command("CLIENT", "TRACKING", "OFF")
        connection.read_response()

    def close(self) -> None:
        """Drop the connection (and with it any tracking)."""
        self._connection.disconnect()


class WatchPool:
    """Watch connections to one server, one kept between uses (a TLS handshake per
    capture would cost more than the watch saves on a mid-sized database).

    A server that refuses a watch (an ACL denying ``CLIENT`` or the channel) is not
    asked again by this pool: each refusal would add to its ACL log.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._idle: KeyWatch | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False
        #: What the server answered when it refused a watch, if it did.
        self.refused: str | None = None

    def watch(self, prefixes: Sequence[bytes]) -> KeyWatch | None:
        """A watch of ``prefixes`` started now, or None if there is none to be had."""
        with self._lock:
            if self._pid != os.getpid():
                # A forked child: the kept connection's socket is its parent's. Left
                # alone, as redis-py leaves its pool's.
                self._idle, self._pid = None, os.getpid()
            if self._closed or self.refused is not None:
                return None
            kept, self._idle = self._idle, None
        if kept is not None:
            if self._started(kept, prefixes, kept=True):
                return kept
        fresh = KeyWatch.connect(self._client)
        if fresh is not None and self._started(fresh, prefixes, kept=False):
            return fresh
        return None

    def _started(self, watch: KeyWatch, prefixes: Sequence[bytes], *, kept: bool) -> bool:
        """Start ``watch``; on failure close it and, if Redis refused it on a connection
        just made, remember why."""
        try:
            watch.start(prefixes)
            return True
        except redis.ResponseError as exc:
            if not kept:
                self.refused = str(exc)
                log.warning(
                    "Redis refused to report changed keys (CLIENT TRACKING and a "
                    "subscription to __redis__:invalidate: %s): captures on databases "
                    "above scan_in_script_max_keys check with a second SCAN, which misses "
                    "a key created and deleted between the two listings",
                    exc,
                )
        except REDIS_ERRORS:
            pass  # a kept connection the server dropped meanwhile (idle timeout, say)
        except BaseException:
            watch.close()
            raise
        watch.close()
        return False

    def release(self, watch: KeyWatch) -> None:
        """Stop ``watch``; keep its connection for the next one if it still works."""
        usable = not watch.broken
        if usable:
            try:
                watch.stop()
            except REDIS_ERRORS:
                usable = False
        if usable:
            with self._lock:
                if self._idle is None and not self._closed:
                    self._idle = watch
                    return
        watch.close()

    def close(self) -> None:
        """Drop the idle connection; watches in use are closed when released."""
        with self._lock:
            self._closed = True
            watch, self._idle = self._idle, None
        if watch is not None:
            watch.close()
