"""Many worker processes creating and recovering checkpoints of many tasks at once.

Writers change each task as a whole: one Lua script sets every key of a task to a
new generation number (and adds or removes one key), so any state a reader sees
that mixes generations, or misses a key, was torn by an interleaved restore. Four
worker processes then do, on 52 tasks (a few of them hot): whole-task writes,
``create_checkpoint`` and ``recover_from_checkpoint``, each opening its own manager.

Afterwards: every checkpoint a worker was given exists, verifies and holds one
generation; no two creates or recoveries of one task overlap in time (from the
catalog and the recovery log); and every task recovered from its newest checkpoint
is exactly what that checkpoint holds.
"""

from __future__ import annotations

import multiprocessing
import random
import traceback
from datetime import datetime
from typing import Any

import pytest

from cfn_checkpoint import CheckpointManager, KeyLayout
from cfn_checkpoint.model import RedisType, RuntimeEntry

TASKS = [f"mw-{i:02d}" for i in range(52)]
HOT = TASKS[:3]
#: Keys each hot task has besides its whole-task keys, so its operations take a while
#: and overlap (they hold no generation and never change).
HOT_BULK = 3_000
WORKERS = 4
OPS_PER_WORKER = 45
TTL_MS = 600_000

#: Sets every key of one task to generation ARGV[1]; the ``extra`` signal exists only
#: for even generations, so the key set changes too.
WRITE_GENERATION = """
local g = ARGV[1]
redis.call('SET', KEYS[1], '{"gen":' .. g .. ',"role":"coder"}')
redis.call('SET', KEYS[2], '{"gen":' .. g .. ',"role":"tester"}')
redis.call('SET', KEYS[3], g, 'PX', ARGV[2])
if tonumber(g) % 2 == 0 then
    redis.call('SET', KEYS[4], g)
else
    redis.call('DEL', KEYS[4])
end
redis.call('DEL', KEYS[5])
redis.call('RPUSH', KEYS[5], g, g, g)
redis.call('SET', KEYS[6], g, 'PX', ARGV[2])
redis.call('HSET', KEYS[7], 'gen', g, 'status', 'working')
redis.call('DEL', KEYS[8])
redis.call('SADD', KEYS[8], g, 'member-a', 'member-b')
return 1
"""


def task_keys(layout: KeyLayout, task: str) -> list[bytes]:
    return [
        layout.key("agent", task, "coder"),
        layout.key("agent", task, "tester"),
        layout.key("signal", task, "ready"),
        layout.key("signal", task, "extra"),
        layout.key("queue", task, "inbox"),
        layout.key("lock", task, "owner"),
        layout.key("agent", task, "profile"),
        layout.key("signal", task, "members"),
    ]


def write_generation(client: Any, layout: KeyLayout, task: str, generation: int) -> None:
    client.eval(WRITE_GENERATION, 8, *task_keys(layout, task), generation, TTL_MS)


def _generations(entry: RuntimeEntry) -> set[int]:
    value = entry.value
    if entry.type is RedisType.STRING:
        text = value.decode()
        return {int(text.split(":", 1)[1].split(",", 1)[0]) if text.startswith("{") else int(text)}
    if entry.type is RedisType.LIST:
        return {int(v) for v in value}
    if entry.type is RedisType.HASH:
        return {int(v) for f, v in value if f == b"gen"}
    if entry.type is RedisType.SET:
        return {int(v) for v in value if v.isdigit()}
    raise AssertionError(f"unexpected type {entry.type} of {entry.key!r}")


def generation_of(layout: KeyLayout, task: str, entries: list[RuntimeEntry]) -> int:
    """The one generation a whole-task state holds; fails on a torn or partial state."""
    found: set[int] = set()
    for entry in entries:
        found |= _generations(entry)
    assert len(found) == 1, f"task {task} mixes generations {sorted(found)}"
    generation = found.pop()
    keys = task_keys(layout, task)
    expected = set(keys) if generation % 2 == 0 else set(keys) - {keys[3]}
    bulk = layout.key("agent", task, "bulk")
    whole = {e.key for e in entries if not e.key.startswith(bulk)}
    assert whole == expected, f"task {task} has the wrong keys"
    return generation


def _worker(
    index: int, redis_url: str, db_url: str, layout: KeyLayout, start: Any, out: Any
) -> None:
    """One worker process: its own manager, a seeded mix of operations."""
    rng = random.Random(1000 + index)
    created: list[tuple[str, str]] = []
    try:
        with CheckpointManager.open(redis_url, db_url, layout=layout) as mgr:
            client = mgr.runtime.client
            start.wait(60)
            for op in range(OPS_PER_WORKER):
                task = rng.choice(HOT) if rng.random() < 0.5 else rng.choice(TASKS)
                roll = rng.random()
                if roll < 0.35:
                    write_generation(client, layout, task, index * 10_000 + op + 2)
                elif roll < 0.75:
                    meta = mgr.create_checkpoint(task)
                    created.append((task, meta.checkpoint_id))
                else:
                    choices = mgr.list_checkpoints(task)
                    target = rng.choice(choices).checkpoint_id if choices else None
                    result = mgr.recover_from_checkpoint(task, target)
                    assert result.success, result.errors
                    # Writers may have moved on since, but never tear a task.
                    generation_of(layout, task, mgr.live_state(task).entries)
        out.put((index, created, None))
    except BaseException:
        out.put((index, created, traceback.format_exc()))


def _intervals_overlap(spans: list[tuple[datetime, datetime, str]]) -> list[str]:
    spans = sorted(spans)
    return [
        f"{a[2]} ({a[0]}..{a[1]}) overlaps {b[2]} ({b[0]}..{b[1]})"
        for a, b in zip(spans, spans[1:], strict=False)
        if b[0] < a[1]
    ]


@pytest.mark.slow
def test_many_workers_create_and_recover_concurrently(
    redis_url: str, db_url: str, layout: KeyLayout, manager: CheckpointManager
) -> None:
    client = manager.runtime.client
    for task in HOT:
        bulk = layout.key("agent", task, "bulk")
        pipe = client.pipeline(transaction=False)
        for i in range(HOT_BULK):
            pipe.hset(bulk + b"-%d" % i, mapping={"note": "x" * 200})
        pipe.execute()
    for generation, task in enumerate(TASKS, start=2):
        write_generation(client, layout, task, generation)
        manager.durable.record_audit_event(task, "started")
        manager.create_checkpoint(task)

    context = multiprocessing.get_context("spawn")
    start = context.Event()
    out = context.Queue()
    workers = [
        context.Process(target=_worker, args=(i, redis_url, db_url, layout, start, out))
        for i in range(WORKERS)
    ]
    for process in workers:
        process.start()
    start.set()
    reports = [out.get(timeout=600) for _ in workers]
    for process in workers:
        process.join(60)
        assert process.exitcode == 0
    failures = [error for _, _, error in reports if error]
    assert not failures, "\n".join(failures)

    # No checkpoint lost, each a whole-task state.
    created = [pair for _, pairs, _ in reports for pair in pairs]
    assert len(created) >= 40, f"only {len(created)} creates ran"
    for task, checkpoint_id in created:
        meta = manager.verify_checkpoint(checkpoint_id)
        assert meta.task_id == task
        generation_of(layout, task, manager.load_checkpoint(checkpoint_id).entries)

    # No two creates or recoveries of one task interleaved.
    spans: dict[str, list[tuple[datetime, datetime, str]]] = {t: [] for t in TASKS}
    for task in TASKS:
        for meta in manager.list_checkpoints(task):
            assert meta.completed_at is not None, meta
            spans[task].append((meta.created_at, meta.completed_at, meta.checkpoint_id))
    with manager.store.reading() as db:
        rows = db.execute(
            "SELECT task_id, started_at, recovered_at, status FROM recoveries"
        ).fetchall()
    recovered = 0
    for task, started, finished, status in rows:
        assert status == "done", (task, status)
        spans[task].append(
            (datetime.fromisoformat(started), datetime.fromisoformat(finished), "recovery")
        )
        recovered += 1
    assert recovered >= 20, f"only {recovered} recoveries ran"
    overlaps = [o for task in TASKS for o in _intervals_overlap(spans[task])]
    assert not overlaps, overlaps[:5]

    # Every recovery exact: each task back to its newest checkpoint, key for key.
    for task in TASKS:
        result = manager.recover_from_checkpoint(task)
        assert result.success, result.errors
        contents = manager.load_checkpoint(result.checkpoint_id)
        live = manager.live_state(task)
        assert [(e.key, e.type, e.value) for e in live.entries] == [
            (e.key, e.type, e.value) for e in contents.entries
        ]
        assert [e.pttl_ms is None for e in live.entries] == [
            e.pttl_ms is None for e in contents.entries
        ]
        assert live.tables == contents.tables


def test_generation_check_catches_a_torn_state(
    layout: KeyLayout, manager: CheckpointManager
) -> None:
    """The invariant the test above relies on does fail on a mixed or partial state."""
    client = manager.runtime.client
    write_generation(client, layout, "torn", 4)
    assert generation_of(layout, "torn", manager.live_state("torn").entries) == 4
    client.set(task_keys(layout, "torn")[0], b'{"gen":5,"role":"coder"}')
    with pytest.raises(AssertionError, match="mixes generations"):
        generation_of(layout, "torn", manager.live_state("torn").entries)
    write_generation(client, layout, "torn", 6)
    client.delete(task_keys(layout, "torn")[4])
    with pytest.raises(AssertionError, match="wrong keys"):
        generation_of(layout, "torn", manager.live_state("torn").entries)
