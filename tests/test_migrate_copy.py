"""``backhauld migrate --from-data-dir``: an embedded install (SQLite catalog +
archive directory), made by a real backhauld backing up a real sshd node,
copied into a real PostgreSQL and a real S3 server (SeaweedFS on loopback);
then a backhauld on the copy lists, serves and builds on every archive. And
the destinations and sources it must refuse, in one line with exit 1."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from click.testing import CliRunner, Result
from conftest import LiveServer

from cli.main import main as cli_main
from fixtures.postgres import PostgresCluster
from fixtures.seaweed import SeaweedS3
from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

REGION = "us-east-1"


@dataclass
class Install:
    """An embedded install as a stopped backhauld left it, and what its API
    said about it before it stopped."""

    data_dir: Path
    trees: dict[int, Path]  # target id -> the tree on the node
    backups: dict[int, list[dict]]  # target id -> every archive (kept and rotated)
    targets: dict[int, dict]
    max_run_id: int

    def copy_to(self, where: Path) -> Path:
        shutil.copytree(self.data_dir, where, symlinks=True)
        return where

    def kept(self) -> list[dict]:
        return [b for bs in self.backups.values() for b in bs if b["retained"]]


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey,
            node: SSHD) -> Install:
    """Two targets, each with a full and delta backups; one with keep=1, so
    it has a rotated archive (a row without a file)."""
    root = tmp_path_factory.mktemp("embedded")
    trees = {}
    for name in ("alpha", "beta"):
        tree = root / name
        tree.mkdir()
        for i in range(3):
            (tree / f"f{i}.bin").write_bytes(os.urandom(200_000))
        (tree / "notes.txt").write_text(f"{name} 1\n")
        trees[name] = tree
    srv = LiveServer(root / "data", server_key)
    srv.start(timeout=90)
    try:
        ids = {}
        for name, keep in (("alpha", 10), ("beta", 1)):
            t = srv.register(node, trees[name], every=600, keep=keep)
            ids[t["id"]] = trees[name]
            srv.wait_for(lambda t=t: any(r["status"] == "success" for r in srv.runs(t["id"])),
                         60, f"the first backup of {name}")
            for n in (2, 3):
                (trees[name] / "notes.txt").write_text(f"{name} {n}\n")
                r = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"})
                assert r.json()["run"]["transfer"] == "delta", r.text
        backups = {tid: srv.api("GET", f"/targets/{tid}/backups").json()["backups"]
                   for tid in ids}
        targets = {tid: srv.api("GET", f"/targets/{tid}").json()["target"] for tid in ids}
        max_run = max(r["id"] for tid in ids for r in srv.runs(tid))
        assert srv.stop() == 0
    finally:
        srv.stop()
    assert any(not b["retained"] for b in backups[max(ids)])  # beta rotated
    return Install(root / "data", ids, backups, targets, max_run)


def migrate(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("BACKHAUL_", "AWS_"))}
    return subprocess.run([sys.executable, "-m", "orchestrator", "migrate", *args],
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=300)


def s3_env(s3: SeaweedS3, tmp_path: Path) -> dict[str, str]:
    return {**s3.env(), "AWS_CONFIG_FILE": str(tmp_path / "no-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-credentials")}


def copy_args(src: Path, catalog_url: str, s3: SeaweedS3, bucket: str,
              *extra: str) -> list[str]:
    return ["--from-data-dir", str(src), "--catalog-url", catalog_url,
            "--store-url", f"s3://{bucket}/site", "--store-endpoint", s3.endpoint,
            "--store-region", REGION, *extra]


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def keys(s3: SeaweedS3, bucket: str) -> set[str]:
    got = s3.client().list_objects_v2(Bucket=bucket)
    return {o["Key"] for o in got.get("Contents", [])}


def pg_ids(url: str, sql: str) -> list:
    dsn = url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        return [r[0] for r in conn.execute(sql)]


def client(srv: LiveServer, *args: str) -> Result:
    return CliRunner().invoke(cli_main, ["--server", srv.url, "--token", srv.token, *args],
                              env={"BACKHAUL_URL": None, "BACKHAUL_TOKEN": None})


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("backhauld migrate: error:")]
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def new_server(data_dir: Path, key: ServerKey, catalog_url: str, s3: SeaweedS3,
               bucket: str) -> LiveServer:
    return LiveServer(data_dir, key, catalog_url=catalog_url,
                      store_url=f"s3://{bucket}/site", store_endpoint=s3.endpoint,
                      store_region=REGION)


def test_an_install_moves_to_postgresql_and_s3(
        tmp_path: Path, install: Install, server_key: ServerKey, node: SSHD,
        pg: PostgresCluster, s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    src = install.copy_to(tmp_path / "data")
    before = snapshot(src)
    bucket = s3.create_bucket()
    url = pg.create_database()
    env = s3_env(s3, tmp_path)
    done = migrate(*copy_args(src, url, s3, bucket), env=env)
    assert done.returncode == 0, done.stderr
    kept = install.kept()
    assert f"archive {len(kept)}/{len(kept)}" in done.stderr  # progress, on stderr
    assert f"{len(kept)} archives copied" in done.stdout and "0 not copied" in done.stdout
    assert snapshot(src) == before  # the source is not touched
    # Every kept archive and its index, under the same names, in the bucket.
    stored = keys(s3, bucket)
    assert all(k.startswith("site/") for k in stored)
    assert sorted(k.rsplit("/", 1)[1] for k in stored if k.endswith(".tar.gz")) == \
        sorted(b["file_name"] for b in kept)
    assert sorted(k.rsplit("/", 1)[1] for k in stored if k.endswith(".index")) == \
        sorted(b["file_name"].removesuffix(".tar.gz") + ".index" for b in kept)
    # The scheduler's jobs came along: one per target, with its next run.
    jobs = set(pg_ids(url, "SELECT id FROM apscheduler_jobs"))
    assert {f"target:{tid}" for tid in install.trees} <= jobs

    for k, v in env.items():
        monkeypatch.setenv(k, v)
    srv = new_server(src, server_key, url, s3, bucket)
    srv.start(timeout=90)
    try:
        assert "job store reconciled" not in srv.log()  # nothing was missing
        for tid, made in install.backups.items():
            now = srv.api("GET", f"/targets/{tid}/backups").json()["backups"]
            assert [(b["id"], b["sha256"], b["retained"]) for b in now] == \
                [(b["id"], b["sha256"], b["retained"]) for b in made]
            target = srv.api("GET", f"/targets/{tid}").json()["target"]
            assert target["next_run_at"] == install.targets[tid]["next_run_at"]
        for b in kept:  # every archive downloads with its sha256 intact
            out = tmp_path / f"a{b['id']}.tar.gz"
            got = client(srv, "download", str(b["id"]), "-o", str(out))
            assert got.exit_code == 0, got.output
            assert hashlib.sha256(out.read_bytes()).hexdigest() == b["sha256"]
        # ls and a single-file restore read the migrated index.
        tid = max(install.trees)
        newest = next(b for b in install.backups[tid] if b["retained"])
        listed = client(srv, "ls", str(newest["id"]))
        assert listed.exit_code == 0 and "notes.txt" in listed.output, listed.output
        dest = tmp_path / "restored"
        got = client(srv, "restore", str(newest["id"]), "--to", str(dest), "--only", "notes.txt")
        assert got.exit_code == 0, got.output
        assert [p.name for p in dest.rglob("*") if p.is_file()] == ["notes.txt"]
        assert next(dest.rglob("notes.txt")).read_text() == \
            (install.trees[tid] / "notes.txt").read_text()
        # The next backup on the new install builds on the migrated index,
        # and gets ids past the copied ones (the sequences were set).
        (install.trees[tid] / "notes.txt").write_text("after the move\n")
        r = srv.api("POST", f"/targets/{tid}/run", params={"wait": "true"}).json()["run"]
        assert r["status"] == "success" and r["transfer"] == "delta", r
        assert r["id"] > install.max_run_id
        assert r["archive_id"] > max(b["id"] for bs in install.backups.values() for b in bs)
        nodes = client(srv, "nodes")
        assert nodes.exit_code == 0 and str(node.port) in nodes.output
    finally:
        srv.stop()


def test_a_target_without_jobs_is_scheduled_at_start(
        tmp_path: Path, install: Install, server_key: ServerKey, pg: PostgresCluster,
        s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    """An install whose job store is gone (jobs.db deleted) still comes out
    with every target scheduled: backhauld rebuilds the jobs from the targets."""
    src = install.copy_to(tmp_path / "data")
    (src / "jobs.db").unlink()
    bucket, url = s3.create_bucket(), pg.create_database()
    env = s3_env(s3, tmp_path)
    done = migrate(*copy_args(src, url, s3, bucket), env=env)
    assert done.returncode == 0, done.stderr
    assert "0 scheduler jobs" in done.stdout
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    srv = new_server(src, server_key, url, s3, bucket)
    srv.start(timeout=90)
    try:
        jobs = set(pg_ids(url, "SELECT id FROM apscheduler_jobs"))
        assert {f"target:{tid}" for tid in install.trees} <= jobs
        for tid in install.trees:
            assert srv.api("GET", f"/targets/{tid}").json()["target"]["next_run_at"]
    finally:
        srv.stop()


def test_an_archive_that_does_not_match_is_reported_and_not_copied(
        tmp_path: Path, install: Install, server_key: ServerKey, pg: PostgresCluster,
        s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    src = install.copy_to(tmp_path / "data")
    tid = min(install.trees)
    bad = next(b for b in install.backups[tid] if b["retained"])  # the newest
    path = next((src / "archives").rglob(bad["file_name"]))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    bucket, url = s3.create_bucket(), pg.create_database()
    env = s3_env(s3, tmp_path)
    done = migrate(*copy_args(src, url, s3, bucket), env=env)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"archive {bad['id']} not copied: sha256 mismatch" in done.stderr
    stored = keys(s3, bucket)
    assert not any(k.endswith(bad["file_name"]) for k in stored)
    assert len([k for k in stored if k.endswith(".tar.gz")]) == len(install.kept()) - 1
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    srv = new_server(src, server_key, url, s3, bucket)
    srv.start(timeout=90)
    try:
        listed = {b["id"]: b for b in srv.api("GET", f"/targets/{tid}/backups").json()["backups"]}
        assert listed[bad["id"]]["state"] == "corrupt" and not listed[bad["id"]]["retained"]
        assert "not migrated" in listed[bad["id"]]["verify_error"]
        # the target's next backup is a full one: the newest archive is gone
        r = srv.api("POST", f"/targets/{tid}/run", params={"wait": "true"}).json()["run"]
        assert r["status"] == "success" and r["transfer"] == "full", r
    finally:
        srv.stop()


def test_resume_finishes_an_interrupted_copy_and_refuses_what_is_not_its_own(
        tmp_path: Path, install: Install, server_key: ServerKey, pg: PostgresCluster,
        s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> None:
    src = install.copy_to(tmp_path / "data")
    bucket = s3.create_bucket()
    env = s3_env(s3, tmp_path)
    first = pg.create_database()
    assert migrate(*copy_args(src, first, s3, bucket), env=env).returncode == 0
    # An interruption after the archives, before the catalog: an empty
    # database and a bucket that holds every archive but one.
    gone = next(k for k in keys(s3, bucket) if k.endswith(install.kept()[0]["file_name"]))
    s3.client().delete_object(Bucket=bucket, Key=gone)
    # ... and the upload a killed copy left unfinished
    dead = s3.client().create_multipart_upload(Bucket=bucket, Key=gone)["UploadId"]
    url = pg.create_database()
    refused = migrate(*copy_args(src, url, s3, bucket), env=env)
    one_error_line(refused, "already holds", "--resume")
    again = migrate(*copy_args(src, url, s3, bucket, "--resume"), env=env)
    assert again.returncode == 0, again.stderr
    n = len(install.kept())
    assert "1 archives copied" in again.stdout and f"{n - 1} already there" in again.stdout
    assert again.stderr.count("skipped") == n - 1
    uploads = s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads") or []
    assert dead not in {u["UploadId"] for u in uploads}
    assert "removed the unfinished upload" in again.stderr
    # Resuming over a complete copy is harmless; a plain run is refused.
    assert migrate(*copy_args(src, url, s3, bucket, "--resume"), env=env).returncode == 0
    one_error_line(migrate(*copy_args(src, url, s3, bucket), env=env), "already holds rows")
    assert pg_ids(url, "SELECT count(*) FROM archives")[0] == \
        sum(len(bs) for bs in install.backups.values())

    # Once a backhauld made a backup on the copy, it is no longer resumable.
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    srv = new_server(src, server_key, url, s3, bucket)
    srv.start(timeout=90)
    try:
        tid = max(install.trees)
        (install.trees[tid] / "notes.txt").write_text("used since\n")
        r = srv.api("POST", f"/targets/{tid}/run", params={"wait": "true"}).json()["run"]
        assert r["status"] == "success", r
    finally:
        srv.stop()
    used = migrate(*copy_args(src, pg.create_database(), s3, bucket, "--resume"), env=env)
    one_error_line(used, "does not list")  # the new archive is not the source's
    one_error_line(migrate(*copy_args(src, url, s3, s3.create_bucket(), "--resume"), env=env),
                   "used it since")


def test_what_the_copy_refuses(tmp_path: Path, install: Install, server_key: ServerKey,
                               pg: PostgresCluster, s3: SeaweedS3) -> None:
    src = install.copy_to(tmp_path / "data")
    env = s3_env(s3, tmp_path)
    bucket = s3.create_bucket()
    dead = f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/nowhere"
    line = one_error_line(migrate(*copy_args(src, dead, s3, bucket), env=env),
                          "cannot use the catalog database")
    assert "secret" not in line
    one_error_line(migrate(*copy_args(src, pg.create_database(), s3, "no-such-bucket"),
                           env=env), "does not exist")
    wrong = {**env, "AWS_SECRET_ACCESS_KEY": "0" * 40}
    one_error_line(migrate(*copy_args(src, pg.create_database(), s3, bucket), env=wrong),
                   "refused the credentials")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error_line(migrate(*copy_args(empty, pg.create_database(), s3, bucket), env=env),
                   "not a backhaul install")
    one_error_line(migrate(*copy_args(tmp_path / "missing", pg.create_database(), s3, bucket),
                           env=env), "not a directory")
    one_error_line(migrate("--from-data-dir", str(src), "--catalog-url", pg.create_database(),
                           env=env), "--store-url")
    # a backhauld running on the destination database
    taken = pg.create_database()
    other = LiveServer(tmp_path / "other", server_key, catalog_url=taken)
    other.start(timeout=90)
    try:
        one_error_line(migrate(*copy_args(src, taken, s3, bucket), env=env),
                       "another backhauld already runs the scheduler")
    finally:
        other.stop()
    # a backhauld running on the source
    srv = LiveServer(src, server_key)
    srv.start(timeout=90)
    try:
        one_error_line(migrate(*copy_args(src, pg.create_database(), s3, bucket), env=env),
                       "a backhauld is running on")
    finally:
        srv.stop()
    assert keys(s3, bucket) == set()  # the refused copies wrote nothing
    # The plain schema upgrade keeps its contract: a store option without
    # --from-data-dir is a usage error, and the old form still works.
    usage = migrate("--store-url", f"s3://{bucket}/x", "--data-dir", str(tmp_path / "x"))
    assert usage.returncode == 2 and "--from-data-dir" in usage.stderr
    plain = migrate("--data-dir", str(src))
    assert plain.returncode == 0 and "nothing to do" in plain.stdout, plain.stderr


def test_every_option_of_migrate_is_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    shown = migrate("--help")
    assert shown.returncode == 0
    options = set(re.findall(r"(--[a-z][a-z-]+)", shown.stdout)) - {"--help"}
    assert {"--from-data-dir", "--store-url", "--resume"} <= options
    missing = [o for o in sorted(options) if f"{o}" not in readme.split("## Monitoring")[0]]
    assert not missing, f"backhauld migrate options missing from README.md: {missing}"
