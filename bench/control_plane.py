"""Section ``ctlplane``: the control plane alone at 10,000 targets, on the
embedded default (SQLite) and on PostgreSQL.

    .venv/bin/python -m bench --only ctlplane
    .venv/bin/python -m bench.control_plane [--targets 10000] [--backend sqlite,postgresql]

Unlike ``control`` (real nodes: each registration checks its path over SSH
and starts a first backup, so it measures backups as much as registrations),
the targets here sit on 10 loopback addresses (127.0.0.10-19) on a port
where nothing listens. Registration goes through its whole path: input
checks, the duplicate check, the path check (refused at once: the node is
down), the catalog rows and the APScheduler job in its persistent store; a
node found down gets its first run one interval later and one probe per node
(10 in all, backing off), so nothing else competes for the server.

Measured: registrations/s from one client, one request after the other
(keep-alive), then from 16 client threads; ``backhaul jobs`` (the installed
console script, a fresh process: its default page and its summary line) and
``backhaul jobs --all``; ``GET /api/v1/targets`` of a page and of all.
The PostgreSQL cluster is the test fixture's (fsync and synchronous_commit
off): its figures leave out the disk flush that SQLite's pay.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.harness import Backhauld, BenchError, Context, run_timed
from bench.measure import cpu_seconds, median, parallel_map
from bench.report import Metric, at_least, at_most, info, table
from fixtures.server import free_port

SECTION = "ctlplane"
NODES = 10
THREADS = 16
SEQUENTIAL_SHARE = 0.2  # the first fifth one by one, the rest from THREADS threads


def _register(client_of: Any, jobs: list[dict[str, Any]], threads: int) -> tuple[float, list[str]]:
    """POST every job (``threads`` at a time, each thread its own keep-alive
    connection); returns the wall time and the errors."""
    local = threading.local()
    errors: list[str] = []

    def one(body: dict[str, Any]) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = client_of()
        status, doc = client.request("POST", "/api/v1/targets", body=body)
        if status != 201:
            errors.append(f"HTTP {status}: {doc}")

    t0 = time.perf_counter()
    if threads == 1:
        for body in jobs:
            one(body)
    else:
        parallel_map(one, jobs, threads, "bench-ctl")
    return time.perf_counter() - t0, errors


class _Stopper:
    def __init__(self, srv: Backhauld) -> None:
        self.srv = srv

    def close(self) -> None:
        self.srv.stop()


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(ctx: Context, backend: str, targets: int, catalog_url: str | None = None,
            runs: int = 5) -> list[Metric]:
    settings: dict[str, object] = {"scrub_every": 0}
    if catalog_url:
        settings["catalog_url"] = catalog_url
    closed = free_port("127.0.0.1")  # nothing listens there, on any 127.0.0.x
    jobs = [{"host": f"127.0.0.{10 + i % NODES}", "port": closed, "user": "nobody",
             "path": f"/srv/app{i:05d}", "every_minutes": 1440} for i in range(targets)]
    first = int(targets * SEQUENTIAL_SHARE)
    name = f"{SECTION}: {backend}"
    srv = Backhauld(ctx.scratch / f"ctlplane-{backend}", ctx.key, **settings)
    with contextlib.closing(_Stopper(srv)):
        srv.start(timeout=180)  # a loaded machine may take a while to import everything
        ctx.log(f"{name}: {first} registrations one by one, then {targets - first} "
                f"from {THREADS} threads ({NODES} nodes that are down)")
        cpu0 = cpu_seconds(srv.pid)
        seq_s, errors = _register(srv.client, jobs[:first], 1)
        ctx.log(f"  {first / seq_s:.0f}/s one by one")
        cpu1 = cpu_seconds(srv.pid)
        par_s, more = _register(srv.client, jobs[first:], THREADS)
        cpu2 = cpu_seconds(srv.pid)
        errors += more
        ctx.log(f"  {(targets - first) / par_s:.0f}/s from {THREADS} threads, "
                f"{len(errors)} errors")
        if errors:
            raise BenchError(f"{len(errors)} registrations failed, e.g. {errors[0]}")
        env = srv.cli_env()
        page, everything, page_cpu = [], [], []
        for _ in range(runs):
            before = _children_cpu()
            elapsed, cp = run_timed([ctx.backhaul, "jobs"], env=env)
            page_cpu.append(_children_cpu() - before)
            # (a backhaul from before paging prints every target: the "before" figure)
            if f" of {targets} shown" not in cp.stdout.decode() \
                    and cp.stdout.count(b"\n") < targets + 1:
                raise BenchError(f"backhaul jobs printed neither a page nor every target:\n"
                                 f"{cp.stdout[-300:]!r}")
            page.append(elapsed)
        for _ in range(max(1, runs // 2)):
            elapsed, cp = run_timed([ctx.backhaul, "jobs", "--all"], env=env)
            lines = cp.stdout.count(b"\n")
            if lines < targets + 1:
                raise BenchError(f"backhaul jobs --all printed {lines} lines")
            everything.append(elapsed)
        client = srv.client()
        api_page, api_all = [], []
        cpu_page = cpu_seconds(srv.pid)
        for _ in range(runs):
            t0 = time.perf_counter()
            client.request("GET", "/api/v1/targets", query={"limit": 100})
            api_page.append(time.perf_counter() - t0)
        page_server_cpu = (cpu_seconds(srv.pid) - cpu_page) / runs
        for _ in range(max(1, runs // 2)):
            t0 = time.perf_counter()
            client.request("GET", "/api/v1/targets")
            api_all.append(time.perf_counter() - t0)
    return [
        at_least(SECTION, f"{backend}: registrations, one client, one by one ({first})",
                 first / seq_s, "/s", 100, "{:.0f}", seconds=seq_s),
        at_least(SECTION, f"{backend}: registrations, {THREADS} client threads "
                          f"({targets - first}, up to {targets} targets)",
                 (targets - first) / par_s, "/s", 100, "{:.0f}", seconds=par_s),
        info(SECTION, f"{backend}:   backhauld CPU per registration, one by one",
             (cpu1 - cpu0) / first * 1000, "ms", "{:.1f}"),
        info(SECTION, f"{backend}:   backhauld CPU per registration, {THREADS} threads",
             (cpu2 - cpu1) / (targets - first) * 1000, "ms", "{:.1f}"),
        at_most(SECTION, f"{backend}: `backhaul jobs` with {targets} targets (a page)",
                median(page), "s", 0.5, "{:.3f}", runs=page),
        info(SECTION, f"{backend}:   CPU of the `backhaul jobs` process",
             median(page_cpu), "s", "{:.3f}", runs=page_cpu),
        info(SECTION, f"{backend}:   of which: GET /api/v1/targets?limit=100",
             median(api_page), "s", "{:.3f}", runs=api_page),
        info(SECTION, f"{backend}:   backhauld CPU per GET of a page", page_server_cpu, "s",
             "{:.3f}"),
        info(SECTION, f"{backend}: `backhaul jobs --all` ({targets} rows)", median(everything),
             "s", "{:.3f}", runs=everything),
        info(SECTION, f"{backend}:   of which: GET /api/v1/targets (all)", median(api_all),
             "s", "{:.3f}", runs=api_all),
    ]


def run_control_plane(ctx: Context, backends: tuple[str, ...] = ("sqlite", "postgresql"),
                      targets: int | None = None) -> list[Metric]:
    count = targets or (1_000 if ctx.quick else 10_000)
    runs = 3 if ctx.quick else 5
    out: list[Metric] = []
    for backend in backends:
        if backend == "sqlite":
            out += measure(ctx, backend, count, runs=runs)
        else:
            from fixtures.postgres import PostgresCluster
            with PostgresCluster() as pg:
                out += measure(ctx, backend, count, pg.create_database("ctl"), runs=runs)
        out.append(info(SECTION, f"{backend}: load average (1 min) after",
                        os.getloadavg()[0], "", "{:.1f}"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.control_plane")
    parser.add_argument("--targets", type=int, default=10_000)
    parser.add_argument("--backend", default="sqlite,postgresql",
                        help="sqlite, postgresql or both (comma-separated)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="backhaul-bench-ctl-"))
    ctx = Context(quick=False, cache=scratch / "cache", scratch=scratch,
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    load = os.getloadavg()[0]
    try:
        got = run_control_plane(ctx, tuple(args.backend.split(",")), args.targets)
    finally:
        ctx.close()
    print(table(got))
    print(json.dumps({"load_1min_start": load, "load_1min_end": os.getloadavg()[0],
                      "metrics": [{"name": m.name, "value": m.value, **m.detail}
                                  for m in got]}, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
