"""Delta backups over a real sshd with real tar/gzip/bsdtar: each composed
archive is a complete, standard tar.gz of the tree as it was."""

from __future__ import annotations

import os
import random
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from conftest import Engine, make_engine

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

pytestmark = pytest.mark.timeout(300)


def tree_state(root: Path) -> dict:
    """Everything an archive must reproduce: per entry its type, content or
    link target, file mode and mtime (whole seconds), and which names share
    an inode (hard links)."""
    out: dict = {}
    inodes: dict[int, list[bytes]] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, broot)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            elif stat.S_ISSOCK(st.st_mode):
                continue  # tar leaves sockets out
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), int(st.st_mtime), f.read())
                inodes.setdefault(st.st_ino, []).append(rel)
    links = sorted(sorted(v) for v in inodes.values() if len(v) > 1)
    return {"entries": out, "hardlinks": links}


def extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    with tarfile.open(archive, "r:gz") as tf:
        tf.extractall(dest, filter="data")
    return dest


def check_archive(archive: Path, src: Path, scratch: Path, expected: dict) -> None:
    """The archive against the tree it was taken of: tarfile extraction, GNU
    tar --compare, gzip -t and bsdtar."""
    got = tree_state(extract(archive, scratch) / src.name)
    assert got["entries"].keys() == expected["entries"].keys()
    for k, v in expected["entries"].items():
        assert got["entries"][k] == v, k
    assert got["hardlinks"] == expected["hardlinks"]
    subprocess.run(["gzip", "-t", str(archive)], check=True)
    subprocess.run(["bsdtar", "-tzf", str(archive)], check=True, capture_output=True)
    cmp = subprocess.run(["tar", "--compare", "-zf", str(archive), "-C", str(src.parent)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def newest_archive(eng: Engine, target_id: int) -> Path:
    a = eng.catalog.list_archives(target_id, retained_only=True)[0]
    return eng.store.root / a["file_name"]


@pytest.fixture(params=[True, False], ids=["python3", "coreutils"])
def deng(request: pytest.FixtureRequest, tmp_path: Path, server_key: ServerKey):
    e = make_engine(tmp_path / "data", server_key)
    e.engine.use_node_python = request.param
    yield e
    e.pool.close()
    e.catalog.close()


def _base_tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    rnd = random.Random(1)
    (root / "log.txt").write_bytes(rnd.randbytes(300_000))
    (root / "db.bin").write_bytes(rnd.randbytes(3 * 1024 * 1024))
    for i in range(20):
        (root / "sub" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))


def test_tail_and_blocks_send_only_what_changed(deng: Engine, node: SSHD,
                                                tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = deng.register(node, src)
    first = deng.engine.run(target.id)
    assert (first.status, first.transfer) == ("success", "full"), first.message

    # A log grows by 4 KiB (incompressible): only the tail crosses.
    with open(src / "log.txt", "ab") as f:
        f.write(os.urandom(4096))
    second = deng.engine.run(target.id)
    assert (second.status, second.transfer) == ("success", "delta"), second.message
    assert second.bytes_transferred < 40_000, second
    check_archive(newest_archive(deng, target.id), src, tmp_path / "x2", tree_state(src))

    # 3 blocks rewritten in place in a 3 MiB file: the block hashes and those blocks.
    with open(src / "db.bin", "r+b") as f:
        for off in (10_000, 1_500_000, 3 * 1024 * 1024 - 100):
            f.seek(off)
            f.write(os.urandom(50))
    third = deng.engine.run(target.id)
    assert (third.status, third.transfer) == ("success", "delta"), third.message
    assert third.bytes_transferred < 150_000, third
    check_archive(newest_archive(deng, target.id), src, tmp_path / "x3", tree_state(src))

    # Touched only (mtime): the block hashes prove the content, nothing else moves.
    os.utime(src / "db.bin", (1_600_000_000, 1_600_000_000))
    fourth = deng.engine.run(target.id)
    assert (fourth.status, fourth.transfer) == ("success", "delta"), fourth.message
    check_archive(newest_archive(deng, target.id), src, tmp_path / "x4", tree_state(src))

    unchanged = deng.engine.run(target.id)
    assert (unchanged.status, unchanged.transfer) == ("unchanged", "none")
    assert unchanged.bytes_transferred < 200


def test_full_flag_forces_a_true_full(eng: Engine, node: SSHD, tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src)
    assert eng.engine.run(target.id).transfer == "full"
    assert eng.engine.run(target.id).transfer == "none"
    forced = eng.engine.run(target.id, full=True)
    assert (forced.status, forced.transfer) == ("success", "full"), forced.message
    assert forced.bytes_transferred > 3_000_000
    runs = eng.catalog.list_runs(target_ids=[target.id])
    assert [r["transfer"] for r in runs] == ["full", "none", "full"]


def test_full_every_makes_every_nth_backup_full(eng: Engine, node: SSHD,
                                                tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src)
    eng.engine.full_every = 3
    kinds = []
    for i in range(6):
        (src / "sub" / f"new{i}").write_text(str(i))
        kinds.append(eng.engine.run(target.id).transfer)
    assert kinds == ["full", "delta", "delta", "full", "delta", "delta"]


def test_clock_jumping_back_costs_a_listing_not_a_wrong_archive(eng: Engine, node: SSHD,
                                                                 tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src)
    assert eng.engine.run(target.id).transfer == "full"
    # As if the node's clock had run a day ahead at the last backup: nothing
    # since then looks newer, so the scan's changes come back empty.
    from storage.catalog import targets
    with eng.catalog.engine.begin() as c:
        c.execute(targets.update().where(targets.c.id == target.id)
                  .values(last_node_time=str(int(os.path.getmtime(src)) + 86400) + ".0"))
    (src / "sub" / "f3.txt").write_text("rewritten\n")
    os.unlink(src / "sub" / "f4.txt")
    res = eng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "delta"), res.message
    check_archive(newest_archive(eng, target.id), src, tmp_path / "x", tree_state(src))


def test_a_file_deleted_before_the_fetch_is_a_warning(eng: Engine, node: SSHD,
                                                     tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.transfer import delta as delta_mod
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src)
    assert eng.engine.run(target.id).transfer == "full"
    (src / "sub" / "f5.txt").write_text("changed, then gone\n")
    (src / "sub" / "f6.txt").write_text("changed, then rewritten\n")
    real = delta_mod.DeltaRun.fetch

    def racing_fetch(self, items):  # the node changes between listing and fetch
        if (src / "sub" / "f5.txt").exists():
            os.unlink(src / "sub" / "f5.txt")
            (src / "sub" / "f6.txt").write_text("rewritten again, longer than before\n")
        return real(self, items)

    monkeypatch.setattr(delta_mod.DeltaRun, "fetch", racing_fetch)
    res = eng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "delta"), res.message
    assert "f5.txt" in (res.warnings or "") and "f6.txt" in (res.warnings or "")
    # What the archive holds is the tree as tar read it.
    check_archive(newest_archive(eng, target.id), src, tmp_path / "x", tree_state(src))


def test_rotation_after_twelve_deltas_leaves_ten_independent_archives(
        eng: Engine, node: SSHD, tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src, keep=10)
    assert eng.engine.run(target.id).transfer == "full"
    states = {}
    for i in range(12):
        (src / "sub" / f"gen{i}.txt").write_text(f"generation {i}\n")
        with open(src / "log.txt", "ab") as f:
            f.write(os.urandom(1000))
        res = eng.engine.run(target.id)
        assert (res.status, res.transfer) == ("success", "delta"), res.message
        states[res.archive_id] = tree_state(src)
    kept = eng.catalog.list_archives(target.id, retained_only=True)
    assert len(kept) == 10 and len(eng.archive_files()) == 10
    for a in kept:  # each alone: every other archive (and index) deleted
        alone = tmp_path / f"alone-{a['id']}"
        alone.mkdir()
        shutil.copy(eng.store.root / a["file_name"], alone / "a.tar.gz")
        got = tree_state(extract(alone / "a.tar.gz", alone / "x") / "app")
        assert got == states[a["id"]]


def test_api_and_cli_show_how_each_run_transferred(live, node: SSHD, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from click.testing import CliRunner

    from cli.main import main as cli_main
    src = tmp_path / "app"
    _base_tree(src)
    t = live.register(node, src, every=100000)
    addr = f"{node.user}@{node.host}:{node.port}"
    env = {"BACKHAUL_URL": live.url, "BACKHAUL_TOKEN": live.token}
    runner = CliRunner()

    def cli(*args: str) -> str:
        r = runner.invoke(cli_main, list(args), env=env, catch_exceptions=False)
        assert r.exit_code == 0, r.output
        return r.output

    # Registration starts the first backup: a full one.
    live.wait_for(lambda: [r for r in live.runs(t["id"]) if r["status"] != "running"],
                  30, "the first run")
    (src / "sub" / "f1.txt").write_text("changed\n")
    assert "(delta)" in cli("run", addr, str(src), "--wait")
    cli("run", addr, str(src), "--wait")  # unchanged
    out = json.loads(cli("run", addr, str(src), "--wait", "--full", "--json"))
    assert (out["run"]["status"], out["run"]["transfer"]) == ("success", "full")
    runs = live.runs(t["id"])
    assert [r["transfer"] for r in runs] == ["full", "none", "delta", "full"]
    hist = json.loads(cli("history", addr, str(src), "--json"))
    assert [r["transfer"] for r in hist["runs"]] == ["full", "none", "delta", "full"]
    assert "(full)" in cli("run", addr, str(src), "--wait", "--full")
    table = cli("history", addr, str(src))
    assert "TRANSFER" in table and "delta" in table


@pytest.mark.parametrize("python", [True, False], ids=["python3", "coreutils"])
def test_restricted_key_allows_every_delta_command(eng: Engine, server_key: ServerKey,
                                                   tmp_path: Path, python: bool) -> None:
    """A `pubkey --restricted` key runs scans, fetches and both refinements:
    what changes per run travels on stdin, so the hash list stays fixed."""
    from orchestrator import remote
    src = tmp_path / "app"
    _base_tree(src)
    eng.engine.use_node_python = python
    line = remote.restricted_key_line(server_key.public_line, [str(src)])
    with SSHD(tmp_path / "rnode", [line], host="127.0.0.5") as sshd:
        target = eng.register(sshd, src)
        assert eng.engine.run(target.id).transfer == "full"
        with open(src / "log.txt", "ab") as f:
            f.write(os.urandom(5000))  # tail
        with open(src / "db.bin", "r+b") as f:
            f.seek(2_000_000)
            f.write(os.urandom(300))  # blocks
        (src / "sub" / "new.txt").write_text("new\n")  # fetch
        os.unlink(src / "sub" / "f2.txt")
        res = eng.engine.run(target.id)
        assert (res.status, res.transfer) == ("success", "delta"), res.message
        assert res.bytes_transferred < 100_000
        check_archive(newest_archive(eng, target.id), src, tmp_path / "x", tree_state(src))
        assert eng.engine.run(target.id, full=True).transfer == "full"


def test_an_edited_text_file_sends_its_changed_chunks(deng: Engine, node: SSHD,
                                                      tmp_path: Path) -> None:
    """python3 on the node: a line inserted at the top and one edited in the
    middle of a 60 KB text file cost those chunks; coreutils only: the file."""
    src = tmp_path / "app"
    src.mkdir()
    lines = [f"line {i} {os.urandom(12).hex()}\n" for i in range(1200)]
    (src / "conf.txt").write_text("".join(lines))
    target = deng.register(node, src)
    assert deng.engine.run(target.id).transfer == "full"
    lines[600] = "an edited line in the middle\n"
    (src / "conf.txt").write_text("# a new first line\n" + "".join(lines))
    res = deng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "delta"), res.message
    if deng.engine.use_node_python:
        assert res.bytes_transferred < 6000, res
    else:
        assert res.bytes_transferred > 20_000, res
    check_archive(newest_archive(deng, target.id), src, tmp_path / "x", tree_state(src))


def test_a_missing_previous_archive_means_a_full_not_a_failure(eng: Engine, node: SSHD,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src)
    assert eng.engine.run(target.id).transfer == "full"
    for p in eng.archive_files():
        p.unlink()  # lost behind the server's back
    (src / "sub" / "f1.txt").write_text("changed\n")
    res = eng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "full"), res.message
    check_archive(newest_archive(eng, target.id), src, tmp_path / "x", tree_state(src))


def test_a_socket_in_the_tree_does_not_defeat_the_scan(eng: Engine, node: SSHD,
                                                       tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """tar leaves sockets out; so do the scan and the listing, so the
    rebuilt listing still adds up and no whole listing is fetched."""
    import logging
    import socket
    src = tmp_path / "app"
    _base_tree(src)
    sock = socket.socket(socket.AF_UNIX)
    (src / "run").mkdir()
    sock.bind(str(src / "run" / "app.sock"))  # its directory does not change below
    # older than the 1 s overlap of the next scan, so only the listing knows it
    os.utime(src / "run", (1_600_000_000, 1_600_000_000))
    import time
    time.sleep(1.2)
    try:
        target = eng.register(node, src)
        assert eng.engine.run(target.id).transfer == "full"
        (src / "sub" / "f1.txt").write_text("changed\n")
        with caplog.at_level(logging.INFO, logger="orchestrator.backup"):
            res = eng.engine.run(target.id)
        assert (res.status, res.transfer) == ("success", "delta"), res.message
        assert "fetching the whole listing" not in caplog.text
        check_archive(newest_archive(eng, target.id), src, tmp_path / "x", tree_state(src))
    finally:
        sock.close()


def test_a_delta_that_costs_about_a_full_becomes_a_full(eng: Engine, node: SSHD,
                                                        tmp_path: Path) -> None:
    src = tmp_path / "app"
    _base_tree(src)
    target = eng.register(node, src)
    assert eng.engine.run(target.id).transfer == "full"
    os.unlink(src / "db.bin")  # 3 of the tree's 3.3 MiB come back under a new name
    (src / "db2.bin").write_bytes(os.urandom(3 * 1024 * 1024))
    res = eng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "full"), res.message
    check_archive(newest_archive(eng, target.id), src, tmp_path / "x", tree_state(src))
