"""Reliability figures: faults injected and survived, load held, hostile input.

    python -m bench.reliability                 # everything (about 15 minutes)
    python -m bench.reliability --only kill     # kill, load, hostile
    python -m bench.reliability --quick         # small sizes, a couple of minutes

Prints a table and writes bench/results/reliability.json. Every process it
starts (sshd nodes, backhauld) is stopped by PID when it ends.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench.harness import Backhauld
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.catalog import Catalog

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(f"[reliability] {msg}", file=sys.stderr, flush=True)


# -- kill -9 at random points of a transfer ------------------------------------------


def _temp_files(data_dir: Path) -> set[Path]:
    return {p for p in (data_dir / "archives").rglob("*") if ".partial-" in p.name}


def _check_store(data_dir: Path, killed_at: float | None = None,
                 orphans: set[Path] | None = None) -> list[str]:
    """Problems with what the catalog lists: every retained archive's file must
    exist, match its sha256 and pass gzip -t; no temp file may remain; no run
    begun before the kill may still be 'running'."""
    import hashlib

    problems = []
    archives_dir = data_dir / "archives"
    # temp files of the killed process (a run begun after the restart has its own)
    left = _temp_files(data_dir) & (orphans if orphans is not None else _temp_files(data_dir))
    if left:
        problems.append(f"{len(left)} temp files of the killed server left")
    cat = Catalog(data_dir / "catalog.db")
    try:
        for t in cat.list_targets(active_only=False):
            for a in cat.list_archives(t.id, retained_only=True):
                path = archives_dir / a["file_name"]
                if not path.exists():
                    # a run of the restarted server may have rotated it out
                    # between the listing and this look (rows are unlisted
                    # before files are deleted)
                    if cat.get_archive(a["id"])["deleted_at"] is None:
                        problems.append(f"archive {a['id']} listed without its file")
                    continue
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                if h.hexdigest() != a["sha256"]:
                    problems.append(f"archive {a['id']} sha256 differs")
                if subprocess.run(["gzip", "-t", str(path)]).returncode != 0:
                    problems.append(f"archive {a['id']} fails gzip -t")
        running = [r for r in cat.list_runs(status="running", limit=100)
                   if killed_at is not None and r["started_at"].timestamp() < killed_at]
        if running:
            problems.append(f"{len(running)} runs begun before the kill still 'running'")
    finally:
        cat.close()
    return problems


def kill_trials(work: Path, key: ServerKey, trials: int, mib: int) -> dict[str, Any]:
    tree = work / "kill-tree" / "app"
    tree.mkdir(parents=True)
    for i in range(mib):
        (tree / f"chunk-{i}").write_bytes(os.urandom(1 << 20))
    rng = random.Random(20261127)
    out: dict[str, Any] = {"trials": trials, "survived": 0, "interrupted_runs": 0,
                           "killed_while_streaming": 0, "next_run_ok": 0, "problems": []}
    with ExitStack() as stack:
        node = stack.enter_context(SSHD(work / "kill-node", key.public_line, host="127.0.2.1"))
        # 40 MiB/s: a transfer lasts about mib/40 s, so the kill lands anywhere in it.
        srv = Backhauld(work / "kill-srv", key, bwlimit="40MiB", retry_min=60,
                        shutdown_grace=5).start()
        stack.callback(lambda: srv.stop())
        target = srv.register(node, tree, every=1440)
        srv.wait_run(target["id"], timeout=120)
        expected = mib / 40
        for trial in range(trials):
            (tree / "marker").write_text(str(trial))
            status, _ = srv.client().request("POST", f"/api/v1/targets/{target['id']}/run")
            assert status == 202, status
            time.sleep(rng.uniform(0.0, expected * 1.1))
            killed_at = time.time()
            srv.kill()
            orphans = _temp_files(srv.data_dir)
            streaming = bool(orphans)
            out["killed_while_streaming"] += streaming
            srv.start()
            problems = _check_store(srv.data_dir, killed_at, orphans)
            # the run in flight at the kill (the restart may already have begun
            # a catch-up run after it)
            before_kill = [r for r in srv.runs(target["id"], limit=5)
                           if _ts(r["started_at"]) < killed_at]
            last = before_kill[0] if before_kill else {"status": "none"}
            out["interrupted_runs"] += last["status"] == "interrupted"
            status, doc = srv.client().request(
                "POST", f"/api/v1/targets/{target['id']}/run", query={"wait": "true"})
            next_ok = status == 200 and doc["run"]["status"] in ("success", "unchanged")
            out["next_run_ok"] += next_ok
            if not next_ok:
                problems.append(f"next run: HTTP {status} {doc}")
            problems += _check_store(srv.data_dir, killed_at, orphans)
            if problems:
                out["problems"].append({"trial": trial, "problems": problems})
            else:
                out["survived"] += 1
            log(f"kill trial {trial + 1}/{trials}: streaming={streaming} "
                f"last={last['status']} next={'ok' if next_ok else 'FAILED'} "
                f"{'; '.join(problems)}")
    return out


def _ts(iso: str) -> float:
    import datetime as dt

    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


# -- load: many targets on many nodes for a while --------------------------------------


def _proc_stats(pid: int) -> tuple[int, int]:
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def load(work: Path, key: ServerKey, *, targets: int, nodes: int, seconds: float,
         minute_seconds: float, change: float) -> dict[str, Any]:
    interval = minute_seconds
    per_node = targets // nodes
    with ExitStack() as stack:
        sshds = [stack.enter_context(SSHD(work / f"load-n{i}", key.public_line,
                                          host=f"127.0.3.{i + 1}")) for i in range(nodes)]
        srv = Backhauld(work / "load-srv", key, minute_seconds=minute_seconds).start()
        stack.callback(lambda: srv.stop())
        dirs = []
        for n in sshds:
            for j in range(per_node):
                d = work / "load-data" / n.host / f"app{j}"
                d.mkdir(parents=True)
                for k in range(3):
                    (d / f"f{k}").write_text(f"{n.host} {j} {k}\n" * 20)
                dirs.append((n, d))
        t0 = time.monotonic()
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda nd: srv.register(nd[0], nd[1], every=1), dirs))
        log(f"load: registered {len(dirs)} targets on {nodes} nodes in "
            f"{time.monotonic() - t0:.1f}s; running {seconds:.0f}s")
        stop = threading.Event()
        rng = random.Random(3)

        def churn() -> None:
            while not stop.wait(interval / 2):
                for _, d in rng.sample(dirs, int(len(dirs) * change)):
                    (d / "f0").write_text(str(time.time()))

        writer = threading.Thread(target=churn, daemon=True)
        writer.start()
        start_wall = time.time()
        samples = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            samples.append(_proc_stats(srv.pid))
            time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        samples.append(_proc_stats(srv.pid))
        end_wall = time.time()
        stop.set()
        writer.join()
        srv.stop()
        cat = Catalog(srv.data_dir / "catalog.db")
        try:
            rows = cat.list_runs(limit=10_000_000)
        finally:
            cat.close()
    figures = analyze_runs(rows, interval, start_wall, end_wall)
    rss = [s[0] for s in samples]
    fds = [s[1] for s in samples]
    return {
        "targets": len(dirs), "nodes": nodes, "seconds": seconds,
        "interval_seconds": interval, **figures,
        "rss_mib_first_last_max": [round(rss[1] / 2**20, 1), round(rss[-1] / 2**20, 1),
                                   round(max(rss) / 2**20, 1)],
        "open_fds_first_last_max": [fds[1], fds[-1], max(fds)],
    }


def analyze_runs(rows: list[dict[str, Any]], interval: float, start: float,
                 end: float) -> dict[str, Any]:
    """Lost, overlapping and failed runs and start delays from the run log.

    A scheduled run records when it was due; for each target the due times
    between ``start + interval`` and ``end - 2 * interval`` (later ones may
    still have been pending when the server stopped) must follow each other
    one interval apart: a longer gap is a lost run. Two runs of one target
    must never overlap."""
    by_target: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        by_target.setdefault(r["target_id"], []).append(r)
    lost = overlapped = failed = checked = 0
    per_target_checked = []
    delays = []
    for runs in by_target.values():
        runs.sort(key=lambda r: r["started_at"])
        failed += sum(r["status"] == "failed" for r in runs)
        due = sorted(r["scheduled_at"].timestamp() for r in runs
                     if r["trigger"] == "schedule" and r["scheduled_at"]
                     and start + interval <= r["scheduled_at"].timestamp() < end - 2 * interval)
        checked += len(due)
        per_target_checked.append(len(due))
        lost += sum(max(0, round((b - a) / interval) - 1)
                    for a, b in zip(due, due[1:], strict=False))
        spans = [(r["started_at"], r["finished_at"]) for r in runs if r["finished_at"]]
        overlapped += sum(s2 < f1 for (_, f1), (s2, _) in zip(spans, spans[1:], strict=False))
        delays += [(r["started_at"] - r["scheduled_at"]).total_seconds() for r in runs
                   if r["scheduled_at"]]
    delays.sort()
    return {
        "runs_total": len(rows), "due_runs_checked": checked,
        "min_due_runs_per_target": min(per_target_checked, default=0),
        "lost": lost, "overlapped": overlapped, "failed": failed,
        "start_delay_p50_s": round(statistics.median(delays), 3) if delays else None,
        "start_delay_p99_s": round(delays[int(len(delays) * 0.99) - 1], 3) if delays else None,
        "start_delay_max_s": round(delays[-1], 3) if delays else None,
    }


# -- the report ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (a couple of minutes)")
    p.add_argument("--only", default="kill,load,hostile",
                   help="comma-separated sections: kill, load, hostile")
    p.add_argument("--kill-trials", type=int, default=None)
    p.add_argument("--load-seconds", type=float, default=None)
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "command": "python -m bench.reliability " + " ".join(argv or
                                                                                   sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="backhaul-rel-") as tmp:
        work = Path(tmp)
        key = ServerKey(work / "key" / "id_ed25519")
        if "kill" in only:
            report["kill"] = kill_trials(work, key, args.kill_trials or (4 if args.quick else 20),
                                         mib=40 if args.quick else 80)
        if "load" in only:
            if args.quick:
                report["load"] = load(work, key, targets=100, nodes=5,
                                      seconds=args.load_seconds or 40, minute_seconds=5,
                                      change=0.1)
            else:
                report["load"] = load(work, key, targets=1000, nodes=20,
                                      seconds=args.load_seconds or 600, minute_seconds=60,
                                      change=0.1)
        if "hostile" in only:
            from bench.reliability_hostile import run_hostile

            hostile: dict[str, Any] = {}
            run_hostile(hostile)
            report["hostile"] = hostile
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reliability.json").write_text(json.dumps(report, indent=2, default=str))
    print(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    rows: list[tuple[str, str, bool]] = []
    if "kill" in report:
        k = report["kill"]
        rows.append(("kill -9 at random points of a transfer",
                     f"{k['survived']}/{k['trials']} survived "
                     f"({k['killed_while_streaming']} mid-stream, "
                     f"{k['interrupted_runs']} runs marked interrupted, "
                     f"{k['next_run_ok']} next runs ok)",
                     k["survived"] == k["trials"]))
    if "load" in report:
        ld = report["load"]
        rows.append(("load: targets x nodes, interval",
                     f"{ld['targets']} x {ld['nodes']}, every {ld['interval_seconds']:g}s "
                     f"for {ld['seconds']:g}s, {ld['runs_total']} runs", True))
        rows.append(("due runs lost / overlapped / failed",
                     f"{ld['lost']} / {ld['overlapped']} / {ld['failed']} "
                     f"of {ld['due_runs_checked']} checked",
                     ld["lost"] == 0 and ld["overlapped"] == 0))
        rows.append(("scheduler start delay p50 / p99 / max",
                     f"{ld['start_delay_p50_s']}s / {ld['start_delay_p99_s']}s / "
                     f"{ld['start_delay_max_s']}s", True))
        rss, fds = ld["rss_mib_first_last_max"], ld["open_fds_first_last_max"]
        rows.append(("server RSS MiB first / last / max", f"{rss[0]} / {rss[1]} / {rss[2]}",
                     rss[1] <= rss[0] * 1.25 + 16))
        rows.append(("open fds first / last / max", f"{fds[0]} / {fds[1]} / {fds[2]}",
                     fds[1] <= fds[0] + 16))
    if "hostile" in report:
        h = report["hostile"].get("hostile_input", {})
        f = report["hostile"].get("fuzz", {})
        rows.append(("hostile values (corpus)",
                     f"{h.get('tried')} tried, {h.get('refused_4xx')} refused, "
                     f"{h.get('accepted_safely')} stored and used safely, "
                     f"{h.get('server_errors_5xx')} 5xx, {h.get('canaries_triggered')} canaries",
                     not h.get("server_errors_5xx") and not h.get("canaries_triggered")
                     and not h.get("accepted_then_broken")))
        from bench.reliability_bounds import rows as bound_rows
        rows += bound_rows(report["hostile"])
        rows.append(("API fuzz (schemathesis)",
                     f"{f.get('requests')} requests, {f.get('server_errors_5xx')} 5xx, "
                     f"{f.get('bad_error_shape')} answers outside the error shape",
                     not f.get("server_errors_5xx") and not f.get("bad_error_shape")))
    out = [f"backhaul reliability, {report['date']}", f"$ {report['command']}", "",
           f"{'what':<40} {'figure':<62} verdict", "-" * 112]
    out += [f"{w:<40} {f:<62} {'ok' if ok else 'FAIL'}" for w, f, ok in rows]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
