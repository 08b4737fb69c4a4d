"""Single-file restore through the archive index against a full restore.

    .venv/bin/python -m bench.restore [--size-mib 300] [--repeat 5] [--keep-scratch]

Builds a tree whose archive is about ``--size-mib`` MiB (incompressible
files plus a few thousand small text files), backs it up once with a live
backhauld from a real sshd on loopback, then times with the installed
``backhaul`` console script, each as a fresh process:

- ``restore ID --to DIR --only sub/0042/conf-0042.txt`` (one small file; the
  server sends a tar.gz of just that entry, read through the index);
- ``restore ID --to DIR`` (the whole archive streamed and extracted).

Goal (issue 12): the single-file restore takes <= 0.5 s. Prints the medians,
the ratio, and the bytes each one moved.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixtures.server import Backhauld
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

MiB = 1 << 20
GOAL_SECONDS = 0.5
SMALL = "sub/0042/conf-0042.txt"


def build_tree(root: Path, size: int) -> None:
    rng = random.Random(12)
    (root / "big").mkdir(parents=True)
    for i in range(size // (4 * MiB)):
        (root / "big" / f"blob-{i:04}.bin").write_bytes(rng.randbytes(4 * MiB))
    for d in range(100):
        sub = root / "sub" / f"{d:04}"
        sub.mkdir(parents=True)
        for f in range(30):
            (sub / f"conf-{d * 30 + f:04}.txt").write_text(f"key{f} = {rng.random()}\n" * 40)
    (root / "sub" / "0042" / "conf-0042.txt").write_text("the file we want back\n")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def backhaul(env: dict[str, str], *args: str) -> float:
    exe = str(Path(sys.executable).with_name("backhaul"))
    t0 = time.perf_counter()
    proc = subprocess.run([exe, *args], env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"backhaul {' '.join(args)} failed: {proc.stderr.strip()}")
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep-scratch", action="store_true")
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="backhaul-bench-restore-"))
    try:
        tree = scratch / "app"
        log(f"building a {args.size_mib} MiB tree in {tree}")
        build_tree(tree, args.size_mib * MiB)
        key = ServerKey(scratch / "key" / "id_ed25519")
        with SSHD(scratch / "node", key.public_line) as node:
            srv = Backhauld(scratch / "server", key.path)
            srv.start()
            try:
                env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
                env.update(BACKHAUL_URL=srv.url, BACKHAUL_TOKEN=srv.token)
                addr = f"{node.user}@{node.host}:{node.port}"
                log("backing it up once")
                backhaul(env, "register", addr, str(tree), "--every", "1440")
                exe = str(Path(sys.executable).with_name("backhaul"))
                t0 = time.perf_counter()
                while True:
                    out = subprocess.run([exe, "--json", "history", addr, str(tree)], env=env,
                                         capture_output=True, text=True).stdout
                    if '"status": "success"' in out:
                        break
                    if '"status": "failed"' in out or time.perf_counter() - t0 > 900:
                        raise SystemExit(f"the backup did not succeed:\n{out[-2000:]}")
                    time.sleep(0.5)
                run = json.loads(out)["runs"][0]
                aid, size = run["archive_id"], run["archive_size"]
                log(f"archive {aid}: {size / MiB:.1f} MiB in "
                    f"{run['duration_seconds']:.1f} s")
                one, full = [], []
                n = 0
                backhaul(env, "restore", str(aid), "--to", str(scratch / "warm"),
                         "--only", SMALL)  # warm-up: page cache, index read once
                for _ in range(args.repeat):
                    n += 1
                    dest = scratch / f"one-{n}"
                    one.append(backhaul(env, "restore", str(aid), "--to", str(dest),
                                        "--only", SMALL))
                    assert (dest / SMALL).read_text() == "the file we want back\n"
                    shutil.rmtree(dest)
                for _ in range(max(1, args.repeat // 2)):
                    n += 1
                    dest = scratch / f"full-{n}"
                    full.append(backhaul(env, "restore", str(aid), "--to", str(dest)))
                    assert (dest / SMALL).read_text() == "the file we want back\n"
                    shutil.rmtree(dest)
            finally:
                srv.stop()
        m_one, m_full = statistics.median(one), statistics.median(full)
        verdict = "pass" if m_one <= GOAL_SECONDS else "MISS"
        print(f"archive                         {size / MiB:8.1f} MiB")
        print(f"restore --only one small file   {m_one:8.3f} s  (median of {len(one)}; "
              f"goal <= {GOAL_SECONDS} s: {verdict})  runs {[round(x, 3) for x in one]}")
        print(f"restore of the whole archive    {m_full:8.3f} s  (median of {len(full)})  "
              f"runs {[round(x, 3) for x in full]}")
        print(f"whole / one file                {m_full / m_one:8.1f} x")
        print(f"load average                    {os.getloadavg()}")
        return 0 if verdict == "pass" else 1
    finally:
        if args.keep_scratch:
            log(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
