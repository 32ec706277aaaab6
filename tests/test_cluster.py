"""Redis Cluster: the launcher, the URL scheme and its errors, both key layouts on a real
cluster, and a failover in the middle of checkpoints and recoveries.

The rest of the suite runs on a cluster too (``CFN_TEST_RUNTIME=cluster``), with the
cluster layout; the tests here cover what only a cluster has.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from redis.cluster import RedisCluster
from redis.crc import key_slot

from cfn_checkpoint import (
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    EmbeddedRedis,
    KeyLayout,
    StoreUnavailableError,
    ValidationError,
)
from cfn_checkpoint.cli import cli
from cfn_checkpoint.runtime import connection
from cfn_checkpoint.runtime.connection import connect
from cfn_checkpoint.runtime.embedded import bundled_redis_server, find_redis_server
from cfn_checkpoint.runtime.embedded_cluster import EmbeddedCluster
from cfn_checkpoint.runtime.redis_runtime import RedisRuntime

from conftest import cluster_binary, redis_client, require, task_state, wipe

#: Run with the cluster runtime of the matrix (CFN_TEST_RUNTIME=cluster, or all), visibly
#: deselected otherwise.
pytestmark = pytest.mark.backends("cluster")


@pytest.fixture(autouse=True)
def _cluster_runs(runtime_kind: str) -> None:
    """Ties every test here to the matrix's runtime kind (for the marker above)."""


CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    ("CFN_REDIS_URL", "CFN_REDIS_HOST", "CFN_REDIS_PORT", "CFN_KEY_LAYOUT", "CFN_KEY_PREFIX")
)


def _binaries() -> list[Any]:
    system = shutil.which("redis-server")
    return [
        pytest.param(system, id="system"),
        pytest.param(bundled_redis_server(), id="bundled-6.2"),
    ]


def write_task(client: redis.Redis | RedisCluster, layout: KeyLayout, task: str) -> None:
    """Keys of every type, some with TTLs, a few dozen of them (so over many slots under
    the reference layout)."""
    for i in range(20):
        client.set(layout.key("agent", task, f"agent-{i}"), f'{{"step": {i}}}'.encode())
    client.set(layout.key("signal", task, "phase"), b"review", px=600_000)
    client.hset(layout.key("signal", task, "progress"), mapping={"coder": "1", "tester": "2"})
    client.sadd(layout.key("signal", task, "consensus"), "coder", "tester")
    client.rpush(layout.key("queue", task, "review"), "p1", "p2", "p3")
    client.zadd(layout.key("queue", task, "priority"), {"p1": 1.5, "p2": 2})
    client.xadd(layout.key("queue", task, "events"), {"event": "started"})
    client.set(layout.key("lock", task, "workspace"), b"coder-1", px=600_000)


def change_task(client: redis.Redis | RedisCluster, layout: KeyLayout, task: str) -> None:
    client.set(layout.key("agent", task, "agent-3"), b"changed")
    client.delete(layout.key("agent", task, "agent-7"))
    client.set(layout.key("agent", task, "created-later"), b"x")
    client.rpush(layout.key("queue", task, "review"), "p4")
    client.xadd(layout.key("queue", task, "events"), {"event": "later"})


# -- the launcher ------------------------------------------------------------------------


@pytest.mark.parametrize("binary", _binaries())
def test_embedded_cluster_forms_serves_and_goes_away(binary: str | None) -> None:
    require(binary is not None, "no such redis-server here")
    cluster = EmbeddedCluster(primaries=3, binary=binary)
    with cluster:
        if binary == bundled_redis_server():
            assert cluster.version().startswith("6.2.")
        assert cluster.url.startswith("redis+cluster://127.0.0.1:")
        assert len(cluster.primary_ports()) == 3
        client = redis_client(cluster.url)
        try:
            info = client.cluster_info()
            assert info["cluster_state"] == "ok" and int(info["cluster_slots_assigned"]) == 16384
            for n in range(50):  # keys land on every primary
                client.set(f"k{n}", n)
            assert client.dbsize(target_nodes=RedisCluster.PRIMARIES) == 50
            assert all(client.dbsize(target_nodes=node) > 0 for node in client.get_primaries())
        finally:
            client.close()
        pids = [node.pid for node in cluster.nodes]
        dirs = [node._workdir for node in cluster.nodes]
    assert not cluster.running and cluster.nodes == []
    for pid, workdir in zip(pids, dirs, strict=True):
        assert pid is not None and not Path(f"/proc/{pid}").exists()
        assert workdir is not None and not os.path.exists(workdir)


def test_embedded_cluster_with_replicas_fails_over() -> None:
    with EmbeddedCluster(primaries=2, replicas=1, binary=cluster_binary()) as cluster:
        first = cluster.primary_ports()
        assert len(first) == 2 and len(cluster.ports) == 4
        (replica,) = cluster.replica_ports(first[0])
        assert cluster.failover(first[0]) == replica
        assert cluster.primary_ports() == [replica, first[1]]
        assert cluster.replica_ports(replica) == [first[0]]


# -- URLs and their errors ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def tcp_server() -> Iterator[EmbeddedRedis]:
    """A single, non-cluster server on a TCP port."""
    with EmbeddedRedis(port=_free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def password_cluster() -> Iterator[EmbeddedCluster]:
    """A one-primary cluster that requires a password (with characters URLs must quote)."""
    with EmbeddedCluster(primaries=1, binary=cluster_binary(), password="s3cret:/@") as cluster:
        yield cluster


def test_a_cluster_url_to_a_plain_server_is_one_clear_error(
    tcp_server: EmbeddedRedis, tmp_path: Path
) -> None:
    started = time.monotonic()
    with pytest.raises(ValidationError) as caught:
        connect(f"redis+cluster://127.0.0.1:{tcp_server.port}")
    assert time.monotonic() - started < 2
    assert str(caught.value) == (
        f"redis+cluster://127.0.0.1:{tcp_server.port} is not a Redis Cluster "
        "(cluster_enabled:0): use redis:// for a single server"
    )
    url = f"redis+cluster://127.0.0.1:{tcp_server.port}"
    db = f"sqlite:///{tmp_path / 'cfn.db'}"
    result = CliRunner().invoke(
        cli, ["--redis-url", url, "--durable-url", db, "create", "t"], env=CLEAN_ENV
    )
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "is not a Redis Cluster" in result.stderr


def test_a_plain_url_to_a_cluster_node_says_to_use_the_cluster_scheme(
    password_cluster: EmbeddedCluster,
) -> None:
    port = password_cluster.ports[0]
    with pytest.raises(ValidationError, match=r"is a Redis Cluster node \(cluster_enabled:1\)"):
        connect(f"redis://:s3cret%3A%2F%40@127.0.0.1:{port}/0")


def test_password_in_a_cluster_url(password_cluster: EmbeddedCluster, tmp_path: Path) -> None:
    assert "s3cret%3A%2F%40@" in password_cluster.url
    layout = KeyLayout(prefix="pw:", cluster=True)
    db = f"sqlite:///{tmp_path / 'cfn.db'}"
    with CheckpointManager.open(password_cluster.url, db) as mgr:
        assert mgr.runtime.cluster and mgr.layout == KeyLayout(cluster=True)
    with CheckpointManager.open(password_cluster.url, db, layout=layout) as mgr:
        write_task(mgr.runtime.client, layout, "t")
        meta = mgr.create_checkpoint("t")
        assert meta.point_in_time and meta.key_count == 27
        mgr.runtime.client.delete(layout.key("agent", "t", "agent-1"))
        assert mgr.recover_from_checkpoint("t").keys_restored == 27
        wipe(mgr.runtime.client, "pw:")


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (":wrong@", "Redis refused the credentials while connecting"),
        ("", "Redis refused the credentials while connecting"),
    ],
    ids=["wrong-password", "no-password"],
)
def test_a_wrong_or_missing_password_is_one_clear_error(
    password_cluster: EmbeddedCluster, auth: str, message: str
) -> None:
    url = f"redis+cluster://{auth}127.0.0.1:{password_cluster.ports[0]}"
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match=message) as caught:
        connect(url)
    assert time.monotonic() - started < 2
    assert "wrong" not in str(caught.value)  # the password is not shown


def test_an_unreachable_cluster_node_is_one_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="Redis unavailable while connecting to"):
        connect(f"redis+cluster://127.0.0.1:{_free_port()}")
    assert time.monotonic() - started < 2


def test_a_node_that_never_answers_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(connection, "PROBE_TIMEOUT", 0.5)
    with socket.socket() as silent:  # accepts connections, never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="Timeout"):
            connect(f"redis+cluster://127.0.0.1:{port}")
        assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000/3",
        "redis+cluster:///no-host",
        "rediss+cluster://h:1?db=2",
        "redis+cluster://:pw@[::1",
        "redis+cluster://127.0.0.1:notaport",
    ],
)
def test_malformed_cluster_urls(url: str) -> None:
    with pytest.raises(ValidationError, match="malformed Redis Cluster URL"):
        connect(url)


def test_rediss_cluster_speaks_tls(tcp_server: EmbeddedRedis) -> None:
    """The TLS scheme really uses TLS: a plain server cannot complete the handshake."""
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="Redis unavailable"):
        connect(f"rediss+cluster://127.0.0.1:{tcp_server.port}")
    assert time.monotonic() - started < 6


# -- the runtime on a cluster ------------------------------------------------------------


@pytest.fixture()
def cluster_url(redis_cluster: EmbeddedCluster) -> str:
    return redis_cluster.url


@pytest.fixture(params=["cluster-layout", "reference-layout"])
def any_layout(
    request: pytest.FixtureRequest, prefix: str, cluster_url: str
) -> Iterator[KeyLayout]:
    """Both key layouts on the session's cluster; the test's keys are wiped afterwards."""
    yield KeyLayout(prefix=prefix, cluster=request.param == "cluster-layout")
    client = redis_client(cluster_url)
    try:
        wipe(client, prefix)
    finally:
        client.close()


SMALL = CheckpointConfig(
    atomic_max_keys=10, batch_keys=4, stream_min_keys=15, enable_auto_cleanup=False
)


def test_the_default_layout_of_a_cluster_is_the_cluster_layout(
    cluster_url: str, tmp_path: Path
) -> None:
    with CheckpointManager.open(cluster_url, f"sqlite:///{tmp_path / 'cfn.db'}") as mgr:
        assert isinstance(mgr.runtime.client, RedisCluster)
        assert mgr.layout.cluster and mgr.runtime.layout.cluster
        assert mgr.writer("t").layout.cluster
        assert RedisRuntime(mgr.runtime.client).layout == KeyLayout(cluster=True)


def test_the_reference_layout_on_a_cluster_is_captured_node_by_node(
    cluster_url: str, prefix: str, tmp_path: Path
) -> None:
    layout = KeyLayout(prefix=prefix)
    db = f"sqlite:///{tmp_path / 'cfn.db'}"
    with CheckpointManager.open(cluster_url, db, layout=layout) as mgr:
        client = mgr.runtime.client
        try:
            write_task(client, layout, "t")
            write_task(client, layout, "other")
            keys = mgr.runtime.task_keys("t")
            assert len(keys) == 27 and len({key_slot(k) for k in keys}) > 20
            assert len({client.get_node_from_key(k).name for k in keys}) == 3
            meta = mgr.create_checkpoint("t")
            assert meta.point_in_time is False
            assert meta.metadata == {"runtime_capture": "node_by_node"}
            assert meta.key_count == 27
            # Unchanged, TTLs ticking down: the same checkpoint, though read slot by slot.
            assert mgr.create_checkpoint("t").checkpoint_id == meta.checkpoint_id
            expected = task_state(client, f"{prefix}*:t:")
            other = task_state(client, f"{prefix}*:other:")
            assert len(expected) == 27 and len(other) == 27
            change_task(client, layout, "t")
            result = mgr.recover_from_checkpoint("t")
            assert result.success and result.atomic is False
            assert (result.keys_restored, result.keys_removed) == (27, 1)
            assert task_state(client, f"{prefix}*:t:") == expected
            assert task_state(client, f"{prefix}*:other:") == other
            assert mgr.diff(meta.checkpoint_id).keys == []
            assert mgr.verify_checkpoint(meta.checkpoint_id).key_count == 27
        finally:
            wipe(client, prefix)


def test_the_cluster_layout_is_one_slot_and_point_in_time(
    cluster_url: str, prefix: str, tmp_path: Path
) -> None:
    layout = KeyLayout(prefix=prefix, cluster=True)
    with CheckpointManager.open(
        cluster_url, f"sqlite:///{tmp_path / 'cfn.db'}", layout=layout
    ) as mgr:
        client = mgr.runtime.client
        try:
            write_task(client, layout, "t")
            keys = mgr.runtime.task_keys("t")
            assert len(keys) == 27 and {key_slot(k) for k in keys} == {key_slot(b"{t}")}
            meta = mgr.create_checkpoint("t")
            assert meta.point_in_time and meta.metadata == {}
            expected = task_state(client, f"{prefix}*:{{t}}:")
            change_task(client, layout, "t")
            result = mgr.recover_from_checkpoint("t")
            assert result.atomic and (result.keys_restored, result.keys_removed) == (27, 1)
            assert task_state(client, f"{prefix}*:{{t}}:") == expected
        finally:
            wipe(client, prefix)


@pytest.mark.parametrize(
    "config",
    [CheckpointConfig(enable_auto_cleanup=False), SMALL],
    ids=["atomic", "batches-and-streaming"],
)
def test_no_crossslot_anywhere(
    cluster_url: str, any_layout: KeyLayout, tmp_path: Path, config: CheckpointConfig
) -> None:
    """Every operation, with tasks read whole, in batches and streamed, under both
    layouts: no multi-key command or script ever spans slots (CROSSSLOT)."""
    layout = any_layout
    db = f"sqlite:///{tmp_path / 'cfn.db'}"
    with CheckpointManager.open(cluster_url, db, layout=layout, config=config) as mgr:
        client = mgr.runtime.client
        write_task(client, layout, "t")
        mgr.durable.record_audit_event("t", "started")
        first = mgr.create_checkpoint("t")
        change_task(client, layout, "t")
        second = mgr.create_checkpoint("t")  # a delta against the first (or streamed)
        assert second.checkpoint_id != first.checkpoint_id
        assert [t.task_id for t in mgr.tasks()] == ["t"]
        assert mgr.diff(first.checkpoint_id, second.checkpoint_id).keys
        plan = mgr.plan_recovery("t", first.checkpoint_id)
        assert plan.changes.keys
        expected = {e.key: e.value for e in mgr.load_checkpoint(first.checkpoint_id).entries}
        mgr.recover_from_checkpoint("t", first.checkpoint_id, restore_durable=True)
        live = mgr.live_state("t")
        assert {e.key: e.value for e in live.entries} == expected
        assert mgr.diff(first.checkpoint_id).keys == []
        assert mgr.runtime.delete_task("t") == 27
        mgr.recover_from_checkpoint("t", second.checkpoint_id)
        assert len(mgr.runtime.task_keys("t")) == 27
        assert all(error is None for _, error in mgr.verify_all())


def test_keys_created_between_listing_and_writing_are_caught(
    cluster_url: str, prefix: str, tmp_path: Path
) -> None:
    """Under the cluster layout the capture and the restore scripts see, at the instant
    they run, a key of the task that appeared after the keys were listed, and try again
    with it: the capture includes it, the restore removes it."""
    layout = KeyLayout(prefix=prefix, cluster=True)
    db = f"sqlite:///{tmp_path / 'cfn.db'}"
    with CheckpointManager.open(cluster_url, db, layout=layout) as mgr:
        client = mgr.runtime.client
        runtime = mgr.runtime
        listed = runtime.task_keys
        sneaked: list[bytes] = []

        def list_then_write(task_id: str) -> list[bytes]:
            keys = listed(task_id)
            # A writer quicker than the next step: a new key right after the listing.
            sneaked.append(layout.key("agent", task_id, f"sneaked-{len(sneaked)}"))
            client.set(sneaked[-1], b"x")
            return keys

        try:
            write_task(client, layout, "t")
            runtime.task_keys = list_then_write  # type: ignore[method-assign]
            meta = mgr.create_checkpoint("t")
            runtime.task_keys = listed  # type: ignore[method-assign]
            assert len(sneaked) == 1 and meta.point_in_time and meta.key_count == 28
            assert sneaked[0] in {e.key for e in mgr.load_checkpoint(meta.checkpoint_id).entries}
            client.delete(sneaked[0])
            plain = mgr.create_checkpoint("t")
            assert plain.key_count == 27
            runtime.task_keys = list_then_write  # type: ignore[method-assign]
            result = mgr.recover_from_checkpoint("t", plain.checkpoint_id)
            runtime.task_keys = listed  # type: ignore[method-assign]
            assert len(sneaked) == 2 and result.atomic and result.keys_removed == 1
            assert client.exists(sneaked[1]) == 0
            assert listed("t") == sorted(
                e.key for e in mgr.load_checkpoint(plain.checkpoint_id).entries
            )
        finally:
            runtime.task_keys = listed  # type: ignore[method-assign]
            wipe(client, prefix)


def test_ttls_count_on_the_clock_of_the_tasks_node(cluster_url: str, tmp_path: Path) -> None:
    with CheckpointManager.open(cluster_url, f"sqlite:///{tmp_path / 'cfn.db'}") as mgr:
        node = mgr.runtime.client.get_node_from_key(b"{t}")
        seconds, micros = mgr.runtime.client.time(target_nodes=node)
        ms = mgr.runtime.server_time_ms("t")
        assert 0 <= ms - (int(seconds) * 1000 + int(micros) // 1000) < 1000


# -- failover ----------------------------------------------------------------------------


@pytest.mark.slow
def test_failover_during_checkpoints_and_recoveries(tmp_path: Path) -> None:
    """Primaries fail over, by hand (CLUSTER FAILOVER) and by a crash (SIGKILL), while
    checkpoints and recoveries of a task run in a loop and a writer changes it. Each
    call either works or raises a CheckpointError; afterwards every checkpoint verifies,
    holds one instant's state, and a recovery restores it exactly."""
    db = f"sqlite:///{tmp_path / 'cfn.db'}"
    layout = KeyLayout(prefix="fo:", cluster=True)
    names = [f"agent-{i}" for i in range(8)]
    with EmbeddedCluster(
        primaries=3, replicas=1, binary=cluster_binary(), node_timeout_ms=1000
    ) as cluster:
        config = CheckpointConfig(enable_auto_cleanup=False, lock_timeout=5.0)
        mgr = CheckpointManager.open(cluster.url, db, layout=layout, config=config)
        writer = redis_client(cluster.url)
        stop = threading.Event()
        outcomes: dict[str, int] = {"created": 0, "recovered": 0, "refused": 0}
        unexpected: list[BaseException] = []

        def write() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                try:  # one transaction: every key of the task carries the same n
                    pipe = writer.pipeline(transaction=True)
                    for name in names:
                        pipe.set(layout.key("agent", "t", name), str(n))
                    pipe.hset(layout.key("signal", "t", "progress"), "n", str(n))
                    pipe.execute()
                except (redis.RedisError, redis.exceptions.RedisClusterException):
                    time.sleep(0.05)  # the writer rides out the failover on its own

        def checkpoint_and_recover() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 4 == 0:
                        mgr.recover_from_checkpoint("t")
                        outcomes["recovered"] += 1
                    else:
                        mgr.create_checkpoint("t", metadata={"i": i})
                        outcomes["created"] += 1
                except CheckpointError:
                    outcomes["refused"] += 1
                    time.sleep(0.05)
                except BaseException as exc:  # anything else is a bug
                    unexpected.append(exc)
                    return

        threads = [threading.Thread(target=write), threading.Thread(target=checkpoint_and_recover)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1)
            for port in cluster.primary_ports():  # each primary, by hand
                cluster.failover(port)
                time.sleep(0.5)
            with contextlib.closing(redis_client(cluster.url)) as fresh:
                owner = fresh.get_node_from_key(b"{t}").port
            cluster.kill(owner)  # the task's primary crashes
            cluster.wait_ok(timeout=30)
            time.sleep(1)
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=60)
        # A create or recover whose unlock met the crashed primary leaves the task lock
        # to its TTL (30 s) on the promoted replica; remove it rather than wait.
        writer.delete(b"fo:cfn-checkpoint:lock:{t}")
        writer.close()
        assert not unexpected, unexpected
        assert outcomes["created"] > 5 and outcomes["recovered"] > 1, outcomes

        checkpoints = mgr.list_checkpoints("t")
        assert checkpoints and all(error is None for _, error in mgr.verify_all("t"))
        for meta in checkpoints:
            entries = mgr.load_checkpoint(meta.checkpoint_id).entries
            values = {
                e.value if isinstance(e.value, bytes) else dict(e.value)[b"n"] for e in entries
            }
            assert meta.point_in_time and len(entries) == 9 and len(values) == 1, meta
        newest = checkpoints[0]
        result = mgr.recover_from_checkpoint("t", newest.checkpoint_id)
        assert result.success and result.atomic
        assert mgr.diff(newest.checkpoint_id).keys == []
        mgr.close()


def test_find_redis_server_is_used_for_the_session_cluster() -> None:
    assert cluster_binary() in (find_redis_server(), bundled_redis_server())


@pytest.mark.backends("cluster")
def test_a_frozen_primary_is_an_error_within_the_command_timeout(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A primary that stops answering (SIGSTOP: no crash, no failover, no replica) ends a
    create with one StoreUnavailableError after (1 + retries) x the command timeout,
    instead of redis-py's defaults (60 s x 10 tries)."""
    monkeypatch.setattr(connection, "COMMAND_TIMEOUT", 1.0)
    layout = KeyLayout(prefix="frozen:", cluster=True)
    with EmbeddedCluster(primaries=3, binary=cluster_binary()) as cluster:
        config = CheckpointConfig(enable_auto_cleanup=False, lock_timeout=5.0)
        mgr = CheckpointManager.open(
            cluster.url, f"sqlite:///{tmp_path / 'cfn.db'}", layout=layout, config=config
        )
        try:
            mgr.writer("t").put_agent("coder", {"step": 1})
            mgr.create_checkpoint("t")
            owner = mgr.runtime.client.get_node_from_key(b"{t}").port
            (node,) = [n for n in cluster.nodes if n.port == owner]
            assert node.pid is not None
            os.kill(node.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(StoreUnavailableError, match="Timeout|timed out"):
                    mgr.create_checkpoint("t")
                elapsed = time.monotonic() - started
            finally:
                os.kill(node.pid, signal.SIGCONT)
            # 1 + CLUSTER_RETRIES tries of 1 s each, plus at most 2 s of backoff between.
            assert elapsed < 1 + connection.CLUSTER_RETRIES * 3 + 2, elapsed
        finally:
            mgr.close()
