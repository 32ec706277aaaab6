"""``cfn-checkpoint demo``: a CFN Loop task checkpointed, crashed and recovered, end to end.

Four agents (coordinator, coder, reviewer, tester) work on one task for three
iterations, writing agent state, signals with TTLs, queues, locks with owner tokens
and TTLs, and durable rows; a checkpoint is taken at each iteration boundary. Then
the task crashes: its runtime keys are wiped, its audit trail is deleted, and work
done after the last checkpoint is half-written. Recovery must put back every key and
every row exactly as they were at the last checkpoint.

The check does not trust the library: the expected state is read with plain Redis
commands and plain SQL right after the last checkpoint, and compared with what the
same reads find after recovery (:func:`read_runtime_state`, :func:`read_durable_state`,
:func:`compare_runtime`, :func:`compare_durable`).

With no Redis URL the demo runs on an embedded ``redis-server``; with one, every key
it writes lives under a unique prefix and is removed afterwards. The durable tier is
always a SQLite file in a temporary directory.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit, urlunsplit

from redis.cluster import RedisCluster
from redis.crc import key_slot

from ._render import human_size
from ._views import checkpoint_json, recovery_json
from .config import redis_url_from_env
from .durable.schema import SKILL_TABLE, TASK_TABLES
from .layout import ROLES, KeyLayout, escape_glob
from .manager import CheckpointManager
from .model import CheckpointMetadata, CheckpointTrigger, RecoveryResult
from .runtime.connection import RedisClient, is_cluster_url

__all__ = [
    "AGENTS",
    "ITERATIONS",
    "TASK_ID",
    "Check",
    "DemoReport",
    "DurableState",
    "KeyState",
    "RuntimeState",
    "compare_durable",
    "compare_runtime",
    "format_report",
    "report_json",
    "read_durable_state",
    "read_runtime_state",
    "run_demo",
]

#: The demo task, and a second task that shares the stores and must be left untouched.
TASK_ID = "cfn-demo"
BYSTANDER_ID = "cfn-demo-bystander"
#: The agents of the simulated CFN Loop.
AGENTS: tuple[str, ...] = ("coordinator", "coder", "reviewer", "tester")
#: Iterations, each ending with an ``iteration_boundary`` checkpoint.
ITERATIONS = 3
#: TTL of the tester's lock taken in the last iteration: it runs out during the crash.
SHORT_LOCK_TTL_MS = 800
#: A restored TTL may exceed the expected one by this much (clock reads, round trips).
TTL_SLACK_MS = 1_000
_READ_ATTEMPTS = 5


# -- independent reads ---------------------------------------------------------------------


class KeyState(NamedTuple):
    """One Redis key as plain commands see it."""

    #: The Redis type name (``string``, ``list``, ``hash``, ``set``, ``zset``, ``stream``...).
    type: str
    #: Canonical value: bytes (string; DUMP payload of other types), a list of bytes (list,
    #: set sorted), a list of pairs (hash sorted by field; zset member and float score in
    #: rank order; stream entry id and its field/value pairs, in id order).
    value: Any
    #: TTL left when read, ``None`` for a key without one.
    pttl_ms: int | None


@dataclass(frozen=True, slots=True)
class RuntimeState:
    """Keys under a few named prefixes, read in one MULTI/EXEC with the server clock."""

    #: Group name (a namespace) -> the key prefix the group covers, in display order.
    groups: dict[str, bytes]
    keys: dict[bytes, KeyState]
    #: Server clock (ms since the epoch) at the read.
    read_at_ms: int

    def group_of(self, key: bytes) -> str | None:
        """The group whose prefix ``key`` starts with."""
        for name, prefix in self.groups.items():
            if key.startswith(prefix):
                return name
        return None


@dataclass(frozen=True, slots=True)
class DurableState:
    """Rows of a few tables, each in primary-key order."""

    tables: dict[str, list[tuple[Any, ...]]]


def task_groups(layout: KeyLayout, task_id: str) -> dict[str, bytes]:
    """The four namespaces of ``task_id`` as read groups, named after their namespace."""
    return {getattr(layout, role): layout.task_prefix(role, task_id) for role in ROLES}


def _scan(client: RedisClient, prefixes: Sequence[bytes]) -> list[bytes]:
    found: set[bytes] = set()
    for prefix in prefixes:
        for key in client.scan_iter(match=escape_glob(prefix) + b"*", count=1000):
            if key.startswith(prefix):
                found.add(key)
    return sorted(found)


def _queue_value(pipe: Any, key: bytes, kind: str) -> None:
    if kind == "string":
        pipe.execute_command("GET", key)
    elif kind == "list":
        pipe.execute_command("LRANGE", key, 0, -1)
    elif kind == "hash":
        pipe.execute_command("HGETALL", key)
    elif kind == "set":
        pipe.execute_command("SMEMBERS", key)
    elif kind == "zset":
        pipe.execute_command("ZRANGE", key, 0, -1, "WITHSCORES")
    elif kind == "stream":
        pipe.execute_command("XRANGE", key, "-", "+")
    else:
        pipe.execute_command("DUMP", key)


def _pairs(reply: Any) -> list[tuple[Any, Any]]:
    if isinstance(reply, dict):
        return list(reply.items())
    items = list(reply)
    if items and isinstance(items[0], list | tuple):
        return [(a, b) for a, b in items]
    return [(items[i], items[i + 1]) for i in range(0, len(items), 2)]


def _canonical(kind: str, reply: Any) -> Any:
    if kind in ("string", "list"):
        return reply if kind == "string" else list(reply)
    if kind == "hash":
        return sorted(_pairs(reply))
    if kind == "set":
        return sorted(reply)
    if kind == "zset":
        # redis-py parses scores to floats; equal doubles are equal scores.
        return [(m, float(s)) for m, s in _pairs(reply)]
    if kind == "stream":
        return [(entry_id, _pairs(fields)) for entry_id, fields in reply]
    return reply


def read_runtime_state(client: RedisClient, groups: Mapping[str, bytes]) -> RuntimeState:
    """Every key under ``groups``' prefixes, read with plain commands in one MULTI/EXEC.

    Keys are found with SCAN and their types with TYPE; then TIME and, per key, TYPE,
    the value and PTTL run in one transaction. A key that changed type in between is
    read again; one that vanished (its TTL ran out) is left out. On a Redis Cluster
    the prefixes must share a slot (the cluster layout): they are read on its node.
    """
    if isinstance(client, RedisCluster):
        slots = {key_slot(prefix) for prefix in groups.values()}
        if len(slots) != 1:
            raise ValueError("on a Redis Cluster the groups must share a slot (cluster layout)")
        client = client.get_redis_connection(client.nodes_manager.get_node_from_slot(slots.pop()))
    for _ in range(_READ_ATTEMPTS):
        keys = _scan(client, list(groups.values()))
        probe = client.pipeline(transaction=False)
        for key in keys:
            probe.type(key)
        kinds = [k.decode() if isinstance(k, bytes) else str(k) for k in probe.execute()]
        pipe = client.pipeline(transaction=True)
        pipe.time()
        for key, kind in zip(keys, kinds, strict=True):
            pipe.type(key)
            _queue_value(pipe, key, kind)
            pipe.pttl(key)
        reply = pipe.execute(raise_on_error=False)
        seconds, micros = reply[0]
        read_at_ms = int(seconds) * 1000 + int(micros) // 1000
        state: dict[bytes, KeyState] = {}
        stable = True
        for i, (key, kind) in enumerate(zip(keys, kinds, strict=True)):
            now_type, value, pttl = reply[1 + 3 * i : 4 + 3 * i]
            now_kind = now_type.decode() if isinstance(now_type, bytes) else str(now_type)
            if now_kind == "none":
                continue
            if now_kind != kind or isinstance(value, Exception):
                stable = False
                break
            ttl = int(pttl)
            state[key] = KeyState(kind, _canonical(kind, value), ttl if ttl >= 0 else None)
        if stable:
            return RuntimeState(dict(groups), state, read_at_ms)
    raise RuntimeError(f"keys kept changing type while being read ({_READ_ATTEMPTS} attempts)")


def read_durable_state(db_path: str | Path, task_id: str) -> DurableState:
    """The task's rows of every per-task table, and all skill metadata, with plain SQL.

    Uses its own connection and one read transaction, independent of the store's.
    """
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        conn.execute("BEGIN")
        tables = {
            name: [
                tuple(row)
                for row in conn.execute(
                    f"SELECT * FROM {name} WHERE task_id = ? ORDER BY id", (task_id,)
                )
            ]
            for name in TASK_TABLES
        }
        tables[SKILL_TABLE] = [
            tuple(row) for row in conn.execute(f"SELECT * FROM {SKILL_TABLE} ORDER BY skill_id")
        ]
        conn.execute("COMMIT")
    finally:
        conn.close()
    return DurableState(tables)


# -- comparison ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the demo's table: a namespace or table, expected vs restored."""

    tier: str
    name: str
    expected: int
    restored: int
    #: What differs, one message each; empty when the check passed.
    problems: tuple[str, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when nothing differs."""
        return not self.problems


def _show(key: bytes) -> str:
    return key.decode(errors="backslashreplace")


def expected_now(
    expected: RuntimeState, at_ms: int, *, absolute: Sequence[str] = ("lock",)
) -> tuple[dict[bytes, KeyState], dict[bytes, KeyState]]:
    """``expected`` as it should look at server time ``at_ms``: ``(present, expired)``.

    Keys in the ``absolute`` groups keep their original expiry instant, so those
    whose TTL has run out by ``at_ms`` are expected to be absent; their TTL left is
    counted down. Other keys get back the TTL they had left when read.
    """
    elapsed = max(0, at_ms - expected.read_at_ms)
    present: dict[bytes, KeyState] = {}
    expired: dict[bytes, KeyState] = {}
    for key, state in expected.keys.items():
        if state.pttl_ms is not None and expected.group_of(key) in absolute:
            left = state.pttl_ms - elapsed
            if left <= 0:
                expired[key] = state
                continue
            state = state._replace(pttl_ms=left)
        present[key] = state
    return present, expired


def _key_problems(key: bytes, want: KeyState, got: KeyState) -> list[str]:
    name = _show(key)
    if want.type != got.type:
        return [f"{name}: type {got.type}, expected {want.type}"]
    problems = []
    if want.value != got.value:
        problems.append(f"{name}: value differs")
    if (want.pttl_ms is None) != (got.pttl_ms is None):
        problems.append(f"{name}: " + ("TTL missing" if got.pttl_ms is None else "unexpected TTL"))
    elif want.pttl_ms is not None and got.pttl_ms is not None:
        if got.pttl_ms > want.pttl_ms + TTL_SLACK_MS:
            problems.append(f"{name}: TTL {got.pttl_ms} ms, expected at most {want.pttl_ms} ms")
    return problems


def compare_runtime(
    expected: RuntimeState, actual: RuntimeState, *, absolute: Sequence[str] = ("lock",)
) -> list[Check]:
    """One :class:`Check` per group of ``expected``: every key's type, bytes and TTL.

    TTL presence must match, and a restored TTL must not be longer than expected
    (see :func:`expected_now` for keys in the ``absolute`` groups, locks by default,
    which are expected to be gone once their TTL has run out).
    """
    present, expired = expected_now(expected, actual.read_at_ms, absolute=absolute)
    checks = []
    for group in expected.groups:
        want = {k: s for k, s in present.items() if expected.group_of(k) == group}
        got = {k: s for k, s in actual.keys.items() if actual.group_of(k) == group}
        problems: list[str] = []
        for key in sorted(want.keys() | got.keys()):
            if key not in got:
                problems.append(f"{_show(key)}: missing")
            elif key not in want:
                why = "its TTL ran out" if key in expired else "not in the checkpoint"
                problems.append(f"{_show(key)}: present, but {why}")
            else:
                problems.extend(_key_problems(key, want[key], got[key]))
        gone = sum(1 for k in expired if expected.group_of(k) == group)
        note = f"{gone} expired, absent as expected" if gone else ""
        checks.append(Check("runtime", group, len(want), len(got), tuple(problems), note))
    return checks


def compare_durable(
    expected: DurableState, actual: DurableState, *, tier: str = "durable"
) -> list[Check]:
    """One :class:`Check` per table of ``expected``: rows matched by their first column."""
    checks = []
    for table, rows in expected.tables.items():
        want = {row[0]: row for row in rows}
        got = {row[0]: row for row in actual.tables.get(table, [])}
        problems: list[str] = []
        for row_id in sorted(want.keys() | got.keys(), key=repr):
            if row_id not in got:
                problems.append(f"{table} row {row_id!r}: missing")
            elif row_id not in want:
                problems.append(f"{table} row {row_id!r}: not in the checkpoint")
            elif want[row_id] != got[row_id]:
                problems.append(f"{table} row {row_id!r}: differs")
        checks.append(Check(tier, table, len(want), len(got), tuple(problems)))
    return checks


def merge_checks(tier: str, name: str, checks: Sequence[Check]) -> Check:
    """Several checks summed up as one line."""
    return Check(
        tier,
        name,
        sum(c.expected for c in checks),
        sum(c.restored for c in checks),
        tuple(p for c in checks for p in c.problems),
    )


# -- the demo ------------------------------------------------------------------------------


@dataclass(slots=True)
class DemoReport:
    """What :func:`run_demo` did and found."""

    task_id: str
    redis: str
    durable_url: str
    checks: list[Check]
    checkpoints: list[CheckpointMetadata]
    recovery: RecoveryResult
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when recovery succeeded and every check passed."""
        return self.recovery.success and not self.problems and all(c.ok for c in self.checks)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _display_url(url: str) -> str:
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


class _Simulation:
    """The CFN Loop task: what each agent writes, iteration by iteration."""

    def __init__(self, mgr: CheckpointManager, task_id: str) -> None:
        self.mgr = mgr
        self.task_id = task_id
        self.writer = mgr.writer(task_id)
        self.client = mgr.runtime.client
        self.layout = mgr.runtime.layout
        self.tokens = {agent: f"{agent}-{secrets.token_hex(4)}" for agent in AGENTS}

    def key(self, role: str, name: str) -> bytes:
        return self.layout.key(role, self.task_id, name)

    def setup(self) -> None:
        durable = self.mgr.durable
        for agent in AGENTS:
            durable.put_skill(
                f"cfn-loop.{agent}", name=f"CFN Loop {agent}", version="1.0", metadata={"a": 1}
            )
        self.writer.acquire_lock("iteration", self.tokens["coordinator"], ttl_ms=120_000)
        durable.record_audit_event(self.task_id, "task_started", agent_id="coordinator")

    def iteration(self, i: int) -> None:
        w, task, durable = self.writer, self.task_id, self.mgr.durable
        last = i == ITERATIONS
        w.put_agent(
            "coordinator",
            {"role": "coordinator", "iteration": i, "phase": "implement", "agents": list(AGENTS)},
        )
        w.set_signal("phase", f"iteration-{i}")
        w.acquire_lock("workspace", self.tokens["coder"], ttl_ms=60_000)
        w.put_agent(
            "coder",
            {"role": "coder", "iteration": i, "files": [f"src/part_{n}.py" for n in range(i)]},
        )
        w.push_queue("review", {"iteration": i, "patch": f"patch-{i}"})
        if not last:  # the coder still holds the workspace when the last checkpoint is taken
            w.release_lock("workspace", self.tokens["coder"])
        w.put_agent("reviewer", {"role": "reviewer", "iteration": i, "approved": last})
        w.push_queue("test", f"patch-{i}")
        if last:  # a short lock: its TTL runs out while the task is down
            w.acquire_lock("test-runner", self.tokens["tester"], ttl_ms=SHORT_LOCK_TTL_MS)
        w.put_agent("tester", {"role": "tester", "iteration": i, "passed": 10 * i})
        # Types beyond the writer's strings and lists, written with plain commands.
        self.client.hset(
            self.key("signal", "progress"), mapping={a: f"iteration-{i}" for a in AGENTS}
        )
        self.client.sadd(self.key("signal", "consensus"), *AGENTS[: i + 1])
        self.client.zadd(self.key("queue", "priority"), {f"patch-{i}": i * 1.5})
        self.client.xadd(self.key("queue", "events"), {"iteration": i, "event": "done"})
        for n, agent in enumerate(AGENTS):
            w.set_signal(f"heartbeat:{agent}", {"iteration": i}, ttl_ms=300_000)
            durable.record_agent_metric(task, agent, "confidence", 0.5 + 0.1 * i + 0.01 * n)
            durable.record_audit_event(task, "agent_step", agent_id=agent, details={"iteration": i})
        durable.record_task_result(
            task, "coordinator", {"iteration": i, "approved": last}, confidence=0.6 + 0.1 * i
        )

    def after_checkpoint(self) -> None:
        """Work of iteration 4 that no checkpoint covers."""
        self.writer.put_agent("coder", {"role": "coder", "iteration": ITERATIONS + 1})
        self.mgr.durable.record_task_result(self.task_id, "coder", {"iteration": ITERATIONS + 1})

    def crash(self) -> tuple[int, int]:
        """Runtime keys wiped, audit trail deleted; returns ``(keys, rows)`` lost."""
        keys = self.mgr.runtime.delete_task(self.task_id)
        with self.mgr.store.atomic() as db:
            rows = db.execute("DELETE FROM audit_trail WHERE task_id = ?", (self.task_id,))
        return keys, int(rows.rowcount)

    def restart(self) -> None:
        """A restarted coordinator writes before anyone recovers the task."""
        self.writer.set_signal("restarted", "coordinator")

    def tamper(self) -> None:
        """Damage the restored state, so the check has something to find."""
        self.client.set(self.key("agent", "coder"), b'{"tampered":true}')
        with self.mgr.store.atomic() as db:
            db.execute(
                "DELETE FROM agent_metrics WHERE id = "
                "(SELECT MAX(id) FROM agent_metrics WHERE task_id = ?)",
                (self.task_id,),
            )


def _bystander(mgr: CheckpointManager) -> None:
    w = mgr.writer(BYSTANDER_ID)
    w.put_agent("coordinator", {"role": "coordinator", "iteration": 1})
    w.set_signal("phase", "iteration-1", ttl_ms=300_000)
    w.push_queue("review", "patch-1")
    w.acquire_lock("workspace", "bystander-coder", ttl_ms=120_000)
    mgr.durable.record_audit_event(BYSTANDER_ID, "task_started", agent_id="coordinator")


def _wipe_prefix(client: RedisClient, prefix: str) -> None:
    keys = _scan(client, [prefix.encode()])
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


@contextlib.contextmanager
def _open(redis_url: str | None, durable_url: str, prefix: str) -> Iterator[CheckpointManager]:
    cluster = redis_url is not None and is_cluster_url(redis_url)
    layout = KeyLayout(prefix=prefix, cluster=cluster)  # on a cluster: each task in one slot
    mgr = CheckpointManager.open(redis_url, durable_url, layout=layout)
    try:
        yield mgr
    finally:
        try:
            if prefix:
                _wipe_prefix(mgr.runtime.client, prefix)
        finally:
            mgr.close()


def run_demo(
    *,
    redis_url: str | None = None,
    tamper: bool = False,
    echo: Callable[[str], None] = print,
) -> DemoReport:
    """Run the demo and return its report; progress goes to ``echo``.

    ``redis_url`` defaults to the environment (``CFN_REDIS_URL``, ``CFN_REDIS_HOST``/
    ``CFN_REDIS_PORT``), else an embedded ``redis-server``. On a configured server every
    key lives under a unique prefix and is deleted afterwards. ``tamper`` changes one
    restored key and one restored row before the check, which must then fail.
    """
    started = time.monotonic()
    url = redis_url or redis_url_from_env()
    prefix = f"cfn-demo-{secrets.token_hex(4)}:" if url else ""
    with tempfile.TemporaryDirectory(prefix="cfn-demo-") as tmp:
        db_path = Path(tmp) / "cfn.db"
        durable_url = f"sqlite:///{db_path}"
        with _open(url, durable_url, prefix) as mgr:
            version = mgr.runtime.version()
            where = (
                f"{_display_url(url)} (redis {version}), keys under {prefix!r}, removed after"
                if url
                else f"embedded redis-server {version} on a private unix socket"
            )
            echo(f"redis:    {where}")
            echo(f"durable:  {durable_url} (temporary)")
            echo(f"task:     {TASK_ID}, agents {', '.join(AGENTS)}; bystander task {BYSTANDER_ID}")
            echo("")
            report = _run(mgr, db_path, tamper=tamper, echo=echo)
    report.redis, report.durable_url = where, durable_url
    report.seconds = time.monotonic() - started
    return report


def _run(
    mgr: CheckpointManager, db_path: Path, *, tamper: bool, echo: Callable[[str], None]
) -> DemoReport:
    task, client, layout = TASK_ID, mgr.runtime.client, mgr.runtime.layout
    sim = _Simulation(mgr, task)
    _bystander(mgr)
    sim.setup()
    last: CheckpointMetadata | None = None
    for i in range(1, ITERATIONS + 1):
        sim.iteration(i)
        last = mgr.create_checkpoint(task, CheckpointTrigger.ITERATION_BOUNDARY, {"iteration": i})
        echo(
            f"iteration {i}: {last.key_count} keys, {last.row_count} rows -> checkpoint "
            f"{last.checkpoint_id} ({human_size(last.stored_bytes)} stored)"
        )
    assert last is not None
    # The expected state, read independently of the library right after the checkpoint.
    groups = task_groups(layout, task)
    bystander_groups = task_groups(layout, BYSTANDER_ID)
    expected = read_runtime_state(client, groups)
    expected_rows = read_durable_state(db_path, task)
    bystander = read_runtime_state(client, bystander_groups)
    bystander_rows = read_durable_state(db_path, BYSTANDER_ID)
    problems: list[str] = []

    boundary = CheckpointTrigger.ITERATION_BOUNDARY
    again = mgr.create_checkpoint(task, boundary, {"iteration": ITERATIONS})
    same = again.checkpoint_id == last.checkpoint_id
    echo(
        "re-checkpoint of the unchanged task: "
        + ("same checkpoint, nothing stored" if same else f"NEW checkpoint {again.checkpoint_id}")
    )
    if not same:
        problems.append(f"re-checkpoint of an unchanged task stored {again.checkpoint_id}")

    sim.after_checkpoint()
    keys_lost, rows_lost = sim.crash()
    sim.restart()
    echo(
        f"crash: iteration 4 had begun (a task result written); then {keys_lost} runtime keys "
        f"were wiped,\n       {rows_lost} audit rows deleted, and a restarted coordinator set a "
        "signal"
    )
    short = [s.pttl_ms for k, s in expected.keys.items() if k.startswith(groups[layout.lock])]
    wait_ms = max((t for t in short if t is not None and t <= SHORT_LOCK_TTL_MS), default=0)
    if wait_ms:
        echo(f"down for {(wait_ms + 150) / 1000:.1f} s: the tester's lock TTL runs out meanwhile")
        time.sleep((wait_ms + 150) / 1000)

    result = mgr.recover_from_checkpoint(task, restore_durable=True)
    echo(
        f"recovery from {result.checkpoint_id}: {_count(result.keys_restored, 'key')} "
        f"restored,\n       {_count(result.keys_removed, 'stray key')} removed, "
        f"{_count(result.keys_expired, 'key')} left out (TTL ran out), "
        f"{_count(result.rows_restored, 'row')} restored"
    )
    for note in result.errors:
        echo(f"  note: {note}")
    if result.checkpoint_id != last.checkpoint_id:
        problems.append(f"recovered from {result.checkpoint_id}, not {last.checkpoint_id}")
    if tamper:
        sim.tamper()
        echo("tamper: one restored key and one restored row changed on purpose")

    actual = read_runtime_state(client, groups)
    checks = compare_runtime(expected, actual)
    checks += compare_durable(expected_rows, read_durable_state(db_path, task))
    other = compare_runtime(bystander, read_runtime_state(client, bystander_groups))
    other += compare_durable(bystander_rows, read_durable_state(db_path, BYSTANDER_ID))
    checks.append(merge_checks("other", f"{BYSTANDER_ID} (keys + rows)", other))
    return DemoReport(
        task_id=task,
        redis="",
        durable_url="",
        checks=checks,
        checkpoints=mgr.list_checkpoints(task),
        recovery=result,
        problems=problems,
    )


# -- output --------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  " + "  ".join(parts).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def format_report(report: DemoReport) -> str:
    """The report as plain text: the check table, the checkpoint list and a verdict."""
    out = ["", "state after recovery vs the last checkpoint:"]
    out += _table(
        ["tier", "namespace / table", "expected", "restored", "check", "note"],
        [
            [c.tier, c.name, str(c.expected), str(c.restored), "OK" if c.ok else "DIFF", c.note]
            for c in report.checks
        ],
        right={2, 3},
    )
    differences = [p for c in report.checks for p in c.problems] + report.problems
    if differences:
        out += ["", "differences:"] + [f"  - {p}" for p in differences]
    out += ["", f"checkpoints of task {report.task_id} (newest first):"]
    out += _table(
        ["checkpoint", "trigger", "status", "iteration", "keys", "rows", "stored"],
        [
            [
                m.checkpoint_id,
                m.trigger.value,
                m.status.value,
                str(m.metadata.get("iteration", "")),
                str(m.key_count),
                str(m.row_count),
                human_size(m.stored_bytes),
            ]
            for m in report.checkpoints
        ],
        right={3, 4, 5, 6},
    )
    failed = sum(1 for c in report.checks if not c.ok) + len(report.problems)
    verdict = (
        f"OK: every key and row is back as it was at the last checkpoint ({report.seconds:.1f} s)"
        if report.ok
        else f"DIFF: {failed} check(s) failed"
    )
    out += ["", verdict]
    return "\n".join(out)


def report_json(report: DemoReport) -> dict[str, Any]:
    """The report as one JSON document: each check (expected, restored, ok, problems),
    the checkpoints, the recovery and the overall verdict ``ok``."""
    return {
        "ok": report.ok,
        "task_id": report.task_id,
        "redis": report.redis,
        "durable_url": report.durable_url,
        "seconds": round(report.seconds, 3),
        "checks": [
            {
                "tier": c.tier,
                "name": c.name,
                "expected": c.expected,
                "restored": c.restored,
                "ok": c.ok,
                "note": c.note,
                "problems": list(c.problems),
            }
            for c in report.checks
        ],
        "problems": list(report.problems),
        "checkpoints": [checkpoint_json(m) for m in report.checkpoints],
        "recovery": recovery_json(report.recovery),
    }
