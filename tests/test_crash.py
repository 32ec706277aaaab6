"""Crash atomicity (DESIGN guarantee 3), proven with SIGKILL against real servers.

A child Python process opens a CheckpointManager on the test Redis, the test's durable
store and the test's key prefix, and loops: write state ``n`` of the task (runtime keys
of every type and a durable row), then ``create_checkpoint`` with ``{"n": n}`` as its
metadata. The parent SIGKILLs it at a random moment, many times. (The children are
forked from one helper process that has imported the library once, so a kill costs
milliseconds instead of an interpreter start and many more kills fit in the budget;
each child opens its own connections after the fork.) After every kill:

* no checkpoint is ``in_progress``;
* every ``completed``/``recovered`` checkpoint has its payloads, loads and verifies,
  and holds exactly state ``n`` of its own metadata;
* every checkpoint the child saw returned is in the store, usable;
* recovery (runtime and durable) succeeds and restores exactly state ``n`` of the
  newest usable checkpoint, whatever half-written state the kill left behind.

The next child then continues from the recovered state.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cfn_checkpoint import CheckpointManager, CheckpointStatus, KeyLayout
from cfn_checkpoint.model import RedisType, RuntimeEntry

from conftest import task_state
from db_support import raw_sql

TASK = "crash-task"
AGENT_BLOB_BYTES = 16_384
ITERATIONS = 120
#: Wall-clock budget of the kill loop; it stops early when spent.
BUDGET_SECONDS = 30.0
MAX_KILL_DELAY = 0.15

# The helper ("zygote"): imports the library once, then forks one child per "spawn".
# The child writes state n with the same recipe as ``expected_state`` below, with plain
# commands one after another (not atomically), so a kill can land between any two.
# Every line is one os.write() of less than PIPE_BUF bytes: a kill never leaves half a
# line, and lines of the helper and its child never interleave.
ZYGOTE = r"""
import json, os, random, sys, traceback
from cfn_checkpoint import CheckpointConfig, CheckpointManager, KeyLayout

redis_url, db_url, prefix, task = sys.argv[1:5]


def say(line):
    os.write(1, (line + "\n").encode())


def child(start):
    me = os.getpid()
    config = CheckpointConfig(enable_auto_cleanup=False, lock_timeout=60.0)
    layout = KeyLayout(prefix=prefix, cluster=redis_url.startswith("redis+cluster:"))
    mgr = CheckpointManager.open(redis_url, db_url, layout=layout,
                                 config=config)
    r = mgr.runtime.client
    L = mgr.runtime.layout

    def key(role, name):
        return L.key(role, task, name)

    say(f"ready {me}")
    n = start
    while True:
        n += 1
        blob = random.Random(n).randbytes(BLOB).hex()
        r.set(key("agent", "coordinator"), json.dumps({"n": n, "blob": blob}, sort_keys=True))
        for w in range(3):
            r.delete(key("agent", f"worker-{w}"))
        r.set(key("agent", f"worker-{n % 3}"), str(n))
        r.delete(key("agent", "stats"))
        r.hset(key("agent", "stats"), mapping={"n": str(n), "parity": "odd" if n % 2 else "even"})
        r.set(key("signal", "phase"), f"phase-{n}", px=600_000)
        r.delete(key("signal", "members"))
        r.sadd(key("signal", "members"), *[f"m{i}" for i in range(n % 4 + 1)])
        r.delete(key("queue", "work"))
        r.rpush(key("queue", "work"), *[str(i) for i in range(max(1, n - 2), n + 1)])
        r.delete(key("queue", "prio"))
        r.zadd(key("queue", "prio"), {f"job-{n}": n, "base": 0})
        if n % 5 == 0:
            r.set(key("agent", "sometimes"), str(n))
        else:
            r.delete(key("agent", "sometimes"))
        r.set(key("lock", "leader"), f"owner-{n}", px=600_000)
        mgr.durable.record_agent_metric(task, "coordinator", "n", float(n))
        meta = mgr.create_checkpoint(task, "iteration_boundary", {"n": n})
        say(f"done {me} {meta.checkpoint_id} {n}")


say("zygote")
for line in sys.stdin:
    cmd, *args = line.split()
    if cmd == "spawn":
        pid = os.fork()
        if pid == 0:
            try:
                child(int(args[0]))
            except BaseException:
                traceback.print_exc()
                say(f"failed {os.getpid()}")
            finally:
                os._exit(1)
    elif cmd == "reap":
        _, status = os.waitpid(int(args[0]), 0)
        say(f"reaped {args[0]} {status}")
    else:
        break
""".replace("BLOB", str(AGENT_BLOB_BYTES))


def expected_state(layout: KeyLayout, n: int) -> dict[bytes, tuple[str, Any, bool]]:
    """State ``n`` as :func:`tests.conftest.task_state` reports it (type, value, has TTL)."""

    def key(role: str, name: str) -> bytes:
        return layout.key(role, TASK, name)

    blob = random.Random(n).randbytes(AGENT_BLOB_BYTES).hex()
    state: dict[bytes, tuple[str, Any, bool]] = {
        key("agent", "coordinator"): (
            "string",
            json.dumps({"n": n, "blob": blob}, sort_keys=True).encode(),
            False,
        ),
        key("agent", f"worker-{n % 3}"): ("string", str(n).encode(), False),
        key("agent", "stats"): (
            "hash",
            sorted([(b"n", str(n).encode()), (b"parity", b"odd" if n % 2 else b"even")]),
            False,
        ),
        key("signal", "phase"): ("string", f"phase-{n}".encode(), True),
        key("signal", "members"): (
            "set",
            sorted(f"m{i}".encode() for i in range(n % 4 + 1)),
            False,
        ),
        key("queue", "work"): (
            "list",
            [str(i).encode() for i in range(max(1, n - 2), n + 1)],
            False,
        ),
        key("queue", "prio"): ("zset", [(b"base", 0.0), (f"job-{n}".encode(), float(n))], False),
        key("lock", "leader"): ("string", f"owner-{n}".encode(), True),
    }
    if n % 5 == 0:
        state[key("agent", "sometimes")] = ("string", str(n).encode(), False)
    return dict(sorted(state.items()))


def entry_state(entry: RuntimeEntry) -> tuple[str, Any, bool]:
    """A captured entry in the same shape as ``task_state``."""
    has_ttl = entry.pttl_ms is not None
    if entry.type == RedisType.ZSET:
        return "zset", [(m, float(s)) for m, s in entry.value], has_ttl
    if entry.type == RedisType.HASH:
        return "hash", sorted(tuple(p) for p in entry.value), has_ttl
    if entry.type in (RedisType.LIST, RedisType.SET):
        return entry.type.value, list(entry.value), has_ttl
    if entry.type == RedisType.STRING:
        return "string", entry.value, has_ttl
    return entry.native_type or "dump", entry.value, has_ttl


def catalog(db_url: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(checkpoint_id, status, metadata)`` rows in commit order, read with plain SQL."""
    with raw_sql(db_url) as db:
        rows = db.rows(
            "SELECT checkpoint_id, task_id, status, metadata FROM checkpoints ORDER BY seq"
        )
    return [(cid, task, status, json.loads(meta)) for cid, task, status, meta in rows]


def payload_gaps(db_url: str, checkpoint_id: str) -> tuple[int, int]:
    """``(manifest entries, manifest entries whose payload row is missing)``."""
    with raw_sql(db_url) as db:
        ((total, missing),) = db.rows(
            "SELECT COUNT(*), COALESCE(SUM(CASE WHEN p.digest IS NULL THEN 1 ELSE 0 END), 0) "
            "FROM checkpoint_payloads c LEFT JOIN payloads p ON p.digest = c.digest "
            "WHERE c.checkpoint_id = ?",
            (checkpoint_id,),
        )
    return int(total), int(missing)


def metric_values(db_url: str) -> list[float]:
    with raw_sql(db_url) as db:
        rows = db.rows("SELECT value FROM agent_metrics WHERE task_id = ? ORDER BY id", (TASK,))
    return [float(v) for (v,) in rows]


def lock_key(prefix: str) -> bytes:
    return f"{prefix}cfn-checkpoint:lock:{{{TASK}}}".encode()


class Zygote:
    """The helper process that forks the children (see ``ZYGOTE``)."""

    def __init__(self, script: Path, stderr: Path, *args: str) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.stderr = stderr
        self.child: int | None = None  # the forked child currently running, if any
        with stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                env=env,
            )
        assert self.readline() == ["zygote"]

    def readline(self) -> list[str]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line:
            pytest.fail(f"crash helper ended: {self.stderr.read_text(errors='replace')}")
        words = line.split()
        if words[0] == "failed":
            pytest.fail(f"child failed on its own: {self.stderr.read_text(errors='replace')}")
        return words

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def run_and_kill(self, start: int, delay: float) -> list[tuple[str, int]]:
        """Fork a child numbering from ``start``, SIGKILL it ``delay`` s after it is ready.

        Returns the checkpoints the child saw ``create_checkpoint`` return.
        """
        self.send(f"spawn {start}")
        words = self.readline()  # blocks until the child has opened both tiers
        assert words[0] == "ready", words
        pid = self.child = int(words[1])
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        self.send(f"reap {pid}")
        reported = []
        while True:  # every line the child wrote comes before the helper's "reaped"
            words = self.readline()
            if words[0] == "done" and int(words[1]) == pid:
                reported.append((words[2], int(words[3])))
            elif words[0] == "reaped" and int(words[1]) == pid:
                self.child = None
                status = int(words[2])
                assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (
                    f"child ended by itself ({status}): {self.stderr.read_text(errors='replace')}"
                )
                return reported

    def close(self) -> None:
        if self.child is not None:  # a test failure left a child running: stop it
            try:
                os.kill(self.child, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc.poll() is None:
            if self.child is not None:
                self.send(f"reap {self.child}")
            self.send("exit")
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.proc.stdout.close()
        self.proc.stdin.close()


@pytest.fixture()
def zygote(tmp_path: Path, redis_url: str, db_url: str, prefix: str) -> Iterator[Zygote]:
    script = tmp_path / "crash_zygote.py"
    script.write_text(ZYGOTE)
    helper = Zygote(script, tmp_path / "crash_zygote.err", redis_url, db_url, prefix, TASK)
    yield helper
    helper.close()


@pytest.mark.slow
def test_sigkill_during_create_never_leaves_a_usable_broken_checkpoint(
    manager: CheckpointManager,
    client: redis.Redis,
    db_url: str,
    prefix: str,
    zygote: Zygote,
) -> None:
    layout = manager.runtime.layout
    rng = random.Random(int.from_bytes(os.urandom(4), "big"))

    verified: set[str] = set()
    iterations = 0
    reported_total = 0
    deadline = time.monotonic() + BUDGET_SECONDS
    while iterations < ITERATIONS and time.monotonic() < deadline:
        iterations += 1
        # Each child numbers its states from its own range, above every earlier one (a
        # child may have written a state, durable row included, that no checkpoint kept).
        start = iterations * 100_000
        delay = rng.uniform(0.0, MAX_KILL_DELAY)
        reported = zygote.run_and_kill(start, delay)
        reported_total += len(reported)
        where = f"iteration {iterations} (killed {delay * 1000:.0f} ms after ready)"

        # A killed child leaves its per-task lock behind for its 30 s TTL.
        client.delete(lock_key(prefix))

        rows = catalog(db_url)
        statuses = {cid: status for cid, _, status, _ in rows}
        assert all(status != CheckpointStatus.IN_PROGRESS for status in statuses.values()), where
        assert all(task == TASK for _, task, _, _ in rows), where
        # The child was killed, never failed on its own: no failed row either.
        assert all(status != CheckpointStatus.FAILED for status in statuses.values()), where

        # Every checkpoint create_checkpoint returned is stored and usable.
        for cid, n in reported:
            assert statuses.get(cid) in ("completed", "recovered"), (where, cid, n)

        usable = [
            (cid, meta["n"])
            for cid, _, status, meta in rows
            if status in ("completed", "recovered")
        ]
        ns = [n for _, n in usable]
        assert ns == sorted(set(ns)), f"{where}: usable checkpoints out of order: {ns}"
        for cid, n in usable:
            if cid in verified:
                continue
            total, missing = payload_gaps(db_url, cid)
            assert total > 0 and missing == 0, f"{where}: {cid} has {missing}/{total} missing"
            loaded = manager.load_checkpoint(cid)  # verifies every hash; must not raise
            assert loaded.meta.metadata == {"n": n}
            got = {e.key: entry_state(e) for e in loaded.entries}
            assert dict(sorted(got.items())) == expected_state(layout, n), f"{where}: {cid}"
            values = [
                float(r[loaded.tables["agent_metrics"].columns.index("value")])
                for r in loaded.tables["agent_metrics"].rows
            ]
            assert values and values[-1] == float(n), f"{where}: {cid} durable rows {values}"
            verified.add(cid)

        if not usable:
            continue  # killed before the first checkpoint ever completed
        newest_id, newest_n = usable[-1]
        result = manager.recover_from_checkpoint(TASK, restore_durable=True)
        assert result.success and not result.errors, (where, result)
        assert result.checkpoint_id == newest_id, where
        assert result.runtime_state_restored and result.durable_state_restored
        assert task_state(client, prefix) == expected_state(layout, newest_n), where
        values = metric_values(db_url)
        assert values and values[-1] == float(newest_n), f"{where}: durable rows {values}"
        assert values == sorted(set(values)), f"{where}: durable rows {values}"
        assert manager.get_checkpoint(newest_id).status == CheckpointStatus.RECOVERED

    # The loop must have exercised something: many kills, many checkpoints.
    assert iterations >= 8, f"only {iterations} iterations fit in the budget"
    assert len(verified) >= iterations, (len(verified), iterations, reported_total)
    final = catalog(db_url)
    assert not [r for r in final if r[2] == CheckpointStatus.IN_PROGRESS]
