"""Two versions of the library against each other, alternately, on one pinned server.

    python bench/ab.py --old /path/to/other/checkout/src [--new src] [-n 10000]
        [--rounds 12] [-k 5] [--what create|unchanged|recover]

A change that saves 1-2% of a create is smaller than the drift of this machine's speed
over a run (see docs/benchmarks.md, *How much the figures move*), so two runs of
``run.py`` cannot tell it. Here one ``redis-server`` (pinned, as in ``run.py``) holds
the workload, and the two trees take turns, ``--rounds`` times (the order flipped each
round): each turn is a new process with that tree's ``src`` first on ``PYTHONPATH``
(the bench scripts are this checkout's), pinned to the same CPU, which times ``-k``
operations:

* ``create``: a first create into a new SQLite store, then the floor's create (the
  task's raw bytes written: ``floor.py``);
* ``unchanged``: an unchanged re-checkpoint, then the floor's capture;
* ``recover``: Redis flushed (outside the timing, as after a crash in ``run.py``),
  then a recovery of the store's checkpoint (no floor).

The floor uses one variant per size, the one ``run.py`` finds faster there
(``lua-all`` up to 10,000 keys, ``scan+lua`` above), where ``run.py`` takes the
faster of both in each run.

Printed for each tree: the library each of its processes imported, the fastest and
the median wall time, the floor's fastest, the ratio of the fastest and the median of
the paired ratios, and the fastest process CPU time (``time.process_time()``: the
client's own work, which the server's share of the CPU and the machine's drift move
far less than wall time). An old tree is made with ``git worktree add /tmp/old
<commit>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import workload
from floor import Floor, fresh_db
from private_redis import add_option, choose, private_server
from run import pin, repopulate

HERE = Path(__file__).resolve().parent
FLOOR_VARIANT_MAX_KEYS = 10_000  # up to this, the floor's one-script read is the faster


def _variant(n: int) -> str:
    return "lua-all" if n <= FLOOR_VARIANT_MAX_KEYS else "scan+lua"


def child(url: str, cpu: int, n: int, k: int, what: str) -> dict[str, list[float]]:
    """One turn: ``k`` timed operations of this process's library against ``url``."""
    from cfn_checkpoint import CheckpointManager  # the tree on PYTHONPATH

    os.sched_setaffinity(0, {cpu})
    client = redis.Redis.from_url(url)
    floor = Floor(client, workload.TASK_ID)
    out: dict[str, list[float]] = {"ours": [], "floor": [], "cpu": []}

    def timed(call: Any) -> Any:
        gc.collect()
        cpu0, start = time.process_time(), time.perf_counter()
        result = call()
        out["ours"].append(time.perf_counter() - start)
        out["cpu"].append(time.process_time() - cpu0)
        return result

    with tempfile.TemporaryDirectory(prefix="cfn-ab-") as tmp:
        if what == "create":
            raw = sum(item.raw_size() for item in workload.generate(n))
            for i in range(k):
                with CheckpointManager.open(url, f"sqlite:///{tmp}/ours-{i}.db") as manager:
                    workload.populate_durable(manager.durable, n)
                    manager.runtime.client.ping()
                    made = timed(lambda m=manager: m.create_checkpoint(workload.TASK_ID))
                if made.key_count != n:
                    raise RuntimeError(f"the checkpoint holds {made.key_count} keys, not {n}")
                db = fresh_db(f"{tmp}/floor-{i}.db")
                gc.collect()
                timing, _ = floor.create(_variant(n), db, raw)
                db.close()
                out["floor"].append(timing.create_s)
        elif what == "unchanged":
            with CheckpointManager.open(url, f"sqlite:///{tmp}/ours.db") as manager:
                workload.populate_durable(manager.durable, n)
                first = manager.create_checkpoint(workload.TASK_ID)
                for _ in range(k):
                    same = timed(lambda m=manager: m.create_checkpoint(workload.TASK_ID))
                    if same.checkpoint_id != first.checkpoint_id:
                        raise RuntimeError("an unchanged re-checkpoint wrote a new checkpoint")
                    gc.collect()
                    start = time.perf_counter()
                    floor.capture(_variant(n))
                    out["floor"].append(time.perf_counter() - start)
        else:
            with CheckpointManager.open(url, f"sqlite:///{tmp}/ours.db") as manager:
                workload.populate_durable(manager.durable, n)
                made = manager.create_checkpoint(workload.TASK_ID)
            for _ in range(k):
                client.flushall()  # a crash: the runtime keys are gone
                with CheckpointManager.open(url, f"sqlite:///{tmp}/ours.db") as manager:
                    manager.runtime.client.ping()
                    timed(
                        lambda m=manager: m.recover_from_checkpoint(
                            workload.TASK_ID, made.checkpoint_id
                        )
                    )
    client.close()
    return out


def imported() -> str:
    """Where this process's ``cfn_checkpoint`` comes from."""
    import cfn_checkpoint

    return str(Path(cfn_checkpoint.__file__).resolve().parent.parent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--old", required=True, help="the other tree's src directory")
    parser.add_argument("--new", default=str(HERE.parent / "src"), help="default: this one's")
    parser.add_argument("-n", type=int, default=10_000, help="keys in the task")
    parser.add_argument(
        "--rounds", type=int, default=12, help="turns of each tree (even: each goes first as often)"
    )
    parser.add_argument("-k", type=int, default=5, help="operations timed per turn")
    parser.add_argument("--what", choices=("create", "unchanged", "recover"), default="create")
    parser.add_argument("--child", nargs=2, metavar=("URL", "CPU"), help=argparse.SUPPRESS)
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    if args.child:
        url, cpu = args.child
        print(json.dumps({"from": [imported()], **child(url, int(cpu), args.n, args.k, args.what)}))
        return
    trees = {"old": Path(args.old).resolve(), "new": Path(args.new).resolve()}
    for name, tree in trees.items():
        if not (tree / "cfn_checkpoint" / "__init__.py").is_file():
            parser.error(f"--{name} {tree}: not a src directory holding cfn_checkpoint")
    if trees["old"] == trees["new"]:
        parser.error(f"--old and --new are the same tree ({trees['old']})")
    results: dict[str, dict[str, list[Any]]] = {
        name: {"from": [], "ours": [], "floor": [], "cpu": []} for name in trees
    }
    with private_server() as server:
        assert server.pid is not None
        cpu = pin(server.pid)
        client = redis.Redis.from_url(server.url)
        repopulate(client, list(workload.generate(args.n)))
        client.close()
        for turn in range(args.rounds):
            for name in ("old", "new") if turn % 2 == 0 else ("new", "old"):
                env = dict(os.environ, PYTHONPATH=f"{trees[name]}{os.pathsep}{HERE}")
                command = [sys.executable, str(HERE / "ab.py"), "--old", args.old]
                command += ["-n", str(args.n), "-k", str(args.k), "--what", args.what]
                command += ["--child", server.url, str(cpu)]
                done = subprocess.run(command, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"the {name} tree failed:\n{done.stderr}")
                for key, values in json.loads(done.stdout.splitlines()[-1]).items():
                    results[name][key] += values
    for name, got in results.items():
        ours, floor, cpu_s = got["ours"], got["floor"], got["cpu"]
        origins = ", ".join(sorted(set(got["from"])))
        line = f"{name} (imported from {origins}): fastest {min(ours) * 1e3:.2f} ms, "
        line += f"median {statistics.median(ours) * 1e3:.2f} ms"
        if args.what != "recover":
            paired = statistics.median(a / b for a, b in zip(ours, floor, strict=True))
            line += f"; floor fastest {min(floor) * 1e3:.2f} ms, ratio of the fastest "
            line += f"{min(ours) / min(floor):.3f}, median of the pairs {paired:.3f}"
        line += f"; process CPU fastest {min(cpu_s) * 1e3:.2f} ms ({len(ours)} each)"
        print(line)


if __name__ == "__main__":
    main()
