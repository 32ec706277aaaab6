"""Hypothesis strategies and writers for random task states."""

from __future__ import annotations

from typing import Any

import redis
from hypothesis import strategies as st

from cfn_checkpoint import KeyLayout

ROLES = ("agent", "signal", "queue", "lock")
SPECIAL = [b"", b"0", b"false", b"null", b"1.50", b"12345678901234567890123", b"\xff\xfe\x00"]

#: Values of 1 MB and more, made cheaply (random megabytes would exhaust Hypothesis' buffer).
big_values = st.tuples(st.integers(1 << 20, 3 << 20), st.binary(min_size=1, max_size=4)).map(
    lambda nb: (nb[1] * (nb[0] // len(nb[1]) + 1))[: nb[0]]
)
values = st.one_of(
    st.sampled_from(SPECIAL),
    st.binary(max_size=64),
    st.text(max_size=32).map(str.encode),
    st.integers(min_value=-(10**30), max_value=10**30).map(lambda n: str(n).encode()),
)
names = st.binary(min_size=1, max_size=12)
scores = st.floats(allow_nan=False, width=64)

kinds: dict[str, Any] = {
    "string": values,
    "list": st.lists(values, min_size=1, max_size=8),
    "hash": st.dictionaries(values, values, min_size=1, max_size=8),
    "set": st.sets(values, min_size=1, max_size=8),
    "zset": st.dictionaries(values, scores, min_size=1, max_size=8),
    "stream": st.lists(
        st.dictionaries(names, values, min_size=1, max_size=3), min_size=1, max_size=4
    ),
}

entry = st.sampled_from(sorted(kinds)).flatmap(
    lambda kind: st.tuples(
        st.just(kind),
        kinds[kind],
        st.one_of(st.none(), st.integers(min_value=60_000, max_value=10**9)),
    )
)


def _bulk(spec: tuple[int, int | None]) -> dict[Any, Any]:
    """Hundreds of small keys, half of them with a TTL."""
    count, ttl = spec
    return {
        (ROLES[i % 4], b"bulk-%d" % i): ("string", b'{"n":%d}' % i, ttl if i % 2 else None)
        for i in range(count)
    }


_few = st.dictionaries(st.tuples(st.sampled_from(ROLES), names), entry, min_size=0, max_size=40)
_large = st.dictionaries(
    st.tuples(st.sampled_from(ROLES), names),
    st.tuples(st.just("string"), big_values, st.none()),
    max_size=2,
)
_many = st.tuples(st.integers(0, 400), st.just(90_000)).map(_bulk)

#: A task state: ``{(role, name): (kind, value, ttl_ms or None)}``; sometimes with values
#: of 1 MB and more, sometimes with hundreds of keys.
task_states = st.tuples(
    _few,
    st.one_of(st.just({}), _large),
    st.one_of(st.just({}), _many),
).map(lambda parts: {**parts[2], **parts[1], **parts[0]})


def write_key(pipe: Any, key: bytes, kind: str, value: Any, ttl_ms: int | None) -> None:
    """Queue the commands that create one key."""
    pipe.delete(key)
    if kind == "string":
        pipe.set(key, value)
    elif kind == "list":
        pipe.rpush(key, *value)
    elif kind == "hash":
        pipe.hset(key, mapping=value)
    elif kind == "set":
        pipe.sadd(key, *value)
    elif kind == "zset":
        pipe.zadd(key, value)
    elif kind == "stream":
        for fields in value:
            pipe.xadd(key, fields)
    if ttl_ms is not None:
        pipe.pexpire(key, ttl_ms)


def write_state(
    client: redis.Redis, layout: KeyLayout, task_id: str, state: dict[Any, Any]
) -> list[bytes]:
    """Write a generated state for ``task_id``; returns its keys."""
    pipe = client.pipeline(transaction=False)
    keys = []
    for (role, name), (kind, value, ttl) in state.items():
        key = layout.key(role, task_id, name)
        keys.append(key)
        write_key(pipe, key, kind, value, ttl)
    pipe.execute()
    return keys
