"""``python -m bench [--quick] [--only NAME[,NAME]]``: run the sections, print
the table, write the JSON file."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from types import FrameType

from bench.bwlimit import run_bwlimit
from bench.control import run_control
from bench.control_plane import run_control_plane
from bench.delta import run_delta
from bench.full import run_full, run_pigz
from bench.harness import REPO, Context
from bench.memory import run_memory
from bench.report import Metric, failed, table, write_json
from bench.scale import run_scale
from bench.transport import run_transport
from bench.unchanged import run_unchanged

SECTIONS: dict[str, tuple[str, Callable[[Context], list[Metric]]]] = {
    "full": ("full backup vs OpenSSH ssh+tar (gzip)", run_full),
    "pigz": ("full backup with pigz vs OpenSSH + gzip", run_pigz),
    "transport": ("SSH channel throughput vs OpenSSH", run_transport),
    "unchanged": ("unchanged checks: wire bytes, latency, sweep", run_unchanged),
    "control": ("client and control plane with many targets", run_control),
    "ctlplane": ("control plane alone at 10,000 targets: SQLite and PostgreSQL",
                 run_control_plane),
    "memory": ("backhauld RSS: streaming, many targets", run_memory),
    "bwlimit": ("--bwlimit accuracy", run_bwlimit),
    "delta": ("changed backups: wire bytes and time vs rsync -az over OpenSSH", run_delta),
    "scale": ("runs/s, CPU, PostgreSQL rows per run, dispatch latency: 1 and 2 workers",
              run_scale),
}
RESULTS = REPO / "bench" / "results" / "latest.json"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "backhaul-bench"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="backhaul's benchmark: starts its own sshd nodes and backhauld, "
                    "compares with the OpenSSH client, prints a table and writes JSON.",
        epilog="sections: " + "; ".join(f"{k}: {v[0]}" for k, v in SECTIONS.items()))
    p.add_argument("--quick", action="store_true",
                   help="small sizes: a smoke test of every section (about a minute)")
    p.add_argument("--only", metavar="NAME[,NAME]",
                   help=f"run only these sections ({', '.join(SECTIONS)})")
    p.add_argument("--cache-dir", type=Path, default=default_cache(),
                   help="where built data is kept between runs (default %(default)s)")
    p.add_argument("--json", type=Path, default=RESULTS, metavar="FILE",
                   help="results file (default bench/results/latest.json)")
    p.add_argument("--keep-scratch", action="store_true",
                   help="keep the per-run scratch dir (server data dirs, logs)")
    args = p.parse_args(argv)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in SECTIONS]
        if unknown:
            p.error(f"--only: unknown section(s) {', '.join(unknown)}; "
                    f"known: {', '.join(SECTIONS)}")
        args.sections = [n for n in SECTIONS if n in names]
    else:
        args.sections = list(SECTIONS)
    return args


def _sigterm(_sig: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: processes are stopped


def _openssh_version() -> str:
    cp = subprocess.run(["ssh", "-V"], capture_output=True, text=True, check=False)
    return (cp.stderr or cp.stdout).strip()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    load_start = os.getloadavg()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {message}", file=sys.stderr, flush=True)

    args.cache_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="run-", dir=args.cache_dir))
    metrics: list[Metric] = []
    section_info: dict[str, dict[str, object]] = {}
    ctx = Context(quick=args.quick, cache=args.cache_dir, scratch=scratch, log=log)
    log(f"bench: sections {', '.join(args.sections)}{' (quick)' if args.quick else ''}; "
        f"cache {args.cache_dir}, scratch {scratch}")
    interrupted = False
    try:
        for name in args.sections:
            t0 = time.monotonic()
            log(f"== {name}: {SECTIONS[name][0]}")
            try:
                got = SECTIONS[name][1](ctx)
                error = None
            except Exception as exc:  # one broken section must not hide the others
                traceback.print_exc()
                error = f"{type(exc).__name__}: {exc}"
                got = [failed(name, SECTIONS[name][0], error)]
            metrics += got
            section_info[name] = {"seconds": round(time.monotonic() - t0, 1), "error": error,
                                  "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}
            for m in got:
                log(f"   {m.name}: {m.shown} ({m.verdict})")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process this run started")
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        ctx.close()
        if args.keep_scratch:
            log(f"scratch kept: {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    total = time.monotonic() - started
    header = {
        "command": " ".join(["python -m bench", *(sys.argv[1:] if argv is None else argv)]),
        "started": started_at,
        "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "interrupted": interrupted,
        "seconds": round(total, 1),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "openssh": _openssh_version(),
                    "paramiko": _version("paramiko")},
        "sizes": asdict(ctx.sizes),
        "sections": section_info,
    }
    write_json(args.json, header, metrics)
    print(table(metrics))
    print(f"\n{len(metrics)} figures in {total:.0f} s on {os.cpu_count()} cores; load average "
          f"{load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; JSON: {args.json}")
    if interrupted:
        return 130
    return 1 if any(m.verdict == "error" for m in metrics) else 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"
