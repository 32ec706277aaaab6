"""Commands on stored checkpoints alone keep working while Redis is down."""

from __future__ import annotations

from pathlib import Path

import pytest

from cfn_checkpoint import CheckpointManager

from cli_support import Cli, assert_one_line_error, write_task

DOWN = "redis://127.0.0.1:1/0"  # nothing listens there


@pytest.fixture()
def offline(manager: CheckpointManager, db_url: str, prefix: str) -> tuple[Cli, str]:
    write_task(manager, "t1", 1)
    checkpoint = manager.create_checkpoint("t1").checkpoint_id
    return Cli(DOWN, db_url, prefix), checkpoint


def test_store_only_commands_work_without_redis(offline: tuple[Cli, str], tmp_path: Path) -> None:
    cli, checkpoint = offline
    assert [c["checkpoint_id"] for c in cli.json("list")] == [checkpoint]
    cli("show", checkpoint, "--keys")
    cli("verify", "--all")
    cli("export", checkpoint, "-o", str(tmp_path / "cp.cfn"))
    cli("cleanup", "--dry-run")
    result = cli("list", "-v")
    assert "redis: not needed by this command" in result.stderr


def test_commands_that_need_redis_say_so_in_one_line(offline: tuple[Cli, str]) -> None:
    cli, _ = offline
    result = Cli.invoke(cli.argv("recover", "t1"))
    assert_one_line_error(result, 1, "Redis unavailable")
