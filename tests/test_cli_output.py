"""What the command prints: keys that are not UTF-8, long values cut short, sizes and
durations, pipes closed early, and ``--json`` / ``-v`` after the command's name."""

from __future__ import annotations

import base64
import json
import re
from datetime import timedelta

import pytest

from cfn_checkpoint import CheckpointManager, KeyLayout
from cfn_checkpoint._params import format_duration, parse_duration
from cfn_checkpoint._render import dedup_percent, human_size, percent
from cfn_checkpoint.cli import DEFAULT_MAX_BYTES, EXIT_STDOUT_CLOSED

from cli_support import Cli, assert_one_line_error, checkpoint_ids, write_task

NOTE = re.compile(r"\u2026 \(truncated, (\d+) bytes in all\)")


@pytest.fixture()
def cmd(redis_url: str, db_url: str, layout: KeyLayout) -> Cli:
    return Cli(redis_url, db_url, layout.prefix)


def only_checkpoint(cmd: Cli) -> str:
    (cp,) = checkpoint_ids(cmd)
    return cp


def value_part(out: str) -> list[str]:
    """The lines of ``show --value`` after the key's header line."""
    lines = out.split("\n\n")[-1].splitlines()
    assert re.search(r" \((string|list|hash|set|zset)[,)]", lines[0]), lines[0]
    return lines[1:]


# -- keys that are not UTF-8 -----------------------------------------------------------------


def test_show_value_of_a_key_that_is_not_utf8(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    key = layout.key("agent", "t1", b"\x80raw\xff")
    manager.runtime.client.set(key, b"odd")
    cmd("create", "t1")
    cp = only_checkpoint(cmd)
    # --keys prints it as a bytes literal ...
    table = cmd("show", cp, "--keys").stdout
    literal = repr(key)
    assert re.search(rf"^{re.escape(literal)}\s+string\s+-\s+3 B$", table, re.M), table
    # ... which --value takes back, whole or after the task's prefix ...
    for name in (literal, r"b'\x80raw\xff'", r'b"\x80raw\xff"'):
        assert value_part(cmd("show", cp, "--value", name).stdout) == ["odd"], name
    data = cmd.json("show", cp, "--value", r"b'\x80raw\xff'")["value"]
    assert base64.b64decode(data["key"]["base64"]) == key and data["value"] == "odd"
    # ... and so do the raw bytes, as a shell passes them.
    done = cmd.run_bytes("show", cp, "--value", b"\x80raw\xff")
    assert (done.returncode, done.stderr) == (0, b""), done.stderr
    assert done.stdout.endswith(literal.encode() + b" (string, no TTL)\nodd\n")
    done = cmd.run_bytes("show", cp, "--value", b"\x81raw")
    assert done.returncode == 3
    assert done.stderr == f"error: checkpoint {cp} has no key b'\\x81raw'\n".encode()
    # Not a bytes literal after all: the text itself, which is no key either.
    result = cmd("show", cp, "--value", "b'\\x80raw", code=3)
    assert_one_line_error(result, 3, 'has no key "b\'\\\\x80raw"')


# -- long values -----------------------------------------------------------------------------


@pytest.fixture()
def big(cmd: Cli, manager: CheckpointManager, layout: KeyLayout) -> str:
    """A checkpoint of t1 with long values: text, multi-byte text, bytes, a list."""
    write_task(manager, "t1", 1)
    client = manager.runtime.client
    client.set(layout.key("agent", "t1", "text"), b"x" * 100_000)
    client.set(layout.key("agent", "t1", "accents"), "\u00e9".encode() * 5_000)
    client.set(layout.key("agent", "t1", "bytes"), b"\xff" * 10_000)
    client.set(layout.key("agent", "t1", "huge"), json.dumps({"a": "y" * 2_000_000}).encode())
    client.rpush(layout.key("queue", "t1", "long"), *(f"item-{n}" for n in range(20_000)))
    cmd("create", "t1")
    return only_checkpoint(cmd)


def test_show_value_is_cut_at_max_bytes(cmd: Cli, big: str) -> None:
    lines = value_part(cmd("show", big, "--value", "text").stdout)
    assert lines == ["x" * DEFAULT_MAX_BYTES, "\u2026 (truncated, 100000 bytes in all)"]
    lines = value_part(cmd("show", big, "--value", "text", "--max-bytes", "10").stdout)
    assert lines == ["x" * 10, "\u2026 (truncated, 100000 bytes in all)"]
    lines = value_part(cmd("show", big, "--value", "text", "--max-bytes", "0").stdout)
    assert lines == ["x" * 100_000]
    # Cut between characters, never inside one.
    lines = value_part(cmd("show", big, "--value", "accents", "--max-bytes", "5").stdout)
    assert lines == ["\u00e9\u00e9", "\u2026 (truncated, 10000 bytes in all)"]
    lines = value_part(cmd("show", big, "--value", "bytes", "--max-bytes", "6").stdout)
    assert lines == ["b'\\xff", "\u2026 (truncated, 10000 bytes in all)"]
    # A value too big to pretty-print is shown from its start.
    lines = value_part(cmd("show", big, "--value", "huge", "--max-bytes", "20").stdout)
    assert lines == ['{"a": "' + "y" * 13, "\u2026 (truncated, 2000009 bytes in all)"]
    lines = value_part(cmd("show", big, "--value", "long").stdout)
    assert lines[:2] == ["[0] item-0", "[1] item-1"]
    assert NOTE.fullmatch(lines[-1]) and len("\n".join(lines[:-1])) == DEFAULT_MAX_BYTES
    lines = value_part(cmd("show", big, "--value", "long", "--max-bytes", "0").stdout)
    assert len(lines) == 20_000 and lines[-1] == "[19999] item-19999"


def test_show_value_json_is_exact_unless_max_bytes(cmd: Cli, big: str) -> None:
    text = cmd.json("show", big, "--value", "text")["value"]
    assert text["value"] == "x" * 100_000 and "truncated" not in text
    text = cmd.json("show", big, "--value", "text", "--max-bytes", "5")["value"]
    assert (text["value"], text["size"], text["truncated"]) == ("xxxxx", 100_000, True)
    accents = cmd.json("show", big, "--value", "accents", "--max-bytes", "5")["value"]
    assert accents["value"] == "\u00e9\u00e9" and accents["truncated"] is True
    raw = cmd.json("show", big, "--value", "bytes", "--max-bytes", "5")["value"]
    assert base64.b64decode(raw["value"]["base64"]) == b"\xff" * 5
    items = cmd.json("show", big, "--value", "long", "--max-bytes", "20")["value"]
    assert items["value"] == ["item-0", "item-1", "item-2"] and items["truncated"] is True
    whole = cmd.json("show", big, "--value", "long", "--max-bytes", "0")["value"]
    assert len(whole["value"]) == 20_000 and "truncated" not in whole


def test_diff_cuts_values_and_says_so(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    client = manager.runtime.client
    same_size, grows = layout.key("agent", "t1", "same"), layout.key("agent", "t1", "grows")
    client.set(same_size, b"x" * 10_000 + b"a")
    client.set(grows, b"z" * 10_000)
    manager.durable.record_task_result("t1", "coder", {"log": "r" * 10_000})
    cmd("create", "t1")
    client.set(same_size, b"x" * 10_000 + b"b")
    client.set(grows, b"z" * 20_000)
    manager.durable.record_task_result("t1", "coder", {"log": "s" * 10_000})
    cmd("create", "t1")
    b, a = checkpoint_ids(cmd)
    out = cmd("diff", a, b).stdout
    assert f"--- {same_size.decode()}: the values differ after the first 4096 bytes shown" in out
    assert (
        "\n-\u2026 (truncated, 10000 bytes in all)\n+\u2026 (truncated, 20000 bytes in all)\n"
        in out
    )
    assert max(len(line) for line in out.splitlines()) < DEFAULT_MAX_BYTES + 100
    whole = cmd("diff", a, b, "--max-bytes", "0").stdout
    assert "\n-" + "x" * 10_000 + "a\n+" + "x" * 10_000 + "b\n" in whole
    assert "truncated" not in whole
    data = cmd.json("diff", a, b)  # exact
    changed = {k["key"]: k for k in data["keys"]}
    assert changed[grows.decode()]["new"]["value"] == "z" * 20_000
    assert all("truncated" not in r for r in data["rows"])
    data = cmd.json("diff", a, b, "--max-bytes", "40")
    changed = {k["key"]: k for k in data["keys"]}
    assert changed[grows.decode()]["new"] == {
        "key": grows.decode(), "type": "string", "ttl_ms": None, "size": 20_000,
        "value": "z" * 40, "truncated": True,
    }  # fmt: skip
    (added,) = [r for r in data["rows"] if r["table"] == "task_results"]
    assert added["truncated"] == ["result"]  # not the shorter created_at
    assert added["new"]["result"] == '{"log": "' + "s" * 31


def test_recover_dry_run_cuts_values_too(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    key = layout.key("agent", "t1", "text")
    manager.runtime.client.set(key, b"x" * 50_000)
    cmd("create", "t1")
    manager.runtime.client.set(key, b"y" * 50_000)
    out = cmd("recover", "t1", "--dry-run").stdout
    assert "\n-" + "y" * DEFAULT_MAX_BYTES + "\n+" + "x" * DEFAULT_MAX_BYTES + "\n" in out
    assert out.count("\u2026 (truncated, 50000 bytes in all)") == 1  # the same on both sides
    plan = cmd.json("recover", "t1", "--dry-run", "--max-bytes", "3")
    (change,) = plan["changes"]["keys"]
    assert (change["old"]["value"], change["new"]["value"]) == ("yyy", "xxx")
    assert change["old"]["truncated"] is change["new"]["truncated"] is True
    assert cmd.json("recover", "t1", "--dry-run")["changes"]["keys"][0]["new"]["value"] == (
        "x" * 50_000
    )


# -- sizes, shares and durations ----------------------------------------------------------


def test_sizes_roll_over_and_dedup_is_never_100_percent_when_bytes_were_stored(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    manager.runtime.client.set(layout.key("agent", "t1", "zeros"), b"\0" * 1_048_575)
    cmd("create", "t1")
    cp = only_checkpoint(cmd)
    keys = cmd("show", cp, "--keys").stdout
    assert re.search(r"agent:\{?t1\}?:zeros\s+string\s+-\s+1\.0 MiB$", keys, re.M), keys
    assert "1024.0 KiB" not in keys
    (meta,) = cmd.json("list")
    assert 0 < meta["stored_bytes"] < meta["raw_bytes"] // 200  # nearly all compressed away
    assert 0.995 < meta["dedup_ratio"] < 1
    row = cmd("list").stdout.splitlines()[1].split()
    assert re.fullmatch(r"99\.[5-9]%", row[-1]), row
    assert re.search(r"\(dedup 99\.[5-9]%\)", cmd("show", cp).stdout)


def test_size_and_share_formats() -> None:
    assert [human_size(n) for n in (0, 1023, 1024, 1048575, 1048576, 1536)] == [
        "0 B", "1023 B", "1.0 KiB", "1.0 MiB", "1.0 MiB", "1.5 KiB",
    ]  # fmt: skip
    assert human_size(1024**4 * 2048) == "2048.0 TiB"
    assert [percent(r) for r in (0, 0.934, 0.9949, 0.9951, 0.99999, 1)] == [
        "0%", "93%", "99%", "99.5%", "99.9%", "100%",
    ]  # fmt: skip
    assert dedup_percent(0, 1000) == "100%"
    assert dedup_percent(1, 10**9) == "99.9%"
    assert dedup_percent(1000, 1000) == dedup_percent(5, 0) == "0%"


def test_durations_are_spaced_like_ages(cmd: Cli, manager: CheckpointManager) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    out = cmd("cleanup", "--older-than", "8d 2h").stdout
    assert out == "removed 0 checkpoints older than 1w 1d 2h and 0 payloads (0 B)\n"
    for text in ("90m", "1h30m", "1h 30m", "5400s"):
        assert format_duration(parse_duration(text)) == "1h 30m"
    assert format_duration(timedelta(milliseconds=1500)) == "1s 500ms"
    assert parse_duration(format_duration(timedelta(days=36_500))) == timedelta(days=36_500)


def test_sorted_set_scores_are_strings(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    scores = layout.key("queue", "t1", "scores")
    manager.runtime.client.zadd(scores, {"low": float("-inf"), "mid": 1.5, "high": float("inf")})
    cmd("create", "t1")
    data = cmd.json("show", only_checkpoint(cmd), "--value", "scores")["value"]
    assert data["value"] == [["low", "-inf"], ["mid", "1.5"], ["high", "inf"]]


# -- pipes closed early ----------------------------------------------------------------------


def test_output_into_head_stops_quietly(
    cmd: Cli, manager: CheckpointManager, layout: KeyLayout
) -> None:
    write_task(manager, "t1", 1)
    manager.runtime.client.rpush(
        layout.key("queue", "t1", "long"), *(f"item-{n}" for n in range(100_000))
    )
    cmd("create", "t1")
    cp = only_checkpoint(cmd)
    done = cmd.into_head("show", cp, "--value", "long", "--max-bytes", "0")
    assert (done.returncode, done.stderr) == (EXIT_STDOUT_CLOSED, "")
    assert done.stdout.startswith("checkpoint ")
    done = cmd.into_head("show", cp, "--value", "long", json_mode=True)
    assert (done.returncode, done.stderr, done.stdout) == (EXIT_STDOUT_CLOSED, "", "{\n")
    done = cmd.into_head("list")  # all written before head is done: a plain success
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.split() == ["checkpoint", "task", "trigger", "status", "age", "keys",
                                   "rows", "stored", "dedup"]  # fmt: skip


def test_watch_into_head_ends_at_the_next_line(cmd: Cli, manager: CheckpointManager) -> None:
    write_task(manager, "t1", 1)
    done = cmd.into_head("watch", "--interval", "100ms", "--task", "t1", json_mode=True)
    assert done.returncode == EXIT_STDOUT_CLOSED
    assert done.stderr == "watching t1 every 100ms; Ctrl-C stops\n"
    assert json.loads(done.stdout)["event"] == "created"


# -- --json and -v after the command ---------------------------------------------------------


def test_json_and_verbose_after_the_command(cmd: Cli, manager: CheckpointManager) -> None:
    write_task(manager, "t1", 1)
    made = json.loads(cmd("create", "t1", "--json").stdout)
    cp = made["checkpoint"]["checkpoint_id"]
    assert made["created"] is True
    assert [m["checkpoint_id"] for m in json.loads(cmd("list", "--json").stdout)] == [cp]
    assert json.loads(cmd("list", "t1", "--json", json_mode=True).stdout)[0]["checkpoint_id"] == cp
    assert json.loads(cmd("show", cp, "--json").stdout)["checkpoint"]["checkpoint_id"] == cp
    result = cmd("list", "-v")
    assert result.stderr.startswith("redis: ") and "key prefix" in result.stderr
    assert result.stdout.splitlines()[1].startswith(cp)
    result = cmd("show", "cp_nosuch", "-v", "--json", code=3)
    lines = result.stderr.splitlines()
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "error: no checkpoint with id 'cp_nosuch'"
    assert result.stdout == ""
    done = cmd.run("tasks", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)[0]["task_id"] == "t1"
