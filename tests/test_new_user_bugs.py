"""The bugs found when backhaul was tried as a new user would (issue 12), each
against a live backhauld and real sshd nodes (or the engine and a real sshd
where time has to be controlled)."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest
from click.testing import Result
from conftest import LiveServer, addr, cli

from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator import remote
from orchestrator.backup import BackupEngine, CatalogHostKeys
from orchestrator.ssh import ServerKey, SSHPool
from storage.archives import ArchiveStore
from storage.catalog import Catalog


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def ok(result: Result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    return result.stdout


def error_line(result: Result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.output
    (line,) = result.stderr.splitlines()
    return line


def tree(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "a.txt").write_text("alpha\n")
    return root


def settled(srv: LiveServer, target_id: int, count: int = 1) -> list[dict]:
    def done() -> list[dict] | None:
        runs = srv.runs(target_id)
        if len(runs) >= count and all(r["status"] != "running" for r in runs):
            return runs
        return None
    return srv.wait_for(done, 30, f"{count} runs of target {target_id}")


def run_wait(srv: LiveServer, target_id: int) -> dict:
    r = srv.api("POST", f"/targets/{target_id}/run", params={"wait": "true"})
    assert r.status_code == 200, r.text
    return r.json()["run"]


def row_with(table: str, *needles: str) -> str:
    rows = [line for line in table.splitlines() if all(n in line for n in needles)]
    assert len(rows) == 1, (needles, table)
    return rows[0]


# 1 -------------------------------------------------------------------------------


def test_a_refused_run_drops_the_pooled_connection(tmp_path: Path, server_key: ServerKey) -> None:
    """authorized_keys fixed while a pooled connection, authenticated under the
    old restricted line, stays open: the next run must authenticate again."""
    app, other = tree(tmp_path / "app"), tree(tmp_path / "other")
    old_line = remote.restricted_key_line(server_key.public_line, [str(app)])
    catalog = Catalog(tmp_path / "catalog.db")
    pool = SSHPool(server_key, CatalogHostKeys(catalog), connect_timeout=5, io_timeout=15,
                   idle_timeout=3600)
    engine = BackupEngine(catalog, ArchiveStore(tmp_path / "archives"), pool)
    try:
        with SSHD(tmp_path / "node", [old_line], host="127.0.0.5") as sshd:
            n = catalog.ensure_node(sshd.user, sshd.host, sshd.port)
            t_app = catalog.add_target(n.id, str(app), 60, 10)
            t_other = catalog.add_target(n.id, str(other), 60, 10)
            assert engine.run(t_app.id).status == "success"
            refused = engine.run(t_other.id)
            assert refused.error_code == "command_refused"
            # The user follows the hint: the line now allows both paths.
            sshd.set_authorized_keys([remote.restricted_key_line(
                server_key.public_line, [str(app), str(other)])])
            again = engine.run(t_other.id)
            assert (again.status, again.error_code) == ("success", None), again
    finally:
        pool.close()
        catalog.close()


# 2 and 5 (purged) -----------------------------------------------------------------


def test_backups_and_history_span_registrations(srv: LiveServer, node: SSHD,
                                                tmp_path: Path) -> None:
    app = tree(tmp_path / "app")
    first = srv.register(node, app, every=60)
    settled(srv, first["id"])
    (app / "b.txt").write_text("beta\n")
    assert run_wait(srv, first["id"])["status"] == "success"
    ok(cli(srv, "unregister", addr(node), str(app)))

    second = srv.register(node, app, every=60, keep=1)
    assert second["id"] != first["id"]
    settled(srv, second["id"])
    (app / "c.txt").write_text("gamma\n")
    assert run_wait(srv, second["id"])["status"] == "success"  # rotates one (keep 1)
    ok(cli(srv, "unregister", addr(node), str(app), "--purge"))

    made = srv.api("GET", f"/targets/{second['id']}/backups").json()["backups"]
    assert {b["target_id"] for b in made} == {first["id"], second["id"]}
    assert len(made) == 4
    states = {b["id"]: b["state"] for b in made}
    first_ids = [b["id"] for b in made if b["target_id"] == first["id"]]
    second_ids = sorted(b["id"] for b in made if b["target_id"] == second["id"])
    assert [states[i] for i in first_ids] == ["kept", "kept"]
    assert [states[i] for i in second_ids] == ["rotated", "purged"]

    table = ok(cli(srv, "backups", addr(node), str(app)))
    for b in made:
        (row,) = [line for line in table.splitlines() if line.split()[-1:] == [str(b["id"])]]
        assert f" {b['state']} " in row
        # CREATED to the second, so two backups of one minute can be told apart
        assert b["created_at"][:19].replace("T", " ") in row
    assert "4 backups made, 2 kept" in table

    history = ok(cli(srv, "history", addr(node), str(app)))
    runs = srv.runs(first["id"]) + srv.runs(second["id"])
    listed = [line.split()[0] for line in history.splitlines()[1:]]
    assert sorted(listed) == sorted(str(r["id"]) for r in runs)


# 3 ----------------------------------------------------------------------------------


def test_last_seen_follows_successful_contact_at_most_once_a_minute(
        tmp_path: Path, server_key: ServerKey, node: SSHD) -> None:
    now = [dt.datetime(2026, 1, 1, tzinfo=dt.UTC)]
    catalog = Catalog(tmp_path / "catalog.db", clock=lambda: now[0])
    pool = SSHPool(server_key, CatalogHostKeys(catalog), connect_timeout=5, io_timeout=15)
    engine = BackupEngine(catalog, ArchiveStore(tmp_path / "archives"), pool)
    app = tree(tmp_path / "app")
    try:
        n = catalog.ensure_node(node.user, node.host, node.port)
        t = catalog.add_target(n.id, str(app), 60, 10)
        assert engine.run(t.id).status == "success"
        assert catalog.get_node(n.id).last_seen_at == now[0]
        start = now[0]
        now[0] += dt.timedelta(seconds=30)
        assert engine.run(t.id).status == "unchanged"
        assert catalog.get_node(n.id).last_seen_at == start  # no write within the minute
        now[0] += dt.timedelta(seconds=31)
        assert engine.run(t.id).status == "unchanged"
        assert catalog.get_node(n.id).last_seen_at == now[0]
    finally:
        pool.close()
        catalog.close()


def test_nodes_shows_a_host_key_mismatch(srv: LiveServer, server_key: ServerKey,
                                         tmp_path: Path) -> None:
    app = tree(tmp_path / "app")
    with SSHD(tmp_path / "n", server_key.public_line, host="127.0.0.8") as sshd:
        t = srv.register(sshd, app, every=60)
        settled(srv, t["id"])
        sshd.regenerate_host_key()
        sshd.kill_sessions()
        sshd.restart()
        assert run_wait(srv, t["id"])["error_code"] == "host_key_mismatch"
        row = row_with(ok(cli(srv, "nodes")), addr(sshd))
        assert "KEY MISMATCH" in row and "host key of" in row
        assert srv.api("DELETE", f"/targets/{t['id']}").status_code == 200


# 4 ------------------------------------------------------------------------------------


def test_a_second_unregister_is_an_error(srv: LiveServer, node: SSHD, tmp_path: Path) -> None:
    app = tree(tmp_path / "app")
    t = srv.register(node, app, every=60)
    settled(srv, t["id"])
    ok(cli(srv, "unregister", addr(node), str(app)))
    line = error_line(cli(srv, "unregister", addr(node), str(app)))
    assert line.startswith("backhaul: error: [target_unregistered] ")
    assert "is not registered" in line
    # purging what the first unregister kept is still possible, once
    assert "purged 1 archives" in ok(cli(srv, "unregister", addr(node), str(app), "--purge"))
    error_line(cli(srv, "unregister", addr(node), str(app), "--purge"))


# 5 --------------------------------------------------------------------------------------


def test_history_archive_column_and_download_defaults(srv: LiveServer, node: SSHD,
                                                      tmp_path: Path) -> None:
    app = tree(tmp_path / "myapp")
    t = srv.register(node, app, every=60)
    (run,) = settled(srv, t["id"])
    table = ok(cli(srv, "history", addr(node), str(app)))
    header = table.splitlines()[0].split()
    assert "ARCHIVE" in header
    row = row_with(table, f"{run['id']} ")
    assert str(run["archive_id"]) in row.split()

    out = ok(cli(srv, "download", str(run["archive_id"])))
    saved = Path(re.search(r"to (\S+) \(", out).group(1))
    assert saved.exists()
    assert saved.name.startswith(f"{node.user}@{node.host}_{node.port}-myapp-")
    assert saved.name.endswith(f"-{run['id']}.tar.gz")

    result = cli(srv, "download", "abc")
    assert result.exit_code == 2
    assert "an archive id is a number" in result.stderr


# 6 -------------------------------------------------------------------------------------


def test_run_wait_labels_wire_and_stored_sizes(srv: LiveServer, node: SSHD,
                                               tmp_path: Path) -> None:
    app = tree(tmp_path / "app")
    t = srv.register(node, app, every=60)
    settled(srv, t["id"])
    (app / "more.txt").write_text("x" * 3000)
    out = ok(cli(srv, "run", addr(node), str(app), "--wait"))
    run = srv.runs(t["id"])[0]
    (b,) = [b for b in srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
            if b["id"] == run["archive_id"]]
    assert run["archive_size"] == b["size"]
    assert f"archive {b['id']} ({b['size']} B stored), " in out
    assert f"{run['bytes_transferred']} B transferred in " in out


# 7 ---------------------------------------------------------------------------------------


def test_failed_runs_are_logged_as_warnings(srv: LiveServer, node: SSHD, tmp_path: Path) -> None:
    app = tree(tmp_path / "app")
    t = srv.register(node, app, every=60)
    settled(srv, t["id"])
    (app / "a.txt").unlink()
    app.rmdir()
    run = run_wait(srv, t["id"])
    assert run["status"] == "failed"
    srv.api("DELETE", f"/targets/{t['id']}")
    lines = [line for line in srv.log().splitlines() if f"run {run['id']} " in line]
    assert lines and all(" WARNING " in line for line in lines), lines
    assert f"target {t['id']} " in lines[0] and addr(node) in lines[0]


# 8 ------------------------------------------------------------------------------------------


def test_nodes_forget_removes_a_node_without_targets(srv: LiveServer, tmp_path: Path) -> None:
    port = free_port()  # a mistyped port: nothing listens there
    where = f"backup@127.0.0.1:{port}"
    reg = cli(srv, "register", where, "/srv/data", "--every", "60")
    assert reg.exit_code == 0, reg.output
    line = error_line(cli(srv, "nodes", "--forget", where))
    assert line.startswith("backhaul: error: [node_in_use] ") and "/srv/data" in line
    ok(cli(srv, "unregister", where, "/srv/data"))
    assert "forgot node" in ok(cli(srv, "nodes", "--forget", where))
    assert where not in ok(cli(srv, "nodes"))
    assert all(n["port"] != port for n in srv.api("GET", "/nodes").json()["nodes"])
    # its history stays
    assert srv.api("GET", "/runs", params={"port": port}).json()["runs"] is not None
    error_line(cli(srv, "nodes", "--forget", where))  # gone: node_not_found
