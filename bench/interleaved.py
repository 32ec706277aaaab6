"""An unchanged re-checkpoint against the capture floor, measured alternately.

    python bench/interleaved.py [-n 10000] [--rounds 15]

``run.py`` measures our calls and the floor's seconds apart, so a slow phase of the
machine can fall on one and not the other. Here one process takes a checkpoint, then
alternates: an unchanged re-checkpoint, the floor's capture, an unchanged
re-checkpoint, ... Printed: the ratio of the fastest of each, and the median of the
ratios of each pair. Pinned to one CPU with its own ``redis-server``, as ``run.py`` is.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time

import redis
import workload
from floor import Floor
from run import pin, repopulate

from cfn_checkpoint import CheckpointManager, EmbeddedRedis


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    variant = "lua-all" if args.n <= 10_000 else "scan+lua"  # the faster one, per run.py
    ours: list[float] = []
    floor: list[float] = []
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory(prefix="cfn-ab-") as tmp:
        assert server.pid is not None
        pin(server.pid)
        client = redis.Redis.from_url(server.url)
        repopulate(client, list(workload.generate(args.n)))
        reader = Floor(client, workload.TASK_ID)
        with CheckpointManager.open(server.url, f"sqlite:///{tmp}/ab.db") as manager:
            workload.populate_durable(manager.durable, args.n)
            first = manager.create_checkpoint(workload.TASK_ID)
            for _ in range(args.rounds):
                gc.collect()
                start = time.perf_counter()
                same = manager.create_checkpoint(workload.TASK_ID)
                ours.append(time.perf_counter() - start)
                if same.checkpoint_id != first.checkpoint_id:
                    raise RuntimeError("an unchanged re-checkpoint wrote a new checkpoint")
                gc.collect()
                start = time.perf_counter()
                reader.capture(variant)
                floor.append(time.perf_counter() - start)
        client.close()
    paired = statistics.median(a / b for a, b in zip(ours, floor, strict=True))
    print(
        f"N={args.n:,}, {args.rounds} rounds: unchanged re-checkpoint {min(ours) * 1000:.1f} ms, "
        f"capture floor ({variant}) {min(floor) * 1000:.1f} ms; ratio of the fastest "
        f"{min(ours) / min(floor):.3f}, median of the pairs {paired:.3f}"
    )


if __name__ == "__main__":
    main()
