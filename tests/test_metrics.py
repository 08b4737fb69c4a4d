"""GET /metrics: the catalog in Prometheus' text format, parsed back with
prometheus_client's own parser."""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import sqlite3
import time
from pathlib import Path

import httpx
import pytest
from conftest import LiveServer
from prometheus_client.parser import text_string_to_metric_families

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey


def scrape(srv: LiveServer) -> dict[str, list]:
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {srv.token}"},
                  timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            assert isinstance(s.value, float) and math.isfinite(s.value), s
            out.setdefault(s.name, []).append(s)
    return out


def parse(ts: str) -> float:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def value(samples: dict[str, list], name: str, **labels: str) -> float:
    found = [s.value for s in samples.get(name, [])
             if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, f"{name}{labels}: {found} in {sorted(samples)}"
    return found[0]


def test_metrics_per_target_node_scheduler_and_server(tmp_path: Path, server_key: ServerKey,
                                                     node: SSHD) -> None:
    srv = LiveServer(tmp_path / "srv", server_key).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        (app / "a.txt").write_text("hello\n" * 1000)
        gone = tmp_path / "gone"
        gone.mkdir()
        t = srv.register(node, app, every=600)
        f = srv.register(node, gone, every=600)
        before = time.time()
        first = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
        second = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
        assert (first["status"], second["status"]) in (("success", "unchanged"),
                                                        ("unchanged", "unchanged"))
        gone.rmdir()
        failed = srv.api("POST", f"/targets/{f['id']}/run", params={"wait": "true"}).json()["run"]
        assert failed["status"] == "failed"

        m = scrape(srv)
        tl = {"target_id": str(t["id"]), "node": t["address"], "path": str(app)}
        fl = {"target_id": str(f["id"]), "node": f["address"], "path": str(gone)}
        backups = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
        # The unchanged run is the newest good run: its end is the last success.
        last_success = value(m, "backhaul_last_success_timestamp_seconds", **tl)
        assert last_success >= before - 1
        assert last_success >= value(m, "backhaul_last_change_timestamp_seconds", **tl)
        assert value(m, "backhaul_last_attempt_timestamp_seconds", **tl) >= before - 1
        assert value(m, "backhaul_last_archive_size_bytes", **tl) == backups[0]["size"] > 0
        assert value(m, "backhaul_archives_kept", **tl) == len(backups)
        assert value(m, "backhaul_archives_kept_bytes", **tl) == sum(b["size"] for b in backups)
        assert value(m, "backhaul_last_duration_seconds", **tl) >= 0
        assert value(m, "backhaul_runs_total", result="unchanged", **tl) >= 1
        runs = sum(value(m, "backhaul_runs_total", result=r, **tl)
                   for r in ("success", "unchanged", "failed", "interrupted"))
        assert runs == len(srv.runs(t["id"]))
        assert value(m, "backhaul_last_run_failed", **tl) == 0
        assert value(m, "backhaul_target_interval_seconds", **tl) == 600 * 60

        # A failure does not move the last success; it counts as a failure.
        good = [r for r in srv.runs(f["id"]) if r["status"] in ("success", "unchanged")]
        last_good = max((parse(r["finished_at"]) for r in good), default=0)
        assert value(m, "backhaul_last_success_timestamp_seconds", **fl) == \
            pytest.approx(last_good, abs=1)
        assert all(r["id"] < failed["id"] for r in good)
        assert value(m, "backhaul_runs_total", result="failed", **fl) == 1
        assert value(m, "backhaul_consecutive_failures", **fl) >= 1
        assert value(m, "backhaul_last_run_failed", **fl) == 1

        assert value(m, "backhaul_node_reachable", node=t["address"]) == 1
        assert value(m, "backhaul_node_last_seen_timestamp_seconds", node=t["address"]) > 0
        assert value(m, "backhaul_scheduler_due_runs") >= 0
        assert value(m, "backhaul_scheduler_oldest_overdue_seconds") >= 0
        assert value(m, "backhaul_store_free_bytes") > 0
        db = srv.data_dir / "catalog.db"
        assert value(m, "backhaul_catalog_size_bytes") >= db.stat().st_size
        assert value(m, "backhaul_scrape_errors") == 0
    finally:
        srv.stop()


def test_one_bad_row_does_not_break_the_scrape(live: LiveServer, node: SSHD,
                                               tmp_path: Path) -> None:
    apps = []
    for name in ("good", "bad"):
        (tmp_path / name).mkdir()
        apps.append(live.register(node, tmp_path / name, every=600))
    # A value no code path writes (SQLite keeps text in an INTEGER column).
    with sqlite3.connect(live.data_dir / "catalog.db") as db:
        db.execute("UPDATE targets SET every_minutes = 'x' WHERE id = ?", (apps[1]["id"],))
    m = scrape(live)
    ids = {s.labels["target_id"] for s in m["backhaul_last_success_timestamp_seconds"]}
    assert ids == {str(apps[0]["id"])}
    assert value(m, "backhaul_scrape_errors") == 1
    assert value(m, "backhaul_node_reachable", node=apps[0]["address"]) == 1


def test_metrics_need_the_token(live: LiveServer) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": live.token}):
        r = httpx.get(live.url + "/metrics", headers=headers, timeout=10)
        assert r.status_code == 401
        assert r.json()["error"]["code"] == "unauthorized"
        assert "backhaul_" not in r.text


def test_backlog_and_progress_while_a_slow_run_holds_the_only_worker(
        tmp_path: Path, server_key: ServerKey, node: SSHD) -> None:
    """One worker, busy with a throttled transfer: the next due run waits, the
    scheduler series show it, and the status page shows the bytes so far."""
    srv = LiveServer(tmp_path / "srv", server_key, workers=1, bwlimit="1MiB").start()
    try:
        slow, quick = tmp_path / "slow", tmp_path / "quick"
        slow.mkdir()
        quick.mkdir()
        (slow / "noise.bin").write_bytes(os.urandom(4 * 2**20))  # incompressible: ~4 s
        s = srv.register(node, slow, every=600)
        srv.wait_for(lambda: value(scrape(srv), "backhaul_target_running",
                                   target_id=str(s["id"]), node=s["address"],
                                   path=str(slow)) == 1, 20, "the slow run to start")
        q = srv.register(node, quick, every=600)  # due now, but no worker is free
        m = srv.wait_for(lambda: (lambda m: m if value(m, "backhaul_scheduler_due_runs") >= 1
                                  and value(m, "backhaul_scheduler_oldest_overdue_seconds") > 0
                                  else None)(scrape(srv)), 10, "the waiting run")
        assert value(m, "backhaul_runs_in_flight") == 1
        assert value(m, "backhaul_target_running", target_id=str(q["id"]), node=q["address"],
                     path=str(quick)) == 0

        session = httpx.post(srv.url + "/login", data={"token": srv.token},
                             timeout=10).cookies
        progress = re.compile(r"running: (\d+(?:\.\d)?) (B|KiB|MiB)")
        page = srv.wait_for(lambda: progress.search(httpx.get(
            srv.url + "/", cookies=session, timeout=10).text), 20, "progress on the page")
        assert float(page.group(1)) > 0
        srv.wait_for(lambda: [r for r in srv.runs(q["id"]) if r["finished_at"]], 60,
                     "the waiting run to run once the worker is free")
        assert value(scrape(srv), "backhaul_scheduler_due_runs") == 0
    finally:
        srv.stop()
