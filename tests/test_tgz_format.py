"""The member-aligned archive format against real GNU tar streams of real
trees, read back by gzip, GNU tar, bsdtar and Python's tarfile."""

from __future__ import annotations

import hashlib
import io
import subprocess
import tarfile
import zlib
from pathlib import Path

import pytest

from storage.tgz import (
    CHUNK,
    GROUP_MAX,
    LARGE,
    ArchiveIndex,
    InvalidIndex,
    block_size_for,
    canonical_key,
    make_header,
    parse_header,
    rebuild_index,
)
from storage.tgz.format import eof_key, group_key, is_boundary
from tests.tgz_trees import (
    bsdtar_available,
    extract_with,
    frame,
    make_tree,
    reader_of,
    snapshot,
    tar_raw,
)


@pytest.fixture(scope="module")
def framed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes, ArchiveIndex]:
    base = tmp_path_factory.mktemp("tree")
    root = make_tree(base)
    raw = tar_raw(root)
    archive, index = frame(raw)
    path = base / "framed.tar.gz"
    path.write_bytes(archive)
    return root, raw, archive, index


def _members(archive: bytes) -> list[tuple[int, int, bytes]]:
    """(compressed offset, compressed length, raw bytes) of each gzip member."""
    out, pos = [], 0
    while pos < len(archive):
        d = zlib.decompressobj(wbits=31)
        raw = d.decompress(archive[pos:]) + d.flush()
        assert d.eof
        n = len(archive) - pos - len(d.unused_data)
        out.append((pos, n, raw))
        pos += n
    return out


def test_framing_keeps_the_raw_tar_stream_byte_for_byte(framed) -> None:
    _, raw, archive, index = framed
    members = _members(archive)
    assert b"".join(m[2] for m in members) == raw
    assert len(members) == len(index.members) > 10
    assert index.raw_size == len(raw) and index.archive_size == len(archive)
    assert index.archive_sha256 == hashlib.sha256(archive).hexdigest()
    for (c_off, c_len, data), m in zip(members, index.members, strict=True):
        assert (c_off, c_len, len(data)) == (m.c_off, m.c_len, m.r_len)
        assert raw[m.r_off:m.r_off + m.r_len] == data


def test_gzip_gnu_tar_and_bsdtar_accept_the_archive(framed, tmp_path: Path) -> None:
    root, raw, archive, _ = framed
    path = tmp_path / "a.tar.gz"
    path.write_bytes(archive)
    subprocess.run(["gzip", "-t", str(path)], check=True)
    # GNU tar compares every member against the tree: content, mode, mtime, links.
    res = subprocess.run(["tar", "--compare", "-zf", str(path), "-C", str(root.parent)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    # Every reader lists the same members, with the same metadata, as it does for
    # the stream tar itself wrote.
    plain = tmp_path / "plain.tar"
    plain.write_bytes(raw)
    if not bsdtar_available():
        pytest.fail("bsdtar (libarchive-tools) is missing: run scripts/bootstrap.sh")
    for cmd in (["tar", "-tvf"], ["bsdtar", "-tvf"]):
        ours = subprocess.run([*cmd, str(path)], check=True, capture_output=True).stdout
        theirs = subprocess.run([*cmd, str(plain)], check=True, capture_output=True).stdout
        assert ours == theirs and ours.count(b"\n") >= 520
    with tarfile.open(path) as tf:
        names = tf.getnames()
    assert len(names) == 520 and "root/new\nline" in names


@pytest.mark.parametrize("tool", ["gnutar", "bsdtar", "tarfile"])
def test_every_reader_extracts_the_tree(framed, tmp_path: Path, tool: str) -> None:
    root, _, archive, _ = framed
    path = tmp_path / "a.tar.gz"
    path.write_bytes(archive)
    dest = extract_with(tool, path, tmp_path / "x")
    assert snapshot(dest / "root") == snapshot(root)


def test_index_matches_tarfile_and_the_bytes_at_its_offsets(framed) -> None:
    root, raw, archive, index = framed
    reader = reader_of(archive, index)
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        infos = tf.getmembers()
    assert [e.path for e in index.entries] == [ti.name for ti in infos]
    for e, ti in zip(index.entries, infos, strict=True):
        assert (e.h_off, e.d_off, e.size) == (ti.offset, ti.offset_data, ti.size), e.path
        assert (e.mode, e.uid, e.gid, e.uname, e.gname) == (
            ti.mode, ti.uid, ti.gid, ti.uname, ti.gname)
        assert (e.mtime, e.link) == (ti.mtime, ti.linkname)
        assert e.type.encode() == (ti.type if ti.type != b"\0" else b"0")
        header = reader.header_bytes(e)
        assert header == raw[e.h_off:e.d_off] and hashlib.sha256(header).digest() == \
            e.header_sha256
        if ti.isreg():
            content = (root.parent / e.path).read_bytes()
            assert raw[e.d_off:e.d_off + e.size] == content
            assert e.sha256 == hashlib.sha256(content).digest()
            if e.size >= LARGE:
                bs = block_size_for(e.size)
                assert e.block_size == bs
                assert e.block_hashes == [hashlib.sha256(content[i:i + bs]).digest()[:16]
                                          for i in range(0, e.size, bs)]
            else:
                assert (e.block_size, e.block_hashes) == (0, [])
        else:
            assert e.sha256 is None
    # The names that break naive code are all there.
    paths = {e.path for e in index.entries}
    assert "root/caf\udce9-latin1/\udcff\udcfe raw" in paths
    assert "root/new\nline" in paths and "root/empty dir" in paths
    assert any(len(p.encode("utf-8", "surrogateescape")) > 100 for p in paths)
    assert {e.type for e in index.entries} >= {"0", "1", "2", "5", "6"}


def test_members_follow_the_framing_rules(framed) -> None:
    _, raw, _, index = framed
    by_start = {e.h_off: e for e in index.entries}
    large_data = {e.d_off: e for e in index.entries if e.is_large}
    last = index.members[-1]
    assert last.key == eof_key(raw[last.r_off:])
    assert raw[last.r_off:].count(0) == last.r_len >= 1024 and len(raw) % 10240 == 0
    chunks = 0
    i = 0
    members = index.members[:-1]
    while i < len(members):
        m = members[i]
        e = by_start[m.r_off]
        if e.is_large:
            assert m.r_len == e.header_len and m.key == group_key([e.header_key_part()])
            n = -(-e.size // CHUNK)
            for k in range(n):
                c = members[i + 1 + k]
                assert c.r_off == e.d_off + k * CHUNK
                assert c.r_len == (CHUNK if k < n - 1 else e.end - c.r_off)
                chunks += 1
            assert large_data[e.d_off] is e
            i += 1 + n
            continue
        group = [x for x in index.entries if m.r_off <= x.h_off < m.r_off + m.r_len]
        assert group[-1].end == m.r_off + m.r_len
        assert m.key == group_key([x.key_part() for x in group])
        assert all(not x.is_large for x in group)
        assert not any(is_boundary(x.path) for x in group[:-1])
        if len(group) > 1:
            assert m.r_len <= GROUP_MAX
        i += 1
    assert chunks == 3 + 2  # big.log (2.6 MiB) and exactly-2MiB


def test_index_dump_load_round_trip(framed) -> None:
    _, _, _, index = framed
    index.fingerprint, index.node_time = "f" * 64, "1700000000.5"
    index.entries[3].record = b"\xff record \n\0"
    data = index.dumps()
    back = ArchiveIndex.loads(data)
    assert back.entries == index.entries and back.members == index.members
    assert (back.fingerprint, back.node_time, back.archive_sha256) == (
        index.fingerprint, index.node_time, index.archive_sha256)
    head = zlib.decompress(data, wbits=31).split(b"\n", 1)[0]
    assert b'"format":"backhaul-index","version":1' in head
    with pytest.raises(InvalidIndex):
        ArchiveIndex.loads(data[:len(data) // 2])
    with pytest.raises(InvalidIndex, match="version"):
        ArchiveIndex.loads(zlib.compress(head.replace(b'"version":1', b'"version":99') + b"\n",
                                         wbits=31))
    with pytest.raises(InvalidIndex):
        ArchiveIndex.loads(b"not gzip at all")


def test_rebuild_index_equals_the_written_index(framed) -> None:
    _, _, archive, index = framed
    calls: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        calls.append((off, n))
        return archive[off:off + n]

    rebuilt = rebuild_index(read, len(archive))
    assert rebuilt.framed
    assert rebuilt.members == index.members
    for a, b in zip(rebuilt.entries, index.entries, strict=True):
        a.record = b.record  # not in the archive
        assert a == b
    assert (rebuilt.archive_sha256, rebuilt.raw_size) == (index.archive_sha256, index.raw_size)
    assert max(n for _, n in calls) <= 1 << 20


def test_rebuild_index_of_a_single_member_archive_is_unframed(framed, tmp_path: Path) -> None:
    root, raw, _, index = framed
    plain = zlib.compress(raw, wbits=31)
    rebuilt = rebuild_index(lambda o, n: plain[o:o + n], len(plain))
    assert not rebuilt.framed and len(rebuilt.members) == 1 and rebuilt.members[0].key == ""
    assert [e.path for e in rebuilt.entries] == [e.path for e in index.entries]
    # It still reads through the index.
    e = rebuilt.by_path("root/big.log")
    data = b"".join(reader_of(plain, rebuilt).iter_data(e, 5, 1_500_000))
    assert data == (root / "big.log").read_bytes()[5:1_500_000]


def test_ranged_reads_touch_only_the_members_they_need(framed) -> None:
    root, _, archive, index = framed
    seen: list[tuple[int, int]] = []

    def read(off: int, n: int) -> bytes:
        seen.append((off, n))
        return archive[off:off + n]

    from storage.tgz import ArchiveReader

    reader = ArchiveReader(read, index)
    e = index.by_path("root/big.log")
    content = (root / "big.log").read_bytes()
    for start, end in [(0, 10), (CHUNK - 3, CHUNK + 5), (2 * CHUNK, None), (100, 100)]:
        seen.clear()
        got = b"".join(reader.iter_data(e, start, end))
        assert got == content[start:end]
        members = {m.c_off for m in index.members if (m.c_off, m.c_len) in seen}
        assert len(members) == len(seen) <= 2
    small = index.by_path("root/many/f0123.txt")
    assert b"".join(reader.iter_data(small)) == (root / "many/f0123.txt").read_bytes()


def test_canonical_key_is_tar_sort_name_order(framed) -> None:
    _, _, _, index = framed
    keys = [canonical_key(e.path) for e in index.entries]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    # "a-b" sorts after everything under "a/" (tar sorts siblings, not whole paths).
    assert canonical_key("r/a/z") < canonical_key("r/a-b")


def test_make_header_round_trips_through_tar_readers(tmp_path: Path) -> None:
    name = "root/\udcff odd/" + "n" * 120
    header = make_header(None, path=name, mode=0o640, uid=1234, gid=99, uname="u",
                         gname="g", size=3, mtime=1_700_000_000, type="0")
    info = parse_header(header)
    assert (info.path, info.mode, info.uid, info.size, info.mtime) == (
        name, 0o640, 1234, 3, 1_700_000_000)
    link = make_header(None, path="root/l", type="2", link="t" * 200, mtime=5)
    assert parse_header(link).link == "t" * 200
    d = make_header(None, path="root/dir", type="5", mode=0o700)
    assert parse_header(d).path == "root/dir"
    raw = header + b"abc" + bytes(509) + link + d + bytes(1024)
    (tmp_path / "h.tar").write_bytes(raw + bytes(-len(raw) % 10240))
    out = subprocess.run(["tar", "-tvf", str(tmp_path / "h.tar")], capture_output=True,
                         check=True).stdout
    assert b"n" * 120 in out and b"t" * 200 in out
    with pytest.raises(TypeError):
        make_header(None, path="x", colour="red")


def test_each_deflate_binding_writes_standard_members(framed) -> None:
    from storage.tgz import FramingWriter
    from storage.tgz.deflate import DEFAULT_BACKEND, available
    from tests.tgz_trees import gunzip

    _, raw, _, index = framed
    assert DEFAULT_BACKEND == "isal"  # a [server] dependency: the fast path is the default
    for backend in ("zlib", "isal", "zlib-ng"):
        if backend == "zlib-ng" and not available(backend):
            continue  # optional, measured by bench/deflate.py only
        out = io.BytesIO()
        w = FramingWriter(out.write, backend=backend, level=1)
        w.feed(raw)
        other = w.finish()
        assert gunzip(out.getvalue()) == raw
        assert [m.key for m in other.members] == [m.key for m in index.members]
