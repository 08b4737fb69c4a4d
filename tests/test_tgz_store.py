"""The archive store keeps an index beside each archive: committed with it,
rebuilt when lost or damaged, deleted and swept with it."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from storage.archives import ArchiveStore, index_name
from storage.errors import ArchiveWriteError
from storage.tgz import ArchiveIndex, ArchiveReader
from tests.tgz_trees import frame, make_tree, tar_raw

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def framed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, ArchiveIndex]:
    root = make_tree(tmp_path_factory.mktemp("tree"))
    archive, index = frame(tar_raw(root))
    return root, archive, index


def _store_one(store: ArchiveStore, archive: bytes, index: ArchiveIndex | None,
               run_id: int = 1) -> str:
    with store.writer("node", 1, run_id, T0 + dt.timedelta(seconds=run_id)) as w:
        w.write(archive[:1000])
        w.write(archive[1000:])
        return w.commit(index).file_name


def test_commit_writes_the_index_beside_the_archive(framed, tmp_path: Path) -> None:
    root, archive, index = framed
    index.fingerprint = "ab" * 32
    store = ArchiveStore(tmp_path / "s")
    name = _store_one(store, archive, index)
    idx_path = store.root / index_name(name)
    assert idx_path.name.endswith(".index") and idx_path.stat().st_mode & 0o777 == 0o600
    assert store.files() == {name}  # the index is not an archive
    loaded = store.load_index(name)
    assert loaded.entries == index.entries and loaded.members == index.members
    assert loaded.fingerprint == "ab" * 32 and loaded.archive_size == len(archive)
    reader = ArchiveReader(lambda o, n: store.read_range(name, o, n), loaded)
    e = loaded.by_path("root/big.log")
    assert b"".join(reader.iter_data(e)) == (root / "big.log").read_bytes()
    assert store.read_range(name, len(archive) - 3, 10) == archive[-3:]


def test_an_index_that_disagrees_with_the_bytes_is_refused(framed, tmp_path: Path) -> None:
    _, archive, index = framed
    store = ArchiveStore(tmp_path / "s")
    wrong = ArchiveIndex.loads(index.dumps())
    wrong.archive_sha256 = "0" * 64
    with pytest.raises(ArchiveWriteError, match="other bytes"):
        _store_one(store, archive, wrong)
    assert store.files() == set() and not list(store.root.glob("*/*/*"))


@pytest.mark.parametrize("damage", ["missing", "garbage", "truncated", "other-size",
                                    "bad-offsets"])
def test_a_lost_or_damaged_index_is_rebuilt(framed, tmp_path: Path, damage: str) -> None:
    _, archive, index = framed
    store = ArchiveStore(tmp_path / "s")
    name = _store_one(store, archive, index)
    idx_path = store.root / index_name(name)
    if damage == "missing":
        idx_path.unlink()
    elif damage == "garbage":
        idx_path.write_bytes(b"\x1f\x8b garbage")
    elif damage == "truncated":
        idx_path.write_bytes(idx_path.read_bytes()[:200])
    elif damage == "other-size":
        other = ArchiveIndex.loads(idx_path.read_bytes())
        other.archive_size += 1
        idx_path.write_bytes(other.dumps())
    else:
        other = ArchiveIndex.loads(idx_path.read_bytes())
        other.members[3].c_off += 1
        idx_path.write_bytes(other.dumps())
    rebuilt = store.load_index(name)
    assert rebuilt.members == index.members
    assert [e.path for e in rebuilt.entries] == [e.path for e in index.entries]
    assert rebuilt.fingerprint is None  # not in the archive
    # ... and written back, so the next load reads it.
    assert ArchiveIndex.loads(idx_path.read_bytes()).members == index.members


def test_an_archive_without_an_index_from_before_gets_one(framed, tmp_path: Path) -> None:
    _, archive, _ = framed
    store = ArchiveStore(tmp_path / "s")
    name = _store_one(store, archive, None)  # how backup.py committed before indexes
    assert not (store.root / index_name(name)).exists()
    assert store.load_index(name).framed


def test_delete_and_sweeps_remove_index_files(framed, tmp_path: Path) -> None:
    _, archive, index = framed
    store = ArchiveStore(tmp_path / "s")
    kept = _store_one(store, archive, index, 1)
    gone = _store_one(store, archive, index, 2)
    stray = _store_one(store, archive, index, 3)
    store.delete(gone)
    assert not (store.root / gone).exists() and not (store.root / index_name(gone)).exists()
    # A crash between the index's rename and the archive's: an index alone.
    orphan = index_name(kept).replace(".index", "-9.index")
    (store.root / orphan).write_bytes(b"x")
    # A crash during the index write: its temp file.
    tmp = store.root / "node/1/.x.index.partial-1234abcd"
    tmp.write_bytes(b"x")
    removed = store.sweep_unlisted({kept})
    assert stray in removed and orphan in removed
    assert not (store.root / index_name(stray)).exists()
    assert store.sweep_temp_files() == [tmp] and not tmp.exists()
    assert sorted(os.listdir(store.root / "node/1")) == sorted(
        [Path(kept).name, Path(index_name(kept)).name])
