"""Composing a new archive from the previous one plus what changed: the
result is exactly the tar stream GNU tar writes of the new tree, and members
whose bytes did not change are copied, not recompressed."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from storage.errors import InvalidArchive
from storage.tgz import CHUNK, Composer, make_header, rebuild_index
from tests.tgz_trees import (
    MiB,
    compose_like_a_delta,
    frame,
    gunzip,
    make_tree,
    reader_of,
    tar_entries,
    tar_raw,
)


@pytest.fixture
def v1(tmp_path: Path):
    root = make_tree(tmp_path)
    raw = tar_raw(root)
    archive, index = frame(raw)
    return root, raw, archive, index


def _check(archive: bytes, index, new_raw: bytes, root: Path, tmp_path: Path) -> None:
    """The composed archive is the new tree's tar stream, its index is exact,
    and GNU tar finds no difference against the tree."""
    assert gunzip(archive) == new_raw
    rebuilt = rebuild_index(lambda o, n: archive[o:o + n], len(archive))
    assert rebuilt.members == index.members
    for a, b in zip(rebuilt.entries, index.entries, strict=True):
        a.record = b.record
        assert a == b
    path = tmp_path / "composed.tar.gz"
    path.write_bytes(archive)
    subprocess.run(["gzip", "-t", str(path)], check=True)
    res = subprocess.run(["tar", "--compare", "-zf", str(path), "-C", str(root.parent)],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_copying_every_entry_copies_every_member(v1) -> None:
    root, raw, archive, index = v1
    out = io.BytesIO()
    comp = Composer(out.write, reader_of(archive, index))
    for e in index.entries:
        comp.copy(e)
    new_index = comp.finish()
    assert out.getvalue() == archive
    assert comp.stats()["members_compressed"] == 0
    assert comp.members_copied == len(index.members)
    assert new_index.members == index.members


def test_composer_without_a_previous_archive_writes_what_framing_writes(v1) -> None:
    _, raw, archive, _ = v1
    out = io.BytesIO()
    comp = Composer(out.write, None)
    for _, header, data in tar_entries(raw):
        comp.add(header, [data])
    comp.finish()
    assert out.getvalue() == archive


def test_inserting_one_file_reuses_most_members(v1, tmp_path: Path) -> None:
    root, raw, archive, index = v1
    (root / "many" / "f0250-new.txt").write_bytes(b"a new file\n" * 50)
    new_raw = tar_raw(root)
    new, new_index, comp = compose_like_a_delta(archive, index, new_raw)
    _check(new, new_index, new_raw, root, tmp_path)
    # The group holding many/ (its mtime changed), the group the file lands in,
    # and the end member if the raw size moved to another record.
    assert comp.members_compressed <= 4
    assert comp.members_copied >= len(index.members) - 4
    assert comp.raw_bytes_compressed < 2 * 512 * 1024


def test_patching_large_and_small_files(v1, tmp_path: Path) -> None:
    root, raw, archive, index = v1
    big = root / "big.log"
    old_big = big.read_bytes()
    with open(big, "r+b") as f:
        f.seek(CHUNK + 1000)
        f.write(b"X" * 100)
        f.seek(0, os.SEEK_END)
        f.write(b"appended line\n" * 300)
    exact = root / "exactly-2MiB"
    with open(exact, "r+b") as f:
        f.seek(CHUNK + 5)
        f.write(b"in place")
    small = root / "many" / "f0001.txt"
    small_old = small.read_bytes()
    with open(small, "ab") as f:
        f.write(b"tail\n")
    os.truncate(root / "just-below-large", 1000)
    new_raw = tar_raw(root)
    patches = {
        "root/big.log": [(CHUNK + 1000, b"X" * 100), (len(old_big), b"appended line\n" * 300)],
        "root/exactly-2MiB": [(CHUNK + 5, b"in place")],
        "root/many/f0001.txt": [(len(small_old), b"tail\n")],
        "root/just-below-large": [],
    }
    new, new_index, comp = compose_like_a_delta(archive, index, new_raw, patches)
    _check(new, new_index, new_raw, root, tmp_path)
    e = new_index.by_path("root/big.log")
    assert e.sha256 == hashlib.sha256(big.read_bytes()).digest()
    # Chunk 0 of both large files is copied; only the chunks written to are new.
    old_chunk0 = {m.key for m in index.members if m.r_off in
                  (index.by_path("root/big.log").d_off, index.by_path("root/exactly-2MiB").d_off)}
    new_keys = {m.key for m in new_index.members}
    assert len(old_chunk0) == 2 and old_chunk0 <= new_keys
    assert new_index.by_path("root/exactly-2MiB").block_hashes[:8] == \
        index.by_path("root/exactly-2MiB").block_hashes[:8]
    assert comp.raw_bytes_compressed < 4 * MiB


def test_metadata_only_changes_copy_the_content(v1, tmp_path: Path) -> None:
    root, raw, archive, index = v1
    (root / "exec.sh").chmod(0o700)
    os.utime(root / "big.log", (1_600_000_000, 1_600_000_000))
    new_raw = tar_raw(root)
    new, new_index, comp = compose_like_a_delta(archive, index, new_raw)
    _check(new, new_index, new_raw, root, tmp_path)
    # big.log's chunks were copied: only its header member and a group are new.
    assert comp.raw_bytes_compressed < 600 * 1024
    # A header made here (not by tar) works too.
    out = io.BytesIO()
    comp = Composer(out.write, reader_of(archive, index))
    for e in index.entries:
        comp.copy(e, make_header(e, mode=0o600) if e.path == "root/a" else None)
    comp.finish()
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tf:
        ti = tf.getmember("root/a")
        assert ti.mode == 0o600 and tf.extractfile(ti).read() == b"hello\n"


def test_composer_refuses_bad_input(v1) -> None:
    _, _, archive, index = v1
    comp = Composer(io.BytesIO().write, reader_of(archive, index))
    comp.copy(index.entries[1])
    with pytest.raises(ValueError, match="canonical"):
        comp.copy(index.entries[0])
    head = make_header(None, path="root/zz-new", size=10)
    with pytest.raises(InvalidArchive, match="more data"):
        Composer(io.BytesIO().write, None).add(head, [b"x" * 11])
    with pytest.raises(InvalidArchive, match="less data"):
        Composer(io.BytesIO().write, None).add(head, [b"x" * 9])
    old = index.by_path("root/a")
    comp = Composer(io.BytesIO().write, reader_of(archive, index))
    with pytest.raises(InvalidArchive, match="beyond"):
        comp.patch(old, make_header(old, size=6), 6, [(4, b"xyz")])
    comp = Composer(io.BytesIO().write, reader_of(archive, index))
    with pytest.raises(InvalidArchive, match="overlap"):
        comp.patch(old, make_header(old, size=6), 6, [(2, b"xy"), (1, b"z")])
    with pytest.raises(ValueError):
        Composer(io.BytesIO().write, None).copy(old)


def _mutate(root: Path, rng) -> dict:
    """One generation of random changes; returns patches for in-place writes."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()
                   and p.stat().st_nlink == 1)
    patches: dict = {}
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(["create", "delete", "rename", "chmod", "append", "inplace", "symlink",
                         "hardlink", "mkdir", "truncate"])
        victim = rng.choice(files)
        rel = victim.relative_to(root.parent).as_posix()
        if not victim.exists() or rel in patches:
            continue
        if op == "create":
            (victim.parent / f"new-{rng.randrange(10**6)}").write_bytes(
                rng.randbytes(rng.choice([0, 10, 5000, 2 * MiB + 3])))
        elif op == "delete":
            victim.unlink()
        elif op == "rename":
            victim.rename(victim.parent / f"renamed-{rng.randrange(10**6)}")
        elif op == "chmod":
            victim.chmod(rng.choice([0o600, 0o640, 0o755]))
        elif op == "append":
            extra = rng.randbytes(rng.randint(1, 70_000))
            patches[rel] = [(victim.stat().st_size, extra)]
            with open(victim, "ab") as f:
                f.write(extra)
        elif op == "inplace" and victim.stat().st_size > 10:
            size = victim.stat().st_size
            off = rng.randrange(size - 5)
            piece = rng.randbytes(min(5, size - off))
            patches[rel] = [(off, piece)]
            with open(victim, "r+b") as f:
                f.seek(off)
                f.write(piece)
        elif op == "truncate":
            new = rng.randrange(victim.stat().st_size + 1)
            os.truncate(victim, new)
            patches[rel] = []
        elif op == "symlink":
            link = root / "link-to-a"
            link.unlink(missing_ok=True)
            os.symlink(f"target-{rng.randrange(100)}", link)
        elif op == "hardlink":
            os.link(victim, victim.parent / f"hl-{rng.randrange(10**6)}")
        elif op == "mkdir":
            (root / f"dir-{rng.randrange(10**6)}").mkdir(exist_ok=True)
    return patches


def test_generations_of_random_changes_compose_exactly(tmp_path: Path) -> None:
    import random

    rng = random.Random(7)
    root = make_tree(tmp_path)
    archive, index = frame(tar_raw(root))
    for gen in range(8):
        patches = _mutate(root, rng)
        new_raw = tar_raw(root)
        archive, index, comp = compose_like_a_delta(archive, index, new_raw, patches)
        assert gunzip(archive) == new_raw, f"generation {gen}"
        assert comp.members_copied > len(index.members) // 2
    _check(archive, index, new_raw, root, tmp_path)


def test_verify_copies_refuses_a_damaged_previous_archive(v1) -> None:
    _, _, archive, index = v1
    m = index.members[len(index.members) // 2]
    damaged = bytearray(archive)
    damaged[m.c_off + m.c_len // 2] ^= 0x55
    damaged = bytes(damaged)
    # Without verification the copy is verbatim: the damage would carry over.
    out = io.BytesIO()
    comp = Composer(out.write, reader_of(damaged, index))
    for e in index.entries:
        comp.copy(e)
    comp.finish()
    assert out.getvalue() == damaged
    comp = Composer(io.BytesIO().write, reader_of(damaged, index), verify_copies=True)
    with pytest.raises(InvalidArchive):
        for e in index.entries:
            comp.copy(e)
        comp.finish()


def test_a_recompressed_group_inflates_each_old_member_once(v1) -> None:
    _, _, archive, index = v1
    reads: list[int] = []
    from storage.tgz import ArchiveReader

    reader = ArchiveReader(lambda o, n: (reads.append(o), archive[o:o + n])[1], index)
    comp = Composer(io.BytesIO().write, reader)
    # A new header for the first file under many/ changes its group's key, so
    # the whole group (dozens of entries from one old member) is recompressed.
    first = next(e for e in index.entries if e.path.startswith("root/many/f"))
    for e in index.entries:
        comp.copy(e, make_header(e, mode=0o600) if e is first else None)
    comp.finish()
    assert comp.members_compressed >= 1
    copied_offsets = {m.c_off for m in index.members}
    assert reads and set(reads) <= copied_offsets
    # Each old member is read once: copied, or inflated once for its group.
    assert sorted(reads) == sorted(set(reads))
