"""A node that answers a delta backup with a hostile stream: names outside
the root or not asked for, tails and block lists that disagree with their
own sizes, a block beyond the end of its file. Each run ends as
``invalid_archive`` and nothing new is listed (no archive, index or temp file)."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Engine, make_engine

from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey

pytestmark = pytest.mark.timeout(120)

# The real commands run, except the fetch and the python3 batches, which are
# answered from payload files when present (py.N: the Nth python3 batch).
WRAPPER = """#!/bin/sh
d={dir}
case "$SSH_ORIGINAL_COMMAND" in
  *"-T -"*) if [ -f $d/fetch ]; then cat >/dev/null; cat $d/fetch; exit 0; fi ;;
  *"import sys"*)
    n=$(cat $d/count 2>/dev/null || echo 0); n=$((n + 1)); echo $n > $d/count
    if [ -f $d/py.$n ]; then cat >/dev/null; cat $d/py.$n; exit 0; fi ;;
esac
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""


@pytest.fixture
def wnode(tmp_path: Path, server_key: ServerKey) -> Iterator[SSHD]:
    work = tmp_path / "wnode"
    work.mkdir()
    script = work / "wrap.sh"
    script.write_text(WRAPPER.format(dir=work))
    script.chmod(0o755)
    line = f'command="{script}",no-pty {server_key.public_line}'
    with SSHD(work / "sshd", [line], host="127.0.0.4") as sshd:
        sshd.payloads = work  # type: ignore[attr-defined]
        yield sshd


@pytest.fixture
def heng(tmp_path: Path, server_key: ServerKey) -> Iterator[Engine]:
    e = make_engine(tmp_path / "data", server_key)
    yield e
    e.pool.close()
    e.catalog.close()


def _targz(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tree(root: Path) -> None:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "text.txt").write_text("".join(f"line {i} {os.urandom(8).hex()}\n"
                                                   for i in range(2000)))
    (root / "sub" / "f1.txt").write_text("one\n")
    (root / "log").write_bytes(os.urandom(200_000))
    (root / "db").write_bytes(os.urandom(2_000_000))


def _mutate(root: Path, case: str) -> None:
    if case.startswith("fetch"):
        (root / "sub" / "f1.txt").write_text("one, changed\n")
    elif case.startswith("chunk"):
        text = (root / "sub" / "text.txt").read_text()
        (root / "sub" / "text.txt").write_text("a new first line\n" + text)
    elif case.startswith("tail"):
        with open(root / "log", "ab") as f:
            f.write(os.urandom(5000))
    else:
        with open(root / "db", "r+b") as f:
            f.seek(100_000)
            f.write(os.urandom(100))


SHA = b"0" * 64
PAYLOADS: dict[str, dict[str, bytes]] = {
    "fetch-escapes-root": {"fetch": _targz([("app/sub/f1.txt", b"x"), ("../evil", b"e")])},
    "fetch-absolute": {"fetch": _targz([("/etc/evil", b"e")])},
    "fetch-not-asked-for": {"fetch": _targz([("app/sub/f1.txt", b"x"),
                                             ("app/sub/zzz", b"z")])},
    "tail-shorter-than-announced": {
        "py.1": gzip.compress(b"ok\nD 5000\n" + b"x" * 100 + b"E " + SHA + b"\n")},
    "tail-malformed": {"py.1": gzip.compress(b"ok\nQ what\n")},
    "block-list-disagrees-with-size": {
        "py.1": gzip.compress(b"ok 2000000 3\n" + b"ab" * 24)},
    "chunk-reference-out-of-range": {
        "py.1": gzip.compress(b"ok\nR 99999\nE " + SHA + b"\n")},
    "chunk-shorter-than-announced": {
        "py.1": gzip.compress(b"ok\nD 500\nabcE " + SHA + b"\n")},
    "block-beyond-eof": {
        "py.2": gzip.compress(b"ok\nK 99999 10\n" + b"y" * 10 + b"E " + SHA + b"\n")},
    "block-not-asked-for": {
        "py.2": gzip.compress(b"ok\nK 0 10\n" + b"y" * 10 + b"E " + SHA + b"\n")},
}


@pytest.mark.parametrize("case", sorted(PAYLOADS))
def test_hostile_delta_stream_is_refused(heng: Engine, wnode: SSHD, tmp_path: Path,
                                         case: str) -> None:
    src = tmp_path / "app"
    _tree(src)
    target = heng.register(wnode, src)
    first = heng.engine.run(target.id)
    assert (first.status, first.transfer) == ("success", "full"), first.message
    before = heng.catalog.list_archives(target.id)
    files_before = sorted(p.name for p in heng.store.root.rglob("*") if p.is_file())

    _mutate(src, case)
    (wnode.payloads / "count").unlink(missing_ok=True)  # type: ignore[attr-defined]
    for name, data in PAYLOADS[case].items():
        (wnode.payloads / name).write_bytes(data)  # type: ignore[attr-defined]
    res = heng.engine.run(target.id)

    assert (res.status, res.error_code) == ("failed", "invalid_archive"), res
    assert res.message
    assert heng.catalog.list_archives(target.id) == before
    assert sorted(p.name for p in heng.store.root.rglob("*") if p.is_file()) == files_before
    assert heng.temp_files() == []


def test_control_the_wrapper_alone_gives_a_good_delta(heng: Engine, wnode: SSHD,
                                                      tmp_path: Path) -> None:
    """Without payloads the same wrapper node backs up by delta, refinements
    included: the refusals above come from the payloads."""
    src = tmp_path / "app"
    _tree(src)
    target = heng.register(wnode, src)
    assert heng.engine.run(target.id).transfer == "full"
    for case in ("fetch", "tail", "block", "chunk"):
        _mutate(src, case)
    res = heng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "delta"), res.message
    assert res.bytes_transferred < 100_000


def test_a_tail_whose_hash_disagrees_is_fetched_whole(heng: Engine, wnode: SSHD,
                                                      tmp_path: Path) -> None:
    """The node's sha256 of the whole file does not match the reassembled
    bytes (as when the file changes between two reads of the coreutils
    path): the file is fetched whole in a second pass and the archive is
    right."""
    from test_delta_transfer import check_archive, newest_archive, tree_state
    src = tmp_path / "app"
    _tree(src)
    target = heng.register(wnode, src)
    assert heng.engine.run(target.id).transfer == "full"
    tail = os.urandom(5000)
    with open(src / "log", "ab") as f:
        f.write(tail)
    (wnode.payloads / "py.1").write_bytes(  # type: ignore[attr-defined]
        gzip.compress(b"ok\nD 5000\n" + tail + b"E " + SHA + b"\n"))
    res = heng.engine.run(target.id)
    assert (res.status, res.transfer) == ("success", "delta"), res.message
    assert res.bytes_transferred > 200_000  # the whole log came again
    check_archive(newest_archive(heng, target.id), src, tmp_path / "x", tree_state(src))
