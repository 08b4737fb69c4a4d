"""`backhaul ls`, `backhaul find` and `restore --only` through the archive's
index, against a live backhauld and a real sshd."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest import LiveServer
from test_restore import snapshot, source_tree

from cli.main import main
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.archives import ArchiveStore
from storage.catalog import Catalog

NO_ENV = {"BACKHAUL_URL": None, "BACKHAUL_TOKEN": None, "BACKHAUL_DATA_DIR": None}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey) -> Iterator[LiveServer]:
    s = LiveServer(tmp_path_factory.mktemp("browse") / "server", server_key)
    s.start()
    yield s
    s.stop()


def cli(srv: LiveServer, *args: str) -> Result:
    return CliRunner().invoke(main, ["--server", srv.url, "--token", srv.token, *args],
                              env=NO_ENV)


def ok(res: Result) -> str:
    assert res.exit_code == 0, (res.exit_code, res.stdout, res.stderr)
    return res.stdout


def backup_now(srv: LiveServer, target: dict) -> int:
    r = srv.api("POST", f"/targets/{target['id']}/run", params={"wait": "true"})
    run = r.json()["run"]
    assert run["status"] == "success", run
    return run["archive_id"]


@pytest.fixture(scope="module")
def tree(srv: LiveServer, node: SSHD, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, dict, int, int]:
    """A tree backed up twice: sub/deeper/x.cfg and a 3 MiB file change in between."""
    app = source_tree(tmp_path_factory.mktemp("src") / "app")
    (app / "large.bin").write_bytes(os.urandom(3 << 20))
    for i in range(200):  # enough small files for several gzip groups
        (app / "sub" / f"f{i:03}.txt").write_text(f"file {i}\n" * 50)
    t = srv.register(node, app, every=60)
    srv.wait_for(lambda: [r for r in srv.runs(t["id"]) if r["status"] == "success"],
                 30, "the first backup")
    first = srv.runs(t["id"])[0]["archive_id"]
    (app / "sub" / "deeper" / "x.cfg").write_text("x=2, longer now\n")
    (app / "large.bin").write_bytes(os.urandom(3 << 20))
    second = backup_now(srv, t)
    return app, t, first, second


def entries_of(srv: LiveServer, aid: int, **params: str) -> list[dict]:
    r = srv.api("GET", f"/archives/{aid}/entries", params=params)
    assert r.status_code == 200, r.text
    return r.json()["entries"]


def test_ls_lists_every_entry_as_the_tree_holds_it(srv: LiveServer, tree) -> None:
    app, _t, _first, second = tree
    listed = {e["path"]: e for e in json.loads(ok(cli(srv, "ls", str(second), "--json")))
              ["entries"]}
    want = snapshot(app)
    assert set(listed) == set(want) | {"."}
    for rel, e in listed.items():
        if rel == ".":
            assert e["type"] == "dir" and e["node_path"] == str(app)
            continue
        st = (app / rel).lstat()
        kind = want[rel][0]
        assert e["node_path"] == f"{app}/{rel}"
        assert e["mode"] == st.st_mode & 0o7777
        assert int(e["mtime"]) == int(st.st_mtime)
        if kind == "link":
            assert (e["type"], e["link"]) == ("symlink", os.readlink(app / rel))
        elif kind == "dir":
            assert e["type"] == "dir"
        elif e["type"] == "file":
            assert e["size"] == st.st_size
        else:  # the second name of a hard-linked file
            assert e["type"] == "hardlink" and e["link"] in ("app/top.txt", "app/hard-top.txt")

    text = ok(cli(srv, "ls", str(second)))
    assert "MODE" in text.splitlines()[0]
    assert any(line.startswith("-rwxr-xr-x") and line.endswith(" run.sh")
               for line in text.splitlines())
    assert "link-to-note -> sub/note.txt" in text


def test_ls_path_is_a_file_or_subtree_relative_or_absolute(srv: LiveServer, tree) -> None:
    app, _t, _first, second = tree
    sub = [e["path"] for e in entries_of(srv, second, path="sub/deeper")]
    assert sub == ["sub/deeper", "sub/deeper/x.cfg"]
    assert [e["path"] for e in entries_of(srv, second, path=f"{app}/sub/deeper")] == sub
    one = json.loads(ok(cli(srv, "ls", str(second), "sub/note.txt", "--json")))["entries"]
    assert [(e["path"], e["size"]) for e in one] == [("sub/note.txt", 5)]

    res = cli(srv, "ls", str(second), "sub/nope")
    assert res.exit_code == 1 and "[entry_not_found]" in res.stderr
    res = cli(srv, "ls", str(second), "/elsewhere/x")
    assert res.exit_code == 1 and "[invalid_path]" in res.stderr
    res = cli(srv, "ls", str(second), "../x")
    assert res.exit_code == 1 and "[invalid_path]" in res.stderr


def test_ls_reads_the_index_not_the_archive(srv: LiveServer, node: SSHD,
                                            tmp_path: Path) -> None:
    app = tmp_path / "idx"
    app.mkdir()
    (app / "a.txt").write_text("a\n")
    t = srv.register(node, app, every=60)
    aid = srv.wait_for(lambda: [r["archive_id"] for r in srv.runs(t["id"])
                                if r["status"] == "success"], 30, "the backup")[0]
    cat = Catalog(srv.data_dir / "catalog.db")
    try:
        path = ArchiveStore(srv.data_dir / "archives").path_of(cat.get_archive(aid)["file_name"])
    finally:
        cat.close()
    path.write_bytes(bytes(path.stat().st_size))  # same size, nothing readable left
    assert [e["path"] for e in entries_of(srv, aid)] == [".", "a.txt"]


def test_find_says_which_backups_hold_which_version(srv: LiveServer, tree) -> None:
    app, _t, first, second = tree
    answer = json.loads(ok(cli(srv, "find", srv_addr(srv, tree), str(app), "x.cfg", "--json")))
    assert answer["archives_searched"] == 2 and answer["matches"] == 2
    found = {a["archive_id"]: a["entries"] for a in answer["archives"]}
    assert set(found) == {first, second}
    assert [e["path"] for e in found[first]] == ["sub/deeper/x.cfg"]
    assert found[first][0]["size"] == 4 and found[second][0]["size"] == 16
    assert found[first][0]["sha256"] != found[second][0]["sha256"]

    by_glob = json.loads(ok(cli(srv, "find", srv_addr(srv, tree), str(app), "sub/f0[0-4]?.txt",
                                "--json")))
    assert by_glob["matches"] == 2 * 50

    text = ok(cli(srv, "find", srv_addr(srv, tree), str(app), "*.cfg"))
    rows = [line for line in text.splitlines() if line.endswith("sub/deeper/x.cfg")]
    assert len(rows) == 2 and str(first) in text and str(second) in text
    assert "2 matches in 2 of 2 kept archives" in text

    none = ok(cli(srv, "find", srv_addr(srv, tree), str(app), "*.nothing"))
    assert "no entry matching '*.nothing' in the 2 kept archives" in none


def srv_addr(srv: LiveServer, tree) -> str:
    t = tree[1]
    return f"{t['user']}@{t['host']}:{t['port']}"


def extract_response(srv: LiveServer, aid: int, *only: str) -> bytes:
    r = srv.api("POST", f"/archives/{aid}/extract", json={"only": list(only)})
    assert r.status_code == 200, r.text
    return r.content


def names_in(data: bytes) -> list[str]:
    out = subprocess.run(["tar", "tzf", "-"], input=data, capture_output=True, check=True)
    return out.stdout.decode().split()


def test_extract_sends_only_the_members_of_the_selection(srv: LiveServer, tree) -> None:
    app, _t, _first, second = tree
    cat = Catalog(srv.data_dir / "catalog.db")
    store = ArchiveStore(srv.data_dir / "archives")
    try:
        name = cat.get_archive(second)["file_name"]
    finally:
        cat.close()
    archive = store.path_of(name).read_bytes()
    index = store.load_index(name)

    one = extract_response(srv, second, "sub/note.txt")
    assert names_in(one) == ["app/sub/note.txt"]
    assert len(one) < 1000 < len(archive) // 100  # a re-compressed member and the end

    big = extract_response(srv, second, f"{app}/large.bin")
    assert names_in(big) == ["app/large.bin"]
    e = index.by_path("app/large.bin")
    held = [m for m in index.members if e.h_off <= m.r_off and m.r_off + m.r_len <= e.end]
    assert len(held) == 4  # its header member and three 1 MiB chunks, copied as stored
    stored = b"".join(archive[m.c_off:m.c_off + m.c_len] for m in held)
    assert big.startswith(stored)
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(big))) as tar:
        got = tar.extractfile("app/large.bin").read()
    assert got == (app / "large.bin").read_bytes()

    sub = extract_response(srv, second, "sub/deeper", "top.txt")
    assert names_in(sub) == ["app/sub/deeper/", "app/sub/deeper/x.cfg", "app/top.txt"]

    r = srv.api("POST", f"/archives/{second}/extract", json={"only": ["nope"]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "entry_not_found"
    r = srv.api("POST", f"/archives/{second}/extract", json={"only": ["../etc"]})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_path"


def test_restore_only_round_trips_files_and_subtrees(srv: LiveServer, tree,
                                                     tmp_path: Path) -> None:
    app, _t, _first, second = tree
    want = snapshot(app)
    dest = tmp_path / "one"
    ok(cli(srv, "restore", str(second), "--to", str(dest), "--only", "large.bin",
           "--only", f"{app}/sub/deeper"))
    got = snapshot(dest)
    assert {k: v for k, v in got.items() if k != "sub"} == {
        k: want[k] for k in ("large.bin", "sub/deeper", "sub/deeper/x.cfg")}

    part = tmp_path / "part"
    res = cli(srv, "restore", str(second), "--to", str(part), "--only", "sub/note.txt",
              "--only", "missing.txt")
    assert res.exit_code == 1 and "not in archive" in res.stderr and "missing.txt" in res.stderr
    assert (part / "sub" / "note.txt").read_text() == "note\n"


def test_restore_to_a_node_sends_only_the_selection(srv: LiveServer, node: SSHD, tree,
                                                    tmp_path: Path) -> None:
    app, _t, _first, second = tree
    size = srv.api("GET", f"/archives/{second}").json()["backup"]["size"]
    addr = f"{node.user}@{node.host}:{node.port}"
    dest = tmp_path / "on-node"
    answer = json.loads(ok(cli(srv, "--json", "restore", str(second), "--to-node", addr,
                               "--dest", str(dest), "--only", "sub/deeper")))
    assert answer["restored"]["bytes_sent"] < size // 100
    assert snapshot(dest) == {k: v for k, v in snapshot(app).items()
                              if k.startswith("sub/deeper")} | {"sub": snapshot(dest)["sub"]}
    res = cli(srv, "restore", str(second), "--to-node", addr, "--dest", str(tmp_path / "x"),
              "--only", "nope")
    assert res.exit_code == 1 and "not in archive" in res.stderr
    assert not (tmp_path / "x").exists()


def test_a_stream_cut_after_its_first_member_is_an_error(srv: LiveServer, tree,
                                                         tmp_path: Path) -> None:
    """The whole-archive restore reads every gzip member: one cut short fails
    the restore (Python's tarfile alone stopped after the first member)."""
    from test_restore import plant

    _app, t, _first, _second = tree
    first = gzip.compress(tar_of([("app/a.txt", b"a\n")]) [:1024])  # a header + data, no end
    second = gzip.compress(tar_of([("app/b.txt", b"b\n")]))
    whole = first + second
    aid = plant(srv, t, whole)
    dest = tmp_path / "whole"
    ok(cli(srv, "restore", str(aid), "--to", str(dest)))
    assert (dest / "a.txt").read_text() == "a\n" and (dest / "b.txt").read_text() == "b\n"

    cut = plant(srv, t, first + second[:-12])
    res = cli(srv, "restore", str(cut), "--to", str(tmp_path / "cut"))
    assert res.exit_code == 1 and "cut short" in res.stderr, res.output


def tar_of(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_an_archive_without_an_index_is_browsed_after_rebuilding_it(srv: LiveServer, tree,
                                                                   tmp_path: Path) -> None:
    """One gzip member for the whole tar, no index (an archive from before the
    index): ls rebuilds the index; --only inflates that member up to the entry."""
    from test_restore import plant

    _app, t, _first, _second = tree
    files = [(f"app/d/f{i:03}.txt", f"{i}\n".encode() * 100) for i in range(300)]
    aid = plant(srv, t, gzip.compress(tar_of(files)))
    names = [e["path"] for e in entries_of(srv, aid, path="d")]
    assert names == [name[4:] for name, _ in files]
    dest = tmp_path / "one"
    ok(cli(srv, "restore", str(aid), "--to", str(dest), "--only", "d/f150.txt",
           "--only", "d/f299.txt"))
    assert (dest / "d" / "f150.txt").read_bytes() == b"150\n" * 100
    assert sorted(p.name for p in (dest / "d").iterdir()) == ["f150.txt", "f299.txt"]
