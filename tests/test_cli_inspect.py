"""``create``, ``list``, ``tasks``, ``show`` and ``diff``, in table and JSON mode."""

from __future__ import annotations

import base64
import re

import pytest

from cfn_checkpoint import CheckpointManager, KeyLayout
from cfn_checkpoint._render import human_size

from cli_support import Cli, assert_one_line_error, checkpoint_ids, write_task

#: Keys and rows ``write_task(..., 1)`` leaves (9 keys: 3 agents, 3 signals, 2 queues, 1 lock).
KEYS, ROWS = 9, 3
CHECKPOINT = r"cp_t1_\d{8}T\d{12}_[0-9a-f]{6}"
SIZE = r"\d+(\.\d)? (B|KiB|MiB)"


@pytest.fixture()
def cmd(redis_url: str, db_url: str, layout: KeyLayout) -> Cli:
    return Cli(redis_url, db_url, layout.prefix)


@pytest.fixture()
def two(cmd: Cli, manager: CheckpointManager) -> tuple[str, str]:
    """Checkpoints A (step 1) and B (step 2) of task t1."""
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    write_task(manager, "t1", 2)
    cmd("create", "t1")
    b, a = checkpoint_ids(cmd)
    return a, b


# -- create ----------------------------------------------------------------------------------


def test_create_stores_once_per_change(cmd: Cli, manager: CheckpointManager) -> None:
    write_task(manager, "t1", 1)
    out = cmd(
        "create", "t1", "--trigger", "iteration_boundary", "--meta", "note=a b=c",
        "--meta", "iteration:=1",
    ).stdout  # fmt: skip
    match = re.fullmatch(
        rf"created checkpoint ({CHECKPOINT}) of task t1: {KEYS} keys, {ROWS} rows, "
        rf"{SIZE} stored \(dedup \d+%\)\n",
        out,
    )
    assert match, out
    first = match.group(1)
    again = cmd("create", "t1").stdout
    assert again == f"unchanged: task t1 is as at checkpoint {first}; nothing stored\n"
    (meta,) = cmd.json("list")
    assert meta["checkpoint_id"] == first
    assert meta["trigger"] == "iteration_boundary"
    assert meta["metadata"] == {"note": "a b=c", "iteration": 1}

    write_task(manager, "t1", 2)
    made = cmd.json("create", "t1")
    assert made["created"] is True
    assert made["checkpoint"]["trigger"] == "manual"
    assert made["checkpoint"]["key_count"] == KEYS and made["checkpoint"]["row_count"] == 5
    same = cmd.json("create", "t1", "--trigger", "periodic")
    assert same["created"] is False
    assert same["checkpoint"]["checkpoint_id"] == made["checkpoint"]["checkpoint_id"]
    assert checkpoint_ids(cmd) == [made["checkpoint"]["checkpoint_id"], first]


# -- list ------------------------------------------------------------------------------------


def test_list_table_shows_sizes_and_dedup(
    cmd: Cli, manager: CheckpointManager, two: tuple[str, str]
) -> None:
    write_task(manager, "t2", 1)
    cmd("create", "t2")
    lines = cmd("list").stdout.splitlines()
    assert lines[0].split() == [
        "checkpoint", "task", "trigger", "status", "age", "keys", "rows", "stored", "dedup",
    ]  # fmt: skip
    metas = cmd.json("list")
    assert [m["task_id"] for m in metas] == ["t2", "t1", "t1"]
    for line, meta in zip(lines[1:], metas, strict=True):
        cells = line.split()
        ratio = max(0.0, 1 - meta["stored_bytes"] / meta["raw_bytes"])
        assert meta["dedup_ratio"] == ratio  # exact
        assert cells[:4] == [meta["checkpoint_id"], meta["task_id"], "manual", "completed"]
        assert re.fullmatch(r"\d+s", cells[4]), cells
        assert cells[5:7] == [str(meta["key_count"]), str(meta["row_count"])]
        assert " ".join(cells[7:9]) == human_size(meta["stored_bytes"])
        assert cells[9] == f"{ratio * 100:.0f}%"
        assert meta["stored_bytes"] > 0 and meta["raw_bytes"] > meta["stored_bytes"]
        assert 0 <= meta["age_seconds"] < 60
    # The second checkpoint of t1 shares its unchanged payloads with the first.
    assert metas[1]["dedup_ratio"] > 0


def test_list_filters(cmd: Cli, two: tuple[str, str]) -> None:
    a, b = two
    assert checkpoint_ids(cmd, "t1", "--limit", "1") == [b]
    assert checkpoint_ids(cmd, "--status", "completed") == [b, a]
    assert cmd.json("list", "t1", "--status", "recovered") == []
    assert cmd("list", "--status", "recovered").stdout == "no checkpoints\n"
    assert len(cmd("list", "t1").stdout.splitlines()) == 3
    result = cmd("list", "--limit", "0", code=2)
    assert_one_line_error(result, 2, "--limit")


def test_list_of_an_unknown_task(cmd: Cli, two: tuple[str, str]) -> None:
    assert_one_line_error(cmd("list", "nosuch", code=3), 3, "unknown task 'nosuch'")


# -- tasks -----------------------------------------------------------------------------------


def test_tasks(cmd: Cli, manager: CheckpointManager, two: tuple[str, str]) -> None:
    _, b = two
    write_task(manager, "t2", 1)  # live keys, no checkpoint
    write_task(manager, "t3", 1)
    cmd("create", "t3")
    manager.runtime.delete_task("t3")  # checkpoints, no live keys
    rows = [line.split() for line in cmd("tasks").stdout.splitlines()]
    assert rows[0] == ["task", "live", "keys", "checkpoints", "newest", "status", "age"]
    assert rows[1][:5] == ["t1", str(KEYS), "2", b, "completed"]
    assert rows[2] == ["t2", str(KEYS), "0", "-", "-", "-"]
    assert rows[3][:3] == ["t3", "0", "1"]
    assert re.fullmatch(r"\d+s", rows[1][5])
    data = {t["task_id"]: t for t in cmd.json("tasks")}
    assert list(data) == ["t1", "t2", "t3"]
    assert (data["t1"]["live_keys"], data["t1"]["checkpoints"]) == (KEYS, 2)
    assert data["t1"]["newest"]["checkpoint_id"] == b
    assert data["t2"] == {"task_id": "t2", "live_keys": KEYS, "checkpoints": 0, "newest": None}
    assert data["t3"]["live_keys"] == 0 and data["t3"]["newest"]["status"] == "completed"


# -- show ------------------------------------------------------------------------------------


def test_show_metadata_and_namespaces(cmd: Cli, two: tuple[str, str]) -> None:
    a, _ = two
    out = cmd("show", a).stdout
    fields = dict(line.split(None, 1) for line in out.split("\n\n")[0].splitlines())
    assert fields["checkpoint"] == a and fields["task"] == "t1"
    assert fields["status"] == "completed" and fields["trigger"] == "manual"
    assert fields["keys"] == f"{KEYS} (point in time)" and fields["rows"] == str(ROWS)
    assert re.fullmatch(rf"{SIZE} encoded, {SIZE} stored \(dedup \d+%\)", fields["size"])
    assert fields["recovered"] == "never"
    assert re.search(rf"^agents\s+3\s+{SIZE}$", out, re.M)
    assert re.search(rf"^signals\s+3\s+{SIZE}$", out, re.M)
    assert re.search(rf"^queues\s+2\s+{SIZE}$", out, re.M)
    assert re.search(rf"^locks\s+1\s+{SIZE}$", out, re.M)
    assert re.search(r"^audit_trail\s+1$", out, re.M)
    assert re.search(r"^skill_metadata \(global, not restored\)\s+1$", out, re.M)
    data = cmd.json("show", a)
    assert data["checkpoint"]["checkpoint_id"] == a
    assert data["namespaces"]["agents"]["keys"] == 3
    assert {k: v["keys"] for k, v in data["namespaces"].items()} == {
        "agents": 3, "signals": 3, "queues": 2, "locks": 1,
    }  # fmt: skip
    assert data["tables"] == {"agent_metrics": 1, "audit_trail": 1, "task_results": 1}
    assert data["skills"] == 1 and "keys" not in data and "value" not in data


def test_show_keys(cmd: Cli, two: tuple[str, str], layout: KeyLayout) -> None:
    a, _ = two
    out = cmd("show", a, "--keys").stdout
    table = out.split("\n\n")[-1].splitlines()
    assert table[0].split() == ["key", "type", "ttl", "size"]
    rows = {r.split()[0]: r.split()[1:] for r in table[1:]}

    def k(role: str, name: str) -> str:
        return layout.key(role, "t1", name).decode()

    assert rows[k("signal", "heartbeat")][0] == "string"
    assert re.fullmatch(r"9m|9m 59s|10m", " ".join(rows[k("signal", "heartbeat")][1:-2]))
    assert rows[k("signal", "progress")][:2] == ["hash", "-"]
    assert rows[k("signal", "consensus")][:2] == ["set", "-"]
    assert rows[k("queue", "review")][:2] == ["list", "-"]
    assert rows[k("queue", "priority")][:2] == ["zset", "-"]
    assert rows[k("agent", "blob")] == ["string", "-", "7", "B"]
    keys = {k["key"]: k for k in cmd.json("show", a, "--keys")["keys"]}
    assert len(keys) == KEYS
    assert keys[k("agent", "blob")] == {
        "key": k("agent", "blob"), "type": "string", "ttl_ms": None, "size": 7,
    }  # fmt: skip
    assert 590_000 < keys[k("lock", "workspace")]["ttl_ms"] <= 600_000


def test_show_value(cmd: Cli, two: tuple[str, str], layout: KeyLayout) -> None:
    a, _ = two
    coder = layout.key("agent", "t1", "coder").decode()
    for name in ("coder", coder.removeprefix(layout.prefix), coder):
        out = cmd("show", a, "--value", name).stdout
        assert out.endswith(
            f"\n\n{coder} (string, no TTL)\n"
            '{\n  "files": [\n    "app.py",\n    "test_app.py"\n  ],\n  "iteration": 1\n}\n'
        ), out
    out = cmd("show", a, "--value", "blob").stdout
    blob_key = layout.key("agent", "t1", "blob").decode()
    assert out.endswith(f"{blob_key} (string, no TTL)\nb'\\x80\\xffraw\\x00\\x01'\n")
    out = cmd("show", a, "--value", "review").stdout
    assert out.endswith('(list, no TTL)\n[0] {"patch": 0}\n[1] {"patch": 1}\n')
    blob = cmd.json("show", a, "--value", "blob")["value"]
    assert blob["type"] == "string"
    assert base64.b64decode(blob["value"]["base64"]) == b"\x80\xffraw\x00\x01"
    coder = cmd.json("show", a, "--value", "coder")["value"]
    assert coder["value"] == '{"files":["app.py","test_app.py"],"iteration":1}'
    progress = cmd.json("show", a, "--value", "progress")["value"]
    assert (progress["type"], progress["value"]) == ("hash", [["coder", "1"]])
    priority = cmd.json("show", a, "--value", "priority")["value"]
    assert priority["value"] == [["p1", "1"], ["p0", "1.5"]]


def test_show_value_not_found_or_ambiguous(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    manager.runtime.client.set(layout.key("signal", "t1", "coder"), b"signal")
    cmd("create", "t1")
    (a,) = checkpoint_ids(cmd)
    assert_one_line_error(cmd("show", a, "--value", "nosuch", code=3), 3, "no key 'nosuch'")
    result = cmd("show", a, "--value", "coder", code=2)
    assert_one_line_error(result, 2, "matches several keys", "give the full key")
    signal = layout.key("signal", "t1", "coder").decode().removeprefix(layout.prefix)
    assert cmd("show", a, "--value", signal).stdout.endswith("\nsignal\n")


# -- diff ------------------------------------------------------------------------------------


def test_diff_two_checkpoints(cmd: Cli, two: tuple[str, str], layout: KeyLayout) -> None:
    a, b = two
    coder = layout.key("agent", "t1", "coder").decode()
    out = cmd("diff", a, b).stdout
    assert out.startswith(
        "keys: added 0, removed 0, changed 7; rows: added 2, removed 0, changed 0\n"
    ), out
    assert re.search(rf"^~\s+changed\s+{re.escape(coder)}\s+string\s+value$", out, re.M)
    assert re.search(r"^\+\s+added\s+audit_trail\s+2$", out, re.M)
    assert re.search(r"^\+\s+added\s+agent_metrics\s+2$", out, re.M)
    assert f"--- {coder} ({a})\n+++ {coder} ({b})\n" in out
    assert '\n-  "iteration": 1\n+  "iteration": 2\n' in out
    assert "\n-b'\\x80\\xffraw\\x00\\x01'\n+b'\\x80\\xffraw\\x00\\x02'\n" in out
    assert '\n+[2] {"patch": 2}\n' in out
    data = cmd.json("diff", a, b)
    assert (data["old"], data["new"], data["empty"]) == (a, b, False)
    assert data["counts"]["keys_changed"] == 7 and data["counts"]["rows_added"] == 2
    change = next(k for k in data["keys"] if k["key"] == coder)
    assert change["change"] == "changed" and change["detail"] == "value"
    assert '"iteration":1' in change["old"]["value"] and '"iteration":2' in change["new"]["value"]
    audit = next(r for r in data["rows"] if r["table"] == "audit_trail")
    assert audit["old"] is None and audit["new"]["details"] == '{"n": 2}'
    assert cmd("diff", a, a).stdout == f"no differences between {a} and {a}\n"
    assert cmd.json("diff", b, b)["empty"] is True


def test_diff_live(
    cmd: Cli, manager: CheckpointManager, two: tuple[str, str], layout: KeyLayout
) -> None:
    _, b = two
    assert cmd("diff", b, "--live").stdout == f"no differences between {b} and live\n"
    manager.runtime.client.set(layout.key("signal", "t1", "restarted"), b"yes")
    manager.runtime.client.delete(layout.key("agent", "t1", "reviewer"))
    manager.durable.record_audit_event("t1", "restarted")
    out = cmd("diff", b, "--live").stdout
    assert out.startswith("keys: added 1, removed 1, changed 0; rows: added 1, removed 0")
    restarted = re.escape(layout.key("signal", "t1", "restarted").decode())
    reviewer = re.escape(layout.key("agent", "t1", "reviewer").decode())
    assert re.search(rf"^\+\s+added\s+{restarted}\s+string\s*$", out, re.M)
    assert re.search(rf"^-\s+removed\s+{reviewer}\s+string\s*$", out, re.M)
    data = cmd.json("diff", b, "--live")
    assert data["new"] == "live"
    assert [(k["change"], k["key"].rsplit(":", 1)[1]) for k in data["keys"]] == [
        ("removed", "reviewer"),
        ("added", "restarted"),
    ]


@pytest.mark.parametrize("args", [["diff", "{a}"], ["diff", "{a}", "{b}", "--live"]])
def test_diff_needs_new_or_live(cmd: Cli, two: tuple[str, str], args: list[str]) -> None:
    a, b = two
    result = cmd(*(x.format(a=a, b=b) for x in args), code=2)
    assert_one_line_error(result, 2, "give either NEW or --live")
