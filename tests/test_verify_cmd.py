"""`backhaul verify` and the scrub re-read stored archives and flag the bad
ones in the catalog: a flipped byte and a truncated file are both found."""

from __future__ import annotations

from pathlib import Path

from conftest import LiveServer, cli

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey


def three_archives(srv: LiveServer, node: SSHD, app: Path) -> tuple[dict, list[dict]]:
    app.mkdir()
    (app / "big.bin").write_bytes(bytes(range(256)) * 400)
    t = srv.register(node, app, every=60)
    srv.wait_for(lambda: [r for r in srv.runs(t["id"]) if r["status"] == "success"], 30,
                 "first backup")
    for i in range(2):
        (app / f"n{i}.txt").write_text("x" * (i + 1))
        run = srv.api("POST", f"/targets/{t['id']}/run", params={"wait": "true"}).json()["run"]
        assert run["status"] == "success", run
    backups = srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
    assert len(backups) == 3
    return t, backups


def file_of(srv: LiveServer, backup: dict) -> Path:
    (path,) = (srv.data_dir / "archives").rglob(backup["file_name"])
    return path


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])


def test_verify_finds_a_flipped_byte_and_a_truncated_file(live: LiveServer, node: SSHD,
                                                          tmp_path: Path) -> None:
    app = tmp_path / "app"
    t, (good, flipped, cut) = three_archives(live, node, app)
    flip_byte(file_of(live, flipped))
    truncate(file_of(live, cut))

    res = cli(live, "verify", str(good["id"]))
    assert res.exit_code == 0, res.output
    assert " ok " in res.stdout.splitlines()[1]

    res = cli(live, "verify", "--all")
    assert res.exit_code == 1, res.output
    assert res.stderr.strip().startswith("2 of 3 archives are corrupt")
    rows = {int(line.split()[0]): line for line in res.stdout.splitlines()[1:]}
    assert "CORRUPT" in rows[flipped["id"]] and "CORRUPT" in rows[cut["id"]]
    assert "CORRUPT" not in rows[good["id"]]

    answer = live.api("POST", "/archives/verify",
                      json={"archive_ids": [flipped["id"], cut["id"]]}).json()
    by_id = {c["archive_id"]: c for c in answer["results"]}
    assert by_id[flipped["id"]]["sha256_ok"] is False
    assert by_id[cut["id"]]["sha256_ok"] is False
    assert by_id[cut["id"]]["structure_ok"] is False
    assert "truncated" in by_id[cut["id"]]["error"] or "corrupt" in by_id[cut["id"]]["error"]
    assert answer["corrupt"] == 2

    # flagged in the catalog and shown by `backups`, never as a good kept archive
    listed = {b["id"]: b for b in
              live.api("GET", f"/targets/{t['id']}/backups").json()["backups"]}
    assert listed[flipped["id"]]["verify_status"] == "corrupt"
    assert listed[good["id"]]["verify_status"] == "ok"
    res = cli(live, "backups", f"{node.user}@{node.host}:{node.port}", str(app))
    assert res.exit_code == 0
    lines = {int(line.split()[-1]): line for line in res.stdout.splitlines()[1:]
             if line.strip() and line.split()[-1].isdigit()}
    assert "kept,CORRUPT" in lines[flipped["id"]] and "kept,CORRUPT" in lines[cut["id"]]
    assert "kept,verified" in lines[good["id"]]
    assert f"archive {cut['id']} is CORRUPT" in res.stderr


def test_verify_refuses_bad_arguments(live: LiveServer) -> None:
    assert cli(live, "verify").exit_code == 2
    assert cli(live, "verify", "1", "--all").exit_code == 2
    res = cli(live, "verify", "999")
    assert res.exit_code == 1 and "[archive_not_found]" in res.stderr


def test_scrub_verifies_kept_archives_and_logs_runs(tmp_path: Path, server_key: ServerKey,
                                                    node: SSHD) -> None:
    # 0.00003 days = 2.6 s between checks of one archive
    srv = LiveServer(tmp_path / "srv", server_key, scrub_every=0.00003).start()
    try:
        t, (_good, flipped, _cut) = three_archives(srv, node, tmp_path / "app")
        flip_byte(file_of(srv, flipped))

        def scrubbed() -> list[dict] | None:
            runs = [r for r in srv.runs(t["id"]) if r["trigger"] == "scrub"]
            return runs if {r["archive_id"] for r in runs} >= {flipped["id"], _good["id"]} \
                and any(r["archive_id"] == flipped["id"] and r["status"] == "failed"
                        for r in runs) else None

        runs = srv.wait_for(scrubbed, 30, "scrub runs")
        bad = next(r for r in runs if r["archive_id"] == flipped["id"])
        assert (bad["status"], bad["error_code"]) == ("failed", "archive_corrupt")
        assert "CORRUPT" in bad["message"]
        assert all(r["status"] == "success" for r in runs if r["archive_id"] == _good["id"])
        listed = {b["id"]: b for b in
                  srv.api("GET", f"/targets/{t['id']}/backups").json()["backups"]}
        assert listed[flipped["id"]]["verify_status"] == "corrupt"
    finally:
        srv.stop()
