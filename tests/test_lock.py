"""Serialized per task (DESIGN guarantee 8), against the real Redis.

Create and recover of one task never interleave, across threads and processes;
different tasks proceed in parallel; the lock is released after an exception, only
by its owner, and renewed while held.

The interleaving checks instrument the real manager (its real capture, restore and
commit run unchanged): every section that must run under the task lock counts itself
in a Redis counter (two sections inside at once = an overlap) and probes the task lock
with a fresh ``TaskLock(timeout=0.1)``, which must time out because the section's own
create or recover holds it.
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointManager,
    CheckpointNotFoundError,
    KeyLayout,
    LockTimeoutError,
    ValidationError,
)
from cfn_checkpoint.runtime.lock import TaskLock

TASK = "lock-task"
OTHER = "lock-other"
#: Generous bound for "this must finish while that is still held": a deadlock detector,
#: not a speed requirement.
LIVENESS_SECONDS = 5.0

# Shared by the threads (loaded with runpy) and the child processes (run as a script).
HELPER = r'''
import json, sys, threading, time
from cfn_checkpoint import CheckpointConfig, CheckpointManager, KeyLayout, LockTimeoutError
from cfn_checkpoint.runtime.lock import TaskLock


def probe_keys(prefix):
    """Counters outside every task's key namespaces (never captured)."""
    return {n: f"{prefix}probe-{n}".encode() for n in ("inside", "overlaps", "entered", "unlocked")}


def instrument(mgr, task, *, probe_lock=True, hold=None):
    """Wrap the sections of ``mgr`` that must run under the lock of ``task``.

    ``hold``: a callable run inside each section, given its name (to block there).
    """
    client = mgr.runtime.client
    prefix = mgr.runtime.layout.prefix
    keys = probe_keys(prefix)

    def wrap(name, fn, probe):
        def section(*args, **kwargs):
            first = args[0] if args else None
            if getattr(first, "task_id", first) != task:
                return fn(*args, **kwargs)  # another task's section: not instrumented
            if client.incr(keys["inside"]) != 1:
                client.incr(keys["overlaps"])
            client.incr(keys["entered"])
            try:
                if probe:
                    other = TaskLock(client, task, prefix=prefix, timeout=0.1)
                    try:
                        other.acquire()
                    except LockTimeoutError:
                        pass
                    else:
                        client.incr(keys["unlocked"])
                        other.release()
                if hold is not None:
                    hold(name)
                time.sleep(0.002)  # widen the window an overlap would need
                return fn(*args, **kwargs)
            finally:
                client.decr(keys["inside"])
        return section

    mgr.runtime.capture = wrap("capture", mgr.runtime.capture, probe_lock)
    mgr.runtime.restore = wrap("restore", mgr.runtime.restore, probe_lock)
    mgr.store.commit_checkpoint = wrap("commit", mgr.store.commit_checkpoint, False)


def work(mgr, task, name, rounds):
    """Rounds of: change the task, create a checkpoint, recover the newest one."""
    writer = mgr.writer(task)
    for i in range(rounds):
        writer.put_agent(f"agent-{name}", {"round": i})
        writer.push_queue("log", f"{name}-{i}")
        mgr.create_checkpoint(task, metadata={"by": name, "round": i})
        mgr.recover_from_checkpoint(task)


def main():
    redis_url, db_url, prefix, task, name, rounds, mode = sys.argv[1:8]
    config = CheckpointConfig(enable_auto_cleanup=False, lock_timeout=120.0)
    layout = KeyLayout(prefix=prefix, cluster=redis_url.startswith("redis+cluster:"))
    mgr = CheckpointManager.open(redis_url, db_url, layout=layout,
                                 config=config)
    if mode == "work":
        instrument(mgr, task)
        print("ready", flush=True)
        sys.stdin.readline()  # "go"
        work(mgr, task, name, int(rounds))
        print("done", flush=True)
    elif mode in ("hold-create", "hold-recover"):
        def hold(section):
            if section in ("capture", "restore"):
                print(f"inside {section}", flush=True)
                sys.stdin.readline()  # held inside the section until the parent says so
        instrument(mgr, task, probe_lock=False, hold=hold)
        print("ready", flush=True)
        if mode == "hold-create":
            meta = mgr.create_checkpoint(task, metadata={"by": name})
            print(f"done {meta.checkpoint_id}", flush=True)
        else:
            result = mgr.recover_from_checkpoint(task)
            print(f"done {result.checkpoint_id}", flush=True)
    elif mode == "hold-lock":
        lock = TaskLock(mgr.runtime.client, task, prefix=prefix, ttl_ms=int(rounds))
        lock.acquire()
        print("locked " + lock.token.decode(), flush=True)
        time.sleep(3600)
    mgr.close()


if __name__ == "__main__":
    main()
'''


@pytest.fixture()
def helper_path(tmp_path: Path) -> Path:
    path = tmp_path / "lock_helper.py"
    path.write_text(HELPER)
    return path


@pytest.fixture()
def helper(helper_path: Path) -> dict[str, Any]:
    return runpy.run_path(str(helper_path))


def lock_key(prefix: str, task: str) -> bytes:
    return f"{prefix}cfn-checkpoint:lock:{{{task}}}".encode()


def counters(client: redis.Redis, helper: dict[str, Any], prefix: str) -> dict[str, int]:
    return {name: int(client.get(key) or 0) for name, key in helper["probe_keys"](prefix).items()}


def probe_is_locked(client: redis.Redis, prefix: str, task: str) -> bool:
    """True if a fresh holder cannot get the task lock within 0.1 s."""
    lock = TaskLock(client, task, prefix=prefix, timeout=0.1)
    try:
        lock.acquire()
    except LockTimeoutError as exc:
        assert "\n" not in str(exc)
        return True
    lock.release()
    return False


class Child:
    """A helper process talking over stdin/stdout lines."""

    def __init__(self, helper_path: Path, *args: str) -> None:
        env = dict(os.environ)
        src = str(Path(__file__).resolve().parents[1] / "src")
        env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
        self.proc = subprocess.Popen(
            [sys.executable, str(helper_path), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    def readline(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode().strip()
        if not line:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            pytest.fail(f"helper process said nothing: {err.decode(errors='replace')}")
        return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def finish(self) -> str:
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, err.decode(errors="replace")
        return out.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


@pytest.fixture()
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.kill()


def same_files_manager(
    redis_url: str, db_url: str, layout: KeyLayout, **config: Any
) -> CheckpointManager:
    """Another manager on the same Redis, SQLite file and prefix (as another process has)."""
    cfg = CheckpointConfig(enable_auto_cleanup=False, **config)
    return CheckpointManager.open(redis_url, db_url, layout=layout, config=cfg)


# -- create and recover never interleave ---------------------------------------------------


@pytest.mark.slow
def test_threads_and_processes_never_interleave_on_one_task(
    manager: CheckpointManager,
    client: redis.Redis,
    redis_url: str,
    db_url: str,
    prefix: str,
    helper: dict[str, Any],
    helper_path: Path,
    children: list[Child],
) -> None:
    rounds = 3
    manager.writer(TASK).put_agent("seed", {"round": -1})
    manager.create_checkpoint(TASK)  # so that the first recover has something to use
    helper["instrument"](manager, TASK)

    for name in ("proc-a", "proc-b"):
        child = Child(helper_path, redis_url, db_url, prefix, TASK, name, str(rounds), "work")
        children.append(child)
    for child in children:
        assert child.readline() == "ready"

    errors: list[BaseException] = []

    def thread_work(name: str) -> None:
        try:
            helper["work"](manager, TASK, name, rounds)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=thread_work, args=(n,)) for n in ("thr-a", "thr-b")]
    for child in children:
        child.send("go")
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outputs = [child.finish() for child in children]

    assert not errors, errors
    assert all("done" in out for out in outputs), outputs
    seen = counters(client, helper, prefix)
    # 4 workers x rounds x (capture + restore), plus commits of changed states.
    assert seen["entered"] >= 4 * rounds * 2, seen
    assert seen["overlaps"] == 0, f"create/recover sections interleaved: {seen}"
    assert seen["unlocked"] == 0, f"a section ran without the task lock held: {seen}"
    assert seen["inside"] == 0, seen
    assert client.exists(lock_key(prefix, TASK)) == 0
    # Every worker's checkpoints are there, all usable.
    made = manager.list_checkpoints(TASK)
    assert {m.metadata.get("by") for m in made} >= {"proc-a", "proc-b", "thr-a", "thr-b"}
    assert all(m.status in ("completed", "recovered") for m in made)


def test_probe_detects_a_section_run_without_the_lock(
    manager: CheckpointManager, client: redis.Redis, prefix: str, helper: dict[str, Any]
) -> None:
    """The instrument above can fail: a capture outside create is seen as unlocked."""
    manager.writer(TASK).put_agent("a", "x")
    helper["instrument"](manager, TASK)
    manager.runtime.capture(TASK)  # not under the task lock
    assert counters(client, helper, prefix)["unlocked"] == 1
    manager.create_checkpoint(TASK)  # under the task lock
    assert counters(client, helper, prefix)["unlocked"] == 1


def _held_in_thread(
    manager: CheckpointManager, helper: dict[str, Any], op: str
) -> tuple[threading.Thread, threading.Event, threading.Event, list[BaseException]]:
    """Run ``op`` (create or recover of TASK) in a thread, held inside its locked section."""
    entered, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(section: str) -> None:
        if section in ("capture", "restore"):
            entered.set()
            assert release.wait(60), "never released"

    helper["instrument"](manager, TASK, probe_lock=False, hold=hold)

    def run() -> None:
        try:
            if op == "create":
                manager.create_checkpoint(TASK)
            else:
                manager.recover_from_checkpoint(TASK)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert entered.wait(30), "the operation never reached its locked section"
    return thread, entered, release, errors


@pytest.mark.parametrize("op", ["create", "recover"])
def test_a_held_operation_blocks_create_and_recover_of_the_same_task_threads(
    manager: CheckpointManager,
    client: redis.Redis,
    redis_url: str,
    db_url: str,
    layout: KeyLayout,
    prefix: str,
    helper: dict[str, Any],
    op: str,
) -> None:
    writer = manager.writer(TASK)
    writer.put_agent("a", {"v": 1})
    first = manager.create_checkpoint(TASK)
    writer.put_agent("a", {"v": 2})

    thread, _, release, errors = _held_in_thread(manager, helper, op)
    try:
        assert probe_is_locked(client, prefix, TASK)
        impatient = CheckpointManager(
            manager.runtime,
            manager.store,
            config=CheckpointConfig(enable_auto_cleanup=False, lock_timeout=0.3),
        )
        with pytest.raises(LockTimeoutError):
            impatient.create_checkpoint(TASK)
        with pytest.raises(LockTimeoutError):
            impatient.recover_from_checkpoint(TASK, first.checkpoint_id)
    finally:
        release.set()
        thread.join(60)
    assert not thread.is_alive() and not errors, errors
    assert not probe_is_locked(client, prefix, TASK)
    # Once released, the same calls go through.
    manager.create_checkpoint(TASK)
    assert manager.recover_from_checkpoint(TASK, first.checkpoint_id).success


@pytest.mark.parametrize("op", ["create", "recover"])
@pytest.mark.parametrize("sharing", ["same-manager", "own-manager"])
def test_a_held_operation_does_not_block_another_task(
    manager: CheckpointManager,
    client: redis.Redis,
    redis_url: str,
    db_url: str,
    layout: KeyLayout,
    prefix: str,
    helper: dict[str, Any],
    op: str,
    sharing: str,
) -> None:
    """While a create/recover of TASK sits inside its locked section, OTHER goes through."""
    manager.writer(TASK).put_agent("a", {"v": 1})
    manager.create_checkpoint(TASK)
    manager.writer(TASK).put_agent("a", {"v": 2})
    manager.writer(OTHER).put_agent("b", {"v": 1})
    other_mgr = (
        manager if sharing == "same-manager" else same_files_manager(redis_url, db_url, layout)
    )
    thread, _, release, errors = _held_in_thread(manager, helper, op)
    done: list[str] = []
    other_errors: list[BaseException] = []

    def other_work() -> None:
        try:
            meta = other_mgr.create_checkpoint(OTHER)
            other_mgr.writer(OTHER).put_agent("b", {"v": 2})
            other_mgr.recover_from_checkpoint(OTHER, meta.checkpoint_id)
            done.append(meta.checkpoint_id)
        except BaseException as exc:
            other_errors.append(exc)

    other = threading.Thread(target=other_work, daemon=True)
    try:
        other.start()
        other.join(LIVENESS_SECONDS)
        finished_while_held = not other.is_alive()
        assert probe_is_locked(client, prefix, TASK)  # TASK really was held all along
    finally:
        release.set()
        thread.join(60)
        other.join(60)
        if other_mgr is not manager:
            other_mgr.close()
    assert not errors and not other_errors, (errors, other_errors)
    assert finished_while_held, (
        f"create+recover of {OTHER} waited for the held {op} of {TASK} ({sharing})"
    )
    assert done


def test_a_held_create_in_another_process_blocks_this_one(
    manager: CheckpointManager,
    client: redis.Redis,
    redis_url: str,
    db_url: str,
    layout: KeyLayout,
    prefix: str,
    helper_path: Path,
    children: list[Child],
) -> None:
    manager.writer(TASK).put_agent("a", {"v": 1})
    first = manager.create_checkpoint(TASK)
    manager.writer(TASK).put_agent("a", {"v": 2})
    manager.writer(OTHER).put_agent("b", {"v": 1})
    child = Child(helper_path, redis_url, db_url, prefix, TASK, "proc", "0", "hold-create")
    children.append(child)
    assert child.readline() == "ready"
    assert child.readline() == "inside capture"

    assert probe_is_locked(client, prefix, TASK)
    impatient = same_files_manager(redis_url, db_url, layout, lock_timeout=0.3)
    try:
        with pytest.raises(LockTimeoutError) as info:
            impatient.create_checkpoint(TASK)
        assert "\n" not in str(info.value) and TASK in str(info.value)
        with pytest.raises(LockTimeoutError):
            impatient.recover_from_checkpoint(TASK, first.checkpoint_id)
        # Another task is not held up by the other process's lock.
        impatient.create_checkpoint(OTHER)
    finally:
        impatient.close()
    assert manager.store.get_checkpoint(first.checkpoint_id) is not None
    assert len(manager.list_checkpoints(TASK)) == 1  # the child's create has not committed

    child.send("go on")
    out = child.finish()
    assert "done cp_" in out
    assert not probe_is_locked(client, prefix, TASK)
    assert len(manager.list_checkpoints(TASK)) == 2
    assert manager.recover_from_checkpoint(TASK, first.checkpoint_id).success


def test_a_held_recover_in_another_process_blocks_this_one(
    manager: CheckpointManager,
    client: redis.Redis,
    redis_url: str,
    db_url: str,
    layout: KeyLayout,
    prefix: str,
    helper_path: Path,
    children: list[Child],
) -> None:
    manager.writer(TASK).put_agent("a", {"v": 1})
    first = manager.create_checkpoint(TASK)
    manager.writer(TASK).put_agent("a", {"v": 2})
    child = Child(helper_path, redis_url, db_url, prefix, TASK, "proc", "0", "hold-recover")
    children.append(child)
    assert child.readline() == "ready"
    assert child.readline() == "inside restore"

    assert probe_is_locked(client, prefix, TASK)
    with pytest.raises(LockTimeoutError):
        TaskLock(client, TASK, prefix=prefix, timeout=0.3).acquire()
    # The restore has not happened yet: the task is still as this process left it.
    assert client.get(layout.key("agent", TASK, "a")) == b'{"v":2}'

    child.send("go on")
    assert f"done {first.checkpoint_id}" in child.finish()
    assert client.get(layout.key("agent", TASK, "a")) == b'{"v":1}'
    assert not probe_is_locked(client, prefix, TASK)


# -- the lock itself ------------------------------------------------------------------------


def test_lock_is_released_after_an_exception_inside(client: redis.Redis, prefix: str) -> None:
    key = lock_key(prefix, TASK)
    with pytest.raises(RuntimeError, match="boom"), TaskLock(client, TASK, prefix=prefix):
        assert client.exists(key) == 1
        raise RuntimeError("boom")
    assert client.exists(key) == 0
    assert not probe_is_locked(client, prefix, TASK)


def test_manager_releases_the_lock_when_create_or_recover_fails_inside(
    manager: CheckpointManager, client: redis.Redis, prefix: str
) -> None:
    key = lock_key(prefix, TASK)
    manager.writer(TASK).put_agent("a", "x")
    # An expected error raised under the lock: no checkpoint to recover.
    with pytest.raises(CheckpointNotFoundError):
        manager.recover_from_checkpoint(TASK)
    assert client.exists(key) == 0
    # A checkpoint of another task named for this one: refused under the lock.
    manager.writer(OTHER).put_agent("b", "y")
    other = manager.create_checkpoint(OTHER)
    with pytest.raises(ValidationError):
        manager.recover_from_checkpoint(TASK, other.checkpoint_id)
    assert client.exists(key) == 0

    # An unexpected error in the middle of create (the real capture, then a failure).
    capture = manager.runtime.capture

    def failing_capture(*args: Any, **kwargs: Any) -> Any:
        capture(*args, **kwargs)
        assert client.exists(key) == 1  # really inside the lock
        raise RuntimeError("capture blew up")

    manager.runtime.capture = failing_capture  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="capture blew up"):
        manager.create_checkpoint(TASK)
    manager.runtime.capture = capture  # type: ignore[method-assign]
    assert client.exists(key) == 0
    assert manager.list_checkpoints(TASK) == []
    assert manager.create_checkpoint(TASK).task_id == TASK


def test_release_only_by_the_owner_token(client: redis.Redis, prefix: str) -> None:
    key = lock_key(prefix, TASK)
    owner = TaskLock(client, TASK, prefix=prefix)
    owner.acquire()
    try:
        stranger = TaskLock(client, TASK, prefix=prefix, timeout=0.1)
        stranger.release()  # not its lock: must not free it
        assert client.get(key) == owner.token
        with pytest.raises(LockTimeoutError):
            stranger.acquire()
        assert client.get(key) == owner.token
    finally:
        owner.release()
    assert client.exists(key) == 0

    # A holder whose lock was lost (expired, taken over) cannot free the new owner's lock.
    old = TaskLock(client, TASK, prefix=prefix, ttl_ms=10_000)
    old.acquire()
    client.delete(key)  # as if its TTL had run out
    new = TaskLock(client, TASK, prefix=prefix, timeout=0.1)
    new.acquire()
    try:
        old.release()
        assert client.get(key) == new.token
        assert probe_is_locked(client, prefix, TASK)
    finally:
        new.release()
    assert client.exists(key) == 0


def test_renewal_keeps_a_held_lock_alive_past_its_ttl(client: redis.Redis, prefix: str) -> None:
    key = lock_key(prefix, TASK)
    lock = TaskLock(client, TASK, prefix=prefix, ttl_ms=300)
    lock.acquire()
    try:
        time.sleep(1.0)  # more than three TTLs
        assert client.get(key) == lock.token
        assert 0 < client.pttl(key) <= 300
        assert probe_is_locked(client, prefix, TASK)
    finally:
        lock.release()
    assert client.exists(key) == 0
    time.sleep(0.3)  # the renewer is gone: nothing brings the key back
    assert client.exists(key) == 0


def test_a_killed_holder_loses_the_lock_when_its_ttl_runs_out(
    redis_url: str,
    db_url: str,
    client: redis.Redis,
    prefix: str,
    helper_path: Path,
    children: list[Child],
) -> None:
    key = lock_key(prefix, TASK)
    child = Child(helper_path, redis_url, db_url, prefix, TASK, "holder", "500", "hold-lock")
    children.append(child)
    line = child.readline()
    assert line.startswith("locked ")
    assert client.get(key) == line.split()[1].encode()
    time.sleep(0.8)  # the child's renewer keeps it past its 500 ms TTL
    assert client.get(key) == line.split()[1].encode()
    child.proc.send_signal(signal.SIGKILL)
    child.kill()
    lock = TaskLock(client, TASK, prefix=prefix, timeout=10.0)
    lock.acquire()  # free again once the dead holder's TTL ran out
    try:
        assert client.get(key) == lock.token
    finally:
        lock.release()


def test_locks_of_different_tasks_and_prefixes_are_independent(
    client: redis.Redis, prefix: str
) -> None:
    held = TaskLock(client, "a", prefix=prefix)
    held.acquire()
    try:
        for task, pfx in (("a-b", prefix), ("b", prefix), ("a", prefix + "tenant2:")):
            other = TaskLock(client, task, prefix=pfx, timeout=0.1)
            other.acquire()  # must not wait for "a"
            other.release()
        assert probe_is_locked(client, prefix, "a")
    finally:
        held.release()
        client.delete(lock_key(prefix + "tenant2:", "a"))


def test_lock_refuses_a_bad_task_id(client: redis.Redis, prefix: str) -> None:
    with pytest.raises(ValidationError):
        TaskLock(client, "a}:b", prefix=prefix)
    assert list(client.scan_iter(match=f"{prefix}*")) == []


def test_a_lock_lost_while_held_stops_the_write(
    manager: CheckpointManager, client: redis.Redis, prefix: str
) -> None:
    """A holder whose lock expired (or was taken over) must not write on top of the new holder."""
    lock = TaskLock(client, TASK, prefix=prefix, ttl_ms=300, timeout=1)
    lock.acquire()
    try:
        client.set(lock.key, b"someone-else", px=5_000)  # another holder took over
        deadline = time.monotonic() + 5
        while not lock.lost.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(LockTimeoutError, match="lost the lock"):
            lock.check()
    finally:
        lock.release()
    assert client.get(lock.key) == b"someone-else"  # release only frees our own token
    client.delete(lock.key)
