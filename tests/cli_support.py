"""Helpers shared by the ``test_cli_*`` files (no tests here).

The command runs through its real entry point: click's ``CliRunner`` on the ``cli``
group in-process, or ``python -m cfn_checkpoint.cli`` in a subprocess, always against
the test Redis under the test's key prefix and a fresh durable store (SQLite or
PostgreSQL). What the tests expect is read back with plain Redis commands and plain SQL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from click.testing import CliRunner, Result

from cfn_checkpoint import CheckpointManager
from cfn_checkpoint.cli import cli

from conftest import redis_client, task_state
from db_support import sql_dump

#: Environment that would point the command somewhere other than the test's stores.
CONFIG_VARS = (
    "CFN_REDIS_URL",
    "CFN_REDIS_HOST",
    "CFN_REDIS_PORT",
    "CFN_DURABLE_URL",
    "CFN_KEY_PREFIX",
    "CFN_KEY_LAYOUT",
)
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(CONFIG_VARS)


def clean_environ() -> dict[str, str]:
    """This process's environment without the command's configuration variables."""
    return {k: v for k, v in os.environ.items() if k not in CONFIG_VARS}


@dataclass(frozen=True)
class Cli:
    """The command, pointed at one Redis, one durable store and one key prefix."""

    redis_url: str
    db_url: str
    prefix: str

    def argv(self, *args: str, json_mode: bool = False) -> list[str]:
        """Global options, then ``args``."""
        base = ["--redis-url", self.redis_url, "--durable-url", self.db_url]
        base += ["--key-prefix", self.prefix]
        return base + (["--json"] if json_mode else []) + list(args)

    @staticmethod
    def invoke(argv: list[str]) -> Result:
        """Run ``cfn-checkpoint argv`` in-process, without the environment's configuration."""
        return CliRunner().invoke(cli, argv, env=CLEAN_ENV)

    def __call__(self, *args: str, json_mode: bool = False, code: int = 0) -> Result:
        """Run in-process; assert the exit code."""
        result = self.invoke(self.argv(*args, json_mode=json_mode))
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
        return result

    def json(self, *args: str, code: int = 0) -> Any:
        """Run with ``--json``; the parsed stdout."""
        return json.loads(self(*args, json_mode=True, code=code).stdout)

    def run(self, *args: str, json_mode: bool = False) -> subprocess.CompletedProcess[str]:
        """Run ``python -m cfn_checkpoint.cli`` in a subprocess (exit code not checked)."""
        return subprocess.run(
            [sys.executable, "-m", "cfn_checkpoint.cli", *self.argv(*args, json_mode=json_mode)],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_environ(),
            check=False,
        )

    def run_bytes(
        self, *args: str | bytes, stdin: bytes = b"", json_mode: bool = False
    ) -> subprocess.CompletedProcess[bytes]:
        """Like :meth:`run`, with arguments that may be any bytes (as a shell passes
        them), ``stdin`` fed in, and stdout and stderr as bytes."""
        base: list[str | bytes] = [sys.executable, "-m", "cfn_checkpoint.cli"]
        return subprocess.run(
            base + list(self.argv(json_mode=json_mode)) + list(args),
            input=stdin,
            capture_output=True,
            timeout=60,
            env=clean_environ(),
            check=False,
        )

    def into_head(self, *args: str, json_mode: bool = False) -> subprocess.CompletedProcess[str]:
        """``cfn-checkpoint ARGS | head -1`` in a shell: stdout is head's, stderr and the
        exit code are the command's."""
        argv = [sys.executable, "-m", "cfn_checkpoint.cli", *self.argv(*args, json_mode=json_mode)]
        return subprocess.run(
            ["bash", "-c", '"$@" | head -1; exit "${PIPESTATUS[0]}"', "bash", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_environ(),
            check=False,
        )


def assert_one_line_error(result: Result, code: int, *words: str) -> None:
    """The command failed with ``code`` and exactly one ``error:`` line naming ``words``."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert "Traceback" not in result.output


def write_task(manager: CheckpointManager, task: str, step: int, *, stream: bool = False) -> None:
    """Give ``task`` keys of every native type (TTLs included) and durable rows; ``step``
    changes the agent state and adds a queue item, an audit event and a metric."""
    client = manager.runtime.client
    layout = manager.runtime.layout
    writer = manager.writer(task)
    writer.put_agent("coder", {"iteration": step, "files": ["app.py", "test_app.py"]})
    writer.put_agent("reviewer", {"verdict": "pending", "step": step})
    writer.set_signal("heartbeat", "alive", ttl_ms=600_000)
    writer.acquire_lock("workspace", f"coder-{step}", ttl_ms=600_000)
    review = layout.key("queue", task, "review")
    client.delete(review)
    client.rpush(review, *(json.dumps({"patch": n}) for n in range(step + 1)))
    client.hset(layout.key("signal", task, "progress"), mapping={"coder": str(step)})
    client.sadd(layout.key("signal", task, "consensus"), "coder", f"r{step}")
    client.zadd(layout.key("queue", task, "priority"), {"p0": 1.5, f"p{step}": step})
    client.set(layout.key("agent", task, "blob"), b"\x80\xffraw\x00" + bytes([step]))
    if stream:
        client.xadd(layout.key("queue", task, "events"), {"event": f"step-{step}"})
    manager.durable.record_audit_event(task, "agent_step", agent_id="coder", details={"n": step})
    manager.durable.record_agent_metric(task, "coder", "confidence", 0.5 + step / 10)
    if step == 1:
        manager.durable.record_task_result(task, "coder", {"ok": True}, confidence=0.9)
        manager.durable.put_skill("cfn-loop.coder", name="coder")


def runtime_keys(url: str, prefix: str) -> dict[bytes, tuple[str, Any, bool]]:
    """Every key under ``prefix``: type, value, whether it has a TTL (plain commands)."""
    client = redis_client(url)
    try:
        return task_state(client, prefix)
    finally:
        client.close()


def state(cli_: Cli) -> tuple[Any, Any]:
    """Everything the command could change: the prefix's Redis keys and the whole store."""
    return runtime_keys(cli_.redis_url, cli_.prefix), sql_dump(cli_.db_url)


def checkpoint_ids(cli_: Cli, *args: str) -> list[str]:
    """Ids of ``list`` (newest first)."""
    return [m["checkpoint_id"] for m in cli_.json("list", *args)]
