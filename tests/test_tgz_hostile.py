"""Streams a node could send that are not one complete, well-formed tar
archive: re-framing refuses them with InvalidArchive."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from storage.errors import InvalidArchive
from storage.tgz import FramingWriter, make_header, rebuild_index
from tests.tgz_trees import frame, tar_raw


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("h") / "root"
    root.mkdir()
    (root / "a").write_bytes(b"a" * 3000)
    (root / "b").write_bytes(b"b" * 10)
    return tar_raw(root)


def _frame(data: bytes) -> None:
    w = FramingWriter(io.BytesIO().write)
    w.feed(data)
    w.finish()


def test_the_untouched_stream_is_accepted(raw: bytes) -> None:
    _frame(raw)


def test_bad_header_checksum(raw: bytes) -> None:
    bad = bytearray(raw)
    bad[512 + 20] ^= 0x01  # a name byte of the second header
    with pytest.raises(InvalidArchive, match="corrupt header"):
        _frame(bytes(bad))


@pytest.mark.parametrize("cut", [100, 512 + 512 + 700, 512 * 3 + 100])
def test_truncated_streams(raw: bytes, cut: int) -> None:
    with pytest.raises(InvalidArchive, match="truncated"):
        _frame(raw[:cut])


def test_a_lone_zero_block_is_not_an_end(raw: bytes) -> None:
    _, index = frame(raw)
    end = index.members[-1].r_off
    _frame(raw[:end + 1024])  # two zero blocks and no record padding: fine
    with pytest.raises(InvalidArchive, match="incomplete end-of-archive"):
        _frame(raw[:end + 512])


def test_data_hidden_after_the_end_marker(raw: bytes) -> None:
    hidden = raw + make_header(None, path="root/hidden", size=0) + bytes(1024)
    with pytest.raises(InvalidArchive, match="after its end"):
        _frame(hidden)


def _archive(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def test_entries_whose_type_carries_no_data_but_claim_some() -> None:
    d = tarfile.TarInfo("root/dir")
    d.type = tarfile.DIRTYPE
    header = bytearray(d.tobuf(tarfile.GNU_FORMAT))
    header[124:136] = b"%011o\0" % 512
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    with pytest.raises(InvalidArchive, match="with data"):
        _frame(bytes(header) + bytes(512) + bytes(1024))


def test_pax_headers_belong_to_the_next_entry() -> None:
    ti = tarfile.TarInfo("root/" + "p" * 150)
    ti.size = 5
    ti.pax_headers = {"mtime": "1700000000.25"}
    data = _archive((ti, b"hello"))
    out = io.BytesIO()
    w = FramingWriter(out.write)
    w.feed(data)
    index = w.finish()
    (e,) = index.entries
    assert e.path == "root/" + "p" * 150 and e.h_off == 0 and e.mtime == 1700000000.25
    assert data[e.d_off:e.d_off + 5] == b"hello"
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        assert tf.extractfile("root/" + "p" * 150).read() == b"hello"


def test_a_corrupt_pax_header() -> None:
    ti = tarfile.TarInfo("root/x")
    ti.pax_headers = {"comment": "y"}
    data = bytearray(_archive((ti, b"")))
    at = data.index(b"comment=y")
    data[at - 3:at - 1] = b"99"  # record length beyond the header
    with pytest.raises(InvalidArchive):
        _frame(bytes(data))


def test_sparse_files_are_refused(tmp_path: Path) -> None:
    ti = tarfile.TarInfo("root/s")
    ti.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(InvalidArchive, match="sparse"):
        _frame(ti.tobuf(tarfile.GNU_FORMAT) + bytes(1024))


def test_rebuild_index_refuses_a_damaged_archive(raw: bytes) -> None:
    archive, _ = frame(raw)
    cut = archive[:len(archive) - 5]
    with pytest.raises(InvalidArchive):
        rebuild_index(lambda o, n: cut[o:o + n], len(cut))
    flipped = bytearray(archive)
    flipped[len(archive) // 2] ^= 0xFF
    with pytest.raises(InvalidArchive):
        rebuild_index(lambda o, n: bytes(flipped[o:o + n]), len(flipped))
