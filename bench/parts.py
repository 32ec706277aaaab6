"""Where a first create and a recovery spend their time, part by part, without a profiler.

    python bench/parts.py [-n 10000] [--repeats 7]

Each part (the library's own functions: listing keys, the capture script, packing
rows, keyframe chunks, compression, the SQLite commit; reading and decompressing the
payloads, decoding rows, making the restore's commands, the MULTI/EXEC that sends them,
the bookkeeping) is wrapped with ``time.perf_counter()``; cProfile's cost per call
would distort code that makes many small calls. Printed: the fastest repetition of each,
with its parts. Pinned to one CPU with its own ``redis-server``, as ``run.py`` is.
"""

from __future__ import annotations

import argparse
import functools
import gc
import tempfile
import time
from collections.abc import Callable
from typing import Any

import redis
import workload
from private_redis import add_option, choose, private_server
from run import connect, pin, repopulate

import cfn_checkpoint.codec as codec_module
import cfn_checkpoint.contents as contents_module
import cfn_checkpoint.image as image_module
import cfn_checkpoint.manager as manager_module
import cfn_checkpoint.runtime.redis_runtime as redis_runtime_module
from cfn_checkpoint import CheckpointManager
from cfn_checkpoint.durable.sql import SqlStore
from cfn_checkpoint.runtime.redis_runtime import RedisRuntime

PARTS: dict[str, float] = {}


def timed_part(owner: Any, name: str, label: str) -> None:
    """Replace ``owner.name`` with a wrapper adding its time to ``PARTS[label]``."""
    inner: Callable[..., Any] = getattr(owner, name)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            PARTS[label] = PARTS.get(label, 0.0) + time.perf_counter() - start

    setattr(owner, name, wrapper)


def instrument() -> None:
    timed_part(RedisRuntime, "task_keys", "client SCAN (listing)")
    timed_part(RedisRuntime, "_scan_read", "capture script (in-script scan)")
    timed_part(RedisRuntime, "_read", "capture script (given keys)")
    timed_part(image_module, "packed_rows", "packing and hashing rows")
    timed_part(manager_module, "keyframe_payloads", "keyframe chunks (their compression too)")
    # Keyframe chunks are compressed inside keyframe_payloads (they are named by their
    # compressed bytes), every other payload at the commit: all through codec.compress.
    timed_part(codec_module, "compress", "compression (all payloads)")
    timed_part(SqlStore, "commit_checkpoint", "SQLite commit")
    timed_part(SqlStore, "load_payloads", "read payloads (SQLite)")
    timed_part(contents_module, "decompress_verified", "decompress and check payloads")
    timed_part(contents_module, "decode_image", "decode rows")
    timed_part(SqlStore, "start_recovery", "recovery bookkeeping (SQLite)")
    timed_part(SqlStore, "finish_recovery", "recovery bookkeeping (SQLite)")
    timed_part(RedisRuntime, "ttl_clock", "server clock")
    timed_part(RedisRuntime, "dbsize", "database size")
    timed_part(redis_runtime_module, "restore_commands", "make the commands")
    timed_part(redis_runtime_module, "transaction", "pack, send, MULTI/EXEC")
    timed_part(RedisRuntime, "_write", "restore specs and script")
    timed_part(RedisRuntime, "_write_scanning", "restore specs and script")


def best(runs: list[tuple[float, dict[str, float]]]) -> str:
    total, parts = min(runs, key=lambda run: run[0])
    lines = [f"  total {total * 1000:.1f} ms"]
    lines += [f"  {label}: {value * 1000:.1f} ms" for label, value in parts.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=7)
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    instrument()
    items = list(workload.generate(args.n))
    creates: list[tuple[float, dict[str, float]]] = []
    recovers: list[tuple[float, dict[str, float]]] = []
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-parts-") as tmp:
        assert server.pid is not None
        pin(server.pid)
        client = redis.Redis.from_url(server.url)
        for rep in range(args.repeats):
            repopulate(client, items)
            durable = f"sqlite:///{tmp}/parts-{rep}.db"
            with CheckpointManager.open(server.url, durable) as manager:
                workload.populate_durable(manager.durable, args.n)
                connect(manager)
                PARTS.clear()
                gc.collect()
                start = time.perf_counter()
                meta = manager.create_checkpoint(workload.TASK_ID)
                creates.append((time.perf_counter() - start, dict(PARTS)))
            client.flushall()
            with CheckpointManager.open(server.url, durable) as manager:
                connect(manager)
                PARTS.clear()
                gc.collect()
                start = time.perf_counter()
                manager.recover_from_checkpoint(workload.TASK_ID, meta.checkpoint_id)
                recovers.append((time.perf_counter() - start, dict(PARTS)))
        client.close()
    print(f"first create of {args.n:,} keys, fastest of {args.repeats}:\n{best(creates)}")
    print(f"recovery of {args.n:,} keys, fastest of {args.repeats}:\n{best(recovers)}")


if __name__ == "__main__":
    main()
