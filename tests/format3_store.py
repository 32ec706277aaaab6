"""Stores written by storage formats 3 and 4, kept so that later versions prove they read them.

``tests/data/format3.db`` was made by this module's ``main()`` with cfn-checkpoint at
commit ff25efa (format 3: row digests are SHA-1 in hex), on Redis 7.0:

    python tests/format3_store.py tests/data/format3.db redis://127.0.0.1:6379/0

``tests/data/format4.db`` was made the same way with cfn-checkpoint at commit 4e234e7
(format 4: row digests are XXH3-128; keyframe chunks are named by the SHA-256 of their
raw bytes), on Redis 7.0.

It holds two checkpoints of task ``task-f3`` under the key prefix :data:`PREFIX`: a
keyframe of :data:`FIRST`, then a delta to :data:`SECOND`. The TTLs are a century long
so the keys have not expired when the store is read.
"""

from __future__ import annotations

import sys
from typing import Any

import redis

PREFIX = "cfn-format3-fixture:"
TASK = "task-f3"
CENTURY_MS = 100 * 365 * 24 * 3600 * 1000

#: ``(role, name) -> (type, value, TTL or None)``.
FIRST: dict[tuple[str, str], tuple[str, Any, int | None]] = {
    ("agent", "coder"): ("string", b'{"status": "working", "step": 3}', None),
    ("agent", "profile"): ("hash", {b"model": b"sonnet", b"role": b"coder"}, None),
    ("signal", "done"): ("string", b"1", CENTURY_MS),
    ("signal", "members"): ("set", {b"coder", b"reviewer"}, None),
    ("queue", "tasks"): ("list", [b"t1", b"t2", b"t3"], None),
    ("queue", "ranked"): ("zset", {b"a": 1.5, b"b": 2.0}, None),
    ("lock", "leader"): ("string", b"coder", CENTURY_MS),
    **{("agent", f"worker-{i:02d}"): ("string", b'{"n": %d}' % i, None) for i in range(20)},
}
#: FIRST with one key changed, one added and one removed.
SECOND = {
    **{k: v for k, v in FIRST.items() if k != ("queue", "ranked")},
    ("agent", "coder"): ("string", b'{"status": "done", "step": 4}', None),
    ("agent", "reviewer"): ("string", b'{"status": "idle"}', None),
}


def write(client: redis.Redis, state: dict[tuple[str, str], tuple[str, Any, int | None]]) -> None:
    """Replace the task's keys with ``state`` (keys named as the reference layout does)."""
    from cfn_checkpoint import KeyLayout

    layout = KeyLayout(prefix=PREFIX)
    old = list(client.scan_iter(match=PREFIX + "*"))
    if old:
        client.delete(*old)
    for (role, name), (kind, value, ttl) in state.items():
        key = layout.key(role, TASK, name)
        if kind == "string":
            client.set(key, value)
        elif kind == "hash":
            client.hset(key, mapping=value)
        elif kind == "set":
            client.sadd(key, *value)
        elif kind == "list":
            client.rpush(key, *value)
        else:
            client.zadd(key, value)
        if ttl is not None:
            client.pexpire(key, ttl)


def main(db_path: str, redis_url: str) -> None:
    from cfn_checkpoint import CheckpointManager, KeyLayout

    client = redis.Redis.from_url(redis_url)
    with CheckpointManager.open(
        redis_url, f"sqlite:///{db_path}", layout=KeyLayout(prefix=PREFIX)
    ) as manager:
        manager.durable.record_task_result(TASK, "coder", {"ok": True}, confidence=0.9)
        manager.durable.record_agent_metric(TASK, "coder", "confidence", 0.9)
        write(client, FIRST)
        first = manager.create_checkpoint(TASK)
        write(client, SECOND)
        second = manager.create_checkpoint(TASK)
        print(first.checkpoint_id, first.format_version)
        print(second.checkpoint_id, second.format_version)
    write(client, {})


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
