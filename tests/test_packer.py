"""Commands packed with large arguments left uncopied (runtime/packer.py).

The bytes on the wire must be exactly redis-py's: each case is compared with redis-py's
own hiredis packer, then sent to a real Redis, alone, pipelined and as a script's
arguments, and read back. Commands holding a ``bytearray`` or ``memoryview`` are
redis-py's to pack, whatever its version does with them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from redis.connection import HiredisRespSerializer
from redis.exceptions import DataError

from cfn_checkpoint.runtime.connection import connect
from cfn_checkpoint.runtime.packer import LARGE, CommandPacker

from conftest import wipe

BIG = os.urandom(LARGE + 1)
HUGE = os.urandom(3 * LARGE + 7)

CASES: dict[str, tuple[Any, ...]] = {
    "small": (b"SET", b"k", b"v"),
    "words in the name": ("CONFIG GET", "maxmemory"),
    "bytes name with a space": (b"CLIENT SETNAME", b"x"),
    "numbers": ("SET", "k", 1.5, 7),
    "exactly LARGE": (b"SET", b"k", os.urandom(LARGE)),
    "large last": (b"SET", b"k", BIG),
    "large in the middle": (b"EVAL", b"return 1", 2, b"a", BIG, b"c"),
    "two large together": (b"MSET", b"a", BIG, HUGE, b"x"),
    "large right after the name": (b"ECHO", HUGE),
    "large bytearray": (b"SET", b"k", bytearray(BIG)),
    "large memoryview": (b"SET", b"k", memoryview(HUGE)),
    "small bytearray and memoryview": (b"MSET", b"a", bytearray(b"1"), b"b", memoryview(b"2")),
    "many keys and a large value": (b"EVAL", b"return 1", 3000)
    + tuple(b"key:%d" % i for i in range(3000))
    + (HUGE,),
}


@pytest.mark.parametrize("args", CASES.values(), ids=CASES.keys())
def test_the_bytes_are_redis_pys(args: tuple[Any, ...]) -> None:
    ours = b"".join(bytes(chunk) for chunk in CommandPacker().pack(*args))
    assert ours == b"".join(HiredisRespSerializer().pack(*args))


def test_a_large_argument_is_not_copied() -> None:
    chunks = CommandPacker().pack(b"SET", b"k", HUGE)
    assert any(chunk is HUGE for chunk in chunks)
    assert all(len(chunk) < 100 for chunk in chunks if chunk is not HUGE)


@pytest.mark.parametrize(
    "buffer",
    [bytearray(BIG), memoryview(HUGE), memoryview(HUGE)[::2], bytearray(b"1")],
    ids=["large bytearray", "large memoryview", "strided memoryview", "small bytearray"],
)
def test_a_command_with_a_buffer_is_packed_by_redis_py(buffer: bytearray | memoryview) -> None:
    args = (b"MSET", b"a", HUGE, b"b", buffer)
    assert CommandPacker().pack(*args) == HiredisRespSerializer().pack(*args)


@pytest.mark.parametrize("value", [None, {"a": 1}], ids=["None", "dict"])
@pytest.mark.parametrize("size", ["small", "large"])
def test_an_argument_hiredis_refuses_is_a_data_error(value: object, size: str) -> None:
    args = (b"MSET", b"a", b"1" if size == "small" else BIG, b"b", value)
    with pytest.raises(DataError):
        CommandPacker().pack(*args)


@pytest.fixture()
def client(plain_redis_url: str, prefix: str) -> Iterator[redis.Redis]:
    made = connect(plain_redis_url)
    assert isinstance(made, redis.Redis)
    try:
        yield made
    finally:
        wipe(made, prefix)
        made.close()


def test_clients_use_it(client: redis.Redis) -> None:
    packer = client.connection_pool.connection_kwargs["command_packer"]
    assert isinstance(packer, CommandPacker)


def test_large_values_reach_redis_exactly(client: redis.Redis, prefix: str) -> None:
    client.set(prefix + "a", HUGE)
    client.set(prefix + "b", memoryview(BIG))
    assert client.get(prefix + "a") == HUGE
    assert client.get(prefix + "b") == BIG


def test_a_pipeline_with_large_values(client: redis.Redis, prefix: str) -> None:
    with client.pipeline(transaction=True) as pipe:
        pipe.set(prefix + "a", HUGE).rpush(prefix + "l", b"x", BIG, b"y").get(prefix + "a")
        replies = pipe.execute()
    assert replies == [True, 3, HUGE]
    assert client.lrange(prefix + "l", 0, -1) == [b"x", BIG, b"y"]


def test_a_strided_memoryview_is_stored_as_redis_py_stores_it(
    client: redis.Redis, plain_redis_url: str, prefix: str
) -> None:
    view = memoryview(HUGE)[::2]
    stock = redis.Redis.from_url(plain_redis_url)
    try:
        stock.set(prefix + "stock", view)
    finally:
        stock.close()
    client.set(prefix + "ours", view)
    assert client.get(prefix + "ours") == client.get(prefix + "stock")


def test_script_arguments_around_a_large_one(client: redis.Redis, prefix: str) -> None:
    script = client.register_script("return {KEYS[1], ARGV[1], string.len(ARGV[2]), ARGV[3]}")
    reply = script(keys=[prefix + "k"], args=[b"before", HUGE, b"after"])
    assert reply == [(prefix + "k").encode(), b"before", len(HUGE), b"after"]
