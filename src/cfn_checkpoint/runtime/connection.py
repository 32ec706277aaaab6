"""Connecting to Redis (one server or a Redis Cluster), and turning its errors into ours.

URLs::

    redis://[[user]:password@]host[:port][/db]     one server (rediss:// with TLS)
    unix://[[user]:password@]/path/to/redis.sock   one server on a unix socket
    redis+cluster://[[user]:password@]host[:port]  a Redis Cluster (rediss+cluster:// with TLS)

For a cluster one seed node is enough: the client learns the others from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    ClusterError,
    InvalidResponse,
    RedisClusterException,
    TryAgainError,
)
from redis.retry import Retry

from ..errors import CheckpointError, StoreUnavailableError, ValidationError
from .packer import CommandPacker

#: A client of the runtime tier: one server, or a whole Redis Cluster.
RedisClient: TypeAlias = redis.Redis | RedisCluster

#: URL schemes that name a Redis Cluster, and the plain scheme each one stands for.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

#: Seconds to wait for a TCP connection to a node.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for an answer while checking what a URL points to.
PROBE_TIMEOUT = 5.0
#: Seconds to wait for the answer to one command. The longest single command is a
#: capture or restore script of up to ``atomic_max_keys`` (50,000) keys: about 1 s on
#: the benchmark machine.
COMMAND_TIMEOUT = 10.0
#: How often a call that met a timeout or a lost connection is tried again: on one
#: server once; on a cluster three times, each after refreshing the slot map, so a
#: replica promoted meanwhile is found. A server that stops answering is therefore
#: reported after at most (1 + retries) x COMMAND_TIMEOUT, plus a few seconds of backoff.
RETRIES = 1
CLUSTER_RETRIES = 3

#: Errors of redis-py's cluster client that mean the cluster cannot serve us right now
#: (a failover or a resharding under way, slots not covered): not a refused command.
_CLUSTER_TRANSIENT: tuple[type[Exception], ...] = (
    ClusterDownError,
    ClusterError,
    AskError,  # MovedError too: redirects redis-py gave up following
    TryAgainError,
    RedisClusterException,
)

#: Every error a call to Redis may raise: what code that must not fail on Redis catches.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


@contextlib.contextmanager
def redis_errors(
    action: str, refused: type[CheckpointError] = StoreUnavailableError
) -> Iterator[None]:
    """Turn redis-py errors into :class:`CheckpointError`: an unreachable server, or a
    cluster that cannot serve the request now, into :class:`StoreUnavailableError`; a
    refused command (OOM, NOPERM, a script error) into ``refused``."""
    try:
        yield
    except redis.AuthenticationError as exc:
        raise StoreUnavailableError(f"Redis refused the credentials while {action}: {exc}") from exc
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailableError(f"Redis unavailable while {action}: {exc}") from exc
    except InvalidResponse as exc:  # another protocol on that port (HTTP, a proxy, ...)
        raise StoreUnavailableError(
            f"no Redis protocol answer while {action} (not a Redis server?): {exc}"
        ) from exc
    except _CLUSTER_TRANSIENT as exc:
        reason = str(exc) or type(exc).__name__
        raise StoreUnavailableError(
            f"Redis Cluster could not serve the request while {action} (failover or "
            f"resharding under way?): {reason}"
        ) from exc
    except redis.ResponseError as exc:
        raise refused(f"Redis refused a command while {action}: {exc}") from exc


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``, for messages and logs."""
    try:
        parsed = urlsplit(url)
        if parsed.password is None:
            return url
    except ValueError:  # unparseable: say nothing of it that could be a secret
        return "<unparseable URL>"
    user = parsed.username or ""
    host = parsed.netloc.rsplit("@", 1)[1]
    return urlunsplit(parsed._replace(netloc=f"{user}:***@{host}"))


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.split("://", 1)[0].lower() in CLUSTER_SCHEMES


def connect(url: str, *, socket_timeout: float | None = None) -> RedisClient:
    """A client for ``url`` that fails fast, with one clear error.

    Each command waits ``socket_timeout`` seconds for its answer (default
    :data:`COMMAND_TIMEOUT`) and is tried again :data:`RETRIES` times
    (:data:`CLUSTER_RETRIES` on a cluster) after a timeout or a lost connection.

    ``redis://``, ``rediss://`` and ``unix://`` give a :class:`redis.Redis`;
    ``redis+cluster://`` and ``rediss+cluster://`` a :class:`redis.cluster.RedisCluster`.
    A plain URL naming a cluster node, or a cluster URL naming a server that is not
    one, is refused with a :class:`~cfn_checkpoint.errors.ValidationError` saying so.
    """
    try:
        urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed '[': say nothing of it that could be a secret
        kind = "Redis Cluster URL" if is_cluster_url(url) else "Redis URL"
        raise ValidationError(f"malformed {kind} {redact_url(url)!r}: {exc}") from None
    if "://" not in url:
        raise ValidationError(f"malformed Redis URL {redact_url(url)!r}: no scheme")
    timeout = COMMAND_TIMEOUT if socket_timeout is None else socket_timeout
    if is_cluster_url(url):
        return _connect_cluster(url, timeout)
    # A probe with a short timeout first: a server that accepts and never answers is
    # reported within PROBE_TIMEOUT, not after the client's socket_timeout.
    probe = _plain(url, PROBE_TIMEOUT, retries=0)
    try:
        with redis_errors(f"connecting to {redact_url(url)}"):
            probe.ping()
        if _cluster_enabled(probe, url):
            host = urlsplit(url).netloc.rsplit("@", 1)[-1] or "host:port"
            raise ValidationError(
                f"{redact_url(url)} is a Redis Cluster node (cluster_enabled:1): use "
                f"redis+cluster://{host} to reach the whole cluster"
            )
    finally:
        probe.close()
    return _plain(url, timeout, retries=RETRIES)


def _retry(retries: int) -> Retry:
    return Retry(ExponentialWithJitterBackoff(base=0.25, cap=2.0), retries)


def _plain(
    url: str, socket_timeout: float, shown: str | None = None, *, retries: int = 0
) -> redis.Redis:
    try:
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=socket_timeout,
            retry=_retry(retries),
            decode_responses=False,
            command_packer=CommandPacker(),
        )
    except ValueError as exc:
        kind = "Redis URL" if shown is None else "Redis Cluster URL"
        raise ValidationError(f"malformed {kind} {shown or redact_url(url)!r}: {exc}") from exc


def _cluster_enabled(client: redis.Redis, url: str) -> bool:
    """``cluster_enabled`` of the server; False when the user may not run ``INFO``."""
    try:
        with redis_errors(f"asking {redact_url(url)} whether it is a cluster node"):
            info: dict[str, Any] = client.info("cluster")
    except CheckpointError as exc:
        if isinstance(exc, StoreUnavailableError):
            raise
        return False  # INFO refused (an ACL): nothing to tell, the user chose the scheme
    return str(info.get("cluster_enabled", 0)) == "1"


def _connect_cluster(url: str, socket_timeout: float) -> RedisCluster:
    """A cluster client, after checking the seed node really is a healthy cluster node."""
    scheme, rest = url.split("://", 1)
    plain_url = f"{CLUSTER_SCHEMES[scheme.lower()]}://{rest}"
    shown = redact_url(url)
    parsed = urlsplit(plain_url)
    if parsed.path not in ("", "/", "/0") or "db=" in parsed.query:
        raise ValidationError(f"malformed Redis Cluster URL {shown!r}: a cluster has only db 0")
    if parsed.hostname is None:
        raise ValidationError(f"malformed Redis Cluster URL {shown!r}: no host")
    # One plain connection first: an unreachable node, a wrong password and a server that
    # is not a cluster node each get their own message, within PROBE_TIMEOUT.
    probe = _plain(plain_url, PROBE_TIMEOUT, shown)
    try:
        with redis_errors(f"connecting to {shown}"):
            probe.ping()
        if not _cluster_enabled(probe, url):
            raise ValidationError(
                f"{shown} is not a Redis Cluster (cluster_enabled:0): use redis:// for a "
                "single server"
            )
        with redis_errors(f"reading the cluster state of {shown}"):
            state = probe.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
        text = state.decode() if isinstance(state, bytes) else str(state)
        if "cluster_state:ok" not in text:
            raise StoreUnavailableError(
                f"Redis Cluster at {shown} is not serving: its node reports cluster_state:fail "
                "(slots not covered, or a failover under way)"
            )
    finally:
        probe.close()
    try:
        client = RedisCluster.from_url(
            plain_url,
            socket_connect_timeout=CONNECT_TIMEOUT,
            socket_timeout=socket_timeout,
            retry=_retry(CLUSTER_RETRIES),
            decode_responses=False,
        )
    except ValueError as exc:
        raise ValidationError(f"malformed Redis Cluster URL {shown!r}: {exc}") from exc
    except (redis.RedisError, RedisClusterException) as exc:
        with redis_errors(f"connecting to the Redis Cluster at {shown}"):
            raise exc
    return client
