"""Whole backups with the S3 store against the directory store: the same tree
backed up by two live backhauld, one with ``--store-url s3://...`` (SeaweedFS's
``weed mini`` on loopback) and one on the default directory store; per pair a
``run --full`` and a delta after 1% of the files changed, each timed as the
run's own duration. Reports the wall ratio S3 : directory (goal <= 1.10x).

    python -m bench.s3_backup [--mib 256] [--pairs 3]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from bench.harness import Backhauld, Context
from bench.measure import median
from fixtures.seaweed import SeaweedS3

MiB = 2**20


def build_tree(root: Path, total: int, rng: random.Random) -> list[Path]:
    """Half text-like (compressible), half random, in files of 64 KiB to 4 MiB."""
    root.mkdir(parents=True)
    words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(2000)]
    files, made, i = [], 0, 0
    while made < total:
        size = min(rng.choice((64 * 1024, 512 * 1024, 4 * MiB)), total - made)
        p = root / f"d{i % 16}" / f"f{i}.{'txt' if i % 2 else 'bin'}"
        p.parent.mkdir(exist_ok=True)
        if i % 2:
            text = b" ".join(rng.choices(words, k=size // 5 + 1))[:size]
            p.write_bytes(text)
        else:
            p.write_bytes(os.urandom(size))
        files.append(p)
        made += size
        i += 1
    return files


def run(srv: Backhauld, target_id: int, *, full: bool) -> dict[str, Any]:
    status, body = srv.client().request("POST", f"/api/v1/targets/{target_id}/run",
                                        query={"wait": "true", "full": str(full).lower()},
                                        timeout=3600)
    if status != 200 or body["run"]["status"] != "success":
        raise RuntimeError(f"run failed: {status} {body}\n{srv.log_tail()}")
    return body["run"]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3_backup")
    ap.add_argument("--mib", type=int, default=256, help="tree size, MiB")
    ap.add_argument("--pairs", type=int, default=3, help="directory/S3 pairs")
    args = ap.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="bench-s3b-") as d, SeaweedS3() as s3:
        scratch = Path(d)
        for k, v in s3.env().items():
            os.environ[k] = v
        bucket = s3.create_bucket("bench")
        ctx = Context(quick=False, cache=scratch / "cache", scratch=scratch, log=print)
        try:
            files = build_tree(scratch / "tree", args.mib * MiB, rng)
            node = ctx.node()
            servers = {
                "directory": ctx.lasting_backhauld("dir", compressor="auto"),
                "s3": ctx.lasting_backhauld("s3", compressor="auto",
                                            store_url=f"s3://{bucket}/bench",
                                            store_endpoint=s3.endpoint,
                                            store_region="us-east-1"),
            }
            targets = {}
            for name, srv in servers.items():
                t = srv.register(node, scratch / "tree")
                first = srv.wait_run(t["id"], timeout=1800)
                if first["status"] != "success":
                    raise RuntimeError(f"first backup on {name}: {first}")
                targets[name] = t["id"]
            times: dict[str, dict[str, list[float]]] = {
                kind: {"directory": [], "s3": []} for kind in ("full", "delta")}
            for p in range(args.pairs):
                order = ["directory", "s3"] if p % 2 == 0 else ["s3", "directory"]
                for name in order:
                    times["full"][name].append(
                        run(servers[name], targets[name], full=True)["duration_seconds"])
                for f in rng.sample(files, max(1, len(files) // 100)):  # 1% of the files
                    with open(f, "r+b") as fh:
                        fh.write(os.urandom(4096))
                for name in order:
                    r = run(servers[name], targets[name], full=False)
                    if r["transfer"] != "delta":
                        raise RuntimeError(f"expected a delta on {name}: {r}")
                    times["delta"][name].append(r["duration_seconds"])
        finally:
            ctx.close()
    print(f"tree {args.mib} MiB ({len(files)} files), {args.pairs} pairs, "
          "run durations in seconds")
    for kind in ("full", "delta"):
        dirs, s3s = times[kind]["directory"], times[kind]["s3"]
        ratios = [s / f for s, f in zip(s3s, dirs, strict=True)]
        print(f"  {kind}: directory median {median(dirs):.2f} s, S3 median {median(s3s):.2f} s, "
              f"ratio S3 : directory median {median(ratios):.2f}x "
              f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)}; goal <= 1.10x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
