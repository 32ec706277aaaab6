"""``watch``: periodic checkpoints in a subprocess, stopped by SIGTERM or SIGINT."""

from __future__ import annotations

import itertools
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest

from cfn_checkpoint import CheckpointManager, EmbeddedRedis, KeyLayout
from cfn_checkpoint._render import Output
from cfn_checkpoint._watch import Watcher, WatchLog
from cfn_checkpoint.scheduler import PeriodicOutcome

from cli_support import Cli, assert_one_line_error, clean_environ, write_task

INTERVAL = "300ms"
LINE = re.compile(
    r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (created|unchanged|error|cleanup)\s+(\S+) (.*)"
)


@pytest.fixture()
def cmd(redis_url: str, db_url: str, layout: KeyLayout) -> Cli:
    return Cli(redis_url, db_url, layout.prefix)


class Watch:
    """``cfn-checkpoint watch`` running in a subprocess, its stdout read line by line."""

    def __init__(self, cmd: Cli, *args: str, json_mode: bool = False) -> None:
        argv = cmd.argv("watch", "--interval", INTERVAL, *args, json_mode=json_mode)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cfn_checkpoint.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_environ(),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next(self) -> str:
        """The next line of output (fails after 15 s without one)."""
        return self.lines.get(timeout=15)

    def stop(self, sig: signal.Signals) -> tuple[int, str]:
        """Send ``sig``; the exit code and stderr."""
        self.proc.send_signal(sig)
        _, err = self.proc.communicate(timeout=15)
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture()
def watches() -> Iterator[list[Watch]]:
    started: list[Watch] = []
    yield started
    for watch in started:
        watch.kill()


def next_event(watch: Watch, cleanups: list[str]) -> tuple[str, str, str]:
    """The next created/unchanged/error line as (event, task, rest); cleanup lines are
    collected in ``cleanups``."""
    while True:
        line = watch.next()
        match = LINE.fullmatch(line)
        assert match, line
        event, task, rest = match.groups()
        if event != "cleanup":
            return event, task, rest
        cleanups.append(rest)


def test_watch_checkpoints_each_change_once_and_stops_on_sigterm(
    cmd: Cli, manager: CheckpointManager, watches: list[Watch]
) -> None:
    write_task(manager, "t1", 1)
    watch = Watch(cmd, "--task", "t1", "--retention", "0s")
    watches.append(watch)
    cleanups: list[str] = []
    created = []
    event, task, rest = next_event(watch, cleanups)
    assert (event, task) == ("created", "t1"), rest
    created.append(rest.split()[0])
    for step in (2, 3, 4):  # one change per interval: one checkpoint each
        write_task(manager, "t1", step)
        event, task, rest = next_event(watch, cleanups)
        assert (event, task) == ("created", "t1"), rest
        assert re.fullmatch(r"cp_t1_\S+ keys=9 rows=\d+ stored=\d+(\.\d)? (B|KiB)", rest)
        created.append(rest.split()[0])
    for _ in range(3):  # nothing changed: no new checkpoint
        assert next_event(watch, cleanups) == ("unchanged", "t1", created[-1])
    code, err = watch.stop(signal.SIGTERM)
    assert code == 0, err
    assert err == f"watching t1 every {INTERVAL}; Ctrl-C stops\nstopped\n"
    assert len(set(created)) == 4
    # Retention 0s: each new checkpoint let cleanup remove the one before it.
    assert cleanups == ["removed 1 old checkpoint"] * 3
    listed = cmd.json("list")
    assert [m["checkpoint_id"] for m in listed] == [created[-1]]
    assert listed[0]["trigger"] == "periodic" and listed[0]["status"] == "completed"
    assert cmd.json("list", "--status", "in_progress") == []
    assert cmd.json("verify", "--all")["corrupt"] == 0


def test_watch_json_every_active_task_and_sigint(
    cmd: Cli, manager: CheckpointManager, watches: list[Watch]
) -> None:
    write_task(manager, "t1", 1)
    write_task(manager, "t2", 1)
    watch = Watch(cmd, "--no-cleanup", json_mode=True)
    watches.append(watch)
    rounds = []
    for step in (2, 3, None, None):
        events = [json.loads(watch.next()), json.loads(watch.next())]
        rounds.append({e["task_id"]: e for e in events})
        if step is not None:
            write_task(manager, "t1", step)
    code, err = watch.stop(signal.SIGINT)
    assert code == 0, err
    assert [sorted(r) for r in rounds] == [["t1", "t2"]] * 4
    for n, expected in enumerate(["created", "created", "created", "unchanged"]):
        assert rounds[n]["t1"]["event"] == expected
        assert rounds[n]["t2"]["event"] == ("created" if n == 0 else "unchanged")
    first = rounds[0]["t1"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["checkpoint"]["trigger"] == "periodic"
    assert first["checkpoint"]["key_count"] == 9
    t1_ids = [r["t1"]["checkpoint"]["checkpoint_id"] for r in rounds]
    assert len(set(t1_ids)) == 3 and t1_ids[2] == t1_ids[3]
    assert len(cmd.json("list", "t1")) == 3  # --no-cleanup: all kept
    assert len(cmd.json("list", "t2")) == 1


def test_watch_logs_errors_and_keeps_going(db_url: str, prefix: str, watches: list[Watch]) -> None:
    server = EmbeddedRedis().start()
    try:
        cmd = Cli(server.url, db_url, prefix)
        with CheckpointManager.open(server.url, db_url, layout=KeyLayout(prefix=prefix)) as mgr:
            write_task(mgr, "t1", 1)
        watch = Watch(cmd, "--task", "t1")
        watches.append(watch)
        assert next_event(watch, [])[0] == "created"
        server.stop()  # Redis goes away under the running watch
        event, task, rest = next_event(watch, [])
        assert (event, task) == ("error", "t1") and "Redis unavailable" in rest
        assert next_event(watch, [])[:2] == ("error", "t1")
        code, err = watch.stop(signal.SIGTERM)
        assert code == 0, err
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--interval", "0s"], 2, "'0s' is too short: at least 100ms"),
        (["--interval", "99ms"], 2, "'99ms' is too short: at least 100ms"),
        (["--interval", "99999999d"], 2, "'99999999d' is too long: at most 36500d (100 years)"),
        (["--retention", "36501d"], 2, "'36501d' is too long: at most 36500d"),
        (["--interval", "5 minutes"], 2, "is not a duration"),
        (["--retention", "-1d"], 2, "is not a duration"),
        (["--task", "nosuch"], 3, "unknown task 'nosuch'"),
        (["--task", "bad:id"], 2, "contains ':'"),
    ],
)
def test_watch_refuses_bad_options(
    cmd: Cli, manager: CheckpointManager, args: list[str], code: int, words: str
) -> None:
    write_task(manager, "t1", 1)
    assert_one_line_error(cmd("watch", *args, code=code), code, words)
    assert cmd.json("list") == []


# -- what a round logs, and when rounds start ------------------------------------------------


def test_a_checkpoint_another_process_stored_is_logged_unchanged(
    manager: CheckpointManager,
    redis_url: str,
    db_url: str,
    layout: KeyLayout,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_task(manager, "t1", 1)
    mine = Watcher(
        manager,
        log=WatchLog(Output(json_mode=True)),
        interval=timedelta(seconds=1),
        tasks=["t1"],
        cleanup=False,
    )
    mine.run_once()
    first = json.loads(capsys.readouterr().out)
    assert first["event"] == "created"
    write_task(manager, "t1", 2)
    # Another watch checkpoints the change while this one looks at the task's newest
    # checkpoint, and its checkpoint lands just after that look.
    stale = manager.store.usable_checkpoints("t1")
    with CheckpointManager.open(redis_url, db_url, layout=layout) as other:
        theirs = other.create_checkpoint("t1", "periodic")
    looks = iter([stale])
    real = manager.store.usable_checkpoints
    monkeypatch.setattr(manager.store, "usable_checkpoints", lambda t: next(looks, None) or real(t))
    (outcome,) = mine.run_once()
    assert outcome.checkpoint is not None
    assert outcome.checkpoint.checkpoint_id == theirs.checkpoint_id  # the task was unchanged
    assert stale[0].checkpoint_id != theirs.checkpoint_id  # ids alone would say "created"
    logged = json.loads(capsys.readouterr().out)
    assert logged["event"] == "unchanged"
    assert logged["checkpoint"]["checkpoint_id"] == theirs.checkpoint_id
    # A change of its own is still logged as created.
    write_task(manager, "t1", 3)
    mine.run_once()
    assert json.loads(capsys.readouterr().out)["event"] == "created"


@pytest.mark.parametrize(
    ("work", "gap"), [(0.15, 0.3), (0.45, 0.6)], ids=["within-interval", "overrun"]
)
def test_rounds_start_at_a_fixed_rate(manager: CheckpointManager, work: float, gap: float) -> None:
    starts: list[float] = []

    class Timed(Watcher):
        def run_once(self) -> list[PeriodicOutcome]:
            starts.append(time.monotonic())
            time.sleep(work)
            if len(starts) == 4:
                self.stopping.set()
            return []

    watcher = Timed(
        manager, log=WatchLog(Output()), interval=timedelta(milliseconds=300), tasks=["t1"]
    )
    watcher.run_forever()
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Not interval + work: the next round starts one interval (or, after an overrun, the
    # next free slot) after the previous one started.
    assert all(abs(g - gap) < 0.1 for g in gaps), gaps
