"""Bad input: one ``error:`` line, the documented exit code, and nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfn_checkpoint import CheckpointManager, KeyLayout

from cli_support import Cli, assert_one_line_error, checkpoint_ids, state, write_task

UNREACHABLE = "redis://127.0.0.1:1/0"


@pytest.fixture()
def cmd(redis_url: str, db_url: str, layout: KeyLayout) -> Cli:
    return Cli(redis_url, db_url, layout.prefix)


@pytest.fixture()
def ready(cmd: Cli, manager: CheckpointManager) -> str:
    """Task t1 with live keys, rows and one checkpoint; t2 with one checkpoint."""
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    write_task(manager, "t2", 1)
    cmd("create", "t2")
    return checkpoint_ids(cmd, "t2")[0]


def check(cmd: Cli, args: list[str], code: int, *words: str) -> None:
    """In table and in JSON mode: the error, its code, nothing on stdout, nothing changed."""
    before = state(cmd)
    for json_mode in (False, True):
        result = cmd(*args, json_mode=json_mode, code=code)
        assert_one_line_error(result, code, *words)
        assert result.stdout == ""
    assert state(cmd) == before


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        # unknown task or checkpoint
        (["recover", "nosuch"], 3, "task nosuch has no completed checkpoint"),
        (["recover", "nosuch", "--dry-run"], 3, "task nosuch has no completed checkpoint"),
        (["create", "nosuch"], 3, "unknown task 'nosuch'"),
        (["list", "nosuch"], 3, "unknown task 'nosuch'"),
        (["recover", "t1", "--checkpoint", "cp_nosuch"], 3, "no checkpoint with id 'cp_nosuch'"),
        (["show", "cp_nosuch"], 3, "no checkpoint with id 'cp_nosuch'"),
        (["diff", "cp_nosuch", "--live"], 3, "no checkpoint with id 'cp_nosuch'"),
        (["verify", "cp_nosuch"], 3, "no checkpoint with id 'cp_nosuch'"),
        (["recover", "t1", "--checkpoint", "{t2}"], 2, "belongs to task t2, not t1"),
        # bad task ids and options
        (["create", "bad:id"], 2, "task id 'bad:id' contains ':'"),
        (["create", "t1", "--trigger", "sometimes"], 2, "--trigger"),
        (["list", "--status", "lost"], 2, "--status"),
        (["recover", "t1", "--tiers", "disk"], 2, "'disk': expected runtime, durable"),
        (["recover", "t1", "--tiers", ","], 2, "--tiers"),
        (["cleanup", "--keep-last", "0"], 2, "--keep-last"),
        (["no-such-command"], 2, "No such command"),
        # bad --meta
        (["create", "t1", "--meta", "novalue"], 2, "'novalue' is not KEY=VALUE"),
        (["create", "t1", "--meta", "=x"], 2, "'=x' has an empty key"),
        (["create", "t1", "--meta", "k:={bad"], 2, "'{bad' is not valid JSON"),
        (["create", "t1", "--meta", "k=1", "--meta", "k=2"], 2, "key 'k' given twice"),
        # --meta that is not UTF-8 text (undecodable argv bytes arrive as surrogates)
        (["create", "t1", "--meta", "k=\udc80"], 2, "b'k=\\x80': the value is not UTF-8"),
        (["create", "t1", "--meta", "\udcff=v"], 2, "b'\\xff=v': the key is not UTF-8"),
        (["create", "t1", "--meta", 'k:="\\udc80"'], 2, "a string in the JSON value is not"),
        (["create", "t1", "--meta", 'k:={"\\ud800": 1}'], 2, "a string in the JSON value"),
        (["create", "t1", "--meta", "k:=NaN"], 2, "'NaN' is not valid JSON"),
        (["create", "t1", "--meta", "k:=[1e999]"], 2, "a number in the JSON value is not finite"),
        # invalid durations
        (["cleanup", "--older-than", "7x"], 2, "'7x' is not a duration (use a number and a unit"),
        (["cleanup", "--older-than", "d7"], 2, "'d7' is not a duration"),
        (["cleanup", "--older-than", ""], 2, "'' is not a duration"),
        (["cleanup", "--older-than", "7d", "--dry-run", "--older-than", "1.5.3h"], 2, "1.5.3h"),
        # durations too long to mean anything (they used to overflow)
        (["cleanup", "--older-than", "99999999d"], 2, "'99999999d' is too long: at most 36500d"),
        (["cleanup", "--older-than", "36500d1ms"], 2, "is too long: at most 36500d (100 years)"),
        (["cleanup", "--older-than", "9" * 400 + "s"], 2, "is too long"),
        (["watch", "--interval", "99999999d"], 2, "'99999999d' is too long"),
        (["watch", "--retention", "99999999d"], 2, "'99999999d' is too long"),
        # an unknown task is not found, as everywhere else
        (["verify", "--all", "--task", "nosuch"], 3, "unknown task 'nosuch'"),
    ],
)
def test_bad_input(cmd: Cli, ready: str, args: list[str], code: int, words: str) -> None:
    check(cmd, [a.replace("{t2}", ready) for a in args], code, words)


@pytest.mark.parametrize(
    ("options", "code", "words"),
    [
        (["--redis-url", "bogus://x"], 2, "malformed Redis URL 'bogus://x'"),
        (["--redis-url", "redis://127.0.0.1:notaport/0"], 2, "malformed Redis URL"),
        (["--redis-url", UNREACHABLE], 1, "Redis unavailable"),
        (["--durable-url", "mysql://db/cfn"], 2, "unsupported durable URL 'mysql://db/cfn'"),
        (["--durable-url", "sqlite://host/x.db"], 2, "has a host"),
        (["--key-prefix", "tenant*"], 2, "key prefix 'tenant*' must not contain"),
    ],
    ids=["scheme", "port", "unreachable", "durable-scheme", "durable-host", "prefix"],
)
@pytest.mark.parametrize(
    "command", [["create", "t1"], ["list"], ["recover", "t1"], ["tasks"], ["watch"]]
)
def test_bad_stores(
    cmd: Cli, ready: str, options: list[str], code: int, words: str, command: list[str]
) -> None:
    before = state(cmd)
    store_only = command == ["list"] and options[0] == "--redis-url"
    for json_mode in (False, True):
        argv = cmd.argv(json_mode=json_mode) + options + command
        result = Cli.invoke(argv)
        if store_only:
            # Listing needs only the durable store: a bad or unreachable Redis is unused.
            assert result.exit_code == 0, result.stderr
        else:
            assert_one_line_error(result, code, words)
            assert result.stdout == ""
    assert state(cmd) == before


@pytest.mark.parametrize("kind", ["text-file", "directory", "proc", "no-directory"])
def test_unusable_durable_path(cmd: Cli, ready: str, tmp_path: Path, kind: str) -> None:
    text = tmp_path / "notes.txt"
    text.write_bytes(b"not a database\n")
    path = {
        "text-file": text,
        "directory": tmp_path,
        "proc": Path("/proc/cfn.db"),
        "no-directory": tmp_path / "missing" / "cfn.db",
    }[kind]
    words = {
        "text-file": "file is not a database",
        "directory": "unable to open database file",
        "proc": "unable to open database file",
        "no-directory": "no directory",
    }[kind]
    export = tmp_path / "t2.cfnckpt"
    cmd("export", ready, "-o", str(export))
    other = Cli(cmd.redis_url, f"sqlite:///{path}", cmd.prefix)
    before = state(cmd), sorted(tmp_path.iterdir())
    for args in (["create", "t1"], ["import", str(export)], ["watch", "--task", "t1"]):
        result = other(*args, code=1)
        assert_one_line_error(result, 1, words)
    assert text.read_bytes() == b"not a database\n"
    assert (state(cmd), sorted(tmp_path.iterdir())) == before


def test_a_missing_store_is_not_created_by_reading_commands(cmd: Cli, tmp_path: Path) -> None:
    path = tmp_path / "typo.db"
    other = Cli(cmd.redis_url, f"sqlite:///{path}", cmd.prefix)
    for args in (["list"], ["tasks"], ["show", "x"], ["cleanup"], ["verify", "--all"]):
        assert_one_line_error(other(*args, code=1), 1, f"no durable store at {path}")
    assert not path.exists()


def test_verbose_adds_the_traceback(cmd: Cli, ready: str) -> None:
    result = cmd("-v", "show", "cp_nosuch", code=3)
    lines = result.stderr.splitlines()
    assert lines[0].startswith("redis: ") and "key prefix" in lines[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1] == "error: no checkpoint with id 'cp_nosuch'"


def test_meta_of_undecodable_bytes_through_the_entry_point(
    cmd: Cli, ready: str, tmp_path: Path
) -> None:
    before = state(cmd)
    for meta in (b"note=\x80\xff", b"\xfe=v", b'k:="\xff"'):
        done = cmd.run_bytes("create", "t1", "--meta", meta)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.decode().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: Invalid value for '--meta'")
        assert "not UTF-8" in lines[0] and done.stdout == b""
    assert state(cmd) == before
    # What is accepted can be exported.
    done = cmd.run_bytes("create", "t1", "--meta", "note=\u00e9t\u00e9".encode(), json_mode=True)
    assert done.returncode == 0, done.stderr
    cp = json.loads(done.stdout)["checkpoint"]["checkpoint_id"]
    cmd("export", cp, "-o", str(tmp_path / "t1.cfnckpt"))


def test_longest_durations_are_usable(cmd: Cli, ready: str) -> None:
    out = cmd("cleanup", "--older-than", "36500d", "--dry-run").stdout
    assert out.startswith("would remove 0 checkpoints older than 5214w 2d and 0 payloads")
    assert cmd.json("cleanup", "--older-than", "5214w2d")["older_than_seconds"] == 36_500 * 86_400
