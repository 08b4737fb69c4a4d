"""Faults: a hung peer, a full archive disk, a locked catalog, a flapping node,
rotation under failures. Each against real sshd, SQLite and tar."""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Engine, LiveServer, make_engine

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.archives import ArchiveStore


def _tree(root: Path, mib: int) -> Path:
    root.mkdir()
    for i in range(mib):
        (root / f"chunk-{i}.bin").write_bytes(os.urandom(1024 * 1024))
    return root


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True)
    children: dict[int, list[int]] = {}
    for line in out.stdout.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def test_a_frozen_peer_times_out_and_others_keep_running(tmp_path: Path, server_key: ServerKey,
                                                         node: SSHD) -> None:
    eng = make_engine(tmp_path / "data", server_key, io_timeout=2)
    frozen: list[int] = []
    try:
        with SSHD(tmp_path / "hung", server_key.public_line, host="127.0.0.5") as hung:
            big = eng.register(hung, _tree(tmp_path / "big", 150))
            small = tmp_path / "small"
            small.mkdir()
            other = eng.register(node, small)

            def freeze_when_streaming() -> None:
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    if any(p.stat().st_size > 2**20 for p in eng.temp_files()):
                        frozen.extend(_descendants(hung.pid))
                        for pid in frozen:
                            os.kill(pid, signal.SIGSTOP)
                        return
                    time.sleep(0.01)

            t = threading.Thread(target=freeze_when_streaming)
            t.start()
            results = {}
            runner = threading.Thread(target=lambda: results.setdefault(
                "big", eng.engine.run(big.id)))
            started = time.monotonic()
            runner.start()
            t.join()
            assert frozen, "the stream never started"
            # while the big run hangs, another target backs up normally
            (small / "f").write_text("x")
            assert eng.engine.run(other.id).status == "success"
            runner.join(30)
            elapsed = time.monotonic() - started
            r = results["big"]
            assert r.status == "failed" and r.error_code == "timeout", r.message
            assert elapsed < 15, elapsed
            assert eng.catalog.list_archives(big.id) == []
            assert eng.temp_files() == []
            for pid in frozen:
                with _suppress():
                    os.kill(pid, signal.SIGCONT)
    finally:
        for pid in frozen:
            with _suppress():
                os.kill(pid, signal.SIGKILL)
        eng.pool.close()
        eng.catalog.close()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_archive_disk_fails_cleanly_and_recovers(tmp_path: Path, server_key: ServerKey,
                                                        node: SSHD, small_disk: Path) -> None:
    eng = make_engine(tmp_path / "data", server_key)
    eng.store = eng.engine.store = ArchiveStore(small_disk / "archives")
    try:
        app = tmp_path / "app"
        app.mkdir()
        (app / "small.txt").write_text("small")
        target = eng.register(node, app)
        assert eng.engine.run(target.id).status == "success"
        kept = eng.archive_files()
        kept_bytes = [p.read_bytes() for p in kept]
        (app / "big.bin").write_bytes(os.urandom(6 * 1024 * 1024))

        r = eng.engine.run(target.id)

        assert r.status == "failed" and r.error_code == "storage_error", r.message
        assert "no space left" in r.message
        assert eng.archive_files() == kept
        assert [p.read_bytes() for p in kept] == kept_bytes
        assert eng.temp_files() == []
        assert len(eng.catalog.list_archives(target.id)) == 1
        (app / "big.bin").unlink()
        (app / "medium.bin").write_bytes(os.urandom(1024 * 1024))
        assert eng.engine.run(target.id).status == "success"
        assert len(eng.catalog.list_archives(target.id)) == 2
    finally:
        eng.pool.close()
        eng.catalog.close()


def test_rotation_never_deletes_because_of_failures(eng: Engine, node: SSHD,
                                                    tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    target = eng.register(node, app, keep=3)
    for i in range(3):
        (app / f"f{i}").write_text(str(i))
        assert eng.engine.run(target.id).status == "success"
    moved = tmp_path / "moved-away"
    app.rename(moved)
    for _ in range(4):
        assert eng.engine.run(target.id).error_code == "path_not_found"
    assert len(eng.archive_files()) == 3
    assert len(eng.catalog.list_archives(target.id, retained_only=True)) == 3
    moved.rename(app)
    (app / "new").write_text("n")
    assert eng.engine.run(target.id).status == "success"
    assert len(eng.archive_files()) == 3
    assert len(eng.catalog.list_archives(target.id)) == 4


def test_a_locked_catalog_fails_runs_not_the_server(tmp_path: Path, server_key: ServerKey,
                                                   node: SSHD) -> None:
    srv = LiveServer(tmp_path / "srv", server_key, minute_seconds=1, db_busy_timeout=1,
                     retry_min=1, retry_max=2).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        t = srv.register(node, app, every=1)
        srv.wait_for(lambda: len(srv.runs(t["id"])) >= 2, 15, "scheduled runs")
        db = sqlite3.connect(srv.data_dir / "catalog.db", timeout=5, isolation_level=None)
        db.execute("BEGIN EXCLUSIVE")
        try:
            time.sleep(4)  # four schedule ticks, each busy-timeout of 1 s
            assert httpx.get(srv.url + "/health", timeout=5).status_code == 200
            r = srv.api("GET", "/targets")
            assert r.status_code in (200, 503)
            if r.status_code == 503:
                assert r.json()["error"]["code"] == "storage_error"
        finally:
            db.execute("ROLLBACK")
            db.close()
        before = len(srv.runs(t["id"]))
        srv.wait_for(lambda: len(srv.runs(t["id"])) >= before + 2, 15,
                     "runs after the lock is released")
        assert srv.proc is not None and srv.proc.poll() is None
        assert "catalog unavailable" in srv.log() or "database is locked" in srv.log()
    finally:
        srv.stop()


def _overlaps(runs: list[dict]) -> list[tuple[int, int]]:
    spans = sorted((r["started_at"], r["finished_at"] or "9999", r["id"]) for r in runs)
    return [(a[2], b[2]) for a, b in zip(spans, spans[1:], strict=False) if b[0] < a[1]]


def test_a_flapping_node_is_probed_and_caught_up_each_time(tmp_path: Path,
                                                           server_key: ServerKey) -> None:
    with SSHD(tmp_path / "n", server_key.public_line, host="127.0.0.6") as sshd:
        srv = LiveServer(tmp_path / "srv", server_key, minute_seconds=2,
                         retry_min=0.5, retry_max=1.5).start()
        try:
            apps = []
            for i in range(2):
                a = tmp_path / f"app{i}"
                a.mkdir()
                (a / "f").write_text("x")
                apps.append(a)
            targets = [srv.register(sshd, a, every=1) for a in apps]
            srv.wait_for(lambda: all(srv.runs(t["id"]) for t in targets), 15, "first runs")
            for outage in range(3):
                sshd.kill_sessions()
                sshd.stop()
                srv.wait_for(lambda: srv.api("GET", "/nodes").json()["nodes"][0]["reachable"]
                             is False, 15, f"outage {outage} noticed")
                for a in apps:
                    (a / f"during-{outage}").write_text("changed while down")
                time.sleep(2)
                sshd.start()
                marker = f"during-{outage}"
                for t in targets:
                    srv.wait_for(lambda t=t, m=marker: _has_backup_with(srv, t["id"], m),
                                 15, f"catch-up after outage {outage}")
            for t in targets:
                runs = srv.runs(t["id"])
                assert not _overlaps(runs), _overlaps(runs)
        finally:
            srv.stop()


def _has_backup_with(srv: LiveServer, target_id: int, name: str) -> bool:
    backups = srv.api("GET", f"/targets/{target_id}/backups").json()["backups"]
    if not backups:
        return False
    r = srv.api("GET", f"/archives/{backups[0]['id']}/download")
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tf:
        return any(n.endswith("/" + name) for n in tf.getnames())


def test_sigterm_mid_transfer_aborts_within_the_grace_and_exits_zero(
        tmp_path: Path, server_key: ServerKey, node: SSHD) -> None:
    big = _tree(tmp_path / "big", 60)
    srv = LiveServer(tmp_path / "srv", server_key, bwlimit="5MiB", shutdown_grace=1).start()
    try:
        t = srv.register(node, big, every=60)
        archives = srv.data_dir / "archives"
        srv.wait_for(lambda: list(archives.rglob("*.partial-*")), 20, "a transfer in flight")
        started = time.monotonic()
        assert srv.stop() == 0
        assert time.monotonic() - started < 15
        assert not list(archives.rglob("*.partial-*"))
        srv.start()
        run = srv.runs(t["id"])[-1]  # newer ones: the catch-up run the restart begins
        assert run["status"] == "interrupted", run
        backups = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
        assert all(b["run_id"] != run["id"] for b in backups)
    finally:
        srv.stop()
