"""Section ``bwlimit``: one transfer through a backhauld started with
``--bwlimit 20MiB`` must run at 20 MiB/s +- 10 %."""

from __future__ import annotations

from bench import data
from bench.harness import BenchError, Context
from bench.report import Metric, within

MiB = 1024 * 1024


def run_bwlimit(ctx: Context) -> list[Metric]:
    limit = ctx.sizes.bwlimit
    size = ctx.sizes.bw_bytes
    tree = data.random_tree(ctx.cache, "bw", size, 1, ctx.log)
    ctx.log(f"bwlimit: {size // MiB} MiB of random data under --bwlimit {limit // MiB}MiB")
    with ctx.backhauld("bwlimit", bwlimit=f"{limit // MiB}MiB") as srv:
        t = srv.register(ctx.node(), tree)
        run = srv.wait_run(t["id"], timeout=600, interval=0.2)
    if run["status"] != "success":
        raise BenchError(f"bwlimit run failed: {run}")
    rate = run["bytes_transferred"] / run["duration_seconds"] / MiB
    return [within("bwlimit", f"transfer rate under --bwlimit {limit // MiB}MiB", rate,
                   "MiB/s", limit / MiB, 0.10, "{:.2f}", bytes=run["bytes_transferred"],
                   seconds=run["duration_seconds"])]
