"""A small writer API for the platform's agents, in the same key layout."""

from __future__ import annotations

import json
from typing import Any

import redis
from redis.commands.core import Script

from ..errors import ValidationError
from ..layout import KeyLayout, validate_task_id
from . import scripts
from .connection import RedisClient, redis_errors

Value = bytes | str | int | float | dict[str, Any] | list[Any]


def _encode(value: Value) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | float):
        return repr(value).encode()
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _ttl(ttl_ms: int | None) -> int | None:
    if ttl_ms is None:
        return None
    if not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) or ttl_ms <= 0:
        raise ValidationError(f"TTL must be a positive number of milliseconds, not {ttl_ms!r}")
    return ttl_ms


class TaskWriter:
    """Writes one task's runtime state: agents, signals, queues and locks.

    Dicts and lists are stored as compact JSON, strings as UTF-8, bytes as they are.
    """

    def __init__(self, client: RedisClient, task_id: str, *, layout: KeyLayout | None = None):
        self.client = client
        self.task_id = validate_task_id(task_id)
        #: Default: the reference layout on one server, the cluster layout on a cluster.
        self.layout = layout or KeyLayout(cluster=not isinstance(client, redis.Redis))
        self._release = Script(client, scripts.RELEASE_IF_OWNER)

    def put_agent(self, agent_id: str, state: Value) -> bytes:
        """Store an agent's state under ``agent:<task>:<agent_id>``; returns the key."""
        key = self.layout.key("agent", self.task_id, agent_id)
        with redis_errors("writing agent state"):
            self.client.set(key, _encode(state))
        return key

    def set_signal(self, name: str, value: Value, *, ttl_ms: int | None = None) -> bytes:
        """Set a coordination signal, optionally expiring after ``ttl_ms``."""
        key = self.layout.key("signal", self.task_id, name)
        with redis_errors("writing a signal"):
            self.client.set(key, _encode(value), px=_ttl(ttl_ms))
        return key

    def push_queue(self, name: str, *items: Value) -> int:
        """Append items to a queue (a Redis list); returns its new length."""
        if not items:
            raise ValidationError("push_queue needs at least one item")
        key = self.layout.key("queue", self.task_id, name)
        with redis_errors("pushing to a queue"):
            return int(self.client.rpush(key, *(_encode(i) for i in items)))

    def acquire_lock(self, name: str, owner: str, *, ttl_ms: int) -> bool:
        """Take a lock for ``owner`` for ``ttl_ms``; False if someone holds it."""
        if not owner:
            raise ValidationError("lock owner token must not be empty")
        key = self.layout.key("lock", self.task_id, name)
        with redis_errors("acquiring a lock"):
            return bool(self.client.set(key, owner.encode(), nx=True, px=_ttl(ttl_ms)))

    def release_lock(self, name: str, owner: str) -> bool:
        """Release a lock, only if ``owner`` holds it; True if it was released."""
        key = self.layout.key("lock", self.task_id, name)
        with redis_errors("releasing a lock"):
            return bool(self._release(keys=[key], args=[owner.encode()]))
