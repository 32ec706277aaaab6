"""Where an operation's time goes: the client's CPU against Redis's, ours and the floor's.

    python bench/cpu_split.py [-n 10000] [--rounds 5] [--what recover|create|unchanged]

``run.py`` pins this process and ``redis-server`` to one CPU, so an operation's wall
time is about the client's CPU time plus the server's. This tells them apart: the
process CPU time (``time.process_time()``) and the server's (``used_cpu_user`` plus
``used_cpu_sys`` from ``INFO cpu``, read before and after; the ``INFO`` call itself
adds a few tens of microseconds) of our operation and of the floor's, taken in turns
on one pinned server with the workload of ``run.py``:

* ``recover``: Redis flushed (as after a crash), then a recovery of a full checkpoint
  by a new manager, against the floor's recovery (``packed``: blobs read back, the
  keys written from the capture in memory);
* ``create``: a first create into a new SQLite store, against the floor's create;
* ``unchanged``: an unchanged re-checkpoint (the first after the create, as in
  ``run.py``), against the floor's capture.

Printed for each: wall, client CPU and server CPU, each the median over the rounds.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import redis
import workload
from ab import _variant
from floor import Floor, fresh_db
from private_redis import add_option, choose, private_server
from run import connect, pin, repopulate

from cfn_checkpoint import CheckpointManager

Split = tuple[float, float, float]  # wall, client CPU, server CPU (seconds)


def server_cpu(client: redis.Redis) -> float:
    """Seconds of CPU the server has used."""
    info: Any = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def split(client: redis.Redis, call: Callable[[], Any]) -> Split:
    """``call``'s wall time, this process's CPU time and the server's, in seconds."""
    gc.collect()
    server0 = server_cpu(client)
    cpu0, start = time.process_time(), time.perf_counter()
    call()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    return wall, cpu, server_cpu(client) - server0


def rounds(
    url: str, client: redis.Redis, n: int, count: int, what: str, tmp: str
) -> dict[str, list[Split]]:
    """``count`` turns of ours and the floor's ``what``."""
    out: dict[str, list[Split]] = {"ours": [], "floor": []}
    floor = Floor(client, workload.TASK_ID)
    raw = sum(item.raw_size() for item in workload.generate(n))
    db = fresh_db(f"{tmp}/floor.db")
    _, capture = floor.create(_variant(n), db, raw)
    durable = f"sqlite:///{tmp}/ours.db"
    with CheckpointManager.open(url, durable) as manager:
        workload.populate_durable(manager.durable, n)
        full = manager.create_checkpoint(workload.TASK_ID)
    for turn in range(count):
        if what == "recover":
            client.flushall()
            with CheckpointManager.open(url, durable) as manager:
                connect(manager)
                out["ours"].append(
                    split(
                        client,
                        lambda m=manager: m.recover_from_checkpoint(
                            workload.TASK_ID, full.checkpoint_id
                        ),
                    )
                )
            client.flushall()
            out["floor"].append(split(client, lambda: floor.recover("packed", db, capture)))
        elif what == "create":
            with CheckpointManager.open(url, f"sqlite:///{tmp}/create-{turn}.db") as manager:
                workload.populate_durable(manager.durable, n)
                connect(manager)
                out["ours"].append(
                    split(client, lambda m=manager: m.create_checkpoint(workload.TASK_ID))
                )
            floor_db = fresh_db(f"{tmp}/floor-{turn}.db")
            out["floor"].append(split(client, lambda d=floor_db: floor.create(_variant(n), d, raw)))
            floor_db.close()
        else:
            with CheckpointManager.open(url, f"sqlite:///{tmp}/same-{turn}.db") as manager:
                workload.populate_durable(manager.durable, n)
                connect(manager)
                manager.create_checkpoint(workload.TASK_ID)
                out["ours"].append(
                    split(client, lambda m=manager: m.create_checkpoint(workload.TASK_ID))
                )
            out["floor"].append(split(client, lambda: floor.capture(_variant(n))))
    db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("-n", type=int, default=10_000, help="keys in the task")
    parser.add_argument("--rounds", type=int, default=5, help="turns of each")
    parser.add_argument("--what", choices=("recover", "create", "unchanged"), default="recover")
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-split-") as tmp:
        assert server.pid is not None
        pin(server.pid)
        client = redis.Redis.from_url(server.url)
        repopulate(client, list(workload.generate(args.n)))
        got = rounds(server.url, client, args.n, args.rounds, args.what, tmp)
        client.close()
    print(f"{args.what}, N = {args.n:,}: medians of {args.rounds} turns, ms")
    print("| | wall | client CPU | server CPU |")
    print("|---|---:|---:|---:|")
    for name, splits in got.items():
        wall, cpu, served = (
            statistics.median(column) * 1e3 for column in zip(*splits, strict=True)
        )
        print(f"| {name} | {wall:.1f} | {cpu:.1f} | {served:.1f} |")


if __name__ == "__main__":
    main()
