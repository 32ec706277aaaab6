"""zstandard levels on a checkpoint's own payloads: time to compress and decompress, size.

    python bench/levels.py [-n 10000] [--levels -1,1,2,3,5,7,9]

Takes one checkpoint of the benchmark workload (private ``redis-server``, SQLite in a
temporary directory), reads back every payload it stored, and compresses them all again
at each level (best of 5, pinned to one CPU like ``run.py``). Printed per level: the
compressed share of the raw bytes and the time to compress and to decompress, in ms and
in µs per key.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from functools import partial

import redis
import workload
import zstandard
from private_redis import add_option, choose, private_server
from run import pin, repopulate

from cfn_checkpoint import CheckpointManager
from cfn_checkpoint.codec import decompress_verified


def best_of(times: int, call: Callable[[], object]) -> float:
    fastest = float("inf")
    for _ in range(times):
        start = time.perf_counter()
        call()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest


def _each(step: Callable[[bytes], bytes], items: list[bytes]) -> list[bytes]:
    return [step(item) for item in items]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--levels", default="-1,1,2,3,5,7,9")
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    levels = [int(level) for level in args.levels.split(",")]
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-levels-") as tmp:
        assert server.pid is not None
        pin(server.pid)
        client = redis.Redis.from_url(server.url)
        repopulate(client, list(workload.generate(args.n)))
        with CheckpointManager.open(server.url, f"sqlite:///{tmp}/levels.db") as manager:
            workload.populate_durable(manager.durable, args.n)
            meta = manager.create_checkpoint(workload.TASK_ID)
            digests = [digest for _, digest in manager.store.manifest(meta.checkpoint_id)]
            stored = manager.store.load_payloads(digests)
            raws = [decompress_verified(digest, stored[digest]) for digest in digests]
        client.close()
    total = sum(map(len, raws))
    print(f"N={args.n:,}: {len(raws)} payloads, {total:,} raw bytes")
    print("| level | stored / raw | compress ms | µs a key | decompress ms |")
    print("|---:|---:|---:|---:|---:|")
    for level in levels:
        packer = zstandard.ZstdCompressor(level=level)
        unpacker = zstandard.ZstdDecompressor()
        packed = [packer.compress(raw) for raw in raws]
        size = sum(map(len, packed))
        took = best_of(5, partial(_each, packer.compress, raws))
        back = best_of(5, partial(_each, unpacker.decompress, packed))
        print(
            f"| {level} | {size / total:.3f} | {took * 1000:.1f} | "
            f"{took * 1e6 / args.n:.2f} | {back * 1000:.1f} |"
        )


if __name__ == "__main__":
    main()
