"""Scale-out: unchanged checks per second and dispatch latency with 1 and 2
workers (``--role worker``) behind one elected scheduler, on a throwaway
PostgreSQL and 5 sshd nodes on loopback.

    .venv/bin/python -m bench.scale [--targets 50] [--seconds 40]

Every target is due every 2 s (``minute_seconds=2``, ``every=1``): a demand
of targets/2 checks per second. The run log gives the completed unchanged
checks per second over the window (capacity only when it stays below the
demand) and the dispatch latency (started_at - scheduled_at of scheduled
runs, p50/p99; the catalog keeps whole seconds).
Not part of ``python -m bench`` (yet): a standalone script.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import Backhauld, Context
from fixtures.postgres import PostgresCluster


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def measure(ctx: Context, pg: PostgresCluster, workers: int, targets: int,
            seconds: float) -> dict[str, float]:
    url = pg.create_database()
    shared = ctx.scratch / f"scale-{workers}"
    common = dict(catalog_url=url, minute_seconds=2, heartbeat=2, stall_timeout=10,
                  workers=4, per_node=2, sync_every=1, scrub_every=0)
    procs: list[Backhauld] = []
    try:
        for name, role in [("api", "api"), ("sched", "scheduler"),
                           *[(f"worker{i}", "worker") for i in range(workers)]]:
            p = Backhauld(shared, ctx.key, role=role, **common)
            p.log_path = ctx.scratch / f"scale-{workers}-{name}.log"
            procs.append(p.start())
        api = procs[0]
        nodes = ctx.nodes(5)
        ids = []
        for i in range(targets):
            root = ctx.scratch / f"scale-{workers}-trees" / f"t{i}"
            root.mkdir(parents=True)
            for j in range(5):
                (root / f"f{j}").write_bytes(os.urandom(2000))
            ids.append(api.register(nodes[i % len(nodes)], root, every=1)["id"])
        time.sleep(10)  # first full backups, connections pooled
        start = dt.datetime.now(dt.UTC)
        time.sleep(seconds)
        end = dt.datetime.now(dt.UTC)
        rows = []
        for tid in ids:
            rows += api.runs(tid, limit=1000)
    finally:
        for p in procs:
            p.stop()
    window = [r for r in rows if r["finished_at"] and r["started_at"]
              and start <= dt.datetime.fromisoformat(r["finished_at"]) < end]
    unchanged = [r for r in window if r["status"] == "unchanged"]
    lat = [(dt.datetime.fromisoformat(r["started_at"])
            - dt.datetime.fromisoformat(r["scheduled_at"])).total_seconds()
           for r in window if r["trigger"] == "schedule" and r["scheduled_at"]]
    return {"workers": workers, "checks_per_s": len(unchanged) / seconds,
            "runs_in_window": len(window), "failed": sum(r["status"] == "failed" for r in window),
            "latency_p50_s": _quantile(lat, 0.5), "latency_p99_s": _quantile(lat, 0.99),
            "latency_mean_s": statistics.fmean(lat) if lat else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=40)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="backhaul-bench-scale-"))
    ctx = Context(quick=True, cache=scratch / "cache", scratch=scratch,
                  log=lambda s: print(s, file=sys.stderr))
    results = []
    try:
        with PostgresCluster() as pg:
            for workers in (1, 2):
                results.append(measure(ctx, pg, workers, args.targets, args.seconds))
                print(json.dumps(results[-1]), flush=True)
    finally:
        ctx.close()
    print(f"load average at the end: {os.getloadavg()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
