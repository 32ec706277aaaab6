"""Checkpoints per second against the number of worker processes, on one machine.

Each of W worker processes owns an equal share of T tasks of K keys (the benchmark
workload, cluster layout) and, for a fixed time, goes round its tasks: change 1% of
a task's keys, then ``create_checkpoint`` it. That is what a platform does when it
checkpoints every task at every iteration. Two deployments are measured in the same
run:

* ``cluster+postgres``: an embedded 3-primary Redis Cluster and PostgreSQL (the
  machine's, or ``--postgres-url``), in a throwaway schema;
* ``redis+sqlite``: one embedded Redis and one SQLite file, the default deployment;
* ``cluster1+sqlite``: the same on a one-node Redis Cluster (cluster layout), which
  lists a task's keys from its slot instead of scanning the whole keyspace.

CPU time is read per side (workers, Redis servers, PostgreSQL server processes) so
the table shows where the time goes. Usage::

    python bench/scaling.py                       # workers 1 2 4, 48 tasks x 1,000 keys
    python bench/scaling.py --workers 1 2 --seconds 5 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent))

import workload  # noqa: E402
from private_redis import ENV, add_option, choose, private_server  # noqa: E402

from cfn_checkpoint import CheckpointManager, EmbeddedRedis, KeyLayout  # noqa: E402
from cfn_checkpoint.runtime.embedded_cluster import EmbeddedCluster  # noqa: E402


@dataclass(frozen=True, slots=True)
class Deployment:
    name: str
    redis_url: str
    durable_url: str
    layout: KeyLayout
    #: Server processes whose CPU time counts as the runtime tier's.
    redis_pids: tuple[int, ...]
    #: Whether the durable tier is a server (PostgreSQL) whose processes to count.
    durable_server: bool


@dataclass(frozen=True, slots=True)
class Round:
    deployment: str
    workers: int
    checkpoints: int
    seconds: float
    per_second: float
    p50_ms: float
    p95_ms: float
    cpu_workers_s: float
    cpu_redis_s: float
    cpu_durable_s: float
    #: Of the machine's CPU capacity over the window (cores x seconds).
    cpu_busy: float


#: What can be measured: a 3-primary cluster with PostgreSQL; one Redis (reference key
#: layout) with SQLite; a one-node cluster (cluster layout) with SQLite.
DEPLOYMENTS = ("cluster+postgres", "redis+sqlite", "cluster1+sqlite")


def task_ids(tasks: int) -> list[str]:
    return [f"scale-{i:03d}" for i in range(tasks)]


def _worker(
    deployment: Deployment,
    tasks: list[str],
    keys: int,
    seconds: float,
    ready: Any,
    go: Any,
    out: Any,
    finish: Any,
) -> None:
    """Round the tasks until the time is up; report (latencies, CPU s), then keep the
    connections open until ``finish`` so the server side's CPU time can be read."""
    with CheckpointManager.open(
        deployment.redis_url, deployment.durable_url, layout=deployment.layout
    ) as mgr:
        client = mgr.runtime.client
        for task in tasks:  # warm up: the manager learns each task's newest checkpoint
            mgr.create_checkpoint(task)
        ready.put(os.getpid())
        go.wait(120)
        latencies: list[float] = []
        iteration = 0
        cpu0 = time.process_time()
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            task = tasks[iteration % len(tasks)]
            iteration += 1
            workload.change_fraction(
                client, keys, 0.01, seed=iteration, task_id=task, layout=deployment.layout
            )
            began = time.perf_counter()
            mgr.create_checkpoint(task)
            latencies.append(time.perf_counter() - began)
        out.put((latencies, time.process_time() - cpu0))
        finish.wait(120)


def _cpu(pids: tuple[int, ...]) -> dict[int, float]:
    """CPU seconds (user + system) used so far by each process still running."""
    found: dict[int, float] = {}
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.NoSuchProcess:
            continue
        found[pid] = times.user + times.system
    return found


def _used(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds used between two readings (a process that started in between counts
    whole; one that ended in between is lost, which the caller avoids)."""
    return sum(spent - before.get(pid, 0.0) for pid, spent in after.items())


def measure(
    deployment: Deployment, workers: int, tasks: list[str], keys: int, seconds: float
) -> Round:
    context = multiprocessing.get_context("spawn")
    ready, out = context.Queue(), context.Queue()
    go, finish = context.Event(), context.Event()
    shares = [tasks[i::workers] for i in range(workers)]
    processes = [
        context.Process(
            target=_worker, args=(deployment, share, keys, seconds, ready, go, out, finish)
        )
        for share in shares
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=600)
    # PostgreSQL forks a backend per connection: list them once the workers are connected.
    durable_pids = postgres_pids() if deployment.durable_server else ()
    redis0, durable0 = _cpu(deployment.redis_pids), _cpu(durable_pids)
    began = time.perf_counter()
    go.set()
    reports = [out.get(timeout=seconds + 600) for _ in processes]
    elapsed = time.perf_counter() - began
    cpu_redis = _used(redis0, _cpu(deployment.redis_pids))
    if deployment.durable_server:  # backends the pool connected meanwhile count too
        durable_pids = postgres_pids()
    cpu_durable = _used(durable0, _cpu(durable_pids))
    finish.set()
    for process in processes:
        process.join(60)
        if process.exitcode != 0:
            raise SystemExit(f"a worker failed (exit code {process.exitcode})")
    latencies = sorted(x for lat, _ in reports for x in lat)
    count = len(latencies)
    cpu_workers = sum(cpu for _, cpu in reports)
    capacity = (psutil.cpu_count() or 1) * elapsed
    return Round(
        deployment=deployment.name,
        workers=workers,
        checkpoints=count,
        seconds=round(elapsed, 2),
        per_second=round(count / elapsed, 1),
        p50_ms=round(statistics.median(latencies) * 1000, 1),
        p95_ms=round(latencies[int(0.95 * (count - 1))] * 1000, 1),
        cpu_workers_s=round(cpu_workers, 2),
        cpu_redis_s=round(cpu_redis, 2),
        cpu_durable_s=round(cpu_durable, 2),
        cpu_busy=round((cpu_workers + cpu_redis + cpu_durable) / capacity, 2),
    )


def prepare(deployment: Deployment, tasks: list[str], keys: int) -> None:
    """Populate every task (keys and durable rows) and take its first checkpoint."""
    with CheckpointManager.open(
        deployment.redis_url, deployment.durable_url, layout=deployment.layout
    ) as mgr:
        for task in tasks:
            items = workload.generate(keys, task_id=task, layout=deployment.layout)
            workload.populate_redis(mgr.runtime.client, items)
            workload.populate_durable(mgr.durable, keys, task_id=task)
            mgr.create_checkpoint(task)


def postgres_pids() -> tuple[int, ...]:
    """The PostgreSQL server's processes on this machine (postmaster and backends)."""
    found = []
    for process in psutil.process_iter(["name"]):
        if (process.info["name"] or "").startswith("postgres"):
            found.append(process.pid)
    return tuple(found)


@contextmanager
def postgres_schema(url: str) -> Iterator[str]:
    """A throwaway schema in the database at ``url``; yields a URL that uses it."""
    import psycopg

    schema = f"cfn_bench_{secrets.token_hex(4)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    joiner = "&" if "?" in url else "?"
    try:
        yield f"{url}{joiner}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def table(rounds: list[Round]) -> str:
    lines = [
        "| deployment | workers | checkpoints/s | p50 ms | p95 ms | CPU s: workers / Redis / "
        "durable | CPU busy |",
        "|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rounds:
        lines.append(
            f"| {r.deployment} | {r.workers} | {r.per_second:,.1f} | {r.p50_ms} | {r.p95_ms} | "
            f"{r.cpu_workers_s} / {r.cpu_redis_s} / {r.cpu_durable_s} | {r.cpu_busy:.0%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tasks", type=int, default=48)
    parser.add_argument("--keys", type=int, default=1_000, help="keys per task")
    parser.add_argument("--seconds", type=float, default=15.0, help="measured time per round")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "CFN_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--deployments",
        nargs="+",
        default=list(DEPLOYMENTS),
        choices=DEPLOYMENTS,
        help="which to measure (default: all)",
    )
    parser.add_argument("--json", type=Path, help="write the results here too")
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    tasks = task_ids(args.tasks)
    rounds: list[Round] = []

    def run(deployment: Deployment) -> None:
        if deployment.name not in args.deployments:
            return
        prepare(deployment, tasks, args.keys)
        for workers in args.workers:
            rounds.append(measure(deployment, workers, tasks, args.keys, args.seconds))
            print(table(rounds[-1:]).splitlines()[-1], flush=True)

    def pids(nodes: list[EmbeddedRedis]) -> tuple[int, ...]:
        return tuple(node.pid for node in nodes if node.pid)

    with tempfile.TemporaryDirectory(prefix="cfn-scaling-") as tmp:
        with (
            EmbeddedCluster(primaries=3, binary=os.environ.get(ENV)) as cluster,
            postgres_schema(args.postgres_url) as pg,
        ):
            run(
                Deployment(
                    "cluster+postgres",
                    cluster.url,
                    pg,
                    KeyLayout(cluster=True),
                    pids(cluster.nodes),
                    True,
                )
            )
        with private_server() as server:
            run(
                Deployment(
                    "redis+sqlite",
                    server.url,
                    f"sqlite:///{tmp}/one.db",
                    KeyLayout(),
                    pids([server]),
                    False,
                )
            )
        with EmbeddedCluster(primaries=1, binary=os.environ.get(ENV)) as single:
            run(
                Deployment(
                    "cluster1+sqlite",
                    single.url,
                    f"sqlite:///{tmp}/single.db",
                    KeyLayout(cluster=True),
                    pids(single.nodes),
                    False,
                )
            )
    print()
    print(table(rounds))
    if args.json:
        info = {
            "tasks": args.tasks,
            "keys_per_task": args.keys,
            "seconds": args.seconds,
            "cpus": psutil.cpu_count(),
            "rounds": [asdict(r) for r in rounds],
        }
        args.json.write_text(json.dumps(info, indent=2) + "\n")


if __name__ == "__main__":
    main()
