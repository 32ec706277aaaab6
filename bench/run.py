"""Run the benchmarks: create/recover of cfn-checkpoint against the floor and the baseline.

    python bench/run.py              # N = 1,000, 10,000, 100,000 -> bench/results.json,
                                     # docs/benchmarks.png
    python bench/run.py --quick      # N = 1,000 only, a smoke run (bench/results-quick.json)
    python bench/run.py --million    # also the 1,000,000-key peak-memory check (memory.py)

Everything runs against a private ``redis-server`` (``EmbeddedRedis``, unix socket; which
binary: ``--redis-server``, see ``private_redis.py``) and fresh SQLite files in a
temporary directory. Each timing is ``time.perf_counter()`` around the one call
measured, best of 5 for N <= 10,000 and best of 3 above (or ``--repeats``). Redis is
flushed and repopulated between phases that change it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shlex
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from itertools import cycle
from pathlib import Path
from typing import Any

import baseline
import redis
import workload
from floor import CAPTURE_VARIANTS, RECOVER_VARIANTS, Capture, Floor
from floor import fresh_db as floor_db
from private_redis import add_option, choose, private_server

import cfn_checkpoint
from cfn_checkpoint import CheckpointManager, EmbeddedRedis

ROOT = Path(__file__).resolve().parent.parent
TASK = workload.TASK_ID

#: (label, results key, target) of each ratio; a target is (comparison, bound).
RATIOS: list[tuple[str, str, tuple[str, float]]] = [
    ("create / floor create", "create_vs_floor", ("<=", 1.5)),
    ("recover / floor recover", "recover_vs_floor", ("<=", 1.5)),
    ("baseline create / create", "baseline_vs_create", (">=", 5.0)),
    ("baseline recover / recover", "baseline_vs_recover", (">=", 5.0)),
    ("unchanged re-checkpoint / capture floor", "unchanged_vs_capture_floor", ("<=", 1.1)),
    ("unchanged re-checkpoint: bytes stored", "unchanged_stored", ("<=", 0)),
    ("1%-changed stored / full stored", "changed_vs_full_stored", ("<=", 0.03)),
    ("full stored / raw", "stored_vs_raw", ("<=", 0.5)),
]

#: Ratios shown for information, without a target: ours against the stricter I/O floor,
#: which writes (and reads back) only as many bytes as our compressed checkpoint
#: stored, rather than the bytes the task holds (see ``floor.py``).
STRICTER: list[tuple[str, str]] = [
    ("create / I/O floor create (stored bytes only)", "create_vs_stored_floor"),
    ("recover / I/O floor recover (stored bytes only)", "recover_vs_stored_floor"),
]


def pin(server_pid: int) -> int:
    """Pin this process and every thread of redis-server to one CPU; returns it.

    On this VM a round trip between two CPUs costs ~125 us (waking an idle vCPU) and
    one on the same CPU ~35 us; left to the scheduler, runs flip between the two and
    round-trip-bound methods (the baseline) vary 4x. One CPU gives the cheapest,
    steadiest round trips: the setting most favourable to the baseline.
    """
    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    for task in os.listdir(f"/proc/{server_pid}/task"):
        os.sched_setaffinity(int(task), {cpu})
    return cpu


def round_trip_us(client: redis.Redis, count: int = 2000) -> float:
    """Median PING round trip in microseconds."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        client.ping()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    """``call()`` timed with perf_counter (after a collection, so an earlier phase's
    garbage is not collected inside the measurement)."""
    gc.collect()
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def connect(manager: CheckpointManager) -> None:
    """Open the manager's first Redis connection before the clock starts, as the
    floor's and the baseline's clients are connected before theirs: a new connection
    costs a connect, HELLO and CLIENT SETINFO (0.5-0.7 ms here), once per manager."""
    manager.runtime.client.ping()


def repopulate(client: redis.Redis, items: list[workload.Key]) -> None:
    client.flushall()
    workload.populate_redis(client, items)
    if client.dbsize() != len(items):
        raise RuntimeError(f"populated {client.dbsize()} keys, expected {len(items)}")


def check_restored(client: redis.Redis, items: list[workload.Key], who: str) -> None:
    """The task's keys are back: the right count, and a sample read back equal."""
    if client.dbsize() != len(items):
        raise RuntimeError(f"{who}: {client.dbsize()} keys after recovery, not {len(items)}")
    for item in random.Random(1).sample(items, min(200, len(items))):
        want: Any = item.value
        if item.kind == "string":
            got: Any = client.get(item.key)
        elif item.kind == "list":
            got = client.lrange(item.key, 0, -1)
        elif item.kind == "hash":
            got = sorted(client.hgetall(item.key).items())
            want = sorted(zip(item.value[::2], item.value[1::2], strict=True))
        else:
            got = sorted(client.smembers(item.key))
        if got != want or (item.ttl_ms is not None) != (client.pttl(item.key) > 0):
            raise RuntimeError(f"{who}: key {item.key!r} differs after recovery")


# -- one size ---------------------------------------------------------------------------------


def run_ours(
    url: str, client: redis.Redis, items: list[workload.Key], n: int, db: Path
) -> dict[str, Any]:
    """create, unchanged re-checkpoint, 1%-changed re-checkpoint, recover (one repetition)."""
    durable = f"sqlite:///{db}"
    out: dict[str, Any] = {}
    with CheckpointManager.open(url, durable) as manager:
        out["rows"] = workload.populate_durable(manager.durable, n)
        connect(manager)
        _, before = manager.store.payload_stats()
        out["create_s"], full = timed(lambda: manager.create_checkpoint(TASK))
        _, after_full = manager.store.payload_stats()
        out["unchanged_s"], same = timed(lambda: manager.create_checkpoint(TASK))
        _, after_same = manager.store.payload_stats()
        out["changed_keys"] = workload.change_fraction(client, n, 0.01)
        out["changed_s"], changed = timed(lambda: manager.create_checkpoint(TASK))
        _, after_changed = manager.store.payload_stats()
    if full.key_count != n:
        raise RuntimeError(f"the checkpoint holds {full.key_count} keys, not {n}")
    if changed.checkpoint_id == full.checkpoint_id:
        raise RuntimeError("the 1%-changed re-checkpoint returned the old checkpoint")
    out.update(
        full_stored_bytes=full.stored_bytes,
        full_raw_bytes=full.raw_bytes,
        full_store_growth=after_full - before,
        point_in_time=full.point_in_time,
        unchanged_new_checkpoint=same.checkpoint_id != full.checkpoint_id,
        unchanged_stored_bytes=same.stored_bytes if same.checkpoint_id != full.checkpoint_id else 0,
        unchanged_store_growth=after_same - after_full,
        changed_stored_bytes=changed.stored_bytes,
        changed_store_growth=after_changed - after_same,
    )
    # A crash: the runtime keys are gone; a new process recovers the full checkpoint.
    client.flushall()
    with CheckpointManager.open(url, durable) as manager:
        connect(manager)
        out["recover_s"], result = timed(
            lambda: manager.recover_from_checkpoint(TASK, full.checkpoint_id)
        )
    if not result.success or result.keys_restored != n:
        raise RuntimeError(f"recovery restored {result.keys_restored} of {n} keys")
    check_restored(client, items, "recover")
    return out


#: The floor writes the task's raw bytes (times named ``create_s``, ``recover_s``); the
#: stricter I/O floor only as many as our checkpoint stored (``create_stored_s``, ...).
_FLOOR_BYTES = {"": "raw", "_stored": "stored"}


def run_floor(
    client: redis.Redis, items: list[workload.Key], nbytes: dict[str, int], tmp: Path, tag: str
) -> dict[str, Any]:
    """The floor's create and recover, each variant, writing ``nbytes["raw"]`` (the
    floor) and ``nbytes["stored"]`` (the stricter I/O floor).

    Every create runs before any recover: a recover rewrites the keys (in the order
    the capture read them, which makes the next read of them faster), and each create
    must read the keys as populated, as ours does.
    """
    floor = Floor(client, TASK)
    out: dict[str, Any] = {}
    captures: dict[tuple[str, str], Capture] = {}
    for suffix, which in _FLOOR_BYTES.items():
        for variant in CAPTURE_VARIANTS:
            db = floor_db(str(tmp / f"floor-{tag}-{variant}-{which}.db"))
            gc.collect()
            made, capture = floor.create(variant, db, nbytes[which])
            db.close()
            if made.keys != len(items):
                raise RuntimeError(f"floor {variant} read {made.keys} keys, not {len(items)}")
            if not suffix:  # the capture floor: the read alone, as in the floor's create
                out[f"capture_s[{variant}]"] = made.capture_s
            out[f"create{suffix}_s[{variant}]"] = made.create_s
            captures[which, variant] = capture
    for suffix, which in _FLOOR_BYTES.items():
        for variant, capture_variant in zip(RECOVER_VARIANTS, cycle(CAPTURE_VARIANTS)):
            client.flushall()
            db = sqlite3.connect(str(tmp / f"floor-{tag}-{capture_variant}-{which}.db"))
            gc.collect()
            back = floor.recover(variant, db, captures[which, capture_variant])
            db.close()
            if back.bytes_read != nbytes[which]:
                raise RuntimeError(f"floor read back {back.bytes_read} bytes, not {nbytes[which]}")
            check_restored(client, items, f"floor {variant}")
            out[f"recover{suffix}_s[{variant}]"] = back.recover_s
    return out


def run_baseline(
    url: str, client: redis.Redis, items: list[workload.Key], db: Path
) -> dict[str, Any]:
    text = redis.Redis.from_url(url, decode_responses=True)
    conn = baseline.fresh_db(str(db))
    text.ping()  # connected before the clock starts, as every other method is
    out: dict[str, Any] = {}
    out["create_s"], keys = timed(lambda: baseline.create(text, conn, TASK)[1])
    if keys != len(items):
        raise RuntimeError(f"baseline read {keys} keys, not {len(items)}")
    client.flushall()
    out["recover_s"], _ = timed(lambda: baseline.recover(text, conn, TASK))
    check_restored(client, items, "baseline")
    conn.close()
    text.close()
    return out


def run_size(url: str, client: redis.Redis, n: int, repeats: int, tmp: Path) -> dict[str, Any]:
    items = list(workload.generate(n))
    raw = sum(item.raw_size() for item in items)
    reps: list[dict[str, Any]] = []
    load_before = os.getloadavg()[0]
    for rep in range(repeats):
        log(f"N={n:,} repetition {rep + 1}/{repeats}: ours")
        repopulate(client, items)
        ours = run_ours(url, client, items, n, tmp / f"ours-{n}-{rep}.db")
        log(f"N={n:,} repetition {rep + 1}/{repeats}: floor")
        repopulate(client, items)
        written = {"raw": raw, "stored": ours["full_stored_bytes"]}
        floor = run_floor(client, items, written, tmp, f"{n}-{rep}")
        log(f"N={n:,} repetition {rep + 1}/{repeats}: baseline")
        repopulate(client, items)
        base = run_baseline(url, client, items, tmp / f"baseline-{n}-{rep}.db")
        reps.append({"ours": ours, "floor": floor, "baseline": base})
    summary = summarize(n, raw, repeats, reps)
    # Other work on the machine shows here (2 cores: Redis and this process share them).
    summary["load_average_1min"] = [load_before, os.getloadavg()[0]]
    return summary


def _best(reps: list[dict[str, Any]], side: str, prefix: str) -> tuple[float, str]:
    """The smallest time over repetitions (and variants: keys ``prefix[variant]``)."""
    found = [
        (value, key[len(prefix) + 1 : -1] if key != prefix else "")
        for rep in reps
        for key, value in rep[side].items()
        if key == prefix or key.startswith(prefix + "[")
    ]
    return min(found)


#: The time ratios: results key -> (numerator, denominator), each ``(side, time name)``.
_TIMED: dict[str, tuple[tuple[str, str], tuple[str, str]]] = {
    "create_vs_floor": (("ours", "create_s"), ("floor", "create_s")),
    "recover_vs_floor": (("ours", "recover_s"), ("floor", "recover_s")),
    "baseline_vs_create": (("baseline", "create_s"), ("ours", "create_s")),
    "baseline_vs_recover": (("baseline", "recover_s"), ("ours", "recover_s")),
    "unchanged_vs_capture_floor": (("ours", "unchanged_s"), ("floor", "capture_s")),
    "create_vs_stored_floor": (("ours", "create_s"), ("floor", "create_stored_s")),
    "recover_vs_stored_floor": (("ours", "recover_s"), ("floor", "recover_stored_s")),
}


def _rep_ratio(rep: dict[str, Any], key: str) -> float:
    (top_side, top), (bottom_side, bottom) = _TIMED[key]
    return _best([rep], top_side, top)[0] / _best([rep], bottom_side, bottom)[0]


def summarize(n: int, raw: int, repeats: int, reps: list[dict[str, Any]]) -> dict[str, Any]:
    first = reps[0]["ours"]
    times: dict[str, float] = {}
    variants: dict[str, str] = {}
    for name in ("create_s", "recover_s", "unchanged_s", "changed_s"):
        times[f"ours_{name}"] = _best(reps, "ours", name)[0]
    for name in ("capture_s", "create_s", "recover_s", "create_stored_s", "recover_stored_s"):
        times[f"floor_{name}"], variants[f"floor_{name}"] = _best(reps, "floor", name)
    for name in ("create_s", "recover_s"):
        times[f"baseline_{name}"] = _best(reps, "baseline", name)[0]
    ours = [rep["ours"] for rep in reps]

    def most(key: str) -> int:
        return max(int(o[key]) for o in ours)

    # Bytes: the largest over repetitions (they differ only when a repetition wrote
    # something the others did not, which is what the targets are about).
    size = {
        "raw_bytes": raw,
        "rows": first["rows"],
        "encoded_bytes": most("full_raw_bytes"),
        "full_stored_bytes": most("full_stored_bytes"),
        "full_store_growth": most("full_store_growth"),
        "unchanged_new_checkpoints": sum(bool(o["unchanged_new_checkpoint"]) for o in ours),
        "unchanged_stored_bytes": most("unchanged_stored_bytes"),
        "unchanged_store_growth": most("unchanged_store_growth"),
        "changed_keys": first["changed_keys"],
        "changed_stored_bytes": most("changed_stored_bytes"),
        "changed_store_growth": most("changed_store_growth"),
        "point_in_time": all(o["point_in_time"] for o in ours),
    }
    ratios = {
        "create_vs_floor": times["ours_create_s"] / times["floor_create_s"],
        "recover_vs_floor": times["ours_recover_s"] / times["floor_recover_s"],
        "baseline_vs_create": times["baseline_create_s"] / times["ours_create_s"],
        "baseline_vs_recover": times["baseline_recover_s"] / times["ours_recover_s"],
        "unchanged_vs_capture_floor": times["ours_unchanged_s"] / times["floor_capture_s"],
        "create_vs_stored_floor": times["ours_create_s"] / times["floor_create_stored_s"],
        "recover_vs_stored_floor": times["ours_recover_s"] / times["floor_recover_stored_s"],
        "unchanged_stored": size["unchanged_store_growth"],
        "changed_vs_full_stored": size["changed_stored_bytes"] / size["full_stored_bytes"],
        "stored_vs_raw": size["full_stored_bytes"] / raw,
    }
    # The same ratios within each repetition (ours against that repetition's floor and
    # baseline, measured seconds apart), and their median: steadier than the ratio of
    # bests when the machine's speed drifts during a run.
    paired = {key: statistics.median(_rep_ratio(rep, key) for rep in reps) for key in _TIMED}
    return {
        "n": n,
        "repeats": repeats,
        "times_s": times,
        "paired_ratios": paired,
        "floor_variants": variants,
        "bytes": size,
        "ratios": ratios,
        "repetitions": reps,
    }


# -- report -----------------------------------------------------------------------------------


def meets(value: float, target: tuple[str, float]) -> bool:
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


def _sh(*cmd: str) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def machine_info(server: EmbeddedRedis, tmp: Path) -> dict[str, Any]:
    package = Path(cfn_checkpoint.__file__).resolve().parent
    repo = package.parent.parent
    commit = _sh("git", "-C", str(repo), "rev-parse", "--short", "HEAD")
    dirty = _sh("git", "-C", str(repo), "status", "--porcelain", "--", "src") if commit else ""
    return {
        "nproc": _sh("nproc"),
        "lscpu": _sh("lscpu").splitlines()[:10],
        "memory": _sh("free", "-h").splitlines()[1:2],
        "kernel": platform.release(),
        "python": platform.python_version(),
        "redis": server.version(),
        "redis_server": server.binary,
        "sqlite": sqlite3.sqlite_version,
        "tmp_filesystem": _sh("df", "-T", str(tmp)).splitlines()[-1:],
        "library": str(package),
        "library_commit": (commit + (" + uncommitted changes" if dirty else "")) or "unknown",
    }


def table(results: list[dict[str, Any]]) -> str:
    def ms(seconds: float) -> str:
        return f"{seconds * 1000:,.1f}"

    lines = [
        "times in ms, best of repeats",
        "| N | create | recover | re-ckpt unchanged | re-ckpt 1% changed | floor create "
        "| floor capture | floor recover | I/O floor create | I/O floor recover "
        "| baseline create | baseline recover |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        t = r["times_s"]
        cells = [
            t["ours_create_s"], t["ours_recover_s"], t["ours_unchanged_s"], t["ours_changed_s"],
            t["floor_create_s"], t["floor_capture_s"], t["floor_recover_s"],
            t["floor_create_stored_s"], t["floor_recover_stored_s"],
            t["baseline_create_s"], t["baseline_recover_s"],
        ]  # fmt: skip
        lines.append(f"| {r['n']:,} | " + " | ".join(ms(c) for c in cells) + " |")
    lines += [
        "",
        "bytes",
        "| N | raw (keys+values) | full: stored | unchanged: stored / store growth "
        "(new checkpoints) | 1% changed: stored / store growth |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        b = r["bytes"]
        lines.append(
            f"| {r['n']:,} | {b['raw_bytes']:,} | {b['full_stored_bytes']:,} "
            f"| {b['unchanged_stored_bytes']:,} / {b['unchanged_store_growth']:,} "
            f"({b['unchanged_new_checkpoints']} of {r['repeats']}) "
            f"| {b['changed_stored_bytes']:,} / {b['changed_store_growth']:,} |"
        )
    header = " | ".join(f"N={r['n']:,}" for r in results)
    lines += ["", f"| ratio | target | {header} |", "|---|---|" + "---:|" * len(results)]
    for label, key, target in RATIOS:
        cells = []
        for r in results:
            value = r["ratios"][key]
            shown = f"{value:,}" if isinstance(value, int) else f"{value:.3g}"
            cells.append(f"{shown} {'ok' if meets(value, target) else 'MISSED'}")
        lines.append(f"| {label} | {target[0]} {target[1]:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "the time ratios within each repetition, median over the repetitions",
        f"| ratio | target | {header} |",
        "|---|---|" + "---:|" * len(results),
    ]
    for label, key, target in RATIOS:
        if key not in _TIMED:
            continue
        cells = []
        for r in results:
            value = r["paired_ratios"][key]
            cells.append(f"{value:.3g} {'ok' if meets(value, target) else 'MISSED'}")
        lines.append(f"| {label} | {target[0]} {target[1]:g} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "against the stricter I/O floor (writes and reads back only the bytes our checkpoint"
        " stored), no target: best of repeats; median of the pairs",
        f"| ratio | {header} |",
        "|---|" + "---:|" * len(results),
    ]
    for label, key in STRICTER:
        cells = [f"{r['ratios'][key]:.3g}; {r['paired_ratios'][key]:.3g}" for r in results]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        v = r["floor_variants"]
        load = ", ".join(f"{x:.2f}" for x in r["load_average_1min"])
        lines.append(
            f"N={r['n']:,}: best of {r['repeats']}; fastest floor variants: capture "
            f"{v['floor_capture_s']}, create {v['floor_create_s']}, recover "
            f"{v['floor_recover_s']}; load average before, after: {load}"
        )
    return "\n".join(lines)


def million_table(m: dict[str, Any]) -> str:
    if "error" in m:
        return f"{m['n']:,} keys: failed: {m['error']}"
    mb = 1_000_000
    lines = [
        f"{m['n']:,} keys, raw {m['raw_bytes'] / mb:,.0f} MB; limit = raw / 2 + 100 MB "
        f"= {m['limit_bytes'] / mb:,.0f} MB",
        "| phase | time (s) | peak RSS over baseline (MB) | baseline RSS (MB) | within limit |",
        "|---|---:|---:|---:|---|",
    ]
    for phase in ("create", "recover"):
        r = m.get(phase)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| {phase} | failed: {r['error']} | | | no |")
            continue
        lines.append(
            f"| {phase} | {r['seconds']:.1f} | {r['peak_over_baseline'] / mb:,.0f} "
            f"| {r['baseline_rss'] / mb:,.0f} | {'yes' if r['within_limit'] else 'NO'} |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [
        ("ours_create_s", "create", "C0", "-"),
        ("ours_recover_s", "recover", "C1", "-"),
        ("ours_unchanged_s", "re-checkpoint, unchanged", "C2", "-"),
        ("ours_changed_s", "re-checkpoint, 1% changed", "C3", "-"),
        ("floor_create_s", "floor: create", "C0", ":"),
        ("floor_capture_s", "floor: capture (read only)", "C2", ":"),
        ("floor_recover_s", "floor: recover", "C1", ":"),
        ("floor_create_stored_s", "I/O floor (stored bytes only): create", "C4", ":"),
        ("baseline_create_s", "per-key baseline: create", "C0", "--"),
        ("baseline_recover_s", "per-key baseline: recover", "C1", "--"),
    ]
    sizes = [r["n"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for key, label, color, style in series:
        ax.plot(
            sizes,
            [r["times_s"][key] for r in results],
            marker={"-": "o", ":": "s", "--": "^"}[style],
            color=color,
            linestyle=style,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("keys in the task (N)")
    ax.set_ylabel("seconds (best of repeats)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_million(python: str, n: int) -> dict[str, Any]:
    log(f"memory check at N={n:,} (bench/memory.py)")
    done = subprocess.run(
        [python, str(Path(__file__).with_name("memory.py")), "-n", str(n), "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    sys.stderr.write(done.stderr)
    if done.returncode != 0:
        return {"n": n, "error": done.stderr.strip().splitlines()[-1:] or ["failed"]}
    return dict(json.loads(done.stdout))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N")
    parser.add_argument("--quick", action="store_true", help="N=1000 only; a smoke run")
    parser.add_argument("--repeats", type=int, help="repetitions of every size")
    parser.add_argument("--million", action="store_true", help="also run memory.py (1M keys)")
    parser.add_argument("--out", type=Path, help="results JSON file")
    parser.add_argument("--plot", type=Path, help="plot PNG file")
    parser.add_argument("--label", default="", help="a note saved with the results")
    parser.add_argument(
        "--no-pin", action="store_true", help="let the OS place the client and redis-server"
    )
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    sizes = [1000] if args.quick else [int(s) for s in args.sizes.split(",")]
    out = args.out or ROOT / ("bench/results-quick.json" if args.quick else "bench/results.json")
    png = args.plot or (None if args.quick else ROOT / "docs/benchmarks.png")
    results: list[dict[str, Any]] = []
    started = datetime.now(UTC)
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-bench-") as name:
        tmp = Path(name)
        info = machine_info(server, tmp)
        client = redis.Redis.from_url(server.url)
        pid = server.pid
        assert pid is not None
        info["pinned_to_cpu"] = None if args.no_pin else pin(pid)
        info["ping_round_trip_us"] = round(round_trip_us(client), 1)
        log(f"pinned to CPU {info['pinned_to_cpu']}; PING {info['ping_round_trip_us']} us")
        for n in sizes:
            repeats = args.repeats or (5 if n <= 10_000 else 3)
            results.append(run_size(server.url, client, n, repeats, tmp))
        client.close()
    report: dict[str, Any] = {
        "measured_at": started.isoformat(timespec="seconds"),
        "command": shlex.join(["python", "bench/run.py", *sys.argv[1:]]),
        "label": args.label,
        "machine": info,
        "workload": {"task": TASK, "seed": workload.SEED},
        "sizes": results,
    }
    if args.million:
        report["million"] = run_million(sys.executable, 1_000_000)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    text = table(results)
    if "million" in report:
        text += "\n\n" + million_table(report["million"])
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nresults: {out} and {out.with_suffix('.md')}")
    if png is not None:
        what = args.label or f"cfn-checkpoint {info['library_commit']}"
        title = f"{what}, measured {started:%Y-%m-%d}, {info['nproc']} cores"
        plot(results, png, title)
        print(f"plot: {png}")


if __name__ == "__main__":
    main()
