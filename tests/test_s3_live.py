"""A live backhauld on PostgreSQL + S3 (a real SeaweedFS on loopback): the
whole flow as on the default deployment, a restart, a kill -9 mid-transfer,
and the store configurations it must refuse at start (one line, exit 1)."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
from conftest import LiveServer

from fixtures.postgres import PostgresCluster
from fixtures.seaweed import SeaweedS3
from fixtures.server import free_port
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey


def keys(s3: SeaweedS3, bucket: str) -> set[str]:
    got = s3.client().list_objects_v2(Bucket=bucket)
    return {o["Key"] for o in got.get("Contents", [])}


def uploads(s3: SeaweedS3, bucket: str) -> list[dict]:
    return s3.client().list_multipart_uploads(Bucket=bucket).get("Uploads", []) or []


def server_on(tmp_path: Path, key: ServerKey, pg: PostgresCluster, s3: SeaweedS3,
              bucket: str, **settings: object) -> LiveServer:
    return LiveServer(tmp_path / "srv", key, catalog_url=pg.create_database(),
                      store_url=f"s3://{bucket}/site-a", store_endpoint=s3.endpoint,
                      store_region="us-east-1", **settings)


def download(srv: LiveServer, archive: dict) -> bytes:
    r = srv.api("GET", f"/archives/{archive['id']}/download")
    assert r.status_code == 200, r.text
    assert int(r.headers["content-length"]) == archive["size"]
    assert hashlib.sha256(r.content).hexdigest() == archive["sha256"]
    return r.content


def members(data: bytes) -> dict[str, bytes]:
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for m in tar:
            if m.isfile():
                f = tar.extractfile(m)
                assert f is not None
                out[m.name] = f.read()
    return out


def test_the_whole_flow_on_postgresql_and_s3(tmp_path: Path, server_key: ServerKey,
                                             node: SSHD, pg: PostgresCluster,
                                             s3_env: SeaweedS3) -> None:
    bucket = s3_env.create_bucket()
    src = tmp_path / "src"
    src.mkdir()
    for i in range(4):
        # 12 MiB reused by each delta: copied by the store (UploadPartCopy)
        (src / f"f{i}.bin").write_bytes(os.urandom(3 * 2**20))
    (src / "notes.txt").write_text("first\n")
    srv = server_on(tmp_path, server_key, pg, s3_env, bucket)
    srv.start()
    try:
        t = srv.register(node, src, every=600, keep=2)
        srv.wait_for(lambda: any(r["status"] == "success" for r in srv.runs(t["id"])),
                     60, "the first (full) backup")
        for text in ("second\n", "third\n"):  # two deltas; the third archive rotates one
            (src / "notes.txt").write_text(text)
            r = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"})
            assert r.json()["run"]["status"] == "success", r.text
            assert r.json()["run"]["transfer"] == "delta", r.text
        runs = [r for r in srv.runs(t["id"]) if r["status"] == "success"]
        assert sorted(r["transfer"] for r in runs) == ["delta", "delta", "full"]
        assert srv.log().count("bytes copied by the store") == 2, srv.log()[-3000:]
        made = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
        backups = [b for b in made if b["retained"]]
        rotated = [b for b in made if not b["retained"]]
        assert len(backups) == 2 and len(rotated) == 1  # keep=2: the full one rotated out
        gone = srv.api("GET", f"/archives/{rotated[0]['id']}/download")
        assert gone.status_code == 410, gone.text
        # The archives and their indexes are objects in the bucket (the rotated
        # one deleted), nothing on disk.
        stored = keys(s3_env, bucket)
        assert all(k.startswith("site-a/") for k in stored), stored
        names = {b["file_name"] for b in backups}
        assert {k.rsplit("/", 1)[1] for k in stored if k.endswith(".tar.gz")} == names
        assert {k.rsplit("/", 1)[1] for k in stored if k.endswith(".index")} == \
            {n[:-len(".tar.gz")] + ".index" for n in names}
        assert not list((srv.data_dir / "archives").rglob("*.tar.gz"))
        newest = members(download(srv, backups[0]))
        assert newest[f"{src.name}/notes.txt"] == b"third\n"
        assert newest[f"{src.name}/f2.bin"] == (src / "f2.bin").read_bytes()
        # verify reads every archive through the store
        v = srv.api("POST", "/archives/verify", json={"all": True}).json()
        assert v["corrupt"] == 0 and {c["status"] for c in v["results"]} >= {"ok"}
        # ls and a selective extract: ranged reads of the members
        ls = srv.api("GET", f"/archives/{backups[0]['id']}/entries").json()
        assert any(e["path"].endswith("notes.txt") for e in ls["entries"]), ls
        ex = srv.api("POST", f"/archives/{backups[1]['id']}/extract",
                     json={"only": ["notes.txt"]})
        assert ex.status_code == 200, ex.text
        assert members(ex.content) == {f"{src.name}/notes.txt": b"second\n"}
        # restore onto the node streams the object over SSH
        dest = tmp_path / "restored"
        res = srv.api("POST", f"/archives/{backups[0]['id']}/restore",
                      json={"host": node.host, "port": node.port, "user": node.user,
                            "dest": str(dest)})
        assert res.status_code == 200, res.text
        assert (dest / "notes.txt").read_text() == "third\n"
        assert (dest / "f0.bin").read_bytes() == (src / "f0.bin").read_bytes()
        metrics = httpx.get(srv.url + "/metrics", timeout=30,
                            headers={"Authorization": f"Bearer {srv.token}"}).text
        assert "backhaul_up" in metrics
        assert not any(line.startswith("backhaul_store_free_bytes ")
                       for line in metrics.splitlines())
        assert srv.stop() == 0
    finally:
        srv.stop()

    srv.start()  # a restart finds the target, its schedule and its archives
    try:
        again = [b for b in srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
                 if b["retained"]]
        assert [b["id"] for b in again] == [b["id"] for b in backups]
        for b in again:
            download(srv, b)
        target = srv.api("GET", f"/targets/{t['id']}").json()["target"]
        assert target["every_minutes"] == 600 and target["next_run_at"]
        (src / "notes.txt").write_text("fourth\n")
        r = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"})
        assert r.json()["run"]["transfer"] == "delta", r.text
    finally:
        srv.stop()


def test_kill_9_mid_transfer_on_s3(tmp_path: Path, server_key: ServerKey, node: SSHD,
                                   pg: PostgresCluster, s3_env: SeaweedS3) -> None:
    """A crash leaves no listed partial archive, and the next start aborts the
    multipart upload the dead server left."""
    bucket = s3_env.create_bucket()
    big = tmp_path / "big"
    big.mkdir()
    for i in range(40):
        (big / f"chunk-{i}").write_bytes(os.urandom(1024 * 1024))
    srv = server_on(tmp_path, server_key, pg, s3_env, bucket, bwlimit="8MiB")
    srv.start()
    try:
        t = srv.register(node, big, every=60)

        def a_part_was_sent() -> bool:
            ups = uploads(s3_env, bucket)
            return bool(ups) and bool(s3_env.client().list_parts(
                Bucket=bucket, Key=ups[0]["Key"], UploadId=ups[0]["UploadId"]).get("Parts"))

        srv.wait_for(a_part_was_sent, 60, "a multipart upload with a part")
        srv.kill()
        dead = {u["UploadId"] for u in uploads(s3_env, bucket)}
        assert dead  # the dead server's upload is still there
        srv.start()
        # aborted by the start-up sweep (a catch-up run may have begun its own)
        assert not dead & {u["UploadId"] for u in uploads(s3_env, bucket)}
        killed = next(r for r in srv.runs(t["id"]) if r["status"] == "interrupted")
        r = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"})
        assert r.json()["run"]["status"] in ("success", "unchanged"), r.text
        backups = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
        assert len(backups) == 1 and backups[0]["run_id"] != killed["id"]
        download(srv, backups[0])
        assert uploads(s3_env, bucket) == []
        assert len({k for k in keys(s3_env, bucket) if k.endswith(".tar.gz")}) == 1
    finally:
        srv.stop()


def start_fails(tmp_path: Path, **env: str) -> str:
    """Run backhauld to its exit; returns its stderr."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    full.update({"BACKHAUL_DATA_DIR": str(tmp_path / "data"),
                 "BACKHAUL_LISTEN": f"127.0.0.1:{free_port()}", **env})
    done = subprocess.run([sys.executable, "-m", "orchestrator"], env=full,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("backhauld: error: ") and "Traceback" not in done.stderr
    return lines[0]


def test_a_missing_bucket_is_one_line(tmp_path: Path, s3_env: SeaweedS3) -> None:
    line = start_fails(tmp_path, BACKHAUL_STORE_URL="s3://no-such-bucket-here/x",
                       BACKHAUL_STORE_ENDPOINT=s3_env.endpoint,
                       BACKHAUL_STORE_REGION="us-east-1")
    assert "no-such-bucket-here" in line and "does not exist" in line


def test_wrong_credentials_are_one_line_and_never_shown(tmp_path: Path,
                                                        s3_env: SeaweedS3) -> None:
    bucket = s3_env.create_bucket()
    wrong = "W" + s3_env.secret_key[1:]
    line = start_fails(tmp_path, BACKHAUL_STORE_URL=f"s3://{bucket}/x",
                       BACKHAUL_STORE_ENDPOINT=s3_env.endpoint,
                       BACKHAUL_STORE_REGION="us-east-1", AWS_SECRET_ACCESS_KEY=wrong)
    assert "refused the credentials" in line
    assert wrong not in line and s3_env.secret_key not in line


def test_a_store_url_of_another_kind_is_one_line(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run([sys.executable, "-m", "orchestrator", "--store-url",
                           "ftp://example/x", "--listen", f"127.0.0.1:{port}",
                           "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "s3://BUCKET/PREFIX" in done.stderr and "Traceback" not in done.stderr
