"""``cfn-checkpoint demo`` and the command's error boundary, on real servers only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cfn_checkpoint import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    KeyLayout,
    LockTimeoutError,
    RestoreError,
    StoreUnavailableError,
    ValidationError,
    __version__,
)
from cfn_checkpoint.cli import cli, exit_code_for
from cfn_checkpoint.demo import (
    RuntimeState,
    compare_durable,
    compare_runtime,
    read_durable_state,
    read_runtime_state,
    task_groups,
)
from cfn_checkpoint.durable.sqlite import SqliteStore
from cfn_checkpoint.runtime.connection import RedisClient as Client

from conftest import redis_client

NAMESPACES = ("agent", "swarm", "queue", "lock")
TABLES = ("task_results", "agent_metrics", "audit_trail", "skill_metadata")
#: Environment that would point the demo somewhere other than the embedded default.
CONFIG_VARS = ("CFN_REDIS_URL", "CFN_REDIS_HOST", "CFN_REDIS_PORT", "CFN_DURABLE_URL")
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(CONFIG_VARS)


def clean_environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cfn_checkpoint.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_environ(),
        check=False,
    )


def assert_all_ok(output: str) -> None:
    for name in NAMESPACES + TABLES:
        match = re.search(rf"^\s+\w+\s+{name}\s+(\d+)\s+(\d+)\s+(OK|DIFF)\b", output, re.M)
        assert match, f"no table row for {name}:\n{output}"
        expected, restored, verdict = match.groups()
        assert (verdict, expected) == ("OK", restored), match.group(0)
    assert "DIFF" not in output


# -- the demo end to end -------------------------------------------------------------------


def test_demo_through_the_entry_point_recovers_everything() -> None:
    started = time.monotonic()
    done = run_cli("demo")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert_all_ok(out)
    assert re.search(
        r"^\s+runtime\s+lock\s+\d+\s+\d+\s+OK\s+1 expired, absent as expected$", out, re.M
    )
    assert re.search(r"^\s+other\s+cfn-demo-bystander .*\bOK$", out, re.M)
    assert "re-checkpoint of the unchanged task: same checkpoint" in out
    rows = re.findall(r"^\s+(cp_cfn-demo_\S+)\s+iteration_boundary\s+(\w+)\s+(\d)\s", out, re.M)
    assert [(status, it) for _, status, it in rows] == [
        ("recovered", "3"),
        ("completed", "2"),
        ("completed", "1"),
    ]
    assert f"recovery from {rows[0][0]}:" in out
    assert out.rstrip().splitlines()[-1].startswith("OK: every key and row is back")
    assert done.stderr == ""
    assert time.monotonic() - started < 30


def test_version_through_the_entry_point() -> None:
    done = run_cli("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"cfn-checkpoint, version {__version__}"


def test_version_through_the_console_script() -> None:
    script = Path(sys.executable).with_name("cfn-checkpoint")
    assert script.exists(), f"no console script next to {sys.executable}: is the project installed?"
    done = subprocess.run(
        [str(script), "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout.strip()) == (0, f"cfn-checkpoint, version {__version__}")


def test_a_differing_state_fails_the_demo() -> None:
    result = CliRunner().invoke(cli, ["demo", "--tamper"], env=CLEAN_ENV)
    assert result.exit_code == 1, result.output
    assert re.search(r"^\s+runtime\s+agent\s+4\s+4\s+DIFF\b", result.stdout, re.M)
    assert re.search(r"^\s+durable\s+agent_metrics\s+12\s+11\s+DIFF\b", result.stdout, re.M)
    assert "- agent:cfn-demo:coder: value differs" in result.stdout
    assert re.search(r"- agent_metrics row \d+: missing", result.stdout)
    assert re.search(r"^\s+runtime\s+swarm\s+(\d+)\s+\1\s+OK\b", result.stdout, re.M)
    assert result.stderr == "error: the recovered state differs from the last checkpoint\n"


def test_demo_json_is_one_document() -> None:
    done = run_cli("--json", "demo")
    assert (done.returncode, done.stderr) == (0, "")
    report = json.loads(done.stdout)  # the whole of stdout: one JSON document
    assert report["ok"] is True and report["problems"] == []
    checks = {(c["tier"], c["name"]): c for c in report["checks"]}
    for name in NAMESPACES:
        check = checks["runtime", name]
        assert check["ok"] is True and check["expected"] == check["restored"] > 0, check
    for name in TABLES:
        assert checks["durable", name]["ok"] is True, checks["durable", name]
    assert checks["runtime", "lock"]["note"] == "1 expired, absent as expected"
    assert [(m["status"], m["metadata"]["iteration"]) for m in report["checkpoints"]] == [
        ("recovered", 3),
        ("completed", 2),
        ("completed", 1),
    ]
    assert report["recovery"]["success"] is True
    assert report["recovery"]["checkpoint_id"] == report["checkpoints"][0]["checkpoint_id"]


def test_demo_json_reports_a_difference_and_fails() -> None:
    result = CliRunner().invoke(cli, ["demo", "--tamper", "--json", "-v"], env=CLEAN_ENV)
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert report["ok"] is False
    agent = next(c for c in report["checks"] if (c["tier"], c["name"]) == ("runtime", "agent"))
    assert (agent["ok"], agent["expected"], agent["restored"]) == (False, 4, 4)
    assert agent["problems"] == ["agent:cfn-demo:coder: value differs"]
    metrics = next(c for c in report["checks"] if c["name"] == "agent_metrics")
    assert (metrics["ok"], metrics["expected"], metrics["restored"]) == (False, 12, 11)
    # -v: the steps on stderr, then the one error line.
    lines = result.stderr.splitlines()
    assert lines[0].startswith("redis:    embedded redis-server")
    assert any(line.startswith("iteration 3: ") for line in lines)
    assert lines[-1] == "error: the recovered state differs from the last checkpoint"


@pytest.mark.parametrize("how", ["demo-option", "global-option", "environment"])
def test_demo_on_a_given_server_cleans_up(redis_url: str, how: str) -> None:
    args, env = {
        "demo-option": (["demo", "--redis-url", redis_url], CLEAN_ENV),
        "global-option": (["--redis-url", redis_url, "demo"], CLEAN_ENV),
        "environment": (["demo"], {**CLEAN_ENV, "CFN_REDIS_URL": redis_url}),
    }[how]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    assert_all_ok(result.stdout)
    match = re.search(r"keys under '(cfn-demo-[0-9a-f]{8}:)', removed after", result.stdout)
    assert match, result.stdout
    client = redis_client(redis_url)
    try:
        assert list(client.scan_iter(match=match.group(1) + "*")) == []
    finally:
        client.close()


# -- the error boundary --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (["--redis-url", "bogus://x", "demo"], {}, 2, "error: malformed Redis URL 'bogus://x'"),
        (["demo"], {"CFN_REDIS_PORT": "six"}, 2, "error: CFN_REDIS_PORT must be a port number"),
        (["--redis-url", "redis://127.0.0.1:1/0", "demo"], {}, 1, "error: Redis unavailable"),
    ],
    ids=["malformed-url", "bad-port", "unreachable"],
)
def test_library_errors_become_one_line_and_an_exit_code(
    args: list[str], env: dict[str, str], code: int, message: str
) -> None:
    result = CliRunner().invoke(cli, args, env={**CLEAN_ENV, **env})
    assert result.exit_code == code, result.output
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValidationError("x"), 2),
        (CheckpointNotFoundError("x"), 3),
        (CorruptCheckpointError("x"), 4),
        (StoreUnavailableError("x"), 1),
        (LockTimeoutError("x"), 1),
        (RestoreError("x"), 1),
        (CheckpointError("x"), 1),
    ],
)
def test_exit_codes(error: CheckpointError, code: int) -> None:
    assert exit_code_for(error) == code


def test_usage_errors_exit_2() -> None:
    result = CliRunner().invoke(cli, ["no-such-command"], env=CLEAN_ENV)
    assert result.exit_code == 2


# -- the independent check on real differing states ----------------------------------------


@pytest.fixture()
def client(redis_url: str, layout: KeyLayout) -> Iterator[Client]:
    """A plain client to the test Redis (keys under the test's prefix are wiped after)."""
    conn = redis_client(redis_url)
    yield conn
    conn.close()


def write_task(client: Client, layout: KeyLayout, task: str) -> dict[str, bytes]:
    keys = {
        "agent": layout.key("agent", task, "coder"),
        "signal": layout.key("signal", task, "heartbeat"),
        "hash": layout.key("signal", task, "progress"),
        "set": layout.key("signal", task, "consensus"),
        "list": layout.key("queue", task, "review"),
        "zset": layout.key("queue", task, "priority"),
        "stream": layout.key("queue", task, "events"),
        "lock": layout.key("lock", task, "workspace"),
    }
    client.set(keys["agent"], b'{"iteration":1}')
    client.set(keys["signal"], b"alive", px=60_000)
    client.hset(keys["hash"], mapping={"coder": "done", "tester": "working"})
    client.sadd(keys["set"], "coder", "reviewer")
    client.rpush(keys["list"], b"patch-1", b"patch-2")
    client.zadd(keys["zset"], {"patch-1": 1.5, "patch-2": 3.0})
    client.xadd(keys["stream"], {"event": "done"})
    client.set(keys["lock"], b"coder-token", px=60_000)
    return keys


MUTATIONS = {
    "string-value": ("agent", lambda c, k: c.set(k, b'{"iteration":2}'), "value differs"),
    "list-item": ("queue", lambda c, k: c.rpush(k, b"patch-3"), "value differs"),
    "hash-field": ("swarm", lambda c, k: c.hset(k, "tester", "done"), "value differs"),
    "set-member": ("swarm", lambda c, k: c.srem(k, "reviewer"), "value differs"),
    "zset-score": ("queue", lambda c, k: c.zadd(k, {"patch-1": 2.5}), "value differs"),
    "stream-entry": ("queue", lambda c, k: c.xadd(k, {"event": "more"}), "value differs"),
    "ttl-lost": ("swarm", lambda c, k: c.persist(k), "TTL missing"),
    "ttl-gained": ("agent", lambda c, k: c.pexpire(k, 60_000), "unexpected TTL"),
    "ttl-longer": ("lock", lambda c, k: c.pexpire(k, 600_000), "expected at most"),
    "key-missing": ("lock", lambda c, k: c.delete(k), "missing"),
    "type-changed": ("agent", lambda c, k: (c.delete(k), c.rpush(k, b"x")), "type list"),
}
TARGET = {
    "string-value": "agent",
    "list-item": "list",
    "hash-field": "hash",
    "set-member": "set",
    "zset-score": "zset",
    "stream-entry": "stream",
    "ttl-lost": "signal",
    "ttl-gained": "agent",
    "ttl-longer": "lock",
    "key-missing": "lock",
    "type-changed": "agent",
}


def test_identical_states_compare_ok(client: Client, layout: KeyLayout) -> None:
    write_task(client, layout, "t1")
    groups = task_groups(layout, "t1")
    expected = read_runtime_state(client, groups)
    assert len(expected.keys) == 8
    checks = compare_runtime(expected, read_runtime_state(client, groups))
    assert [(c.name, c.expected, c.restored, c.ok) for c in checks] == [
        ("agent", 1, 1, True),
        ("swarm", 3, 3, True),
        ("queue", 3, 3, True),
        ("lock", 1, 1, True),
    ]


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_a_real_difference_is_reported(client: Client, layout: KeyLayout, mutation: str) -> None:
    keys = write_task(client, layout, "t1")
    write_task(client, layout, "t2")
    groups = task_groups(layout, "t1")
    expected = read_runtime_state(client, groups)
    group, mutate, words = MUTATIONS[mutation]
    key = keys[TARGET[mutation]]
    mutate(client, key)
    checks = {c.name: c for c in compare_runtime(expected, read_runtime_state(client, groups))}
    assert [name for name, c in checks.items() if not c.ok] == [group]
    (problem,) = checks[group].problems
    assert problem.startswith(key.decode() + ":") and words in problem, problem


def test_an_extra_key_is_reported(client: Client, layout: KeyLayout) -> None:
    write_task(client, layout, "t1")
    groups = task_groups(layout, "t1")
    expected = read_runtime_state(client, groups)
    stray = layout.key("signal", "t1", "restarted")
    client.set(stray, b"coordinator")
    checks = {c.name: c for c in compare_runtime(expected, read_runtime_state(client, groups))}
    assert checks["swarm"].problems == (f"{stray.decode()}: present, but not in the checkpoint",)
    assert (checks["swarm"].expected, checks["swarm"].restored) == (3, 4)


def test_a_lock_whose_ttl_ran_out_must_stay_away(client: Client, layout: KeyLayout) -> None:
    lock = layout.key("lock", "t1", "test-runner")
    client.set(lock, b"tester-token", px=150)
    groups = task_groups(layout, "t1")
    expected = read_runtime_state(client, groups)
    assert expected.keys[lock].pttl_ms is not None
    time.sleep(0.3)
    gone = read_runtime_state(client, groups)
    (ok,) = [c for c in compare_runtime(expected, gone) if c.name == "lock"]
    assert ok.ok and (ok.expected, ok.restored) == (0, 0)
    assert ok.note == "1 expired, absent as expected"
    client.set(lock, b"tester-token", px=60_000)  # brought back although it had run out
    back = read_runtime_state(client, groups)
    (bad,) = [c for c in compare_runtime(expected, back) if c.name == "lock"]
    assert bad.problems == (f"{lock.decode()}: present, but its TTL ran out",)


def test_other_keys_keep_their_remaining_ttl(client: Client, layout: KeyLayout) -> None:
    signal = layout.key("signal", "t1", "heartbeat")
    client.set(signal, b"alive", px=150)
    groups = task_groups(layout, "t1")
    expected = read_runtime_state(client, groups)
    time.sleep(0.3)
    client.set(signal, b"alive", px=expected.keys[signal].pttl_ms)  # "remaining" policy
    assert all(c.ok for c in compare_runtime(expected, read_runtime_state(client, groups)))


def test_durable_differences_are_reported(tmp_path: Path) -> None:
    path = tmp_path / "cfn.db"
    store = SqliteStore(str(path))
    try:
        for n in range(3):
            store.record_audit_event("t1", "agent_step", agent_id="coder", details={"n": n})
            store.record_agent_metric("t1", "coder", "confidence", 0.5 + n / 10)
        store.record_audit_event("t2", "task_started")
        store.put_skill("cfn-loop.coder", name="coder")
        expected = read_durable_state(path, "t1")
        assert all(c.ok for c in compare_durable(expected, read_durable_state(path, "t1")))
        with store.atomic() as db:
            db.execute("UPDATE agent_metrics SET value = 0.99 WHERE id = 2")
            db.execute("DELETE FROM audit_trail WHERE task_id = 't1' AND id = 1")
            db.execute("DELETE FROM audit_trail WHERE task_id = 't2'")
        store.record_task_result("t1", "coder", {"stray": True})
        checks = {c.name: c for c in compare_durable(expected, read_durable_state(path, "t1"))}
    finally:
        store.close()
    assert checks["agent_metrics"].problems == ("agent_metrics row 2: differs",)
    assert checks["audit_trail"].problems == ("audit_trail row 1: missing",)
    assert checks["task_results"].problems == ("task_results row 1: not in the checkpoint",)
    assert (checks["task_results"].expected, checks["task_results"].restored) == (0, 1)
    assert checks["skill_metadata"].ok


def test_runtime_state_reads_only_its_groups(client: Client, layout: KeyLayout) -> None:
    write_task(client, layout, "t1")
    write_task(client, layout, "t1-other")
    state = read_runtime_state(client, task_groups(layout, "t1"))
    assert isinstance(state, RuntimeState)
    assert all(layout.task_of(k) == "t1" for k in state.keys)
    types = {s.type for s in state.keys.values()}
    assert types == {"string", "hash", "set", "list", "zset", "stream"}
