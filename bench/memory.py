"""Peak memory of create and recover on a large task (default 1,000,000 keys). Opt-in:

    python bench/memory.py [-n 1000000] [--json]
    python bench/run.py --million          # runs this and adds it to results.json

A private redis-server is populated by a separate process (bench/workload.py), so the
generator's memory is not counted. Create and recover each run in a fresh subprocess
that imports the library, connects to both tiers, reads its baseline
``ru_maxrss`` (RUSAGE_SELF), runs the one call, and reads ``ru_maxrss`` again: the
peak is the difference. Before the recovery the runtime keys are flushed (a crash).
Target: peak <= half the task's raw size (key + value bytes) + 100 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
from private_redis import add_option, choose, private_server
from workload import TASK_ID

from cfn_checkpoint import CheckpointManager

HERE = Path(__file__).resolve().parent
MB = 1_000_000


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def phase(name: str, redis_url: str, durable_url: str) -> dict[str, Any]:
    """Run one phase in this process (the subprocess side) and measure it."""
    with CheckpointManager.open(redis_url, durable_url) as manager:
        manager.runtime.client.ping()
        manager.store.payload_stats()
        before = _maxrss_bytes()
        start = time.perf_counter()
        if name == "create":
            meta = manager.create_checkpoint(TASK_ID)
            detail = {
                "keys": meta.key_count,
                "stored_bytes": meta.stored_bytes,
                "point_in_time": meta.point_in_time,
            }
        else:
            result = manager.recover_from_checkpoint(TASK_ID)
            if not result.success:
                raise RuntimeError(f"recovery failed: {result.errors}")
            detail = {"keys": result.keys_restored, "atomic": result.atomic}
        seconds = time.perf_counter() - start
        peak = _maxrss_bytes()
    return {
        "seconds": seconds,
        "baseline_rss": before,
        "peak_rss": peak,
        "peak_over_baseline": peak - before,
        **detail,
    }


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{done.stderr}")
    return done.stdout


def measure(n: int) -> dict[str, Any]:
    python = sys.executable
    with private_server() as server, tempfile.TemporaryDirectory(prefix="cfn-bench-mem-") as tmp:
        durable = f"sqlite:///{tmp}/store.db"
        print(f"populating {n:,} keys ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        populated = json.loads(
            _run(
                [
                    python,
                    str(HERE / "workload.py"),
                    "--redis-url",
                    server.url,
                    "--durable-url",
                    durable,
                    "-n",
                    str(n),
                ]
            )
        )
        print(f"populated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        client = redis.Redis.from_url(server.url)
        redis_used = int(client.info("memory")["used_memory"])
        out: dict[str, Any] = {
            "n": n,
            "raw_bytes": populated["raw_bytes"],
            "rows": populated["rows"],
            "redis_used_memory": redis_used,
        }
        limit = populated["raw_bytes"] // 2 + 100 * MB
        out["limit_bytes"] = limit
        for name in ("create", "recover"):
            if name == "recover":
                client.flushall()
            print(f"{name} ...", file=sys.stderr, flush=True)
            try:
                result = json.loads(
                    _run(
                        [
                            python,
                            __file__,
                            "--phase",
                            name,
                            "--redis-url",
                            server.url,
                            "--durable-url",
                            durable,
                        ]
                    )
                )
            except RuntimeError as exc:
                out[name] = {"error": str(exc).strip().splitlines()[-1]}
                print(f"{name} failed: {exc}", file=sys.stderr, flush=True)
                if name == "create":
                    break
                continue
            result["within_limit"] = result["peak_over_baseline"] <= limit
            out[name] = result
            print(f"{name}: {result}", file=sys.stderr, flush=True)
        if "recover" in out and "error" not in out["recover"] and client.dbsize() != n:
            out["recover"]["error"] = f"{client.dbsize()} keys after recovery, not {n}"
        client.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="Peak memory of create and recover.")
    parser.add_argument("-n", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="print only the JSON result")
    parser.add_argument("--phase", choices=("create", "recover"), help=argparse.SUPPRESS)
    parser.add_argument("--redis-url", help=argparse.SUPPRESS)
    parser.add_argument("--durable-url", help=argparse.SUPPRESS)
    add_option(parser)
    args = parser.parse_args()
    choose(args.redis_server)
    if args.phase:
        print(json.dumps(phase(args.phase, args.redis_url, args.durable_url)))
        return
    out = measure(args.n)
    if args.json:
        print(json.dumps(out))
        return
    print(json.dumps(out, indent=2))
    for name in ("create", "recover"):
        r = out.get(name, {})
        if "peak_over_baseline" in r:
            print(
                f"{name}: {r['seconds']:.1f} s, peak {r['peak_over_baseline'] / MB:,.0f} MB over "
                f"baseline; limit {out['limit_bytes'] / MB:,.0f} MB "
                f"({'ok' if r['within_limit'] else 'MISSED'})"
            )


if __name__ == "__main__":
    main()
