"""A delta composed into the S3 store copies long runs of the previous
archive's members with UploadPartCopy (a real S3 server: SeaweedFS's ``weed
mini`` on loopback) and stores the same bytes, sha256 and index as the
directory store does for the same inputs."""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fixtures.seaweed import SeaweedS3
from storage.archives import ArchiveStore
from storage.errors import ArchiveWriteError
from storage.stores.s3 import MIN_PART, S3ArchiveStore
from storage.tgz import ArchiveIndex, ArchiveReader, Composer
from tests.tgz_trees import MiB, feed_like_a_delta, frame, gunzip, tar_raw

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)
NODE = "backup@127.0.0.1_22"


class PartLog:
    """The parts of each upload as the server lists them just before the
    writer completes it (observed on the real server, not simulated)."""

    def __init__(self, store: S3ArchiveStore) -> None:
        self.sizes: list[int] = []
        client, complete = store.client, store.client.complete_multipart_upload

        def listing_complete(**kw: Any) -> Any:
            parts = client.list_parts(Bucket=kw["Bucket"], Key=kw["Key"],
                                      UploadId=kw["UploadId"])["Parts"]
            self.sizes = [p["Size"] for p in sorted(parts, key=lambda p: p["PartNumber"])]
            return complete(**kw)

        client.complete_multipart_upload = listing_complete


def s3_store(s3: SeaweedS3) -> tuple[S3ArchiveStore, PartLog]:
    store = S3ArchiveStore(f"s3://{s3.create_bucket()}/backups", endpoint_url=s3.endpoint,
                           region="us-east-1", part_size=MIN_PART)
    store.copy_part = 2 * MIN_PART  # long runs become several copy parts
    return store, PartLog(store)


def stored(store: object, name: str) -> bytes:
    if isinstance(store, S3ArchiveStore):
        return b"".join(store.iter_bytes(name))
    return store.path_of(name).read_bytes()  # type: ignore[attr-defined]


def make_tree(base: Path, sizes: list[int], seed: int = 3) -> Path:
    """Random (incompressible) files, so members' compressed sizes are their
    raw sizes and runs of them cross MIN_PART where the test wants; small
    text files between them."""
    rng = random.Random(seed)
    root = base / "root"
    root.mkdir()
    for i, size in enumerate(sizes):
        (root / f"f{i:02d}.bin").write_bytes(rng.randbytes(size))
        (root / f"f{i:02d}.txt").write_bytes(f"notes {i}\n".encode() * 40)
    return root


def touch(path: Path, offset: int) -> None:
    """4 KiB of new bytes at ``offset``: one chunk member (and the header,
    whose mtime changes) is recompressed, the rest of the file is reused."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(random.Random(offset).randbytes(4096))


def store_archive(store: object, archive: bytes, index: ArchiveIndex, run_id: int) -> str:
    with store.writer(NODE, 7, run_id, T0) as w:  # type: ignore[attr-defined]
        for i in range(0, len(archive), 3 * MiB + 1):
            w.write(archive[i:i + 3 * MiB + 1])
        return w.commit(ArchiveIndex.loads(index.dumps())).file_name


def compose_into(store: object, prev_name: str, prev_index: ArchiveIndex, new_raw: bytes,
                 run_id: int, read: Callable[[int, int], bytes] | None = None,
                 fail_after: int | None = None,
                 writers: list[Any] | None = None) -> tuple[Any, ArchiveIndex, Any]:
    """The orchestrator's way: members read through the store's ranged reads,
    reused ones handed to the writer's ``copy_range``, the rest written."""
    if read is None:
        def read(off: int, n: int) -> bytes:
            return store.read_range(prev_name, off, n)  # type: ignore[attr-defined]
    reader = ArchiveReader(read, prev_index)
    with store.writer(NODE, 7, run_id, T0) as w:  # type: ignore[attr-defined]
        if writers is not None:
            writers.append(w)
        copies = 0

        def copied(offset: int, data: bytes) -> None:
            nonlocal copies
            copies += 1
            if fail_after is not None and copies > fail_after:
                raise RuntimeError("the composition failed half way")
            w.copy_range(prev_name, offset, data)

        comp = Composer(w.write, reader, hash_archive=False, copied=copied)
        index = feed_like_a_delta(comp, prev_index, new_raw)
        return w.commit(index), index, w


def no_uploads_left(store: S3ArchiveStore) -> bool:
    return not store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads")


# name: (file sizes, files touched as (file number, offset))
CASES = {
    # one changed chunk between two long runs: both copied, the chunk uploaded
    # with the head of the run after it (a part must be >= MIN_PART)
    "middle": ([3 * MiB + 100, 3 * MiB, 4 * MiB + 7, 3 * MiB, 4 * MiB], [(2, MiB)]),
    # the first member changes: the run after it tops it up, then is copied
    "start": ([2 * MiB, 5 * MiB, 6 * MiB + 3], [(0, 0)]),
    # the last chunk changes: the end-of-archive member after it is a run
    # too short to copy, uploaded in the short last part
    "end": ([6 * MiB, 5 * MiB + 11], [(1, 5 * MiB)]),
    # a change every 2 MiB: every run is shorter than MIN_PART, all uploaded
    "short runs": ([2 * MiB + 5, 2 * MiB, 2 * MiB + 9, 2 * MiB],
                   [(0, MiB), (1, MiB), (2, MiB), (3, MiB)]),
    # nothing changed: the whole archive is copied, no byte sent
    "unchanged": ([7 * MiB, 6 * MiB], []),
    # smaller than a part: one run, too short to copy, one uploaded part
    "single part": ([MiB + 3, 2 * MiB], []),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_delta_on_s3_stores_what_the_directory_store_stores(
        case: str, s3_env: SeaweedS3, tmp_path: Path) -> None:
    sizes, touched = CASES[case]
    root = make_tree(tmp_path, sizes)
    prev_archive, prev_index = frame(tar_raw(root))
    for i, offset in touched:
        touch(root / f"f{i:02d}.bin", offset)
    new_raw = tar_raw(root)

    directory = ArchiveStore(tmp_path / "archives")
    s3, parts = s3_store(s3_env)
    results = {}
    for label, store in (("directory", directory), ("s3", s3)):
        prev = store_archive(store, prev_archive, prev_index, run_id=1)
        facts, index, writer = compose_into(store, prev, prev_index, new_raw, run_id=2)
        data = stored(store, facts.file_name)
        assert facts.size == len(data) and facts.sha256 == hashlib.sha256(data).hexdigest()
        results[label] = (data, facts.sha256, index.dumps(), writer)
    (d_bytes, d_sha, d_index, _), (s_bytes, s_sha, s_index, s_writer) = \
        results["directory"], results["s3"]
    assert s_bytes == d_bytes and s_sha == d_sha and s_index == d_index
    assert gunzip(s_bytes) == new_raw
    assert no_uploads_left(s3)

    # Every part but the last is a valid S3 part; copied bytes were not sent.
    assert parts.sizes and all(n >= MIN_PART for n in parts.sizes[:-1]), parts.sizes
    assert sum(parts.sizes) == len(s_bytes)
    copied = s_writer.bytes_copied
    if case in ("short runs", "single part"):
        assert copied == 0 and len(parts.sizes) == -(-len(s_bytes) // MIN_PART)
    elif case == "unchanged":
        assert copied == len(s_bytes)
    else:
        # what was not copied is at most the changed members plus one
        # MIN_PART top-up per changed stretch (and the short last part)
        assert len(s_bytes) - copied <= len(touched) * (MIN_PART + 2 * MiB) + MiB
        assert copied >= len(s_bytes) - 2 * MIN_PART - 2 * MiB
        assert copied > 0


def test_a_composition_that_fails_half_way_leaves_no_object_and_no_upload(
        s3_env: SeaweedS3, tmp_path: Path) -> None:
    root = make_tree(tmp_path, [6 * MiB, 6 * MiB, 6 * MiB])
    prev_archive, prev_index = frame(tar_raw(root))
    touch(root / "f02.bin", 3 * MiB)
    s3, _ = s3_store(s3_env)
    prev = store_archive(s3, prev_archive, prev_index, run_id=1)
    writers: list[Any] = []
    with pytest.raises(RuntimeError, match="half way"):
        # 16 members (two files and their notes) are reused, f02's header
        # is not: the first run's copy parts are under way when it fails
        compose_into(s3, prev, prev_index, tar_raw(root), run_id=2, fail_after=18,
                     writers=writers)
    assert writers[0].bytes_copied >= 12 * MiB
    assert s3.files() == {prev} and no_uploads_left(s3)
    assert s3.sweep_temp_files() == []


def test_a_copy_the_server_refuses_aborts_the_upload(s3_env: SeaweedS3,
                                                      tmp_path: Path) -> None:
    """The source vanished (a delete racing the run): the copy part fails,
    the error says so, and nothing is left behind."""
    root = make_tree(tmp_path, [6 * MiB, 6 * MiB])
    prev_archive, prev_index = frame(tar_raw(root))
    touch(root / "f01.bin", 4 * MiB)
    s3, _ = s3_store(s3_env)
    prev = store_archive(s3, prev_archive, prev_index, run_id=1)
    s3.delete(prev)
    with pytest.raises(ArchiveWriteError, match="cannot copy part"):
        # the bytes as they were read before the delete
        compose_into(s3, prev, prev_index, tar_raw(root), run_id=2,
                     read=lambda off, n: prev_archive[off:off + n])
    assert s3.files() == set() and no_uploads_left(s3)


def test_reading_an_archive_in_order_reads_ahead_and_stays_exact(s3_env: SeaweedS3) -> None:
    """A delta walks the previous archive member by member: the next block
    is fetched while the reader works on this one; the bytes stay exact up
    to the end, and a deleted archive is not served from what was read ahead."""
    from storage.stores.s3 import READ_BLOCK

    s3, _ = s3_store(s3_env)
    data = random.Random(5).randbytes(3 * READ_BLOCK + 12345)
    with s3.writer(NODE, 7, 1, T0) as w:
        w.write(data)
        name = w.commit().file_name
    got = bytearray()
    step = 700_001
    for off in range(0, len(data), step):
        got += s3.read_range(name, off, step)
    assert bytes(got) == data
    again = S3ArchiveStore(s3.url, endpoint_url=s3_env.endpoint, region="us-east-1")  # no cache
    assert again.read_range(name, 0, 10) == data[:10]
    assert again.read_range(name, READ_BLOCK - 5, 10) == data[READ_BLOCK - 5:READ_BLOCK + 5]
    again.delete(name)  # block 2, read ahead by now or soon, is forgotten
    with pytest.raises(ArchiveWriteError):
        again.read_range(name, 2 * READ_BLOCK, 10)
