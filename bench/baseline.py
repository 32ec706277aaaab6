"""The per-key baseline: the reference implementation's method, written plainly.

create: SCAN for the task's keys, then per key TYPE, PTTL and GET / LRANGE / HGETALL
/ SMEMBERS, each its own round trip; one JSON row per key inserted into SQLite in
one transaction. recover: read the rows, then one call per key to write it back
(SET with PX for strings; RPUSH / HSET / SADD, plus PEXPIRE for a collection with a
TTL). The client decodes replies to ``str``, as the reference did. Durable rows are
left out (as in the floor).
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import redis

from cfn_checkpoint import KeyLayout


def fresh_db(path: str) -> sqlite3.Connection:
    """A new SQLite file (WAL, synchronous NORMAL) with the baseline's table."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(
        "CREATE TABLE checkpoint_keys (task_id TEXT NOT NULL, key TEXT NOT NULL, "
        "type TEXT NOT NULL, pttl INTEGER NOT NULL, value TEXT NOT NULL)"
    )
    return db


def create(client: redis.Redis, db: sqlite3.Connection, task_id: str) -> tuple[float, int]:
    """Checkpoint the task key by key; returns (seconds, keys). ``client`` must decode
    responses (``decode_responses=True``)."""
    start = time.perf_counter()
    pattern = KeyLayout().scan_pattern(task_id).decode()
    rows: list[tuple[str, str, str, int, str]] = []
    for key in client.scan_iter(match=pattern, count=1000):
        kind = client.type(key)
        pttl = client.pttl(key)
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = client.hgetall(key)
        elif kind == "set":
            value = sorted(client.smembers(key))
        else:
            continue  # the reference handled these four types only
        rows.append((task_id, key, kind, pttl, json.dumps(value)))
    db.execute("BEGIN IMMEDIATE")
    db.executemany("INSERT INTO checkpoint_keys VALUES (?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    return time.perf_counter() - start, len(rows)


def recover(client: redis.Redis, db: sqlite3.Connection, task_id: str) -> tuple[float, int]:
    """Write the task's keys back, one call per key; returns (seconds, keys)."""
    start = time.perf_counter()
    rows = db.execute(
        "SELECT key, type, pttl, value FROM checkpoint_keys WHERE task_id = ?", (task_id,)
    ).fetchall()
    for key, kind, pttl, text in rows:
        value = json.loads(text)
        ttl = pttl if pttl > 0 else None
        if kind == "string":
            client.set(key, value, px=ttl)
            continue
        if kind == "list":
            client.rpush(key, *value)
        elif kind == "hash":
            client.hset(key, mapping=value)
        elif kind == "set":
            client.sadd(key, *value)
        if ttl is not None:
            client.pexpire(key, ttl)
    return time.perf_counter() - start, len(rows)
