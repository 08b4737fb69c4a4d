"""The backup engine over a real sshd, real SQLite and real tar/gzip."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest
from conftest import Engine, address, make_engine

from fixtures.sshd.keys import generate_ed25519
from fixtures.sshd.launcher import SSHD
from orchestrator.errors import ConnectionLost, StreamIncomplete
from orchestrator.ssh import ServerKey


def make_tree(root: Path) -> Path:
    """A tree with the awkward cases: nesting, empty dirs, symlinks, odd names."""
    root.mkdir(parents=True)
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "sub" / "deeper" / "data.bin").write_bytes(os.urandom(50_000))
    (root / "plain.txt").write_text("hello\n" * 100)
    (root / "with space 'quote' \"dq\" $(touch x) ; semi.txt").write_text("odd name\n")
    (root / "ünïcödé-名前.txt").write_text("unicode\n")
    os.makedirs(root / "exec", exist_ok=True)
    script = root / "exec" / "run.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o750)
    (root / "private.key").write_text("secret")
    (root / "private.key").chmod(0o600)
    os.symlink("plain.txt", root / "link-to-plain")
    os.symlink("sub/deeper", root / "link-to-dir")
    os.symlink("does-not-exist", root / "dangling")
    # a name that is not valid UTF-8
    with open(os.path.join(os.fsencode(root), b"latin1-\xe9t\xe9.txt"), "wb") as f:
        f.write(b"not utf-8 name\n")
    return root


def snapshot(root: Path) -> dict[bytes, tuple]:
    """(type, mode, content or link target) of every entry, keyed by bytes path."""
    out: dict[bytes, tuple] = {}
    broot = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, broot)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                with open(full, "rb") as f:
                    out[rel] = ("file", stat.S_IMODE(st.st_mode), f.read())
    return out


def extract(archive: Path, dest: Path) -> Path:
    dest.mkdir()
    with tarfile.open(archive, "r:gz") as tf:
        tf.extractall(dest, filter="data")
    return dest


def test_archive_extracts_to_the_same_tree(eng: Engine, node: SSHD, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "app")
    target = eng.register(node, src)

    result = eng.engine.run(target.id)

    assert result.status == "success", result.message
    archives = eng.catalog.list_archives(target.id)
    assert len(archives) == 1
    file = eng.store.path_of(archives[0]["file_name"])
    assert file.stat().st_size == archives[0]["size"]
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    subprocess.run(["gzip", "-t", str(file)], check=True)
    listing = subprocess.run(["tar", "tzf", str(file)], check=True, capture_output=True).stdout
    assert b"app/sub/deeper/data.bin" in listing
    out = extract(file, tmp_path / "restored")
    # tarfile's data filter clears group/other write bits and the exec bits of
    # non-executable files only; our tree has none of those, so modes match.
    assert snapshot(out / "app") == snapshot(src)


def test_unchanged_tree_transfers_no_archive(eng: Engine, node: SSHD, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "app")
    target = eng.register(node, src)
    first = eng.engine.run(target.id)
    assert first.status == "success"

    second = eng.engine.run(target.id)

    assert second.status == "unchanged"
    assert second.archive_id is None
    # the fingerprint line only: 64 hex chars + "  -\n"
    assert second.bytes_transferred < 100
    assert len(eng.catalog.list_archives(target.id)) == 1
    assert len(eng.archive_files()) == 1


@pytest.mark.parametrize("change", ["touch", "add", "delete", "chmod", "append", "mkdir"])
def test_any_change_makes_a_new_archive(eng: Engine, node: SSHD, tmp_path: Path,
                                        change: str) -> None:
    src = make_tree(tmp_path / "app")
    target = eng.register(node, src)
    assert eng.engine.run(target.id).status == "success"
    victim = src / "plain.txt"
    if change == "touch":
        os.utime(victim, ns=(time.time_ns(), victim.stat().st_mtime_ns + 1_000_000))
    elif change == "add":
        (src / "sub" / "new.txt").write_text("new")
    elif change == "delete":
        victim.unlink()
    elif change == "chmod":
        victim.chmod(0o640)
    elif change == "append":
        # same mtime afterwards: only size and ctime tell
        st = victim.stat()
        with open(victim, "a") as f:
            f.write("x")
        os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif change == "mkdir":
        (src / "empty" / "child").mkdir()

    result = eng.engine.run(target.id)

    assert result.status == "success"
    assert len(eng.catalog.list_archives(target.id)) == 2


def test_rotation_keeps_the_ten_newest(eng: Engine, node: SSHD, tmp_path: Path) -> None:
    src = tmp_path / "app"
    src.mkdir()
    target = eng.register(node, src, keep=10)
    made = []
    for i in range(12):
        (src / f"f{i}").write_text(str(i))
        r = eng.engine.run(target.id)
        assert r.status == "success", r.message
        made.append(r.archive_id)

    files = eng.archive_files()
    assert len(files) == 10
    every = eng.catalog.list_archives(target.id)
    assert len(every) == 12
    retained = [a["id"] for a in every if a["deleted_at"] is None]
    assert sorted(retained) == sorted(made[2:])
    assert {eng.store.path_of(a["file_name"]) for a in every if a["deleted_at"] is None} \
        == set(files)
    assert eng.catalog.count_runs(target.id) == 12


def test_hot_backup_while_a_writer_changes_the_tree(eng: Engine, node: SSHD,
                                                   tmp_path: Path) -> None:
    src = tmp_path / "app"
    src.mkdir()
    for i in range(300):
        (src / f"seed-{i}.dat").write_bytes(os.urandom(20_000))
    target = eng.register(node, src)
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            (src / f"new-{i}.log").write_bytes(os.urandom(5000))
            with open(src / f"seed-{i % 300}.dat", "ab") as f:
                f.write(os.urandom(3000))
            (src / f"new-{i - 5}.log").unlink(missing_ok=True)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        results = [eng.engine.run(target.id) for _ in range(3)]
    finally:
        stop.set()
        t.join()

    for r in results:
        assert r.status == "success", r.message
    for a in eng.catalog.list_archives(target.id):
        f = eng.store.path_of(a["file_name"])
        subprocess.run(["gzip", "-t", str(f)], check=True)
        with tarfile.open(f, "r:gz") as tf:
            assert any(m.name.startswith("app/seed-") for m in tf.getmembers())
    assert not eng.temp_files()


def _assert_failed_cleanly(eng: Engine, target_id: int, result, code: str) -> None:
    assert result.status == "failed"
    assert result.error_code == code, result.message
    assert eng.catalog.list_archives(target_id) == []
    assert eng.archive_files() == []
    assert eng.temp_files() == []
    run = eng.catalog.list_runs(target_ids=[target_id])[0]
    assert (run["status"], run["error_code"]) == ("failed", code)
    assert run["message"]


def test_missing_path_fails_with_path_not_found(eng: Engine, node: SSHD, tmp_path: Path) -> None:
    target = eng.register(node, tmp_path / "nope")
    _assert_failed_cleanly(eng, target.id, eng.engine.run(target.id), "path_not_found")


def test_node_down_fails_unreachable(eng: Engine, own_node: SSHD, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "app")
    target = eng.register(own_node, src)
    own_node.stop()
    result = eng.engine.run(target.id)
    _assert_failed_cleanly(eng, target.id, result, "unreachable")
    assert result.node_unreachable
    assert eng.catalog.get_node(target.node.id).reachable is False


def test_wrong_client_key_fails_auth(eng: Engine, own_node: SSHD, tmp_path: Path) -> None:
    other = generate_ed25519(tmp_path / "other_key")
    own_node.set_authorized_keys(other)
    target = eng.register(own_node, make_tree(tmp_path / "app"))
    _assert_failed_cleanly(eng, target.id, eng.engine.run(target.id), "auth_failed")


def test_changed_host_key_is_refused_and_never_replaced(eng: Engine, own_node: SSHD,
                                                        tmp_path: Path) -> None:
    src = make_tree(tmp_path / "app")
    target = eng.register(own_node, src)
    assert eng.engine.run(target.id).status == "success"
    pinned = eng.catalog.get_node(target.node.id).host_key_fingerprint
    assert pinned == own_node.host_key_fingerprint
    (src / "changed").write_text("x")
    own_node.regenerate_host_key()
    own_node.restart()
    eng.pool.close_idle()
    eng.pool.discard(address(own_node))

    result = eng.engine.run(target.id)

    assert result.status == "failed" and result.error_code == "host_key_mismatch"
    assert pinned in result.message and own_node.host_key_fingerprint in result.message
    assert eng.catalog.get_node(target.node.id).host_key_fingerprint == pinned
    assert len(eng.catalog.list_archives(target.id)) == 1
    assert eng.temp_files() == []


def test_expected_fingerprint_at_registration_is_enforced(eng: Engine, node: SSHD,
                                                          tmp_path: Path) -> None:
    n = eng.catalog.ensure_node(node.user, node.host, node.port)
    eng.catalog.set_host_key_expected(n.id, "SHA256:" + "A" * 43)
    target = eng.catalog.add_target(n.id, str(make_tree(tmp_path / "app")), 5, 10)
    _assert_failed_cleanly(eng, target.id, eng.engine.run(target.id), "host_key_mismatch")


@pytest.mark.parametrize("evil", [
    "{canary_dir}/x; touch {canary}",
    "{canary_dir}/$(touch {canary})",
    "{canary_dir}/`touch {canary}`",
    "{canary_dir}/x' ; touch '{canary}",
    "{canary_dir}/x\" && touch \"{canary}",
    "{canary_dir}/a|touch {canary}",
])
def test_shell_metacharacters_in_path_run_nothing(eng: Engine, node: SSHD, tmp_path: Path,
                                                  evil: str) -> None:
    canary = tmp_path / "PWNED"
    path = evil.format(canary_dir=tmp_path, canary=canary)
    target = eng.register(node, path)
    result = eng.engine.run(target.id)
    assert result.status == "failed" and result.error_code == "path_not_found"
    assert not canary.exists()


def test_a_path_with_metacharacters_that_exists_is_backed_up(eng: Engine, node: SSHD,
                                                             tmp_path: Path) -> None:
    # a name holds no "/": the injected commands would run in the login dir
    home = Path(pwd.getpwnam(node.user).pw_dir)
    canary = home / "PWNED-backhaul-test"
    src = tmp_path / f"app; touch {canary.name} $(touch {canary.name}) `touch {canary.name}`"
    src.mkdir()
    (src / "f").write_text("data")
    target = eng.register(node, src)
    result = eng.engine.run(target.id)
    assert result.status == "success", result.message
    assert not canary.exists()
    with tarfile.open(eng.archive_files()[0], "r:gz") as tf:
        assert f"{src.name}/f" in tf.getnames()


def _big_tree(root: Path, mib: int) -> Path:
    root.mkdir()
    for i in range(mib):
        (root / f"chunk-{i}.bin").write_bytes(os.urandom(1024 * 1024))
    return root


def test_lost_channel_mid_stream_lists_nothing(eng: Engine, own_node: SSHD,
                                               tmp_path: Path) -> None:
    src = _big_tree(tmp_path / "big", 200)
    target = eng.register(own_node, src)
    partial_seen = threading.Event()

    def cut_when_streaming() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if eng.temp_files():
                for p in eng.temp_files():
                    if p.stat().st_size > 1024 * 1024:
                        partial_seen.set()
                        own_node.kill_sessions()
                        return
            time.sleep(0.01)

    killer = threading.Thread(target=cut_when_streaming)
    killer.start()
    result = eng.engine.run(target.id)
    killer.join()

    assert partial_seen.is_set(), "the stream never started"
    _assert_failed_cleanly(eng, target.id, result, result.error_code)
    assert result.error_code in ("remote_command_failed", "unreachable")


def test_stream_without_exit_status_is_never_trusted(node: SSHD, server_key: ServerKey,
                                                     tmp_path: Path) -> None:
    eng = make_engine(tmp_path / "d", server_key)
    try:
        n = eng.catalog.ensure_node(node.user, node.host, node.port)
        conn = eng.pool.connection(address(node))
        got = bytearray()

        def sink(data: bytes) -> None:
            got.extend(data)
            if len(got) > 100_000:
                conn.transport.close()  # the transport dies mid-stream

        with pytest.raises((StreamIncomplete, ConnectionLost)):
            conn.exec("head -c 50000000 /dev/zero", sink=sink, what="stream")
        assert n.id
    finally:
        eng.pool.close()
        eng.catalog.close()


def test_flood_of_stderr_does_not_stall_the_stream(node: SSHD, server_key: ServerKey,
                                                   tmp_path: Path) -> None:
    eng = make_engine(tmp_path / "d", server_key, io_timeout=30)
    try:
        eng.catalog.ensure_node(node.user, node.host, node.port)
        conn = eng.pool.connection(address(node))
        out = bytearray()
        # 12 MB of stderr interleaved with 12 MB of stdout, as a chatty tar would
        cmd = ("for i in $(seq 1 12); do head -c 1000000 /dev/zero | tr '\\0' e >&2; "
               "head -c 1000000 /dev/zero; done; exit 1")
        res = conn.exec(cmd, sink=out.extend, what="chatty", stderr_limit=64 * 1024)
        assert res.exit_status == 1
        assert len(out) == 12_000_000
        assert res.stderr_bytes == 12_000_000
        assert res.stderr_truncated and len(res.stderr) < 70_000
    finally:
        eng.pool.close()
        eng.catalog.close()


def test_connection_is_reused_across_runs(eng: Engine, node: SSHD, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "app")
    t1 = eng.register(node, src)
    t2 = eng.register(node, src / "sub")
    eng.engine.run(t1.id)
    conn = eng.pool.connection(address(node))
    eng.engine.run(t2.id)
    eng.engine.run(t1.id)
    assert eng.pool.connection(address(node)) is conn
    assert eng.pool.open_count() == 1


def test_dead_connection_is_replaced(eng: Engine, own_node: SSHD, tmp_path: Path) -> None:
    src = make_tree(tmp_path / "app")
    target = eng.register(own_node, src)
    assert eng.engine.run(target.id).status == "success"
    own_node.kill_sessions()
    time.sleep(0.2)
    (src / "more").write_text("x")
    assert eng.engine.run(target.id).status == "success"


def test_storage_error_fails_the_run_and_keeps_old_archives(eng: Engine, node: SSHD,
                                                            tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions; the tmpfs test covers this as root")
    src = make_tree(tmp_path / "app")
    target = eng.register(node, src)
    assert eng.engine.run(target.id).status == "success"
    (src / "x").write_text("x")
    tdir = eng.archive_files()[0].parent
    tdir.chmod(0o500)
    try:
        result = eng.engine.run(target.id)
    finally:
        tdir.chmod(0o700)
    assert result.error_code == "storage_error"
    assert len(eng.archive_files()) == 1


@pytest.mark.parametrize("use_pigz", [True, False])
def test_pigz_and_gzip_archives_are_both_standard(eng: Engine, node: SSHD, tmp_path: Path,
                                                  use_pigz: bool) -> None:
    if use_pigz and not shutil.which("pigz"):
        pytest.skip("pigz is not installed on this node")
    eng.engine.use_pigz = use_pigz
    src = make_tree(tmp_path / "app")
    target = eng.register(node, src)
    result = eng.engine.run(target.id)
    assert result.status == "success", result.message
    conn = eng.pool.connection(address(node))
    assert conn.has_pigz() is bool(shutil.which("pigz"))
    file = eng.archive_files()[0]
    subprocess.run(["gzip", "-t", str(file)], check=True)
    assert snapshot(extract(file, tmp_path / "out") / "app") == snapshot(src)
