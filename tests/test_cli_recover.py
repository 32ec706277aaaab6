"""``recover`` (and its dry run), ``verify`` and ``cleanup``, in table and JSON mode."""

from __future__ import annotations

import json
import re
import time

import pytest

from cfn_checkpoint import CheckpointManager, KeyLayout

from cli_support import (
    Cli,
    assert_one_line_error,
    checkpoint_ids,
    runtime_keys,
    state,
    write_task,
)
from db_support import raw_sql, task_rows

MODES = pytest.mark.parametrize("json_mode", [False, True], ids=["table", "json"])


@pytest.fixture()
def cmd(redis_url: str, db_url: str, layout: KeyLayout) -> Cli:
    return Cli(redis_url, db_url, layout.prefix)


def drift(manager: CheckpointManager, layout: KeyLayout) -> None:
    """What happens to t1 after its checkpoints: a new key, a lost key, a new row."""
    manager.runtime.client.set(layout.key("signal", "t1", "restarted"), b"yes")
    manager.runtime.client.delete(layout.key("agent", "t1", "reviewer"))
    manager.durable.record_audit_event("t1", "crashed")


def corrupt(db_url: str, checkpoint_id: str) -> None:
    """Overwrite the payloads only this checkpoint uses with garbage (plain SQL)."""
    with raw_sql(db_url) as db:
        db.execute(
            "UPDATE payloads SET data = ? WHERE digest IN (SELECT digest FROM "
            "checkpoint_payloads WHERE checkpoint_id = ?) AND digest NOT IN (SELECT digest "
            "FROM checkpoint_payloads WHERE checkpoint_id != ?)",
            (b"\x00\x11\x22\x33", checkpoint_id, checkpoint_id),
        )


# -- recover ---------------------------------------------------------------------------------


@MODES
def test_dry_run_changes_nothing(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout, json_mode: bool
) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    write_task(manager, "t1", 2)
    drift(manager, layout)
    (a,) = checkpoint_ids(cmd)
    before = state(cmd)
    args = ("recover", "t1", "--tiers", "runtime,durable", "--dry-run")
    if json_mode:
        plan = cmd.json(*args)
        assert plan["dry_run"] is True and plan["task_id"] == "t1"
        assert plan["checkpoint"]["checkpoint_id"] == a
        assert plan["tiers"] == ["runtime", "durable"]
        counts = plan["changes"]["counts"]
        assert (counts["keys_added"], counts["keys_removed"], counts["keys_changed"]) == (1, 1, 6)
        assert (counts["rows_added"], counts["rows_removed"]) == (0, 3)
        assert plan["expired_keys"] == [] and plan["notes"] == []
    else:
        out = cmd(*args).stdout
        lines = out.splitlines()
        assert lines[0] == (
            f"dry run: recovering task t1 (runtime and durable) from checkpoint {a} "
            "(manual, completed)"
        )
        assert lines[1] == (
            "keys: restore 1, delete 1, overwrite 6; rows: restore 0, delete 3, overwrite 0"
        )
        assert re.search(r"^\+\s+restore\s+\S+agent:\{?t1\}?:reviewer\s+string", out, re.M)
        assert re.search(r"^-\s+delete\s+\S+swarm:\{?t1\}?:restarted\s+string", out, re.M)
        assert re.search(r"^~\s+overwrite\s+\S+agent:\{?t1\}?:coder\s+string\s+value$", out, re.M)
        assert re.search(r"^-\s+delete\s+audit_trail\s+3$", out, re.M)
        assert '\n-  "iteration": 2\n+  "iteration": 1\n' in out
        assert lines[-1] == "nothing was changed (dry run)"
    assert state(cmd) == before


def test_dry_run_names_keys_whose_ttl_ran_out(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    client = manager.runtime.client
    # A TTL the create surely beats on a loaded machine (150 ms did not, once, in a full
    # run on a cluster with PostgreSQL).
    client.set(layout.key("lock", "t1", "tests"), b"tester", px=1_000)
    cmd("create", "t1")
    deadline = time.monotonic() + 5
    while client.exists(layout.key("lock", "t1", "tests")) and time.monotonic() < deadline:
        time.sleep(0.05)
    lock = layout.key("lock", "t1", "tests").decode()
    out = cmd("recover", "t1", "--dry-run").stdout
    assert f"would leave out {lock}: its TTL ran out\n" in out
    assert cmd.json("recover", "t1", "--dry-run")["expired_keys"] == [lock]


@MODES
def test_recover_then_diff_live_shows_nothing(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout, redis_url: str, json_mode: bool
) -> None:
    write_task(manager, "t1", 1)
    expected_keys = runtime_keys(redis_url, layout.prefix)
    expected_rows = task_rows(cmd.db_url, "t1")
    cmd("create", "t1")
    (a,) = checkpoint_ids(cmd)
    write_task(manager, "t1", 2)
    cmd("create", "t1")
    drift(manager, layout)
    args = ("recover", "t1", "--checkpoint", a, "--tiers", "runtime,durable")
    if json_mode:
        data = cmd.json(*args)
        result = data["result"]
        assert data["dry_run"] is False and result["success"] is True
        assert (result["checkpoint_id"], result["task_id"]) == (a, "t1")
        assert result["keys_restored"] == 9 and result["keys_removed"] == 1
        assert result["rows_restored"] == 3 and result["atomic"] is True
        assert result["runtime_state_restored"] and result["durable_state_restored"]
        assert cmd.json("diff", a, "--live")["empty"] is True
    else:
        out = cmd(*args).stdout
        assert out == (
            f"recovered task t1 from checkpoint {a}: 9 keys written, 1 removed, "
            "0 left out (TTL ran out), atomically; 3 durable rows restored\n"
        )
        assert cmd("diff", a, "--live").stdout == f"no differences between {a} and live\n"
    assert runtime_keys(redis_url, layout.prefix) == expected_keys
    assert task_rows(cmd.db_url, "t1") == expected_rows
    assert cmd.json("show", a)["checkpoint"]["status"] == "recovered"


def test_recover_runtime_only_by_default(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout, redis_url: str
) -> None:
    write_task(manager, "t1", 1)
    expected_keys = runtime_keys(redis_url, layout.prefix)
    cmd("create", "t1")
    drift(manager, layout)
    drifted_rows = task_rows(cmd.db_url, "t1")
    out = cmd("recover", "t1").stdout
    assert "durable" not in out
    assert runtime_keys(redis_url, layout.prefix) == expected_keys
    assert task_rows(cmd.db_url, "t1") == drifted_rows
    diff = cmd.json("diff", checkpoint_ids(cmd)[0], "--live")
    assert diff["keys"] == [] and len(diff["rows"]) == 1


def test_recover_falls_back_from_a_corrupt_checkpoint(cmd: Cli, manager: CheckpointManager) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    write_task(manager, "t1", 2)
    cmd("create", "t1")
    b, a = checkpoint_ids(cmd)
    corrupt(cmd.db_url, b)
    result = cmd("recover", "t1")
    notes = result.stderr.splitlines()
    assert notes[0].startswith(f"note: skipped corrupt checkpoint {b}: ")
    assert notes[1] == f"note: fell back to checkpoint {a}"
    assert result.stdout.startswith(f"recovered task t1 from checkpoint {a}: ")
    errors = cmd.json("recover", "t1")["result"]["errors"]
    assert errors[0].startswith(f"skipped corrupt checkpoint {b}")
    result = cmd("recover", "t1", "--checkpoint", b, code=4)
    assert_one_line_error(result, 4, b)


# -- verify ----------------------------------------------------------------------------------


def test_verify(cmd: Cli, manager: CheckpointManager) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    write_task(manager, "t1", 2)
    cmd("create", "t1")
    write_task(manager, "t2", 1)
    cmd("create", "t2")
    c, b, a = checkpoint_ids(cmd)
    out = cmd("verify", "--all").stdout.splitlines()
    assert out[0].split() == ["checkpoint", "task", "result"]
    assert [line.split() for line in out[1:]] == [[c, "t2", "ok"], [b, "t1", "ok"], [a, "t1", "ok"]]
    assert cmd("verify", a).stdout.splitlines()[1].split() == [a, "t1", "ok"]
    data = cmd.json("verify", "--all", "--task", "t1")
    assert (data["checked"], data["corrupt"]) == (2, 0)
    assert data["results"][0] == {"checkpoint_id": b, "task_id": "t1", "ok": True, "error": None}

    corrupt(cmd.db_url, b)
    result = cmd("verify", "--all", code=4)
    assert re.search(rf"^{b}\s+t1\s+CORRUPT: checkpoint {b}", result.stdout, re.M)
    assert re.search(rf"^{a}\s+t1\s+ok$", result.stdout, re.M)
    assert_one_line_error(result, 4, f"1 of 3 checkpoints corrupt: {b}")
    result = cmd("verify", b, json_mode=True, code=4)
    (bad,) = json.loads(result.stdout)["results"]
    assert bad["ok"] is False and b in bad["error"]
    assert_one_line_error(result, 4, f"1 of 1 checkpoint corrupt: {b}")
    assert_one_line_error(cmd("show", b, code=4), 4, b)
    assert cmd.json("verify", a)["corrupt"] == 0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ((), "give either CHECKPOINT or --all"),
        (("x", "--all"), "give either CHECKPOINT or --all"),
        (("x", "--task", "t1"), "--task goes with --all"),
    ],
)
def test_verify_usage(
    cmd: Cli, manager: CheckpointManager, args: tuple[str, ...], words: str
) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    assert_one_line_error(cmd("verify", *args, code=2), 2, words)


# -- cleanup ---------------------------------------------------------------------------------


@MODES
def test_cleanup(cmd: Cli, manager: CheckpointManager, json_mode: bool) -> None:
    for step in (1, 2, 3):
        write_task(manager, "t1", step)
        cmd("create", "t1")
    write_task(manager, "t2", 1)
    cmd("create", "t2")
    d, c, b, a = checkpoint_ids(cmd)
    before = state(cmd)
    if json_mode:
        dry = cmd.json("cleanup", "--older-than", "0s", "--dry-run")
        assert dry["dry_run"] is True and dry["checkpoint_ids"] == [a, b]
        assert dry["older_than_seconds"] == 0 and dry["keep_last"] == 1
        assert dry["payloads_removed"] > 0 and dry["bytes_freed"] > 0
    else:
        out = cmd("cleanup", "--older-than", "0s", "--dry-run").stdout.splitlines()
        assert out[:2] == [f"would remove {a}", f"would remove {b}"]
        assert re.fullmatch(
            r"would remove 2 checkpoints older than 0s and \d+ payloads \(\d+(\.\d)? (B|KiB)\); "
            "nothing was changed",
            out[2],
        )
    assert state(cmd) == before
    if json_mode:
        done = cmd.json("cleanup", "--older-than", "0s", "--keep-last", "2")
        assert done["dry_run"] is False and done["checkpoint_ids"] == [a]
    else:
        out = cmd("cleanup", "--older-than", "0s", "--keep-last", "2").stdout.splitlines()
        assert out[0] == f"removed {a}"
        assert re.fullmatch(r"removed 1 checkpoint older than 0s and \d+ payloads? \(.*\)", out[1])
    assert checkpoint_ids(cmd) == [d, c, b]
    assert cmd.json("cleanup")["checkpoint_ids"] == []  # default: older than 7 days
    assert cmd("cleanup", "--older-than", "1h30m").stdout.startswith(
        "removed 0 checkpoints older than 1h 30m and 0 payloads"
    )
    assert cmd.json("verify", "--all")["corrupt"] == 0
