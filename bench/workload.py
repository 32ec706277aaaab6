"""The benchmark workload: one task of N runtime keys plus some durable rows, seeded.

Mix of the N keys (counts in :func:`counts`):

* hashes and sets: ``max(2, N // 200)`` each (about 0.5% each);
* the rest: 40% agent states (JSON strings of 270-330 bytes), 30% signals (short
  strings or small JSON, half with a TTL), 20% queues (lists of 5-10 JSON items of
  ~60-100 bytes), 10% locks (owner tokens with a TTL).

TTLs are 2 to 12 hours, so nothing expires while a benchmark runs. Durable rows:
``max(10, N // 100)`` audit events, ``max(10, N // 200)`` agent metrics,
``max(5, N // 1000)`` task results for the task, and 10 global skills.

Everything is derived from ``(n, seed)``: the same arguments give the same keys and
bytes. Run as a script it populates a Redis (and a SQLite store) from a separate
process, which is how ``memory.py`` keeps the generator out of the measured process::

    python bench/workload.py --redis-url unix:///path/redis.sock \
        --durable-url sqlite:////tmp/x.db -n 1000000
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import redis
from redis.cluster import RedisCluster

from cfn_checkpoint import CheckpointManager, KeyLayout
from cfn_checkpoint.durable.sql import SqlStore

TASK_ID = "bench-task"
SEED = 20240601

_HOUR_MS = 3_600_000
_WORDS = (
    "plan review patch test build deploy refactor parse index cache merge lint verify "
    "score rank fetch retry split encode decode schema model route handler service "
    "client server queue worker token budget prompt context summary diff commit branch "
    "config module package import export render layout widget session request response"
).split()
_ROLES = ("coder", "tester", "reviewer", "architect", "planner", "researcher")
_STATUSES = ("idle", "thinking", "working", "waiting", "blocked", "done")
_SIGNALS = ("ready", "review", "blocked", "done", "go", "hold")

#: Keys per pipeline round trip while populating or changing.
_PIPELINE_KEYS = 2_000


@dataclass(frozen=True, slots=True)
class Counts:
    """How many keys of each kind a task of ``n`` keys has."""

    agents: int
    signals: int
    queues: int
    locks: int
    hashes: int
    sets: int

    @property
    def total(self) -> int:
        return self.agents + self.signals + self.queues + self.locks + self.hashes + self.sets


@dataclass(frozen=True, slots=True)
class Populated:
    """What :func:`populate_redis` wrote."""

    keys: int
    #: Sum of key bytes and value bytes (string value; list items; hash fields and
    #: values; set members).
    raw_bytes: int
    with_ttl: int


def counts(n: int) -> Counts:
    """The mix of a task of ``n`` keys (``n`` >= 20)."""
    if n < 20:
        raise ValueError(f"the workload needs at least 20 keys, not {n}")
    extra = max(2, n // 200)
    rest = n - 2 * extra
    agents = round(rest * 0.4)
    signals = round(rest * 0.3)
    queues = round(rest * 0.2)
    return Counts(agents, signals, queues, rest - agents - signals - queues, extra, extra)


@dataclass(frozen=True, slots=True)
class Key:
    """One generated key: ``kind`` is string, list, hash or set."""

    key: bytes
    kind: str
    value: bytes | list[bytes]
    ttl_ms: int | None

    def raw_size(self) -> int:
        if isinstance(self.value, bytes):
            return len(self.key) + len(self.value)
        return len(self.key) + sum(len(v) for v in self.value)


def _agent_state(rng: random.Random, i: int, iteration: int | None = None) -> bytes:
    state: dict[str, Any] = {
        "agent_id": f"agent-{i:07d}",
        "role": rng.choice(_ROLES),
        "iteration": iteration if iteration is not None else rng.randint(1, 50),
        "status": rng.choice(_STATUSES),
        "confidence": round(rng.random(), 3),
        "files": [
            f"src/{rng.choice(_WORDS)}/{rng.choice(_WORDS)}.py" for _ in range(rng.randint(1, 3))
        ],
        "last_action": f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}",
        "tokens": rng.randint(100, 50_000),
        "trace_id": f"{rng.getrandbits(64):016x}",
        "updated_ms": 1_700_000_000_000 + rng.randrange(10**9),
        "notes": "",
    }
    base = len(json.dumps(state, separators=(",", ":"), sort_keys=True))
    need = max(0, rng.randint(270, 330) - base)
    words: list[str] = []
    size = 0
    while size < need:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    state["notes"] = " ".join(words)[:need]
    return json.dumps(state, separators=(",", ":"), sort_keys=True).encode()


def _signal_value(rng: random.Random, agents: int) -> bytes:
    if rng.random() < 0.5:
        return rng.choice(_SIGNALS).encode()
    value = {
        "phase": rng.choice(_WORDS),
        "round": rng.randint(1, 20),
        "by": f"agent-{rng.randrange(agents):07d}",
    }
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def _queue_item(rng: random.Random, agents: int) -> bytes:
    item = {
        "id": f"msg-{rng.getrandbits(40):010x}",
        "from": f"agent-{rng.randrange(agents):07d}",
        "kind": rng.choice(_WORDS),
        "priority": rng.randint(0, 9),
        "body": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 7))),
    }
    return json.dumps(item, separators=(",", ":"), sort_keys=True).encode()


def _lock_owner(rng: random.Random, agents: int) -> bytes:
    return f"agent-{rng.randrange(agents):07d}-{rng.getrandbits(32):08x}".encode()


def _ttl(rng: random.Random) -> int:
    return rng.randint(2 * _HOUR_MS, 12 * _HOUR_MS)


def generate(
    n: int, *, seed: int = SEED, task_id: str = TASK_ID, layout: KeyLayout | None = None
) -> Iterator[Key]:
    """The task's keys, one at a time (so a million need not be held at once), named
    by ``layout`` (the reference layout by default)."""
    _key = (layout or KeyLayout()).key
    c = counts(n)
    rng = random.Random(seed)
    agents = max(1, c.agents)
    for i in range(c.agents):
        yield Key(_key("agent", task_id, f"agent-{i:07d}"), "string", _agent_state(rng, i), None)
    for i in range(c.signals):
        ttl = _ttl(rng) if i % 2 == 0 else None
        name = f"signal-{i:07d}"
        yield Key(_key("signal", task_id, name), "string", _signal_value(rng, agents), ttl)
    for i in range(c.queues):
        items = [_queue_item(rng, agents) for _ in range(rng.randint(5, 10))]
        yield Key(_key("queue", task_id, f"queue-{i:07d}"), "list", items, None)
    for i in range(c.locks):
        name = f"lock-{i:07d}"
        yield Key(_key("lock", task_id, name), "string", _lock_owner(rng, agents), _ttl(rng))
    for i in range(c.hashes):
        fields: list[bytes] = []
        for j in range(rng.randint(5, 15)):
            fields.append(f"{rng.choice(_WORDS)}-{j}".encode())
            fields.append(str(rng.randint(0, 10**6)).encode())
        yield Key(_key("agent", task_id, f"profile-{i:07d}"), "hash", fields, None)
    for i in range(c.sets):
        members = {f"agent-{rng.randrange(agents):07d}".encode() for _ in range(rng.randint(5, 15))}
        yield Key(_key("signal", task_id, f"members-{i:07d}"), "set", sorted(members), None)


def _write(pipe: Any, item: Key) -> None:
    if item.kind == "string":
        pipe.set(item.key, item.value, px=item.ttl_ms)
        return
    assert isinstance(item.value, list)
    if item.kind == "list":
        pipe.rpush(item.key, *item.value)
    elif item.kind == "hash":
        pipe.hset(item.key, items=item.value)
    else:
        pipe.sadd(item.key, *item.value)
    if item.ttl_ms is not None:
        pipe.pexpire(item.key, item.ttl_ms)


def populate_redis(client: redis.Redis | RedisCluster, items: Iterable[Key]) -> Populated:
    """Write generated keys (pipelined, no transaction): ``populate_redis(client,
    generate(n))``, or a list of them kept to populate again faster."""
    keys = raw = with_ttl = 0
    pipe = client.pipeline(transaction=False)
    for item in items:
        _write(pipe, item)
        keys += 1
        raw += item.raw_size()
        with_ttl += item.ttl_ms is not None
        if keys % _PIPELINE_KEYS == 0:
            pipe.execute()
    pipe.execute()
    return Populated(keys, raw, with_ttl)


def populate_durable(store: SqlStore, n: int, *, seed: int = SEED, task_id: str = TASK_ID) -> int:
    """Add the task's durable rows and the global skills; returns the task's row count."""
    rng = random.Random(seed + 7)
    agents = max(1, counts(n).agents)
    rows = 0
    for i in range(max(10, n // 100)):
        store.record_audit_event(
            task_id,
            rng.choice(_WORDS),
            agent_id=f"agent-{rng.randrange(agents):07d}",
            details={"step": i, "note": f"{rng.choice(_WORDS)} {rng.choice(_WORDS)}"},
        )
        rows += 1
    for _ in range(max(10, n // 200)):
        store.record_agent_metric(
            task_id, f"agent-{rng.randrange(agents):07d}", rng.choice(_WORDS), rng.random()
        )
        rows += 1
    for i in range(max(5, n // 1000)):
        store.record_task_result(
            task_id,
            f"agent-{rng.randrange(agents):07d}",
            {"result": i, "summary": " ".join(rng.choice(_WORDS) for _ in range(8))},
            confidence=round(rng.random(), 3),
        )
        rows += 1
    for j in range(10):
        store.put_skill(
            f"skill-{j}", name=rng.choice(_WORDS), version="1.0", metadata={"weight": j}
        )
    return rows


def change_fraction(
    client: redis.Redis | RedisCluster,
    n: int,
    fraction: float = 0.01,
    *,
    seed: int = SEED,
    task_id: str = TASK_ID,
    layout: KeyLayout | None = None,
) -> int:
    """Change the value of ``fraction`` of the task's keys, chosen at random (seeded),
    keeping each key's type and TTL. Returns how many keys changed."""
    _key = (layout or KeyLayout()).key
    c = counts(n)
    agents = max(1, c.agents)
    rng = random.Random(seed + 1)
    chosen = sorted(rng.sample(range(c.total), max(1, round(c.total * fraction))))
    pipe = client.pipeline(transaction=False)
    bounds = [
        ("agent", c.agents),
        ("signal", c.signals),
        ("queue", c.queues),
        ("lock", c.locks),
        ("hash", c.hashes),
        ("set", c.sets),
    ]
    for index in chosen:
        kind, i = _locate(bounds, index)
        if kind == "agent":
            state = _agent_state(rng, i, iteration=51 + rng.randrange(50))
            pipe.set(_key("agent", task_id, f"agent-{i:07d}"), state)
        elif kind == "signal":
            value = _signal_value(rng, agents)
            pipe.set(_key("signal", task_id, f"signal-{i:07d}"), value, keepttl=True)
        elif kind == "queue":
            item = _queue_item(rng, agents).decode()
            pipe.lset(_key("queue", task_id, f"queue-{i:07d}"), 0, item)
        elif kind == "lock":
            owner = _lock_owner(rng, agents)
            pipe.set(_key("lock", task_id, f"lock-{i:07d}"), owner, keepttl=True)
        elif kind == "hash":
            pipe.hset(_key("agent", task_id, f"profile-{i:07d}"), "updated", str(index))
        else:
            member = f"agent-{agents + index:07d}"
            pipe.sadd(_key("signal", task_id, f"members-{i:07d}"), member)
    pipe.execute()
    return len(chosen)


def _locate(bounds: list[tuple[str, int]], index: int) -> tuple[str, int]:
    for kind, size in bounds:
        if index < size:
            return kind, index
        index -= size
    raise IndexError(index)


def main() -> None:
    parser = argparse.ArgumentParser(description="Populate the benchmark workload.")
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--durable-url", help="also add the durable rows to this store")
    parser.add_argument("-n", type=int, required=True, help="number of runtime keys")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--task", default=TASK_ID)
    args = parser.parse_args()
    client = redis.Redis.from_url(args.redis_url)
    done = populate_redis(client, generate(args.n, seed=args.seed, task_id=args.task))
    rows = 0
    if args.durable_url:
        with CheckpointManager.open(args.redis_url, args.durable_url) as manager:
            rows = populate_durable(manager.durable, args.n, seed=args.seed, task_id=args.task)
    print(json.dumps({**asdict(done), "rows": rows}))


if __name__ == "__main__":
    main()
