"""`backhaul restore --to DIR`: round trips equal the source, and hostile
archives planted in the store (a symlink chain like CVE-2025-4517's, absolute
names, '..', hard links out) write nothing outside DIR."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path

import pytest
from conftest import LiveServer, cli, cli_on_tty

from fixtures.sshd.launcher import SSHD
from storage.archives import node_dir_name
from storage.catalog import Catalog


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: type, content or link target, permission bits."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", st.st_mode & 0o755)
            else:
                out[rel] = ("file", p.read_bytes(), st.st_mode & 0o755, int(st.st_mtime))
    return out


def source_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "top.txt").write_text("top\n")
    (root / "big.bin").write_bytes(os.urandom(300_000))
    (root / "sub" / "note.txt").write_text("note\n")
    (root / "sub" / "deeper" / "x.cfg").write_text("x=1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "link-to-note").symlink_to("sub/note.txt")
    (root / "sub" / "up").symlink_to("../top.txt")
    os.link(root / "top.txt", root / "hard-top.txt")
    return root


@pytest.fixture(scope="module")
def backed_up(srv: LiveServer, node: SSHD, tmp_path_factory: pytest.TempPathFactory
              ) -> tuple[Path, dict, int]:
    app = source_tree(tmp_path_factory.mktemp("src") / "app")
    t = srv.register(node, app, every=60)
    runs = srv.wait_for(lambda: [r for r in srv.runs(t["id"]) if r["status"] == "success"],
                        30, "the first backup")
    return app, t, runs[0]["archive_id"]


def test_round_trip_of_the_whole_tree(srv: LiveServer, backed_up, tmp_path: Path) -> None:
    app, _t, aid = backed_up
    dest = tmp_path / "restored"
    res = cli(srv, "restore", str(aid), "--to", str(dest))
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith(f"restored archive {aid} to {dest}: ")
    assert snapshot(dest) == snapshot(app)
    assert os.stat(dest / "hard-top.txt").st_ino == os.stat(dest / "top.txt").st_ino


def test_round_trip_of_one_file_and_a_subtree(srv: LiveServer, backed_up,
                                              tmp_path: Path) -> None:
    app, _t, aid = backed_up
    one = tmp_path / "one"
    res = cli(srv, "restore", str(aid), "--to", str(one), "--only", "sub/note.txt")
    assert res.exit_code == 0, res.output
    assert snapshot(one) == {"sub": snapshot(one)["sub"],
                             "sub/note.txt": snapshot(app)["sub/note.txt"]}

    subtree = tmp_path / "subtree"
    res = cli(srv, "restore", str(aid), "--to", str(subtree), "--only", f"{app}/sub")
    assert res.exit_code == 0, res.output
    want = {k: v for k, v in snapshot(app).items() if k == "sub" or k.startswith("sub/")}
    assert snapshot(subtree) == want

    res = cli(srv, "restore", str(aid), "--to", str(tmp_path / "none"), "--only", "nope.txt")
    assert res.exit_code == 1 and "not in archive" in res.stderr


def test_a_non_empty_dir_needs_force(srv: LiveServer, backed_up, tmp_path: Path) -> None:
    app, _t, aid = backed_up
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "top.txt").write_text("local edit\n")
    (dest / "mine.txt").write_text("keep me\n")
    res = cli(srv, "restore", str(aid), "--to", str(dest))
    assert res.exit_code == 1 and "[dest_not_empty]" in res.stderr
    assert (dest / "top.txt").read_text() == "local edit\n"
    res = cli(srv, "restore", str(aid), "--to", str(dest), "--force")
    assert res.exit_code == 0, res.output
    assert (dest / "top.txt").read_text() == "top\n"
    assert (dest / "mine.txt").read_text() == "keep me\n"


def test_force_never_writes_through_a_symlink_already_in_dir(srv: LiveServer, backed_up,
                                                             tmp_path: Path) -> None:
    _app, _t, aid = backed_up
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "sub").symlink_to(outside)  # a trap a --force restore must not follow
    res = cli(srv, "restore", str(aid), "--to", str(dest), "--force")
    assert res.exit_code == 1 and "refused: sub/" in res.stderr
    assert list(outside.iterdir()) == []


# --- hostile archives ---------------------------------------------------------------------


def member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", data: bytes = b"",
           mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def targz(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def plant(srv: LiveServer, target: dict, data: bytes) -> int:
    """Put an archive into the store and the catalog as a run would."""
    cat = Catalog(srv.data_dir / "catalog.db")
    try:
        run_id = cat.start_run(target["id"], "manual")
        rel = f"{node_dir_name(target['user'], target['host'], target['port'])}/" \
              f"{target['id']}/planted-{run_id}.tar.gz"
        path = srv.data_dir / "archives" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return cat.commit_archive(run_id, target["id"], created_at=dt.datetime.now(dt.UTC),
                                  size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                  file_name=rel, fingerprint="0" * 64, bytes_transferred=0,
                                  warnings=None)
    finally:
        cat.close()


def cve_2025_4517_chain(outside_rel: str) -> list[tuple[tarfile.TarInfo, bytes]]:
    """Shaped like the published CVE-2025-4517 reproducer: directories with
    long names reached through a chain of short symlinks, so realpath of the
    chain exceeds PATH_MAX; a link climbing back out of it; then a symlink
    and members written through it."""
    comp = "d" * 247
    steps = "abcdefghijklmnop"
    out, path = [], "app"
    for step in steps:
        out.append(member(f"{path}/{comp}", tarfile.DIRTYPE, mode=0o755))
        out.append(member(f"{path}/{step}", tarfile.SYMTYPE, comp))
        path = f"{path}/{comp}"
    linkpath = "/".join(steps) + "/" + "l" * 254
    out.append(member(f"app/{linkpath}", tarfile.SYMTYPE, "../" * len(steps)))
    out.append(member("app/escape", tarfile.SYMTYPE, f"{linkpath}/../../{outside_rel}"))
    out.append(member("app/escape/victim.txt", data=b"PWNED\n"))
    out.append(member("app/flaglink", tarfile.LNKTYPE, "app/escape/victim.txt"))
    out.append(member("app/flaglink", data=b"PWNED\n"))
    return out


def short_chain() -> list[tuple[tarfile.TarInfo, bytes]]:
    """x -> '.', so x/x/x/.. is DEST/.. although its text stays inside."""
    return [
        member("app/x", tarfile.SYMTYPE, "."),
        member("app/y", tarfile.SYMTYPE, "x/x/x/../outside"),
        member("app/y/victim.txt", data=b"PWNED\n"),
        member("app/z", tarfile.SYMTYPE, "x/x/x/.."),
        member("app/z/outside/victim.txt", data=b"PWNED\n"),
    ]


def names_and_links() -> list[tuple[tarfile.TarInfo, bytes]]:
    return [
        member("app", tarfile.DIRTYPE, mode=0o755),
        member("app/ok.txt", data=b"fine\n"),
        member("/tmp/backhaul-abs-pwned.txt", data=b"PWNED\n"),
        member("app/../outside/dotdot.txt", data=b"PWNED\n"),
        member("../outside/dotdot2.txt", data=b"PWNED\n"),
        member("app/abs", tarfile.SYMTYPE, "/tmp"),
        member("app/abs/backhaul-pwned.txt", data=b"PWNED\n"),
        member("app/up", tarfile.SYMTYPE, "../outside"),
        member("app/up/victim.txt", data=b"PWNED\n"),
        member("app/hl-abs", tarfile.LNKTYPE, "/etc/hostname"),
        member("app/hl-out", tarfile.LNKTYPE, "app/../outside/victim.txt"),
        member("app/hl-via-link", tarfile.LNKTYPE, "app/up/victim.txt"),
        member("app/hl-via-link", data=b"PWNED\n"),
        member("app/dev", tarfile.FIFOTYPE),
        member("app/setuid", data=b"#!/bin/sh\n", mode=0o4777),
    ]


@pytest.mark.parametrize("build", ["cve_2025_4517_chain", "short_chain", "names_and_links"])
def test_a_hostile_archive_writes_nothing_outside_dir(srv: LiveServer, backed_up,
                                                      tmp_path: Path, build: str) -> None:
    _app, t, _aid = backed_up
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("original\n")
    members = {"cve_2025_4517_chain": lambda: cve_2025_4517_chain("outside"),
               "short_chain": short_chain, "names_and_links": names_and_links}[build]()
    aid = plant(srv, t, targz(members))
    before_tmp = sorted(p.as_posix() for p in Path("/tmp").iterdir())
    dest = tmp_path / "dest"
    res = cli(srv, "restore", str(aid), "--to", str(dest))

    assert res.exit_code == 1, res.output  # something was refused, and said so
    assert "refused: " in res.stderr and "Traceback" not in res.output
    assert (outside / "victim.txt").read_text() == "original\n"
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "outside"]
    assert sorted(p.as_posix() for p in Path("/tmp").iterdir()) == before_tmp
    # nothing left in DIR leads outside it
    real = os.path.realpath(dest)
    for dirpath, dirnames, filenames in os.walk(dest):
        for name in dirnames + filenames:
            target = os.path.realpath(Path(dirpath) / name)
            assert target == real or target.startswith(real + os.sep), (name, target)
            assert not (os.lstat(Path(dirpath) / name).st_mode & 0o7000)
    if build == "names_and_links":
        assert (dest / "ok.txt").read_text() == "fine\n"


def test_progress_bars_only_on_a_terminal(srv: LiveServer, backed_up, tmp_path: Path) -> None:
    """The installed client, its stderr on a pseudo-terminal, then not."""
    _app, _t, aid = backed_up
    for argv, label in ((["download", str(aid), "-o", str(tmp_path / "a.tgz")],
                         f"downloading archive {aid}"),
                        (["restore", str(aid), "--to", str(tmp_path / "r")],
                         f"restoring archive {aid}")):
        proc, shown = cli_on_tty(srv, *argv, COLUMNS="100")
        assert proc.returncode == 0, shown
        assert label.encode() in shown, shown
        assert label.encode() not in proc.stdout
    quiet = cli(srv, "restore", str(aid), "--to", str(tmp_path / "q"))
    assert quiet.exit_code == 0 and quiet.stderr == ""
