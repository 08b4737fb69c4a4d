"""Section ``memory``: backhauld's RSS growth while it streams a large
incompressible archive, and its RSS holding the fleet's many targets."""

from __future__ import annotations

import time

from bench import data
from bench.control import fleet
from bench.harness import BenchError, Context
from bench.measure import RssSampler, median, rss_bytes
from bench.report import Metric, at_most, info

MiB = 1024 * 1024
MB = 1e6


def run_memory(ctx: Context) -> list[Metric]:
    size = ctx.sizes.stream
    tree = data.random_tree(ctx.cache, "stream", size, max(1, size // (1024 * MiB)), ctx.log)
    node = ctx.node()
    warm = data.small_dirs(ctx.cache, 1)[0]
    with ctx.backhauld("memory") as srv:
        # A first small backup loads everything a run needs and opens the
        # pooled connection, so the baseline is a server that has worked.
        t = srv.register(node, warm)
        srv.wait_run(t["id"])
        time.sleep(0.5)
        baseline = int(median([float(rss_bytes(srv.pid)) for _ in range(5)]))
        ctx.log(f"memory: streaming {size / MB:.0f} MB of random data, "
                f"baseline RSS {baseline / MiB:.1f} MiB")
        with RssSampler(srv.pid, 0.1) as sampler:
            t = srv.register(node, tree)
            run = srv.wait_run(t["id"], timeout=1800, interval=0.5)
        if run["status"] != "success":
            raise BenchError(f"streaming run failed: {run}")
    growth = max(0, sampler.peak - baseline)
    seconds = run["duration_seconds"] or float("nan")
    out = [
        at_most("memory", f"RSS growth streaming a {size / MB:.0f} MB archive", growth / MiB,
                "MiB", 64, "{:.1f}", baseline=baseline, peak=sampler.peak,
                samples=len(sampler.samples), archive_bytes=run["bytes_transferred"]),
        info("memory", "  stream rate (pigz on random data)",
             run["bytes_transferred"] / MB / seconds, "MB/s", "{:.0f}"),
    ]
    f = fleet(ctx)
    out += [
        at_most("memory", f"RSS with {f.targets} targets registered"
                + (" (after its restart)" if f.restarted else ""), f.rss / MB, "MB", 300,
                "{:.0f}", nodes=f.nodes, restarted=f.restarted),
        info("memory", "  peak RSS while registering and first backups", f.peak_rss / MB,
             "MB", "{:.0f}"),
    ]
    return out
