"""Section ``control``: the client and the control plane with many targets.

The fleet (one backhauld with ``fleet_targets`` targets registered through
the API over ``fleet_nodes`` nodes) is built once per benchmark and shared
with the ``memory`` section, which reports its RSS.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import data
from bench.harness import ApiClient, Backhauld, BenchError, Context, run_timed, ssh_env
from bench.measure import RssSampler, median, parallel_map, rss_bytes
from bench.report import Metric, at_least, at_most, info
from storage.catalog import Catalog

CLIENT_THREADS = 16
EVERY_MINUTES = 1440  # no scheduled run during the benchmark, only the first one
# Registration through the API stops after this; the rest is added offline so
# the figures taken with all targets registered still get measured.
REGISTER_BUDGET = 240.0
REGISTER_BUDGET_QUICK = 30.0


@dataclass
class Fleet:
    srv: Backhauld
    targets: int
    nodes: int
    registered: int  # through the API, within the budget
    register_seconds: float
    settle_seconds: float
    peak_rss: int
    rss: int
    errors: list[str] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # per tenth of the registrations
    restarted: bool = False  # the budget ran out: the rest was added offline
    lost_first_runs: int = 0  # queued first backups the restart dropped


def _register_all(srv: Backhauld, jobs: list[dict[str, Any]], budget: float,
                  log: Callable[[str], None]) -> tuple[float, int, list[str], list[float]]:
    """POST the registrations from CLIENT_THREADS threads until done or until
    ``budget`` seconds have passed. Returns the wall time, how many were
    answered, the errors, and the rate of each successive tenth of the jobs."""
    local = threading.local()
    errors: list[str] = []
    lock = threading.Lock()
    step = max(1, len(jobs) // 10)
    marks: list[float] = []
    done = 0
    last = time.perf_counter()

    def one(body: dict[str, Any]) -> None:
        nonlocal done, last
        if time.perf_counter() > deadline:
            return
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = srv.client()
        status, doc = client.request("POST", "/api/v1/targets", body=body)
        with lock:
            if status != 201:
                errors.append(f"HTTP {status}: {doc}")
            done += 1
            last = time.perf_counter()
            if done % step == 0:
                marks.append(last)
                took = marks[-1] - (marks[-2] if len(marks) > 1 else t0)
                log(f"  {done} registered, {step / took:.0f}/s for the last {step}")

    t0 = time.perf_counter()
    deadline = t0 + budget
    parallel_map(one, jobs, CLIENT_THREADS, "bench-register")
    edges = [t0, *marks]
    rates = [step / (b - a) for a, b in zip(edges, edges[1:], strict=False)]
    return last - t0, done, errors, rates


def _add_offline(srv: Backhauld, jobs: list[dict[str, Any]]) -> None:
    """Add targets straight into the stopped server's catalog; its next start
    reconciles the job store (one job per active target) as after a restore."""
    catalog = Catalog(srv.data_dir / "catalog.db")
    try:
        for j in jobs:
            node = catalog.ensure_node(j["user"], j["host"], j["port"])
            catalog.add_target(node.id, j["path"], j["every_minutes"], 10)
    finally:
        catalog.close()


def _pending(client: ApiClient) -> list[int]:
    """Targets that have no finished run yet."""
    status, doc = client.request("GET", "/api/v1/targets")
    if status != 200:
        raise BenchError(f"GET /targets: HTTP {status}")
    return [t["id"] for t in doc["targets"] if t["last_status"] is None]


def _settle(srv: Backhauld, log: Callable[[str], None], stall: float) -> int:
    """Wait until every target has a finished run. Targets that stay without
    one while nothing runs lost their queued first run (the server advanced
    their schedule when it queued it, then stopped): start those by hand, as a
    user would with ``backhaul run``. Returns how many had to be started."""
    client = srv.client()
    deadline = time.monotonic() + 1800
    last, since, kicked = -1, time.monotonic(), 0
    while pending := _pending(client):
        if time.monotonic() > deadline:
            raise BenchError(f"{len(pending)} first backups still pending after 30 min")
        if len(pending) != last:
            last, since = len(pending), time.monotonic()
        elif not kicked and time.monotonic() - since > stall:
            _, doc = client.request("GET", "/api/v1/runs", query={"status": "running",
                                                                   "limit": 1})
            if not doc["runs"]:
                log(f"  {len(pending)} targets have no run and none is coming: their "
                    "queued first backups were lost with the restart; starting them now")
                for tid in pending:
                    client.request("POST", f"/api/v1/targets/{tid}/run")
                kicked = len(pending)
        log(f"  waiting for first backups: {len(pending)} left")
        time.sleep(min(10.0, max(2.0, len(pending) / 200)))
    return kicked


def fleet(ctx: Context) -> Fleet:
    """The shared fleet, built on first use."""
    if "fleet" in ctx.memo:
        return ctx.memo["fleet"]
    sizes = ctx.sizes
    nodes = ctx.nodes(sizes.fleet_nodes)
    per_node = -(-sizes.fleet_targets // len(nodes))
    dirs = data.small_dirs(ctx.cache, per_node)
    # The same small dirs on every node (they are all this machine): targets
    # are (node, path) pairs. Interleaved, so each node gets its share at once.
    jobs = [{"host": n.host, "port": n.port, "user": n.user, "path": str(d),
             "every_minutes": EVERY_MINUTES}
            for d in dirs for n in nodes][:sizes.fleet_targets]
    srv = ctx.lasting_backhauld("fleet")
    ctx.log(f"fleet: registering {len(jobs)} targets over {len(nodes)} nodes through the API "
            f"({CLIENT_THREADS} client threads); each registration starts a first backup")
    budget = REGISTER_BUDGET_QUICK if ctx.quick else REGISTER_BUDGET
    with RssSampler(srv.pid, 0.1) as sampler:
        seconds, answered, errors, rates = _register_all(srv, jobs, budget, ctx.log)
        ctx.log(f"  {answered} registered in {seconds:.1f} s ({answered / seconds:.0f}/s), "
                f"{len(errors)} errors")
    peak = sampler.peak
    if answered < len(jobs):
        rest = jobs[answered:]
        ctx.log(f"  registration budget ({budget:g} s) spent: adding the other {len(rest)} "
                "targets to the stopped server's catalog; its restart schedules them")
        srv.stop()
        _add_offline(srv, rest)
        srv.start(timeout=600)
    t0 = time.perf_counter()
    with RssSampler(srv.pid, 0.5) as sampler:
        lost = _settle(srv, ctx.log, stall=10.0 if ctx.quick else 30.0)
        settle = time.perf_counter() - t0
    peak = max(peak, sampler.peak)
    time.sleep(1.0)
    result = Fleet(srv, len(jobs) - len(errors), len(nodes), answered, seconds, settle,
                   peak, rss_bytes(srv.pid), errors[:5], rates, answered < len(jobs), lost)
    ctx.memo["fleet"] = result
    return result


def run_control(ctx: Context) -> list[Metric]:
    f = fleet(ctx)
    n = f.targets
    env = f.srv.cli_env()
    jobs_times = []
    for _ in range(ctx.sizes.cli_runs):
        elapsed, cp = run_timed([ctx.backhaul, "jobs"], env=env)
        lines = cp.stdout.count(b"\n")
        if lines < n:
            raise BenchError(f"backhaul jobs printed {lines} lines for {n} targets")
        jobs_times.append(elapsed)
    api_times = []
    client = f.srv.client()
    for _ in range(ctx.sizes.cli_runs):
        t0 = time.perf_counter()
        client.request("GET", "/api/v1/targets")
        api_times.append(time.perf_counter() - t0)
    help_times, py_times = [], []
    for _ in range(ctx.sizes.cli_runs):
        help_times.append(run_timed([ctx.backhaul, "--help"], env=ssh_env())[0])
        py_times.append(run_timed([sys.executable, "-c", "pass"], env=ssh_env())[0])
    rate = f.registered / f.register_seconds
    within = ("" if f.registered == n
              else f" ({f.registered} in the {f.register_seconds:.0f} s budget)")
    return [
        at_least("control", f"registrations through the API{within}", rate, "/s", 100,
                 "{:.1f}", seconds=f.register_seconds, registered=f.registered,
                 errors=f.errors, client_threads=CLIENT_THREADS, nodes=f.nodes,
                 rate_per_tenth=[round(r, 1) for r in f.rates]),
        info("control", "  then: wait until every first backup ran", f.settle_seconds, "s",
             "{:.0f}"),
        *([Metric("control", "  queued first backups lost by the restart",
                  float(f.lost_first_runs), "", str(f.lost_first_runs), goal="0",
                  ok=f.lost_first_runs == 0)] if f.restarted else []),
        at_most("control", f"`backhaul jobs` with {n} targets", median(jobs_times), "s", 0.5,
                "{:.3f}", runs=jobs_times),
        info("control", "  of which: GET /api/v1/targets", median(api_times), "s", "{:.3f}",
             runs=api_times),
        info("control", "`backhaul --help` start-up", median(help_times), "s", "{:.3f}",
             runs=help_times),
        info("control", "  baseline: python -c pass", median(py_times), "s", "{:.3f}",
             runs=py_times),
    ]
