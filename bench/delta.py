"""Section ``delta``: what a changed backup costs on the wire, backhaul (delta
transfer, composed archives) against ``rsync -az`` pulling over OpenSSH.

One mutable tree in the scratch dir: a copy of the real tree plus a SQLite
database and a log. Both tools reach the same sshd through one counting TCP
relay each (bytes both ways, handshakes included, measured identically), and
back up the same tree after each mutation: backhaul through ``POST
/targets/{id}/run?wait=true`` of a backhauld, rsync as ``rsync -az --delete``
into a mirror. Scenarios, each repeated ``rounds`` times (medians):
unchanged; 1 % of the files rewritten; 4 KiB appended to the log; 50 rows
updated in place in the database; one new 10 MiB incompressible file.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from bench import data
from bench.harness import BenchError, Context, ssh_env
from bench.measure import cpu_seconds, median
from bench.report import Metric, at_most, info

MiB = 1024 * 1024
KiB = 1024


class CountingRelay:
    """127.0.0.1:<port> -> the node's sshd, counting every byte both ways."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.total = 0
        self.closed = False
        threading.Thread(target=self._accept, daemon=True, name="relay").start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data_ := src.recv(1 << 16):
                dst.sendall(data_)
                with self.lock:
                    self.total += len(data_)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def count(self) -> int:
        with self.lock:
            return self.total

    def close(self) -> None:
        self.closed = True
        self.listener.close()


def _build(ctx: Context, tree_size: int, db_size: int, log_size: int) -> Path:
    src = ctx.scratch / "delta" / "srv"
    real = data.real_tree(ctx.cache, tree_size, ctx.log)
    ctx.log(f"delta: copying {real} and building a {db_size // MiB} MiB SQLite db and a "
            f"{log_size // MiB} MiB log")
    src.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(real, src, symlinks=True)
    rnd = random.Random(9)
    db = sqlite3.connect(src / "app.db")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, body TEXT)")
    row = 600
    words = [f"w{i}" for i in range(5000)]
    for i in range(db_size // (row + 60)):
        db.execute("INSERT INTO t VALUES (?, ?, ?)",
                   (i, f"name-{i}", " ".join(rnd.choices(words, k=row // 6))[:row]))
    db.commit()
    db.close()
    with open(src / "app.log", "w") as f:
        n = 0
        while f.tell() < log_size:
            f.write(f"2026-12-01T08:00:{n % 60:02d}Z INFO request {n} served in "
                    f"{rnd.randint(1, 900)} ms path=/api/{rnd.choice(words)}\n")
            n += 1
    return src


class _Mutations:
    def __init__(self, src: Path) -> None:
        self.src = src
        self.rnd = random.Random(11)
        self.files = sorted(p for p in src.rglob("*") if p.is_file() and not p.is_symlink()
                            and p.name not in ("app.db", "app.log"))
        self.n = 0

    def unchanged(self) -> None:
        pass

    def rewrite_1pct(self) -> None:
        """1 % of the files rewritten: a new first line, the rest as it was."""
        for p in self.rnd.sample(self.files, max(1, len(self.files) // 100)):
            body = p.read_bytes()
            p.write_bytes(f"# rewritten {time.time_ns()}\n".encode() + body)

    def append_log(self) -> None:
        with open(self.src / "app.log", "ab") as f:
            f.write(os.urandom(2 * KiB).hex().encode())  # 4 KiB

    def update_db(self) -> None:
        db = sqlite3.connect(self.src / "app.db")
        top = db.execute("SELECT max(id) FROM t").fetchone()[0]
        for i in self.rnd.sample(range(top), 50):
            db.execute("UPDATE t SET name = ? WHERE id = ?", (f"upd-{time.time_ns()}", i))
        db.commit()
        db.close()

    def new_file(self) -> None:
        self.n += 1
        (self.src / f"new-{self.n}.bin").write_bytes(os.urandom(10 * MiB))


SCENARIOS: list[tuple[str, str]] = [
    ("unchanged", "unchanged"),
    ("rewrite_1pct", "1 % of files rewritten"),
    ("append_log", "4 KiB appended to the log"),
    ("update_db", "50 rows updated in place in the SQLite db"),
    ("new_file", "one new 10 MiB incompressible file"),
]
GOALS = {"rewrite_1pct": 0.8, "append_log": 0.25, "update_db": 1.5, "new_file": 1.05}


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_delta(ctx: Context) -> list[Metric]:
    if shutil.which("rsync") is None:
        raise BenchError("rsync is not installed (scripts/bootstrap.sh installs it)")
    quick = ctx.quick
    tree_size = 16 * MiB if quick else 210 * MiB
    db_size = 8 * MiB if quick else 65 * MiB
    log_size = 4 * MiB if quick else 20 * MiB
    rounds = 1 if quick else 3
    src = _build(ctx, tree_size, db_size, log_size)
    size = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    nfiles = sum(1 for p in src.rglob("*") if p.is_file())
    ctx.log(f"delta: tree {size / MiB:.0f} MiB, {nfiles} files; {rounds} round(s)")
    node = ctx.node()
    relay_b = CountingRelay(node.host, node.port or 22)
    relay_r = CountingRelay(node.host, node.port or 22)
    mirror = ctx.scratch / "delta" / "mirror"
    mirror.mkdir(parents=True)
    rsync_ssh = " ".join(["ssh", "-F", "/dev/null", "-i", str(ctx.key.path), "-o",
                          "UserKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=no",
                          "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o",
                          "LogLevel=ERROR", "-p", str(relay_r.port)])

    def rsync() -> tuple[int, float, float]:
        before, cpu = relay_r.count(), _children_cpu()
        t0 = time.perf_counter()
        cp = subprocess.run(["rsync", "-az", "--delete", "-e", rsync_ssh,
                             f"{node.user}@127.0.0.1:{src}/", f"{mirror}/"], env=ssh_env(),
                            capture_output=True, text=True, check=False)
        elapsed = time.perf_counter() - t0
        if cp.returncode != 0:
            raise BenchError(f"rsync failed ({cp.returncode}): {cp.stderr[-500:]}")
        return relay_r.count() - before, elapsed, _children_cpu() - cpu

    results: dict[str, dict[str, list[Any]]] = {}
    try:
        with ctx.backhauld("delta", compressor="auto") as srv:
            status, doc = srv.client().request("POST", "/api/v1/targets", body={
                "host": "127.0.0.1", "port": relay_b.port, "user": node.user,
                "path": str(src), "every_minutes": 100000})
            if status != 201:
                raise BenchError(f"register: HTTP {status} {doc}")
            tid = doc["target"]["id"]
            t0 = time.perf_counter()
            first = srv.wait_run(tid, timeout=1800)
            full_s = time.perf_counter() - t0
            if first["status"] != "success":
                raise BenchError(f"first backup failed: {first}")
            full_bytes = relay_b.count()
            rs_full = rsync()
            ctx.log(f"  first: backhaul full {full_bytes / MiB:.1f} MiB {full_s:.1f} s; "
                    f"rsync {rs_full[0] / MiB:.1f} MiB {rs_full[1]:.1f} s")

            def backhaul() -> tuple[int, float, float, str, dict[str, Any]]:
                before, cpu = relay_b.count(), cpu_seconds(srv.pid)
                t = time.perf_counter()
                st, answer = srv.client().request(
                    "POST", f"/api/v1/targets/{tid}/run", query={"wait": "true"})
                elapsed = time.perf_counter() - t
                if st != 200:
                    raise BenchError(f"run: HTTP {st} {answer}")
                run = answer["run"]
                if run["status"] not in ("success", "unchanged"):
                    raise BenchError(f"run failed: {run}")
                return (relay_b.count() - before, elapsed, cpu_seconds(srv.pid) - cpu,
                        run.get("transfer") or "?", run)

            mut = _Mutations(src)
            for r in range(rounds):
                for key, label in SCENARIOS:
                    getattr(mut, key)()
                    b = backhaul()
                    rs = rsync()
                    got = results.setdefault(key, {"b": [], "bt": [], "bc": [], "kind": [],
                                                   "r": [], "rt": [], "rc": []})
                    got["b"].append(b[0])
                    got["bt"].append(b[1])
                    got["bc"].append(b[2])
                    got["kind"].append(b[3])
                    got["r"].append(rs[0])
                    got["rt"].append(rs[1])
                    got["rc"].append(rs[2])
                    ctx.log(f"  round {r + 1} {label}: backhaul {b[3]} {b[0] / KiB:.1f} KiB "
                            f"{b[1]:.2f} s cpu {b[2]:.2f} s | rsync {rs[0] / KiB:.1f} KiB "
                            f"{rs[1]:.2f} s")
            archive = srv.download(b[4]["archive_id"], ctx.scratch / "delta-last.tar.gz") \
                if b[4].get("archive_id") else None
    finally:
        relay_b.close()
        relay_r.close()
    out: list[Metric] = [
        info("delta", f"tree: {size / MiB:.0f} MiB, {nfiles} files "
             f"(db {db_size // MiB} MiB, log {log_size // MiB} MiB)", size / MiB, "MiB",
             "{:.0f}"),
        info("delta", "first backup wire bytes: backhaul full / rsync initial",
             full_bytes / rs_full[0], "x", "{:.2f}", backhaul=full_bytes, rsync=rs_full[0]),
    ]
    for key, label in SCENARIOS:
        g = results[key]
        bb, rb = median(g["b"]), median(g["r"])
        detail = dict(g)
        shown = f"{bb / KiB:.1f} KiB vs {rb / KiB:.1f} KiB"
        if key == "unchanged":
            out.append(at_most("delta", f"{label}: backhaul wire bytes per check", bb / KiB,
                               "KiB", 2.0, "{:.2f}", rsync_kib=rb / KiB, **detail))
            continue
        out.append(at_most("delta", f"{label}: wire bytes backhaul / rsync -az ({shown})",
                           bb / rb, "x", GOALS[key], "{:.2f}", **detail))
        out.append(at_most("delta", f"  {label}: wall time backhaul / rsync",
                           median(g["bt"]) / median(g["rt"]), "x", 1.5, "{:.2f}"))
        out.append(info("delta", f"  {label}: backhauld CPU per backup (rsync client CPU "
                        f"{median(g['rc']):.2f} s)", median(g["bc"]), "s", "{:.2f}"))
    if archive is not None:
        ok = subprocess.run(["gzip", "-t", str(archive)], check=False).returncode == 0
        out.append(Metric("delta", "last composed archive passes gzip -t", float(ok), "",
                          "yes" if ok else "NO", goal="yes", ok=ok))
    return out
