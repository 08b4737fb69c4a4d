"""`backhaul edit`: a target's frequency and keep change without losing its
history; a lower keep rotates at once, and only when asked to."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from conftest import LiveServer, addr, cli

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey


def finished(srv: LiveServer, tid: int, count: int) -> list[dict]:
    return srv.wait_for(lambda: (lambda rs: rs if len(rs) >= count and all(
        r["status"] != "running" for r in rs) else None)(srv.runs(tid)), 30, f"{count} runs")


def parse(ts: str) -> dt.datetime:
    return dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))


def test_edit_changes_keep_and_frequency_keeping_history(live: LiveServer, node: SSHD,
                                                         tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    t = live.register(node, app, every=60)
    finished(live, t["id"], 1)
    for i in range(3):
        (app / f"f{i}").write_text(str(i))
        r = live.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"})
        assert r.json()["run"]["status"] == "success", r.text
    runs_before = live.runs(t["id"])
    assert len(live.api("GET", f"/targets/{t['id']}/backups").json()["backups"]) == 4

    # a lower keep asks first; without a terminal it refuses and changes nothing
    res = cli(live, "edit", addr(node), str(app), "--keep", "2")
    assert res.exit_code == 1, res.output
    assert "[confirmation_needed]" in res.stderr and "--yes" in res.stderr
    assert "2 oldest of 4" in res.stderr
    backups = live.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
    assert [b["state"] for b in backups] == ["kept"] * 4

    res = cli(live, "edit", addr(node), str(app), "--keep", "2", "--every", "5", "--yes")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"edited {t['id']}: {addr(node)} {app} every 5m (keep 2)")
    assert "rotated out 2 archives" in res.stdout
    backups = live.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
    assert [b["state"] for b in backups] == ["kept", "kept", "rotated", "rotated"]
    target = live.api("GET", f"/targets/{t['id']}").json()["target"]
    assert (target["every_minutes"], target["keep"], target["id"]) == (5, 2, t["id"])
    # the next run comes within the new interval, not the old hour
    assert parse(target["next_run_at"]) <= dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    assert [r["id"] for r in live.runs(t["id"])] == [r["id"] for r in runs_before]

    # a higher keep rotates nothing and needs no confirmation
    res = cli(live, "edit", addr(node), str(app), "--keep", "7")
    assert res.exit_code == 0 and "rotated" not in res.stdout, res.output


def test_edit_refuses_bad_values(live: LiveServer, node: SSHD, tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.mkdir()
    t = live.register(node, app, every=60)
    for args, fragment in ((["--keep", "0"], "--keep must be at least 1"),
                           (["--every", "0"], "must be at least 1"),
                           (["--every", "soon"], "'soon' is not a valid integer"),
                           ([], "give --every MINUTES and/or --keep N")):
        res = cli(live, "edit", addr(node), str(app), *args)
        assert res.exit_code == 2 and fragment in res.stderr, (args, res.output)
    r = live.api("PATCH", f"/targets/{t['id']}", json={"keep": 0})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_keep", r.text
    r = live.api("PATCH", f"/targets/{t['id']}", json={"every_minutes": 10**9})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_frequency", r.text
    r = live.api("PATCH", f"/targets/{t['id']}", json={})
    assert r.status_code == 422, r.text
    assert live.api("GET", f"/targets/{t['id']}").json()["target"]["keep"] == 10
    live.api("DELETE", f"/targets/{t['id']}")
    res = cli(live, "edit", addr(node), str(app), "--every", "5")
    assert res.exit_code == 1 and "[target_unregistered]" in res.stderr, res.output


def test_edit_changes_the_scheduler_interval(tmp_path: Path, server_key: ServerKey,
                                             node: SSHD) -> None:
    """With 0.2 s minutes: every 600 (2 min) -> every 5 (1 s); the scheduler
    then fires about once a second."""
    srv = LiveServer(tmp_path / "srv", server_key, minute_seconds=0.2).start()
    try:
        app = tmp_path / "app"
        app.mkdir()
        t = srv.register(node, app, every=600)
        finished(srv, t["id"], 1)
        assert srv.api("PATCH", f"/targets/{t['id']}",
                       json={"every_minutes": 5}).status_code == 200
        runs = finished(srv, t["id"], 4)
        assert all(r["trigger"] == "schedule" for r in runs)
    finally:
        srv.stop()
