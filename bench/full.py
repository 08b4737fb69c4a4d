"""Sections ``full`` and ``pigz``: one ``backhaul run --wait`` of a real tree
against ``ssh node 'tar -C parent -czf - name' > file`` with the OpenSSH client."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import data
from bench.harness import Backhauld, BenchError, Context, node_arg, run_timed, ssh_env
from bench.measure import Pairs, cpu_seconds, median, run_pairs
from bench.report import Metric, at_least, at_most, info

MB = 1e6


class _Comparison:
    """A (backhaul run --wait) vs (ssh ... tar czf -) pair maker for one tree."""

    def __init__(self, ctx: Context, srv: Backhauld, tree: Path) -> None:
        self.ctx = ctx
        self.srv = srv
        self.tree = tree
        self.node = ctx.node()
        self.touch = tree / ".bench-touch"
        self.out = ctx.scratch / f"openssh-{tree.name}.tar.gz"
        self.archive_ids: list[int] = []
        self.server_seconds: list[float] = []  # the run's own duration, per backhaul run
        self.server_cpu: list[float] = []  # backhauld's CPU seconds, per backhaul run
        self.openssh_pigz: list[float] = []  # OpenSSH running backhaul's pigz command
        self.archive_bytes = 0
        self.openssh_bytes = 0
        target = srv.register(self.node, tree)
        first = srv.wait_run(target["id"], timeout=1800)  # also warms the page cache
        if first["status"] != "success":
            raise BenchError(f"first backup of {tree} failed: {first}")
        self.target_id = target["id"]

    def backhaul(self) -> float:
        # Change the tree, so this run transfers instead of answering 'unchanged'.
        self.touch.write_text(f"{time.time_ns()}\n")
        cpu = cpu_seconds(self.srv.pid)
        elapsed, cp = run_timed([self.ctx.backhaul, "--json", "run", node_arg(self.node),
                                 str(self.tree), "--wait", "--full"], env=self.srv.cli_env())
        self.server_cpu.append(cpu_seconds(self.srv.pid) - cpu)
        run = json.loads(cp.stdout)["run"]
        self.server_seconds.append(run["duration_seconds"])
        if run["status"] != "success" or not run["bytes_transferred"]:
            raise BenchError(f"backhaul run did not transfer: {run}")
        self.archive_ids.append(run["archive_id"])
        self.archive_bytes = run["bytes_transferred"]
        return elapsed

    def openssh(self, compress: str = "-z") -> float:
        parent, name = self.tree.parent, self.tree.name
        command = f"tar -C {shlex.quote(str(parent))} {compress} -cf - {shlex.quote(name)}"
        with open(self.out, "wb") as f:
            elapsed, _cp = run_timed(self.ctx.ssh_argv(self.node, command), env=ssh_env(),
                                     stdout=f)
        self.openssh_bytes = self.out.stat().st_size
        if not self.openssh_bytes:
            raise BenchError("ssh ... tar produced no bytes")
        return elapsed

    def pairs(self, *, with_pigz: bool = False) -> Pairs:
        """backhaul vs OpenSSH + gzip; ``with_pigz`` also times OpenSSH +
        ``tar -I 'pigz -n'`` (what backhaul runs) after each baseline run."""
        self.openssh()  # warm-up of the client side; unmeasured

        def baseline() -> float:
            elapsed = self.openssh()
            if with_pigz:
                self.openssh_pigz.append(self.openssh("-I 'pigz -n'"))
            return elapsed

        return run_pairs(self.backhaul, baseline, self.ctx.sizes.pairs,
                         lambda m: self.ctx.log(f"  {m}"), ("backhaul", "openssh"))

    def last_archive(self) -> Path:
        dest = self.ctx.scratch / f"archive-{self.srv.data_dir.name}.tar.gz"
        return self.srv.download(self.archive_ids[-1], dest)


def _gzip_ok(path: Path) -> bool:
    return subprocess.run(["gzip", "-t", str(path)], stderr=subprocess.DEVNULL,
                          check=False).returncode == 0


def _detail(cmp: _Comparison, pairs: Pairs, tree_bytes: int) -> dict[str, Any]:
    return {**pairs.as_detail(), "tree_bytes": tree_bytes, "archive_bytes": cmp.archive_bytes,
            "openssh_archive_bytes": cmp.openssh_bytes, "server_run_seconds": cmp.server_seconds,
            "backhauld_cpu_seconds": cmp.server_cpu}


def _breakdown(section: str, cmp: _Comparison, pairs: Pairs) -> list[Metric]:
    """Where a backhaul run's time goes: the server's own run vs the client's
    share (start-up, resolve, HTTP), and what backhauld burns meanwhile."""
    return [
        info(section, "  of which: the server's run (median)", median(cmp.server_seconds),
             "s", "{:.2f}"),
        info(section, "  backhauld CPU per run (median)", median(cmp.server_cpu), "s",
             "{:.2f}"),
        info(section, "  OpenSSH baseline (median)", median(pairs.b), "s", "{:.2f}"),
    ]


def _tree_bytes(tree: Path) -> int:
    return sum(f.stat().st_size for f in tree.rglob("*") if f.is_file() and not f.is_symlink())


def run_full(ctx: Context) -> list[Metric]:
    tree = data.real_tree(ctx.cache, ctx.sizes.tree, ctx.log)
    size = _tree_bytes(tree)
    ctx.log(f"full: {size / MB:.0f} MB tree, backhauld --compressor gzip")
    with ctx.backhauld("full", compressor="gzip") as srv:
        cmp = _Comparison(ctx, srv, tree)
        pairs = cmp.pairs()
        ok = _gzip_ok(cmp.last_archive())
    ratio = pairs.ratio
    out = [at_most("full", "backup time / OpenSSH ssh+tar czf (gzip)", ratio, "x", 1.05,
                   "{:.3f}", **_detail(cmp, pairs, size)),
           *_breakdown("full", cmp, pairs),
           info("full", "backup: tree MB/s read (gzip)", size / MB / median(pairs.a), "MB/s",
                "{:.1f}")]
    out.append(Metric("full", "archive passes gzip -t", 1.0 if ok else 0.0, "",
                      "yes" if ok else "NO", goal="yes", ok=ok))
    return out


def run_pigz(ctx: Context) -> list[Metric]:
    tree = data.real_tree(ctx.cache, ctx.sizes.tree, ctx.log)
    size = _tree_bytes(tree)
    ctx.log(f"pigz: {size / MB:.0f} MB tree, backhauld --compressor auto (pigz on the node) "
            f"vs OpenSSH + gzip, {os.cpu_count()} cores")
    with ctx.backhauld("pigz", compressor="auto") as srv:
        cmp = _Comparison(ctx, srv, tree)
        pairs = cmp.pairs(with_pigz=True)
        archive = cmp.last_archive()
        ok_gzip = _gzip_ok(archive)
        expected = data.tree_listing(tree)
        got = data.archive_listing(archive)
    speedup = 1 / pairs.ratio
    same = expected == got
    diff = sorted(set(expected.items()) ^ set(got.items()))[:10]
    out = [at_least("pigz", "speed-up over OpenSSH + gzip", speedup, "x", 1.8, "{:.2f}",
                    **_detail(cmp, pairs, size)),
           *_breakdown("pigz", cmp, pairs),
           info("pigz", "  reference: OpenSSH + pigz speed-up over OpenSSH + gzip",
                median([b / c for b, c in zip(pairs.b, cmp.openssh_pigz, strict=True)]), "x",
                "{:.2f}", openssh_pigz_seconds=cmp.openssh_pigz),
           info("pigz", "backup: tree MB/s read (pigz)", size / MB / median(pairs.a), "MB/s",
                "{:.1f}")]
    ok = ok_gzip and same
    shown = f"yes ({len(got)} entries)" if ok else \
        f"NO (gzip -t {'ok' if ok_gzip else 'failed'}, {len(diff)}+ differences)"
    out.append(Metric("pigz", "archive: gzip -t + same files and sizes", float(ok), "", shown,
                      goal="yes", ok=ok, detail={"entries": len(got), "differences": diff}))
    return out
