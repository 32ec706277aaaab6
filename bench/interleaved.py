"""Our time against the floor's, measured alternately in one process.

    python bench/interleaved.py [-n 10000] [--rounds 15] [--what unchanged|create]

``run.py`` measures our calls and the floor's seconds apart, so a slow phase of the
machine can fall on one and not the other. Here one process alternates them:

* ``unchanged`` (the default): it takes a checkpoint, then an unchanged
  re-checkpoint, the floor's capture, an unchanged re-checkpoint, ...;
* ``create``: a first create into a new SQLite store (the manager opened and the
  durable rows written before the clock starts, as in ``run.py``), then the floor's
  create (the task's raw bytes written) into a new database, and again.

Printed: the ratio of the fastest of each, and the median of the ratios of each pair.
Pinned to one CPU with its own ``redis-server``, as ``run.py`` is.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import workload
from floor import Floor, fresh_db
from private_redis import add_option, choose, private_server
from run import connect, pin, repopulate

from cfn_checkpoint import CheckpointManager


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--what", choices=("unchanged", "create"), default="unchanged")
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    if args.what == "create":
        first_creates(args.n, args.rounds)
    else:
        unchanged_recheckpoints(args.n, args.rounds)


def _variant(n: int) -> str:
    """The floor's faster variant at ``n`` keys, per run.py."""
    return "lua-all" if n <= 10_000 else "scan+lua"


@contextmanager
def populated(n: int) -> Iterator[tuple[str, redis.Redis, str]]:
    """``(url, client, temporary directory)`` of a private pinned redis-server holding
    the workload's ``n`` keys."""
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-ab-") as tmp:
        assert server.pid is not None
        pin(server.pid)
        client = redis.Redis.from_url(server.url)
        try:
            repopulate(client, list(workload.generate(n)))
            yield server.url, client, tmp
        finally:
            client.close()


def unchanged_recheckpoints(n: int, rounds: int) -> None:
    """An unchanged re-checkpoint against the floor's capture, alternately."""
    ours: list[float] = []
    floor: list[float] = []
    with populated(n) as (url, client, tmp):
        reader = Floor(client, workload.TASK_ID)
        with CheckpointManager.open(url, f"sqlite:///{tmp}/ab.db") as manager:
            workload.populate_durable(manager.durable, n)
            first = manager.create_checkpoint(workload.TASK_ID)
            for _ in range(rounds):
                gc.collect()
                start = time.perf_counter()
                same = manager.create_checkpoint(workload.TASK_ID)
                ours.append(time.perf_counter() - start)
                if same.checkpoint_id != first.checkpoint_id:
                    raise RuntimeError("an unchanged re-checkpoint wrote a new checkpoint")
                gc.collect()
                start = time.perf_counter()
                reader.capture(_variant(n))
                floor.append(time.perf_counter() - start)
    report(n, "unchanged re-checkpoint", ours, f"capture floor ({_variant(n)})", floor)


def first_creates(n: int, rounds: int) -> None:
    """A first create against the floor's create, alternately."""
    ours: list[float] = []
    floor: list[float] = []
    raw = sum(item.raw_size() for item in workload.generate(n))
    with populated(n) as (url, client, tmp):
        writer = Floor(client, workload.TASK_ID)
        for i in range(rounds):
            with CheckpointManager.open(url, f"sqlite:///{tmp}/ours-{i}.db") as manager:
                workload.populate_durable(manager.durable, n)
                connect(manager)
                gc.collect()
                start = time.perf_counter()
                made = manager.create_checkpoint(workload.TASK_ID)
                ours.append(time.perf_counter() - start)
            if made.key_count != n:
                raise RuntimeError(f"the checkpoint holds {made.key_count} keys, not {n}")
            db = fresh_db(f"{tmp}/floor-{i}.db")
            gc.collect()
            timing, _ = writer.create(_variant(n), db, raw)
            db.close()
            floor.append(timing.create_s)
    report(n, "first create", ours, f"floor create ({_variant(n)})", floor)


def report(n: int, what: str, ours: list[float], floor_what: str, floor: list[float]) -> None:
    paired = statistics.median(a / b for a, b in zip(ours, floor, strict=True))
    print(
        f"N={n:,}, {len(ours)} rounds: {what} {min(ours) * 1000:.1f} ms, "
        f"{floor_what} {min(floor) * 1000:.1f} ms; ratio of the fastest "
        f"{min(ours) / min(floor):.3f}, median of the pairs {paired:.3f}"
    )


if __name__ == "__main__":
    main()
