"""The S3 archive store against a real S3 server (SeaweedFS's ``weed mini`` on
loopback), and the store contract it shares with the directory store."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

import pytest

from fixtures.seaweed import SeaweedS3
from storage.archives import ArchiveStore
from storage.errors import ArchiveWriteError, StorageError
from storage.stores.s3 import MIN_PART, S3ArchiveStore, index_name, parse_store_url

T0 = dt.datetime(2026, 12, 1, 9, 0, tzinfo=dt.UTC)


def s3_store(s3: SeaweedS3, prefix: str = "backups/site-a") -> S3ArchiveStore:
    return S3ArchiveStore(f"s3://{s3.create_bucket()}/{prefix}", endpoint_url=s3.endpoint,
                          region="us-east-1", part_size=MIN_PART)


def stored_bytes(store: object, name: str) -> bytes:
    if isinstance(store, S3ArchiveStore):
        return b"".join(store.iter_bytes(name))
    return store.path_of(name).read_bytes()  # type: ignore[attr-defined]


@pytest.fixture(params=["directory", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """The store contract runs on both backends."""
    if request.param == "directory":
        return ArchiveStore(tmp_path / "archives")
    return s3_store(request.getfixturevalue("s3_env"))


def write(store: object, data: bytes, run_id: int = 1, piece: int = 3_000_001):
    w = store.writer("backup@127.0.0.1_22", 7, run_id, T0)  # type: ignore[attr-defined]
    for i in range(0, len(data), piece):
        w.write(data[i:i + piece])
    return w


# -- the contract both stores keep ----------------------------------------------------


def test_both_stores_serve_the_readers_interface(store: object) -> None:
    """What the server's readers use (storage/stores/base.py): existence,
    size, ranged reads, a streamed whole, the raw index, free space."""
    from storage.stores import Store

    assert isinstance(store, Store)
    data = os.urandom(6 * 2**20 + 5)
    with write(store, data) as w:
        facts = w.commit()
    s: Store = store  # type: ignore[assignment]
    name = facts.file_name
    assert s.exists(name) and not s.exists(name.replace(".tar.gz", "0.tar.gz"))
    assert s.size_of(name) == len(data)
    assert s.read_range(name, 5 * 2**20 - 3, 10) == data[5 * 2**20 - 3:5 * 2**20 + 7]
    assert s.read_range(name, len(data) - 2, 100) == data[-2:]
    assert s.read_range(name, len(data) + 10, 100) == b""
    chunks = list(s.iter_bytes(name, 2**20))
    assert b"".join(chunks) == data and max(map(len, chunks)) <= 2**20
    assert s.read_index_bytes(name) is None  # committed without an index
    free = s.free_bytes()
    assert (free is None) if isinstance(store, S3ArchiveStore) else free > 0
    s.delete(name)
    assert not s.exists(name)


def test_open_store_picks_the_backend(tmp_path: Path, s3_env: SeaweedS3) -> None:
    from storage.stores import open_store

    default = open_store("", default_dir=tmp_path / "d")
    assert isinstance(default, ArchiveStore) and default.root == tmp_path / "d"
    other = open_store(f"file://{tmp_path / 'e'}", default_dir=tmp_path / "d")
    assert isinstance(other, ArchiveStore) and other.root == tmp_path / "e"
    bucket = s3_env.create_bucket()
    remote = open_store(f"s3://{bucket}/p", default_dir=tmp_path / "d",
                        endpoint_url=s3_env.endpoint, region="us-east-1")
    assert isinstance(remote, S3ArchiveStore) and (remote.bucket, remote.prefix) == (bucket, "p")
    with pytest.raises(StorageError, match="does not exist"):
        open_store(f"s3://{bucket}-missing/p", default_dir=tmp_path / "d",
                   endpoint_url=s3_env.endpoint, region="us-east-1")
    with pytest.raises(ValueError, match="s3://BUCKET/PREFIX"):
        open_store("ftp://x/y", default_dir=tmp_path / "d")


def test_an_archive_is_visible_only_once_committed(store: object) -> None:
    data = os.urandom(12 * 2**20 + 17)  # several parts and a short last one
    with write(store, data) as w:
        assert store.files() == set()  # type: ignore[attr-defined]
        facts = w.commit()
    assert facts.sha256 == hashlib.sha256(data).hexdigest() and facts.size == len(data)
    assert store.files() == {facts.file_name}  # type: ignore[attr-defined]
    assert stored_bytes(store, facts.file_name) == data


def test_an_aborted_or_failed_write_leaves_nothing(store: object) -> None:
    w = write(store, os.urandom(6 * 2**20))
    w.abort()
    with pytest.raises(RuntimeError), write(store, b"x" * 1000, run_id=2):
        raise RuntimeError("the stream failed its checks")
    assert store.files() == set()  # type: ignore[attr-defined]
    assert store.sweep_temp_files() == []  # type: ignore[attr-defined]


def test_a_crashed_write_is_swept_at_start(store: object) -> None:
    w = write(store, os.urandom(6 * 2**20))
    del w  # the process died: no abort, no commit
    assert len(store.sweep_temp_files()) == 1  # type: ignore[attr-defined]
    assert store.sweep_temp_files() == []  # type: ignore[attr-defined]
    assert store.files() == set()  # type: ignore[attr-defined]


def test_unlisted_archives_are_swept_and_deletes_remove_them(store: object) -> None:
    keep = write(store, b"keep" * 1000, run_id=1).commit()
    stray = write(store, b"stray" * 1000, run_id=2).commit()
    assert store.sweep_unlisted({keep.file_name}) == [stray.file_name]  # type: ignore
    assert store.files() == {keep.file_name}  # type: ignore[attr-defined]
    store.delete(keep.file_name)  # type: ignore[attr-defined]
    store.delete(keep.file_name)  # type: ignore[attr-defined]  # already gone: no error
    assert store.files() == set()  # type: ignore[attr-defined]


# -- what only the object store does ------------------------------------------------------


def test_ranged_reads(s3_env: SeaweedS3) -> None:
    store = s3_store(s3_env)
    data = os.urandom(7 * 2**20)
    facts = write(store, data).commit()
    for offset, length in ((0, 1), (5, 100), (MIN_PART - 3, 10), (len(data) - 4, 100)):
        assert store.read_range(facts.file_name, offset, length) == \
            data[offset:offset + length]
    assert store.read_range(facts.file_name, len(data), 10) == b""
    assert store.read_range(facts.file_name, 0, 0) == b""
    assert store.size_of(facts.file_name) == len(data)


def test_an_index_object_sits_beside_its_archive_and_goes_with_it(s3_env: SeaweedS3) -> None:
    store = s3_store(s3_env)
    facts = write(store, b"data" * 100).commit()
    store.client.put_object(Bucket=store.bucket, Key=store.key(index_name(facts.file_name)),
                            Body=b"index bytes")
    orphan = "backup@127.0.0.1_22/7/20260101T000000.000000Z-9.index"
    store.client.put_object(Bucket=store.bucket, Key=store.key(orphan), Body=b"x")
    assert store.index_files() == {index_name(facts.file_name), orphan}
    assert store.sweep_unlisted({facts.file_name}) == [orphan]
    store.delete(facts.file_name)
    assert store.index_files() == set() and store.files() == set()


def test_keys_stay_under_the_prefix(s3_env: SeaweedS3) -> None:
    store = s3_store(s3_env, prefix="p/q")
    facts = write(store, b"x").commit()
    keys = [o["Key"] for o in store.client.list_objects_v2(Bucket=store.bucket)["Contents"]]
    assert keys == [f"p/q/{facts.file_name}"]
    for bad in ("../x/1/a.tar.gz", "a/1/../../b.tar.gz", "/etc/1/a.tar.gz"):
        with pytest.raises(ArchiveWriteError):
            store.key(bad)


def test_credentials_come_from_the_credentials_file(s3: SeaweedS3, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    creds = tmp_path / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {s3.access_key}\n"
                     f"aws_secret_access_key = {s3.secret_key}\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    store = s3_store(s3)
    assert write(store, b"from the file").commit().size == 13


def test_a_missing_bucket_is_one_line(s3_env: SeaweedS3) -> None:
    with pytest.raises(StorageError) as err:
        S3ArchiveStore("s3://no-such-bucket-here/x", endpoint_url=s3_env.endpoint,
                       region="us-east-1")
    assert "'no-such-bucket-here' does not exist" in err.value.message
    assert "\n" not in err.value.message


def test_wrong_credentials_are_one_line_without_the_secret(
        s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bucket = s3.create_bucket()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-0123456789")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError) as err:
        S3ArchiveStore(f"s3://{bucket}/x", endpoint_url=s3.endpoint, region="us-east-1")
    assert "refused the credentials" in err.value.message
    assert "wrong-secret" not in err.value.message and s3.secret_key not in err.value.message


def test_store_urls() -> None:
    assert parse_store_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert parse_store_url("s3://bucket") == ("bucket", "")
    for bad in ("http://bucket/x", "s3:///x", "s3://key:secret@bucket/x"):
        with pytest.raises(ValueError):
            parse_store_url(bad)


def test_the_server_listens_on_loopback_only_without_telemetry(s3: SeaweedS3) -> None:
    bound = s3.listening()
    assert bound and all(addr == "127.0.0.1" for addr, _ in bound), bound
    assert ("127.0.0.1", int(s3.endpoint.rsplit(":", 1)[1])) in bound
    assert "-master.telemetry=false" in " ".join(
        Path(f"/proc/{s3.proc.pid}/cmdline").read_bytes().decode().split("\0"))
