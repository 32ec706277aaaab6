"""``export`` and ``import``: across Redis versions, and refusing damaged files."""

from __future__ import annotations

import json
import os
import pty
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from cfn_checkpoint import CheckpointManager, KeyLayout

from cli_support import (
    Cli,
    assert_one_line_error,
    checkpoint_ids,
    clean_environ,
    runtime_keys,
    state,
    write_task,
)
from db_support import task_rows


@pytest.fixture()
def cmd(redis_url: str, db_url: str, layout: KeyLayout) -> Cli:
    return Cli(redis_url, db_url, layout.prefix)


def wipe(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        for key in client.scan_iter(match=prefix + "*", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture()
def servers(redis62_url: str, redis7_url: str, prefix: str) -> Iterator[dict[str, str]]:
    """Redis 6.2 and 7 by name; the test's keys are removed from both afterwards."""
    urls = {"6.2": redis62_url, "7": redis7_url}
    yield urls
    for url in urls.values():
        wipe(url, prefix)


@pytest.mark.parametrize(("source", "target"), [("7", "6.2"), ("6.2", "7")])
def test_export_import_recover_across_redis_versions(
    servers: dict[str, str], prefix: str, tmp_path: Path, source: str, target: str
) -> None:
    src = Cli(servers[source], f"sqlite:///{tmp_path / 'source.db'}", prefix)
    dst = Cli(servers[target], f"sqlite:///{tmp_path / 'target.db'}", prefix)
    with CheckpointManager.open(src.redis_url, src.db_url, layout=KeyLayout(prefix=prefix)) as mgr:
        # A stream taken on 6.2 restores on 7; the other way round Redis refuses it.
        write_task(mgr, "t1", 1, stream=source == "6.2")
        write_task(mgr, "t1", 2, stream=source == "6.2")
    expected_keys = runtime_keys(src.redis_url, prefix)
    expected_rows = task_rows(src.db_url, "t1")
    assert len(expected_keys) == 9 + (source == "6.2")
    src("create", "t1")
    (cp,) = checkpoint_ids(src)
    file = tmp_path / "t1.cfnckpt"

    exported = src.json("export", cp, "-o", str(file))
    assert exported == {
        "checkpoint_id": cp, "task_id": "t1", "path": str(file), "bytes": file.stat().st_size,
    }  # fmt: skip
    out = dst("import", str(file)).stdout
    assert out.startswith(f"imported checkpoint {cp} of task t1: {len(expected_keys)} keys, 5 rows")
    assert dst("verify", cp).stdout.splitlines()[1].split() == [cp, "t1", "ok"]
    dst("recover", "t1", "--checkpoint", cp, "--tiers", "runtime,durable")

    assert runtime_keys(dst.redis_url, prefix) == expected_keys
    assert task_rows(dst.db_url, "t1") == expected_rows
    diff = dst.json("diff", cp, "--live")
    assert diff["rows"] == []
    # DUMP payloads differ between versions (a 6.2 stream comes back from 7 in 7's RDB
    # format), and diff compares DUMP bytes: a stream may show as changed; nothing else.
    assert all(k["new"]["type"] == "stream" for k in diff["keys"]), diff["keys"]
    if source == "7":
        assert diff["empty"] is True
    assert dst.json("show", cp)["checkpoint"]["redis_version"].startswith(source)


def test_export_table_and_entry_point(cmd: Cli, manager: CheckpointManager, tmp_path: Path) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    (cp,) = checkpoint_ids(cmd)
    file = tmp_path / "out.cfnckpt"
    done = cmd.run("export", cp, "-o", str(file))
    assert (done.returncode, done.stderr) == (0, "")  # no progress off a terminal
    assert done.stdout.startswith(f"exported checkpoint {cp} of task t1 to {file} (")
    assert file.exists() and not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
    fresh = Cli(cmd.redis_url, f"sqlite:///{tmp_path / 'fresh.db'}", cmd.prefix)
    done = fresh.run("import", str(file), json_mode=True)
    assert (done.returncode, done.stderr) == (0, "")
    assert '"checkpoint_id": "' + cp + '"' in done.stdout


def test_progress_shows_on_a_terminal_only(
    cmd: Cli, manager: CheckpointManager, tmp_path: Path
) -> None:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    (cp,) = checkpoint_ids(cmd)
    master, slave = pty.openpty()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "cfn_checkpoint.cli"]
            + cmd.argv("export", cp, "-o", str(tmp_path / "x.cfnckpt")),
            stdout=subprocess.PIPE,
            stderr=slave,
            env={**clean_environ(), "TERM": "xterm"},
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert done.returncode == 0
    assert f"exporting checkpoint {cp}".encode() in seen
    assert b"\x1b" not in done.stdout  # results stay plain


# -- damaged files and conflicts --------------------------------------------------------------


@pytest.fixture()
def exported(cmd: Cli, manager: CheckpointManager, tmp_path: Path) -> tuple[str, bytes]:
    write_task(manager, "t1", 1)
    cmd("create", "t1")
    (cp,) = checkpoint_ids(cmd)
    file = tmp_path / "good.cfnckpt"
    cmd("export", cp, "-o", str(file))
    return cp, file.read_bytes()


def damaged(blob: bytes, how: str) -> bytes:
    if how == "truncated":
        return blob[: len(blob) // 2]
    if how == "tampered":
        middle = len(blob) // 2
        return blob[:middle] + bytes([blob[middle] ^ 0x01]) + blob[middle + 1 :]
    if how == "trailer-only":
        return blob[:-1]
    return b"id,task\n1,t1\n"


@pytest.mark.parametrize(
    ("how", "code", "words"),
    [
        ("truncated", 4, "is truncated or altered"),
        ("tampered", 4, "is truncated or altered"),
        ("trailer-only", 4, "is truncated or altered"),
        ("not-an-export", 2, "is not a cfn-checkpoint export file"),
    ],
)
@pytest.mark.parametrize("store", ["existing", "new"])
def test_import_refuses_a_damaged_file(
    cmd: Cli,
    exported: tuple[str, bytes],
    tmp_path: Path,
    how: str,
    code: int,
    words: str,
    store: str,
) -> None:
    _, blob = exported
    bad = tmp_path / f"{how}.cfnckpt"
    bad.write_bytes(damaged(blob, how))
    target = (
        cmd
        if store == "existing"
        else Cli(cmd.redis_url, f"sqlite:///{tmp_path / 'new.db'}", cmd.prefix)
    )
    before = state(cmd)
    for json_mode in (False, True):
        result = target("import", str(bad), json_mode=json_mode, code=code)
        assert_one_line_error(result, code, words)
        assert result.stdout == ""
    assert state(cmd) == before
    assert not (tmp_path / "new.db").exists()


def test_import_refuses_a_checkpoint_that_exists(
    cmd: Cli, exported: tuple[str, bytes], tmp_path: Path
) -> None:
    cp, blob = exported
    file = tmp_path / "again.cfnckpt"
    file.write_bytes(blob)
    before = state(cmd)
    assert_one_line_error(cmd("import", str(file), code=2), 2, f"checkpoint {cp} already exists")
    assert state(cmd) == before


def test_export_of_an_unknown_checkpoint(
    cmd: Cli, exported: tuple[str, bytes], tmp_path: Path
) -> None:
    target = tmp_path / "none.cfnckpt"
    result = cmd("export", "cp_nosuch", "-o", str(target), code=3)
    assert_one_line_error(result, 3, "no checkpoint with id 'cp_nosuch'")
    assert not target.exists()
    result = cmd("export", exported[0], "-o", str(tmp_path / "no" / "dir.cfnckpt"), code=2)
    assert_one_line_error(result, 2, "cannot write export file")
    assert_one_line_error(cmd("import", str(tmp_path / "missing"), code=2), 2, "does not exist")


# -- stdout and stdin ------------------------------------------------------------------------


def test_export_to_stdout_import_from_stdin(
    cmd: Cli, exported: tuple[str, bytes], tmp_path: Path
) -> None:
    cp, blob = exported
    # The file alone on stdout (the same bytes as a file export), the summary on stderr.
    done = cmd.run_bytes("export", cp, "-o", "-")
    assert done.returncode == 0, done.stderr
    assert done.stdout == blob
    assert done.stderr.decode().startswith(f"exported checkpoint {cp} of task t1 to stdout (")
    assert not (Path.cwd() / "-").exists()
    done = cmd.run_bytes("export", cp, "-o", "-", json_mode=True)
    assert done.returncode == 0 and done.stdout == blob
    assert json.loads(done.stderr) == {
        "checkpoint_id": cp, "task_id": "t1", "path": "-", "bytes": len(blob),
    }  # fmt: skip
    # Into another store, from stdin.
    fresh = Cli(cmd.redis_url, f"sqlite:///{tmp_path / 'fresh.db'}", cmd.prefix)
    done = fresh.run_bytes("import", "-", stdin=done.stdout, json_mode=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoint_id"] == cp
    assert fresh.json("verify", cp)["corrupt"] == 0
    again = fresh.run_bytes("import", "-", stdin=blob)
    assert (again.returncode, again.stderr) == (
        2,
        f"error: checkpoint {cp} already exists here\n".encode(),
    )


def test_export_pipes_straight_into_import(
    cmd: Cli, exported: tuple[str, bytes], tmp_path: Path
) -> None:
    cp, _ = exported
    fresh = Cli(cmd.redis_url, f"sqlite:///{tmp_path / 'fresh.db'}", cmd.prefix)
    cli_ = [sys.executable, "-m", "cfn_checkpoint.cli"]
    source = [*cli_, *cmd.argv("export", cp, "-o", "-")]
    target = [*cli_, *fresh.argv("import", "-")]
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; {shlex.join(source)} | {shlex.join(target)}"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_environ(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"imported checkpoint {cp} of task t1: ")
    assert checkpoint_ids(fresh) == [cp]


@pytest.mark.parametrize(
    ("how", "code", "words"),
    [
        ("truncated", 4, "export file stdin is truncated or altered"),
        ("tampered", 4, "export file stdin is truncated or altered"),
        ("not-an-export", 2, "stdin is not a cfn-checkpoint export file"),
        ("empty", 2, "stdin is not a cfn-checkpoint export file"),
    ],
)
def test_import_from_stdin_refuses_a_damaged_file(
    cmd: Cli, exported: tuple[str, bytes], tmp_path: Path, how: str, code: int, words: str
) -> None:
    _, blob = exported
    data = b"" if how == "empty" else damaged(blob, how)
    fresh = Cli(cmd.redis_url, f"sqlite:///{tmp_path / 'new.db'}", cmd.prefix)
    before = state(cmd)
    for target in (cmd, fresh):
        done = target.run_bytes("import", "-", stdin=data)
        assert done.returncode == code, done.stderr
        assert done.stderr.decode() == f"error: {words}\n" and done.stdout == b""
    assert state(cmd) == before
    assert not (tmp_path / "new.db").exists()


def test_export_file_is_not_written_to_a_terminal(
    cmd: Cli, exported: tuple[str, bytes], tmp_path: Path
) -> None:
    cp, _ = exported
    master, slave = pty.openpty()
    try:
        export = subprocess.run(
            [sys.executable, "-m", "cfn_checkpoint.cli", *cmd.argv("export", cp, "-o", "-")],
            stdin=subprocess.DEVNULL,
            stdout=slave,
            stderr=subprocess.PIPE,
            env=clean_environ(),
            timeout=60,
            check=False,
        )
        import_ = subprocess.run(
            [sys.executable, "-m", "cfn_checkpoint.cli", *cmd.argv("import", "-")],
            stdin=slave,
            capture_output=True,
            env=clean_environ(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(slave)
        os.close(master)
    assert export.returncode == 2
    assert export.stderr == (
        b"error: not writing an export file to a terminal: redirect stdout or give -o FILE\n"
    )
    assert import_.returncode == 2
    assert import_.stderr == (
        b"error: not reading an export file from a terminal: pipe one in or give FILE\n"
    )
