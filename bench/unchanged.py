"""Section ``unchanged``: what a check of an unchanged tree costs, through
``BackupEngine.run`` in this process (real catalog, store and SSH pool).

- one 1,000-file tree checked again and again: bytes on the wire (the pooled
  connection's ``CountingSocket``) and latency per check;
- a sweep of many small-dir targets over 10 nodes, all unchanged, run on a
  thread pool sized like the server's defaults (workers=8, per_node=2).
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench import data
from bench.harness import BenchError, Context, address
from bench.measure import median, parallel_map
from bench.report import Metric, at_least, at_most, info
from orchestrator import remote
from orchestrator.backup import BackupEngine, CatalogHostKeys
from orchestrator.ssh import SSHPool
from storage.archives import ArchiveStore
from storage.catalog import Catalog

WORKERS = 8   # the server's default --workers
PER_NODE = 2  # the server's default --per-node


@dataclass
class Engine:
    catalog: Catalog
    pool: SSHPool
    engine: BackupEngine

    def close(self) -> None:
        self.pool.close()
        self.catalog.close()


def make_engine(data_dir: Path, ctx: Context) -> Engine:
    data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(data_dir / "catalog.db")
    store = ArchiveStore(data_dir / "archives")
    pool = SSHPool(ctx.key, CatalogHostKeys(catalog), connect_timeout=10, io_timeout=60)
    return Engine(catalog, pool, BackupEngine(catalog, store, pool, per_node=PER_NODE))


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


def _single(ctx: Context, eng: Engine) -> list[Metric]:
    node = ctx.node()
    tree = data.files_tree(ctx.cache, ctx.sizes.check_files)
    n = eng.catalog.ensure_node(node.user, node.host, node.port)
    tid = eng.catalog.add_target(n.id, str(tree), 60, 10).id
    first = eng.engine.run(tid)
    if first.status != "success":
        raise BenchError(f"first backup of {tree}: {first}")
    for _ in range(5):  # warm-up
        eng.engine.run(tid)
    conn = eng.pool.connection(address(node))
    checks = ctx.sizes.checks
    latencies = []
    wire_before = (conn.sock.bytes_in, conn.sock.bytes_out)
    payload = 0
    for _ in range(checks):
        t0 = time.perf_counter()
        r = eng.engine.run(tid)
        latencies.append(time.perf_counter() - t0)
        if r.status != "unchanged":
            raise BenchError(f"check of an unchanged tree answered {r.status}: {r}")
        payload += r.bytes_transferred
    if eng.pool.connection(address(node)) is not conn:
        raise BenchError("the pooled connection was replaced during the checks")
    wire_in = (conn.sock.bytes_in - wire_before[0]) / checks
    wire_out = (conn.sock.bytes_out - wire_before[1]) / checks

    # The parts of a check: an exec on the open Transport, the fingerprint alone.
    def timed(command: str) -> float:
        out = []
        for _ in range(max(20, checks // 4)):
            t0 = time.perf_counter()
            conn.exec(command, what="bench")
            out.append(time.perf_counter() - t0)
        return median(out)

    floor = timed("true")
    fp = timed(remote.fingerprint_command(str(tree)))
    local = []
    for _ in range(max(20, checks // 4)):
        t0 = time.perf_counter()
        subprocess.run(["sh", "-c", remote.fingerprint_command(str(tree))],
                       stdout=subprocess.DEVNULL, check=True)
        local.append(time.perf_counter() - t0)
    ms = 1000 * median(latencies)
    return [
        at_most("unchanged", f"wire bytes per check ({ctx.sizes.check_files} files)",
                wire_in + wire_out, "B", 2048, "{:.0f}", bytes_in=wire_in, bytes_out=wire_out,
                payload_per_check=payload / checks, checks=checks),
        at_most("unchanged", "check latency, median", ms, "ms", 10, "{:.2f}",
                p90_ms=1000 * sorted(latencies)[int(0.9 * len(latencies))],
                checks=checks),
        info("unchanged", "  of which: exec of `true` on the open Transport", 1000 * floor,
             "ms", "{:.2f}"),
        info("unchanged", "  of which: fingerprint command alone", 1000 * fp, "ms",
             "{:.2f}"),
        info("unchanged", "  reference: that command run here by sh, no SSH",
             1000 * median(local), "ms", "{:.2f}"),
    ]


def _sweep(eng: Engine, ids: list[int], expect: str) -> tuple[float, float]:
    """Run every target once on a WORKERS-thread pool; (seconds, CPU seconds here)."""
    cpu0 = _cpu()
    t0 = time.perf_counter()
    results = parallel_map(eng.engine.run, ids, WORKERS, "bench-sweep")
    elapsed = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    bad = [r for r in results if r.status != expect]
    if bad:
        raise BenchError(f"{len(bad)} of {len(ids)} runs were not {expect}: {bad[0]}")
    return elapsed, cpu


def _sweeps(ctx: Context, eng: Engine) -> list[Metric]:
    sizes = ctx.sizes
    nodes = ctx.nodes(sizes.sweep_nodes)
    dirs = data.small_dirs(ctx.cache, sizes.sweep_targets)
    node_ids = [eng.catalog.ensure_node(n.user, n.host, n.port).id for n in nodes]
    # Interleaved over the nodes, as targets due at the same moment usually are.
    by_node: dict[int, list[int]] = {i: [] for i in range(len(nodes))}
    interleaved = []
    for k, d in enumerate(dirs):
        i = k % len(nodes)
        tid = eng.catalog.add_target(node_ids[i], str(d), 60, 10).id
        by_node[i].append(tid)
        interleaved.append(tid)
    grouped = [tid for i in sorted(by_node) for tid in by_node[i]]
    n = len(interleaved)
    ctx.log(f"unchanged: sweep of {n} targets over {len(nodes)} nodes "
            f"(workers={WORKERS}, per_node={PER_NODE})")
    first, _ = _sweep(eng, interleaved, "success")
    ctx.log(f"  first backups: {n / first:.0f}/s")
    rates, cpus = [], []
    for i in range(sizes.sweeps):
        elapsed, cpu = _sweep(eng, interleaved, "unchanged")
        rates.append(n / elapsed)
        cpus.append(cpu / n)
        ctx.log(f"  sweep {i + 1}/{sizes.sweeps}: {n / elapsed:.0f} checks/s, "
                f"{1000 * cpu / n:.2f} ms CPU per check in this process")
    grouped_s, _ = _sweep(eng, grouped, "unchanged")
    ctx.log(f"  sweep with targets grouped by node: {n / grouped_s:.0f} checks/s")
    return [
        at_least("unchanged", f"sweep of {n} targets / {len(nodes)} nodes", median(rates),
                 "checks/s", 100, "{:.0f}", rates=rates, targets=n, nodes=len(nodes),
                 workers=WORKERS, per_node=PER_NODE, cores=os.cpu_count()),
        info("unchanged", "  server-side CPU per check (paramiko + SQLite)",
             1000 * median(cpus), "ms", "{:.2f}"),
        info("unchanged", "  same sweep, targets ordered by node", n / grouped_s,
             "checks/s", "{:.0f}"),
        info("unchanged", "  first backups of the small dirs", n / first, "runs/s", "{:.0f}"),
    ]


def run_unchanged(ctx: Context) -> list[Metric]:
    eng = make_engine(ctx.scratch / "unchanged-engine", ctx)
    try:
        return _single(ctx, eng) + _sweeps(ctx, eng)
    finally:
        eng.close()
