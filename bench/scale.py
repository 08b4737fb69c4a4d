"""Section ``scale``: runs executed by 1, then 2, ``--role worker`` processes
behind one elected ``--role scheduler`` and an ``--role api`` process, on a
throwaway PostgreSQL (fixtures/postgres.py) and 5 sshd nodes on loopback.

    .venv/bin/python -m bench --only scale            # as a section
    .venv/bin/python -m bench.scale [--targets 50] [--seconds 40] [--modes unchanged,delta]

Every target is due every 2 s (``minute_seconds=2``, ``every=1``): a demand
of targets/2 runs per second. Two workloads:

- ``unchanged``: small trees nobody touches, every run an unchanged check;
- ``delta``: each tree also holds a log that a thread here grows by 4 KiB
  about once a second, so (nearly) every run is a changed backup composed
  from the previous archive.

After every target's first backup, a window of ``seconds`` is measured:

- runs finished in it (the ``runs`` table, read directly) per second, by kind;
- dispatch latency, started_at - scheduled_at of scheduled runs (p50/p99);
- CPU seconds of each backhauld process (its /proc stat, children included),
  per role, and of PostgreSQL and the sshd nodes, divided by the runs;
- PostgreSQL's row writes per table (pg_stat_user_tables inserts, updates,
  deletes), commits and WAL bytes, divided by the runs;
- the machine's busy share of its cores, and its load average.

Everything shares this machine's cores, so the throughput is what the whole
stack (nodes included) gets from them; the per-run CPU and rows are the
figures that carry over to a fleet (bench/README.md, the 100,000-target model).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.harness import Backhauld, BenchError, Context
from bench.report import Metric, failed, info
from fixtures.postgres import PostgresCluster

TICK = os.sysconf("SC_CLK_TCK")
SECTION = "scale"


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# -- CPU from /proc -------------------------------------------------------------

def _stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds incl. reaped children) of a live process."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    # fields[0] is state (field 3); utime..cstime are fields 14-17.
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK


def _table() -> dict[int, tuple[int, float]]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            got = _stat(int(name))
            if got is not None:
                out[int(name)] = got
    return out


def tree_cpu(table: dict[int, tuple[int, float]], root: int) -> float:
    """CPU seconds of a process and its live descendants; each one's
    cutime/cstime covers the descendants it has already reaped."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in table:
            total += table[pid][1]
        todo += children.get(pid, [])
    return total


def _machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of all cores since boot."""
    parts = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = parts[3] + parts[4]  # idle + iowait
    return sum(parts[:8]) - idle, sum(parts[:8])


# -- PostgreSQL's own counters ----------------------------------------------------

def _pg_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def pg_counters(url: str) -> dict[str, Any]:
    """Row writes per table, commits and the WAL position of the bench's database."""
    import psycopg
    with psycopg.connect(_pg_dsn(url), autocommit=True) as conn:
        tables = {name: (ins, upd, dele) for name, ins, upd, dele in conn.execute(
            "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables")}
        commits, rollbacks, db_rows = conn.execute(
            "SELECT xact_commit, xact_rollback, tup_inserted + tup_updated + tup_deleted "
            "FROM pg_stat_database WHERE datname = current_database()").fetchone()
        wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')").fetchone()[0]
    return {"tables": tables, "commits": commits, "rollbacks": rollbacks, "db_rows": db_rows,
            "wal": float(wal)}


def pg_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    tables = {}
    for name, (i, u, d) in after["tables"].items():
        i0, u0, d0 = before["tables"].get(name, (0, 0, 0))
        if (i - i0, u - u0, d - d0) != (0, 0, 0):
            tables[name] = {"inserted": i - i0, "updated": u - u0, "deleted": d - d0}
    return {"tables": tables, "commits": after["commits"] - before["commits"],
            "rollbacks": after["rollbacks"] - before["rollbacks"],
            # pg_stat_database's tup_* over the whole database: a cross-check
            "db_rows_written": after["db_rows"] - before["db_rows"],
            "wal_bytes": after["wal"] - before["wal"]}


def _runs(url: str, since: dt.datetime | None = None,
          until: dt.datetime | None = None) -> list[tuple[Any, ...]]:
    """(target_id, status, transfer, trigger, bytes, start delay s) of runs
    finished in [since, until)."""
    import psycopg
    q = ("SELECT target_id, status, transfer, trigger, bytes_transferred, "
         "EXTRACT(EPOCH FROM started_at - scheduled_at)::float8, error_code FROM runs "
         "WHERE finished_at IS NOT NULL")
    args: list[Any] = []
    if since is not None:
        q += " AND finished_at >= %s AND finished_at < %s"
        # the catalog keeps naive UTC timestamps
        args = [since.replace(tzinfo=None), until.replace(tzinfo=None) if until else None]
    with psycopg.connect(_pg_dsn(url), autocommit=True) as conn:
        return list(conn.execute(q, args).fetchall())


# -- the workload -------------------------------------------------------------------

def _build_tree(root: Path, files: int, log_bytes: int) -> None:
    root.mkdir(parents=True)
    for j in range(files):
        # text-like, compressible: a config or source file
        (root / f"f{j:03d}.txt").write_text(
            "".join(f"line {k} of file {j} in {root.name}: value={k * j % 97}\n"
                    for k in range(40)))
    if log_bytes:
        (root / "app.log").write_bytes(
            b"".join(b"%08d INFO request served in 12 ms\n" % k
                     for k in range(log_bytes // 34)))


class Appender(threading.Thread):
    """Grows each tree's log by 4 KiB, every tree about once per ``period``."""

    def __init__(self, roots: list[Path], period: float) -> None:
        super().__init__(daemon=True, name="bench-scale-appender")
        self.roots, self.period = roots, period
        self.halt = threading.Event()
        self.appended = 0

    def run(self) -> None:
        while not self.halt.is_set():
            t0 = time.monotonic()
            for root in self.roots:
                # log lines with a request id each: compressible about 2:1, like a real log
                stamp = dt.datetime.now(dt.UTC).isoformat()
                chunk = "".join(f"{stamp} WARN req={os.urandom(8).hex()} upstream slow, "
                                f"retry {k}\n" for k in range(60)).encode()[:4096]
                with open(root / "app.log", "ab") as f:
                    f.write(chunk)
                self.appended += 1
                if self.halt.wait(self.period / len(self.roots) / 2):
                    return
            self.halt.wait(max(0.0, self.period - (time.monotonic() - t0)))


def measure(ctx: Context, pg: PostgresCluster, *, workers: int, targets: int,
            seconds: float, mode: str) -> dict[str, Any]:
    url = pg.create_database("scale")
    shared = ctx.scratch / f"scale-{mode}-{workers}"
    # heartbeat/stall as in the tests' scale-out profile: a 2 s heartbeat
    common = dict(catalog_url=url, minute_seconds=2, heartbeat=2, stall_timeout=10,
                  workers=4, per_node=2, sync_every=1, scrub_every=0)
    procs: dict[str, Backhauld] = {}
    pids: dict[str, int] = {}  # kept: the samples are read after the processes stop
    appender: Appender | None = None
    files, log_bytes = (20, 0) if mode == "unchanged" else (200, 256 * 1024)
    try:
        for name, role in [("api", "api"), ("scheduler", "scheduler"),
                           *[(f"worker{i}", "worker") for i in range(workers)]]:
            p = Backhauld(shared, ctx.key, role=role, **common)
            p.log_path = ctx.scratch / f"scale-{mode}-{workers}-{name}.log"
            procs[name] = p.start()
            pids[name] = p.pid
        api = procs["api"]
        nodes = ctx.nodes(5)
        roots = []
        for i in range(targets):
            root = shared.parent / f"scale-{mode}-{workers}-trees" / f"t{i}"
            _build_tree(root, files, log_bytes)
            roots.append(root)
            api.register(nodes[i % len(nodes)], root, every=1)
        # every target's first (full) backup, pooled connections: then measure
        deadline = time.monotonic() + 120 + 2 * targets
        while len({r[0] for r in _runs(url) if r[1] in ("success", "unchanged")}) < targets:
            if time.monotonic() > deadline:
                seen = Counter((r[1], r[6]) for r in _runs(url))
                raise BenchError(f"scale/{mode}/{workers}: first backups not done in time; "
                                 f"runs so far (status, error): {dict(seen)}")
            time.sleep(1)
        if mode == "delta":
            appender = Appender(roots, period=1.0)
            appender.start()
        time.sleep(4)  # the appender's first round reaches every tree
        load_start = os.getloadavg()
        pg_before = pg_counters(url)
        table0, busy0 = _table(), _machine_busy()
        start = dt.datetime.now(dt.UTC)
        t0 = time.monotonic()
        time.sleep(seconds)
        table1, busy1 = _table(), _machine_busy()
        elapsed = time.monotonic() - t0
        end = dt.datetime.now(dt.UTC)
        load_end = os.getloadavg()
        time.sleep(1.5)  # backends flush their table counters at most once a second
        pg_after = pg_counters(url)
        if appender is not None:
            appender.halt.set()
        rows = _runs(url, start, end)
    finally:
        if appender is not None:
            appender.halt.set()
        for p in reversed(list(procs.values())):
            p.stop()
    cpu = {name: tree_cpu(table1, pid) - tree_cpu(table0, pid) for name, pid in pids.items()}
    assert pg.proc is not None
    pg_cpu = tree_cpu(table1, pg.proc.pid) - tree_cpu(table0, pg.proc.pid)
    sshd_cpu = sum(tree_cpu(table1, n.pid) - tree_cpu(table0, n.pid)
                   for n in nodes if n.pid is not None)
    kinds = Counter(("unchanged" if r[1] == "unchanged" else
                     r[2] if r[1] == "success" else r[1]) for r in rows)
    lat = [r[5] for r in rows if r[3] == "schedule" and r[5] is not None]
    delta_bytes = [r[4] for r in rows if r[1] == "success" and r[2] == "delta"]
    done = sum(kinds[k] for k in ("unchanged", "delta", "full"))
    worker_cpu = sum(v for k, v in cpu.items() if k.startswith("worker"))
    pgd = pg_delta(pg_before, pg_after)
    rows_written = sum(sum(t.values()) for t in pgd["tables"].values())
    return {
        "mode": mode, "workers": workers, "targets": targets,
        "demand_per_s": targets / 2, "seconds": round(elapsed, 1),
        "runs": dict(kinds), "runs_per_s": done / elapsed,
        "failed": kinds.get("failed", 0),
        "latency_p50_s": _quantile(lat, 0.5), "latency_p99_s": _quantile(lat, 0.99),
        "latency_mean_s": statistics.fmean(lat) if lat else float("nan"),
        "delta_wire_bytes_median": statistics.median(delta_bytes) if delta_bytes else None,
        "cpu_s": {k: round(v, 2) for k, v in cpu.items()},
        "cpu_s_postgres": round(pg_cpu, 2), "cpu_s_sshd_nodes": round(sshd_cpu, 2),
        "worker_cpu_per_run_ms": 1000 * worker_cpu / done if done else float("nan"),
        "scheduler_cpu_per_run_ms": 1000 * cpu["scheduler"] / done if done else float("nan"),
        "api_cpu_s": round(cpu["api"], 2),
        "postgres_cpu_per_run_ms": 1000 * pg_cpu / done if done else float("nan"),
        "sshd_cpu_per_run_ms": 1000 * sshd_cpu / done if done else float("nan"),
        "machine_busy": (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
        # this stack's share of the machine (the rest is other work on it)
        "stack_share": (sum(cpu.values()) + pg_cpu + sshd_cpu)
        / (elapsed * (os.cpu_count() or 1)),
        "pg": pgd, "pg_rows_per_run": rows_written / done if done else float("nan"),
        "pg_commits_per_run": pgd["commits"] / done if done else float("nan"),
        "pg_wal_bytes_per_run": pgd["wal_bytes"] / done if done else float("nan"),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in load_end],
    }


def _metrics(r: dict[str, Any]) -> Iterator[Metric]:
    tag = f"{r['mode']}, {r['workers']} worker{'s' if r['workers'] > 1 else ''}"
    load = f"load {r['loadavg_start'][0]:.1f}->{r['loadavg_end'][0]:.1f}"
    kind = "unchanged checks" if r["mode"] == "unchanged" else "changed (delta) backups"
    n = r["runs"].get("unchanged" if r["mode"] == "unchanged" else "delta", 0)
    yield info(SECTION, f"{tag}: {kind}/s (demand {r['demand_per_s']:g}/s; {load}; "
               f"cores {r['machine_busy']:.0%} busy, {r['stack_share']:.0%} by this stack)",
               n / r["seconds"], "/s", **r)
    yield info(SECTION, f"  {tag}: dispatch latency p50 (due -> start)",
               r["latency_p50_s"], "s", "{:.2f}")
    yield info(SECTION, f"  {tag}: dispatch latency p99", r["latency_p99_s"], "s", "{:.2f}")
    yield info(SECTION, f"  {tag}: worker CPU per run", r["worker_cpu_per_run_ms"], "ms",
               "{:.1f}")
    yield info(SECTION, f"  {tag}: scheduler CPU per run (api: {r['api_cpu_s']:.2f} s "
               f"in {r['seconds']:.0f} s)", r["scheduler_cpu_per_run_ms"], "ms", "{:.2f}")
    yield info(SECTION, f"  {tag}: PostgreSQL CPU per run", r["postgres_cpu_per_run_ms"],
               "ms", "{:.1f}")
    yield info(SECTION, f"  {tag}: sshd node CPU per run", r["sshd_cpu_per_run_ms"],
               "ms", "{:.1f}")
    yield info(SECTION, f"  {tag}: PostgreSQL rows written per run "
               f"({r['pg_commits_per_run']:.1f} commits, "
               f"{r['pg_wal_bytes_per_run'] / 1024:.1f} KiB WAL)",
               r["pg_rows_per_run"], "rows", "{:.1f}")
    if r["failed"]:
        yield info(SECTION, f"  {tag}: failed runs in the window", r["failed"], "")


def run_scale(ctx: Context, *, targets: int | None = None, seconds: float | None = None,
              modes: tuple[str, ...] = ("unchanged", "delta"),
              counts: tuple[int, ...] = (1, 2)) -> list[Metric]:
    targets = targets or (20 if ctx.quick else 50)
    seconds = seconds or (12 if ctx.quick else 40)
    out: list[Metric] = []
    with PostgresCluster() as pg:
        for mode in modes:
            for workers in counts:
                ctx.log(f"   scale: {mode}, {workers} worker(s), {targets} targets, "
                        f"{seconds:g} s window")
                try:
                    r = measure(ctx, pg, workers=workers, targets=targets, seconds=seconds,
                                mode=mode)
                except BenchError as exc:  # one configuration must not hide the others
                    ctx.log(f"   scale: {mode}, {workers} worker(s): {exc}")
                    out.append(failed(SECTION, f"{mode}, {workers} workers", str(exc)))
                    continue
                ctx.log("   " + json.dumps({k: v for k, v in r.items() if k != "pg"}))
                ctx.log("   pg writes by table: " + json.dumps(r["pg"]["tables"]))
                out += list(_metrics(r))
    return out


def poll_cost(pg: PostgresCluster, targets: int, nodes: int, repeat: int = 3) -> dict[str, Any]:
    """What the leader's poll of the catalog (every ``--sync-every`` seconds,
    roles.CatalogFollower) costs with ``targets`` active targets on ``nodes``
    nodes: rows written in bulk, then each read timed in this process (wall
    and CPU): ``list_targets()`` (the poll before the change counter, still
    the leader's start), ``schedule_changes()`` (each check now) and
    ``scheduled_targets()`` (a check that found the counter moved, and the
    periodic safety-net read)."""
    import sqlalchemy as sa

    from storage.catalog import Catalog
    from storage.catalog import nodes as nodes_t
    from storage.catalog import targets as targets_t
    catalog = Catalog(pg.create_database("poll"))
    now = dt.datetime.now(dt.UTC)
    try:
        with catalog.engine.begin() as conn:
            conn.execute(sa.insert(nodes_t), [
                {"id": i + 1, "user": "backup", "host": f"127.{i // 250}.{i % 250}.2",
                 "port": 22, "probe_attempts": 0, "created_at": now} for i in range(nodes)])
            conn.execute(sa.insert(targets_t), [
                {"id": i + 1, "node_id": i % nodes + 1, "path": f"/srv/data/t{i}",
                 "every_minutes": 60, "keep": 10, "failures": 0, "created_at": now}
                for i in range(targets)])
        out: dict[str, Any] = {"targets": targets, "nodes": nodes}
        reads = {"list_targets": lambda: len(catalog.list_targets()),
                 "schedule_changes": lambda: targets if catalog.schedule_changes() == 0 else -1,
                 "scheduled_targets": lambda: len(catalog.scheduled_targets())}
        for name, read in reads.items():
            walls, cpus = [], []
            for _ in range(repeat):
                c0, t0 = time.process_time(), time.perf_counter()
                got = read()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            if got != targets:
                raise BenchError(f"{name} gave {got}, not {targets}")
            out[name] = {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}
    finally:
        catalog.close()
    return out


def main() -> int:
    from bench.report import table
    parser = argparse.ArgumentParser(prog="python -m bench.scale")
    parser.add_argument("--targets", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--modes", default="unchanged,delta")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2")
    parser.add_argument("--poll", type=int, metavar="N",
                        help="only time the leader's catalog poll with N targets on N/20 nodes")
    args = parser.parse_args()
    if args.poll:
        with PostgresCluster() as pg:
            print(json.dumps(poll_cost(pg, args.poll, max(1, args.poll // 20))))
        return 0
    scratch = Path(tempfile.mkdtemp(prefix="backhaul-bench-scale-"))
    ctx = Context(quick=False, cache=scratch / "cache", scratch=scratch,
                  log=lambda s: print(s, file=sys.stderr, flush=True))
    try:
        metrics = run_scale(ctx, targets=args.targets, seconds=args.seconds,
                            modes=tuple(args.modes.split(",")),
                            counts=tuple(int(x) for x in args.workers.split(",")))
    finally:
        ctx.close()
        shutil.rmtree(scratch, ignore_errors=True)
    print(table(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
