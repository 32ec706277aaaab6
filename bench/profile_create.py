"""Where a create (or a recover) spends its time: cProfile of one call (default N = 10,000).

    python bench/profile_create.py [-n 10000] [--top 10] [--sort cumulative|tottime] [--recover]

With ``--recover`` the profiled call is a recovery of the task (its keys deleted
first, as after a crash) from the checkpoint just taken.

(Not named ``profile.py``: that would shadow the standard library module cProfile uses.)
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time

import redis
import workload
from private_redis import add_option, choose, private_server
from run import pin

from cfn_checkpoint import CheckpointManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--sort", default="cumulative", choices=("cumulative", "tottime"))
    parser.add_argument("--recover", action="store_true", help="profile a recovery instead")
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-bench-prof-") as tmp:
        assert server.pid is not None
        pin(server.pid)  # as run.py does: client and redis-server on one CPU
        client = redis.Redis.from_url(server.url)
        workload.populate_redis(client, workload.generate(args.n))
        with CheckpointManager.open(server.url, f"sqlite:///{tmp}/store.db") as manager:
            workload.populate_durable(manager.durable, args.n)
            # Warm up on another task: the Lua scripts get loaded into this fresh server
            # (the first call of each is refused with NOSCRIPT and sent again).
            manager.writer("warm-up").put_agent("a", {"warm": True})
            manager.create_checkpoint("warm-up")
            profiler = cProfile.Profile()
            if args.recover:
                meta = manager.create_checkpoint(workload.TASK_ID)
                manager.recover_from_checkpoint("warm-up")
                manager.runtime.delete_task(workload.TASK_ID)
            start = time.perf_counter()
            profiler.enable()
            if args.recover:
                manager.recover_from_checkpoint(workload.TASK_ID, meta.checkpoint_id)
            else:
                meta = manager.create_checkpoint(workload.TASK_ID)
            profiler.disable()
            elapsed = time.perf_counter() - start
        client.close()
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats(args.sort).print_stats(args.top)
    what = "recover" if args.recover else "create"
    print(f"{what} of {meta.key_count:,} keys: {elapsed * 1000:.0f} ms under cProfile")
    print(stream.getvalue())


if __name__ == "__main__":
    main()
