"""`backhaul restore ID --to-node NODE --dest PATH`: the server streams the
archive onto a node over SSH (real sshd, GNU tar there)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import LiveServer, addr, cli
from test_restore import snapshot, source_tree

from fixtures.sshd.launcher import SSHD
from orchestrator import remote
from orchestrator.ssh import ServerKey


def first_archive(srv: LiveServer, node: SSHD, app: Path) -> int:
    t = srv.register(node, app, every=60)
    runs = srv.wait_for(lambda: [r for r in srv.runs(t["id"]) if r["status"] == "success"],
                        30, "the first backup")
    return runs[0]["archive_id"]


def test_restore_onto_a_node_round_trips(live: LiveServer, node: SSHD, tmp_path: Path) -> None:
    app = source_tree(tmp_path / "app")
    aid = first_archive(live, node, app)

    dest = tmp_path / "on-node" / "restored"
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(dest))
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"restored archive {aid} to {addr(node)}:{dest} (")
    assert snapshot(dest) == snapshot(app)

    # never over an existing path without --force
    (dest / "top.txt").write_text("local\n")
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(dest))
    assert res.exit_code == 1 and "[dest_exists]" in res.stderr, res.output
    assert (dest / "top.txt").read_text() == "local\n"
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(dest), "--force")
    assert res.exit_code == 0, res.output
    assert (dest / "top.txt").read_text() == "top\n"

    # one file and a subtree
    one = tmp_path / "one"
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(one),
              "--only", "sub/note.txt")
    assert res.exit_code == 0, res.output
    assert snapshot(one)["sub/note.txt"] == snapshot(app)["sub/note.txt"]
    assert set(snapshot(one)) == {"sub", "sub/note.txt"}
    sub = tmp_path / "sub-only"
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(sub),
              "--only", f"{app}/sub")
    assert res.exit_code == 0, res.output
    assert snapshot(sub) == {k: v for k, v in snapshot(app).items()
                             if k == "sub" or k.startswith("sub/")}


def test_restore_onto_a_node_refuses_bad_requests(live: LiveServer, node: SSHD,
                                                  tmp_path: Path) -> None:
    app = source_tree(tmp_path / "app")
    aid = first_archive(live, node, app)
    for args, code in ((["--dest", "relative/dir"], 2), (["--dest", "/x/../etc"], 1),
                       (["--dest", str(tmp_path / "d"), "--only", "../etc"], 1)):
        res = cli(live, "restore", str(aid), "--to-node", addr(node), *args)
        assert res.exit_code == code, (args, res.output)
    assert not (tmp_path / "d").exists()
    res = cli(live, "restore", str(aid), "--to-node", "nobody@127.0.0.1:1", "--dest", "/tmp/x")
    assert res.exit_code == 1 and "is not a node backhaul knows" in res.stderr
    res = cli(live, "restore", str(aid), "--to", str(tmp_path / "a"), "--to-node", addr(node))
    assert res.exit_code == 2


def test_a_restricted_node_refuses_with_a_clear_message(live: LiveServer,
                                                        server_key: ServerKey,
                                                        tmp_path: Path) -> None:
    app = source_tree(tmp_path / "app")
    line = remote.restricted_key_line(server_key.public_line, [str(app)])
    with SSHD(tmp_path / "node", [line], host="127.0.0.6") as sshd:
        aid = first_archive(live, sshd, app)
        dest = tmp_path / "restored"
        res = cli(live, "restore", str(aid), "--to-node", addr(sshd), "--dest", str(dest))
        assert res.exit_code == 1, res.output
        assert "[command_refused]" in res.stderr and "restricted" in res.stderr
        assert "--to DIR" in res.stderr
        assert not dest.exists()


def test_a_single_file_target_restores_as_that_file(live: LiveServer, node: SSHD,
                                                    tmp_path: Path) -> None:
    f = tmp_path / "settings.conf"
    f.write_text("a=1\n")
    aid = first_archive(live, node, f)
    here = tmp_path / "here"
    res = cli(live, "restore", str(aid), "--to", str(here))
    assert res.exit_code == 0, res.output
    assert [p.name for p in here.iterdir()] == ["settings.conf"]
    assert (here / "settings.conf").read_text() == "a=1\n"
    there = tmp_path / "there"
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(there))
    assert res.exit_code == 0, res.output
    assert (there / "settings.conf").read_text() == "a=1\n"


def test_a_large_single_file_target_restores_as_that_file(live: LiveServer, node: SSHD,
                                                          tmp_path: Path) -> None:
    """A file of several MiB: the archive's first gzip member holds its header
    alone and the data follows in chunk members. The server tells it is one
    file from that first member; the client must inflate every member."""
    f = tmp_path / "disk.img"
    data = os.urandom(3 << 20)
    f.write_bytes(data)
    aid = first_archive(live, node, f)
    here = tmp_path / "here"
    res = cli(live, "restore", str(aid), "--to", str(here))
    assert res.exit_code == 0, res.output
    assert [p.name for p in here.iterdir()] == ["disk.img"]
    assert (here / "disk.img").read_bytes() == data
    there = tmp_path / "there"
    res = cli(live, "restore", str(aid), "--to-node", addr(node), "--dest", str(there))
    assert res.exit_code == 0, res.output
    assert [p.name for p in there.iterdir()] == ["disk.img"]
    assert (there / "disk.img").read_bytes() == data
