"""A live backhauld with its catalog and job store on a real PostgreSQL, and
the configurations it must refuse at start: one line, non-zero exit, no
traceback, nothing left listening."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from conftest import LiveServer

from fixtures.postgres import PostgresCluster
from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.catalog import Catalog


def tree(root: Path, files: int = 3) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}.txt").write_text(f"file {i}\n" * 100)
    return root


def test_a_restarted_server_on_postgresql_finds_everything(
        tmp_path: Path, server_key: ServerKey, node: SSHD, pg: PostgresCluster) -> None:
    url = pg.create_database()
    srv = LiveServer(tmp_path / "srv", server_key, catalog_url=url)
    srv.start()
    try:
        a = srv.register(node, tree(tmp_path / "a"), every=60)
        b = srv.register(node, tree(tmp_path / "b"), every=120, keep=3)
        opts = srv.api("PATCH", f"/targets/{a['id']}/options",
                       json={"post_command": "true"})
        assert opts.status_code == 200, opts.text
        for t in (a, b):
            srv.wait_for(lambda t=t: any(r["status"] == "success" for r in srv.runs(t["id"])),
                         30, f"the first backup of target {t['id']}")
        before = {t["id"]: t for t in srv.api("GET", "/targets").json()["targets"]}
        backups = {tid: srv.api("GET", f"/targets/{tid}/backups").json()["backups"]
                   for tid in before}
        assert srv.stop() == 0
    finally:
        srv.stop()

    # Nothing of the catalog or the schedule went to the data dir.
    assert not (srv.data_dir / "catalog.db").exists()
    assert not (srv.data_dir / "jobs.db").exists()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        jobs = set(conn.execute(sa.text("SELECT id FROM apscheduler_jobs")).scalars())
        assert {f"target:{a['id']}", f"target:{b['id']}"} <= jobs
    engine.dispose()

    srv.start()
    try:
        after = {t["id"]: t for t in srv.api("GET", "/targets").json()["targets"]}
        assert set(after) == set(before)
        for tid, t in after.items():
            for key in ("path", "every_minutes", "keep", "next_run_at", "address",
                        "archives_kept", "bytes_kept", "created_at"):
                assert t[key] == before[tid][key], (key, t, before[tid])
        got = srv.api("GET", f"/targets/{a['id']}/options").json()
        assert "true" in str(got)
        for tid, listed in backups.items():
            again = srv.api("GET", f"/targets/{tid}/backups").json()["backups"]
            assert [x["id"] for x in again] == [x["id"] for x in listed]
            for archive in again:
                data = srv.api("GET", f"/archives/{archive['id']}/download").content
                assert hashlib.sha256(data).hexdigest() == archive["sha256"]
        # the metrics measure the PostgreSQL database, not a file in the data dir
        metrics = httpx.get(srv.url + "/metrics", timeout=30,
                            headers={"Authorization": f"Bearer {srv.token}"}).text
        (size,) = [float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("backhaul_catalog_size_bytes ")]
        assert size > 1_000_000  # an empty PostgreSQL database alone is ~7 MB
        # and it goes on working: a manual run lands in the same catalog
        r = srv.api("POST", f"/targets/{b['id']}/run", params={"wait": "true"})
        assert r.json()["run"]["status"] == "unchanged", r.text
    finally:
        srv.stop()


def start_fails(tmp_path: Path, catalog_url: str, **env: str) -> tuple[str, int]:
    """Run backhauld to its exit; returns (its output, the port it was given)."""
    port = free_port()
    full = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    full.update({"BACKHAUL_DATA_DIR": str(tmp_path / "data"),
                 "BACKHAUL_LISTEN": f"127.0.0.1:{port}",
                 "BACKHAUL_CATALOG_URL": catalog_url, **env})
    done = subprocess.run([sys.executable, "-m", "orchestrator"], env=full,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done
    assert done.stdout == ""
    return done.stderr, port


def assert_one_line(out: str, *needles: str) -> None:
    lines = out.splitlines()
    assert len(lines) == 1, out
    assert lines[0].startswith("backhauld: error: "), out
    assert "Traceback" not in out
    for n in needles:
        assert n in lines[0], (n, out)


def test_an_unreachable_database_is_one_line(tmp_path: Path) -> None:
    closed = free_port()
    out, _ = start_fails(tmp_path,
                         f"postgresql+psycopg://backhaul:s3cret@127.0.0.1:{closed}/catalog")
    assert_one_line(out, f"127.0.0.1:{closed}", "Connection refused")
    assert "s3cret" not in out


def test_wrong_credentials_are_one_line(tmp_path: Path, pg: PostgresCluster) -> None:
    pg.create_database()
    url = pg.url("postgres", password="not-the-password")
    out, _ = start_fails(tmp_path, url)
    assert_one_line(out, "password authentication failed")
    assert "not-the-password" not in out and pg.password not in out


def test_a_catalog_newer_than_the_code_is_one_line(tmp_path: Path, catalog_url: str) -> None:
    Catalog(catalog_url).close()
    engine = sa.create_engine(catalog_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()
    out, _ = start_fails(tmp_path, catalog_url)
    assert_one_line(out, "f00dfeed", "upgrade backhaul")


def test_not_a_database_url_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "orchestrator", "--catalog-url",
                           "mysql://u:pw@127.0.0.1/x"], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert "--catalog-url" in done.stderr and "pw@" not in done.stderr
    assert "Traceback" not in done.stderr


def test_a_second_server_on_the_same_postgresql_catalog_is_refused(
        tmp_path: Path, server_key: ServerKey, pg: PostgresCluster) -> None:
    """APScheduler allows one scheduler per job store: the second backhauld
    (another data dir, the same database) stops at start and leaves the
    first one running."""
    url = pg.create_database()
    first = LiveServer(tmp_path / "one", server_key, catalog_url=url).start()
    try:
        out, port = start_fails(tmp_path / "two", url)
        assert_one_line(out, "another backhauld already runs the scheduler")
        with pytest.raises(OSError):
            import socket
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        assert first.api("GET", "/targets").status_code == 200
    finally:
        first.stop()


def test_kill_9_mid_transfer_on_postgresql(tmp_path: Path, server_key: ServerKey,
                                           node: SSHD, pg: PostgresCluster) -> None:
    """A crash leaves no listed partial archive; the restarted server takes the
    scheduler lock the dead one held, marks its run interrupted and goes on."""
    big = tmp_path / "big"
    big.mkdir()
    for i in range(40):
        (big / f"chunk-{i}").write_bytes(os.urandom(1024 * 1024))
    srv = LiveServer(tmp_path / "srv", server_key, catalog_url=pg.create_database(),
                     bwlimit="8MiB")
    srv.start()
    try:
        t = srv.register(node, big, every=60)
        archives = srv.data_dir / "archives"
        srv.wait_for(lambda: any(p.stat().st_size > 2**20
                                 for p in archives.rglob("*.partial-*")),
                     30, "a partial archive being written")
        srv.kill()
        srv.start()
        killed = srv.runs(t["id"])[-1]
        assert killed["status"] == "interrupted"
        r = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"})
        assert r.json()["run"]["status"] in ("success", "unchanged"), r.text
        backups = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
        assert len(backups) == 1 and backups[0]["run_id"] != killed["id"]
        data = srv.api("GET", f"/archives/{backups[0]['id']}/download").content
        assert hashlib.sha256(data).hexdigest() == backups[0]["sha256"]
        assert not list(archives.rglob("*.partial-*"))
    finally:
        srv.stop()


def test_schedules_go_on_after_the_database_restarts(tmp_path: Path, server_key: ServerKey,
                                                     node: SSHD) -> None:
    """PostgreSQL restarted (maintenance, failover) while backhauld runs: the
    scheduler must survive errors from its job store and fire again once the
    database is back, not stop scheduling for good."""
    with PostgresCluster() as own:
        srv = LiveServer(tmp_path / "srv", server_key, catalog_url=own.create_database(),
                         minute_seconds=1)
        srv.start()
        try:
            t = srv.register(node, tree(tmp_path / "app"), every=1)
            srv.wait_for(lambda: len(srv.runs(t["id"])) >= 2, 30, "two scheduled runs")
            own.restart(down_for=4)  # several scheduler ticks with the database away
            srv.wait_for(lambda: srv.api("GET", "/targets").status_code == 200, 30,
                         "the API to read the catalog again")
            after = len(srv.runs(t["id"]))
            srv.wait_for(lambda: len(srv.runs(t["id"])) >= after + 2, 30,
                         "scheduled runs after the database came back")
        finally:
            srv.stop()


def test_the_scheduler_survives_a_job_store_write_failing(
        tmp_path: Path, server_key: ServerKey, node: SSHD, pg: PostgresCluster) -> None:
    """APScheduler itself only survives errors of its due-jobs query. Here the
    job store refuses writes for a while (its role loses UPDATE on the table):
    storing a fired job's next time fails, the scheduler's thread must live on,
    and once writes work again the target is backed up on schedule."""
    url = pg.create_database(owner="bh_sched", password="pw-" + os.urandom(4).hex())
    database = url.rsplit("/", 1)[1]
    srv = LiveServer(tmp_path / "srv", server_key, catalog_url=url, minute_seconds=1)
    srv.start()
    try:
        t = srv.register(node, tree(tmp_path / "app"), every=1)
        srv.wait_for(lambda: len(srv.runs(t["id"])) >= 2, 30, "two scheduled runs")
        pg.sql(database, 'REVOKE UPDATE ON apscheduler_jobs FROM "bh_sched"')
        srv.wait_for(lambda: "permission denied for table apscheduler_jobs" in srv.log(), 30,
                     "a scheduler pass that could not store a job")
        pg.sql(database, 'GRANT UPDATE ON apscheduler_jobs TO "bh_sched"')
        after = len(srv.runs(t["id"]))
        srv.wait_for(lambda: len(srv.runs(t["id"])) >= after + 2, 40,
                     "scheduled runs once the job store takes writes again")
    finally:
        srv.stop()
