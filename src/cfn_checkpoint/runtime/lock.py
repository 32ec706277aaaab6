"""The per-task lock that serializes create and recover of one task across processes.

A Redis key ``<prefix>cfn-checkpoint:lock:{<task>}`` holds a random owner token with a
TTL (on a Redis Cluster its hash tag puts it in the slot of the task's keys under the
cluster layout). A background thread extends the TTL while the holder works, so a long restore
keeps its lock, and a holder that dies loses it when the TTL runs out. Only the owner
token can extend or release it.
"""

from __future__ import annotations

import secrets
import threading
import time
from types import TracebackType

from redis.commands.core import Script

from ..errors import LockTimeoutError
from ..layout import validate_task_id
from . import scripts
from .connection import REDIS_ERRORS, RedisClient, redis_errors


class TaskLock:
    """A lock on one task; use as a context manager."""

    def __init__(
        self,
        client: RedisClient,
        task_id: str,
        *,
        prefix: str = "",
        ttl_ms: int = 30_000,
        timeout: float = 60.0,
    ) -> None:
        self.client = client
        self.task_id = validate_task_id(task_id)
        self.key = f"{prefix}cfn-checkpoint:lock:{{{task_id}}}".encode()
        self.ttl_ms = ttl_ms
        self.timeout = timeout
        self.token = secrets.token_hex(16).encode()
        self._release = Script(client, scripts.RELEASE_IF_OWNER)
        self._extend = Script(client, scripts.EXTEND_IF_OWNER)
        self._stop = threading.Event()
        #: Set when a renewal found the lock no longer ours.
        self.lost = threading.Event()
        self._renewer: threading.Thread | None = None

    def acquire(self) -> None:
        """Wait up to ``timeout`` seconds for the lock."""
        deadline = time.monotonic() + self.timeout
        delay = 0.002
        while True:
            with redis_errors(f"locking task {self.task_id}"):
                if self.client.set(self.key, self.token, nx=True, px=self.ttl_ms):
                    break
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"task {self.task_id} is locked by another create or recover "
                    f"(waited {self.timeout:g} s)"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
        self._stop.clear()
        self.lost.clear()
        self._renewer = threading.Thread(
            target=self._renew, name=f"cfn-lock-{self.task_id}", daemon=True
        )
        self._renewer.start()

    def _renew(self) -> None:
        interval = self.ttl_ms / 3000
        while not self._stop.wait(interval):
            try:
                if not self._extend(keys=[self.key], args=[self.token, self.ttl_ms]):
                    self.lost.set()  # expired or taken over: another holder may be working
                    return
            except REDIS_ERRORS:
                continue  # the next beat tries again (after a failover too); the TTL gives it time

    def check(self) -> None:
        """Raise :class:`LockTimeoutError` if the lock was lost while held."""
        if self.lost.is_set():
            raise LockTimeoutError(
                f"lost the lock of task {self.task_id} (its TTL ran out or another holder "
                "took it); nothing was written"
            )

    def release(self) -> None:
        """Give the lock back (only if still ours)."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
        with redis_errors(f"unlocking task {self.task_id}"):
            self._release(keys=[self.key], args=[self.token])

    def __enter__(self) -> TaskLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
