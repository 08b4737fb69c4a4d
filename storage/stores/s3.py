"""The archive store on S3-compatible object storage (boto3).

Same interface as the directory store (``storage.archives.ArchiveStore``):
``writer() -> write()/commit(index)/abort()``, ``read_range``, ``load_index``,
``delete``, ``files``, ``index_files``, ``sweep_temp_files``,
``sweep_unlisted``. Keys: ``<prefix>/<node>/<target-id>/<stamp>-<run>.tar.gz``
and the index beside it (same stem, ``.index``).

- Writes stream as a multipart upload: one part (``part_size``, 8 MiB by
  default) is buffered at a time, the sha256 is computed on the fly, and each
  part's ETag is checked against its MD5. A delta's long runs of members
  reused from the previous archive (``copy_range``) become copy parts
  (UploadPartCopy with a source range): the store copies them, nothing is
  sent again; their bytes were read once anyway, for the sha256. Nothing is visible until
  ``commit()`` completes the upload, which the caller does only after the
  stream passed its checks; any failure aborts it. The completed object's size
  is checked before the facts are returned.
- An upload left by a crash is invisible and is aborted by the start-up sweep
  (``sweep_temp_files``), as the directory store removes its temp files.
- Credentials come from boto3's standard chain (``AWS_ACCESS_KEY_ID`` /
  ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, the shared credentials file):
  never from a URL or a flag, so they appear neither in ``ps`` nor in logs.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from storage.archives import ArchiveFacts
from storage.errors import ArchiveWriteError, InvalidArchive, StorageError

log = logging.getLogger(__name__)

ARCHIVE_SUFFIX = ".tar.gz"
INDEX_SUFFIX = ".index"
MIN_PART = 5 * 2**20  # S3's smallest part (but the last)
COPY_PART = 16 * 2**20  # a long copied run is copied in parts of at most this size
COPIES_IN_FLIGHT = 2  # copy parts requested concurrently (they hold no bytes here)
READ_BLOCK = 4 * 2**20  # ranged reads below this size go through cached blocks
READ_BLOCKS_KEPT = 4  # blocks kept, over all readers (16 MiB)
READ_AHEAD = 1  # blocks read ahead of a reader walking an archive in order
_KEY = re.compile(r"^[A-Za-z0-9._@-]+/[0-9]+/[A-Za-z0-9._-]+$")


def index_name(file_name: str) -> str:
    if not file_name.endswith(ARCHIVE_SUFFIX):
        raise ValueError(f"{file_name!r} is not an archive name")
    return file_name[:-len(ARCHIVE_SUFFIX)] + INDEX_SUFFIX


def parse_store_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET/PREFIX`` -> (bucket, prefix without slashes at its ends)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment \
            or parts.username or parts.password:
        raise ValueError(f"not an s3://BUCKET/PREFIX URL: {url!r}")
    return parts.netloc, parts.path.strip("/")


def _describe(exc: BaseException) -> str:
    err = getattr(exc, "response", {}).get("Error", {}) if hasattr(exc, "response") else {}
    if err:
        return f"{err.get('Code', 'error')}: {err.get('Message') or 'no message'}"
    return " ".join(str(exc).split())[:300] or exc.__class__.__name__


class _Run:
    """Consecutive bytes of one stored archive handed to ``copy_range``.
    Until it is long enough to copy, its bytes are kept (it may end short
    and be uploaded after all); then only its first ``head`` bytes, which
    top the bytes uploaded before it up to a valid part, are sent, and the
    rest is copied as it grows (``copied``: where the next copy part starts)."""

    __slots__ = ("copied", "head", "kept", "length", "offset", "source")

    def __init__(self, source: str, offset: int, head: int) -> None:
        self.source, self.offset, self.head = source, offset, head
        self.length = 0
        self.kept: list[bytes] = []
        self.copied: int | None = None  # None: not (yet) copying

    @property
    def end(self) -> int:
        return self.offset + self.length

    def long_enough(self) -> bool:
        return self.length - self.head >= MIN_PART


class S3ArchiveWriter:
    """One archive's multipart upload; ``commit()`` completes it.

    Bytes from ``write`` are uploaded in parts of ``part_size``. Bytes from
    ``copy_range`` that continue one stored range are collected in a run;
    a run of at least ``MIN_PART`` (beyond what tops up the bytes before
    it) becomes copy parts (UploadPartCopy: the store copies the range, the
    bytes are not sent again), a shorter one is uploaded with the bytes
    around it. Every part but the last is thus >= ``MIN_PART``, as S3 wants.
    The sha256 is taken over every byte handed in, in order, so it is the
    sha256 of the completed object either way."""

    def __init__(self, store: S3ArchiveStore, final_name: str,
                 created_at: dt.datetime) -> None:
        self._store = store
        self.final_name = final_name
        self.created_at = created_at
        self._key = store.key(final_name)
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._run: _Run | None = None
        self._parts: list[dict[str, Any]] = []
        # One part uploads in a thread of its own while the next one fills:
        # the composing/receiving thread never waits on the network for more
        # than a part (memory: at most two parts). Copy parts hold no bytes:
        # up to COPIES_IN_FLIGHT of them run beside it.
        self._queued = 0
        self._pending: Future[None] | None = None
        self._copying: list[Future[None]] = []
        self._pool: ThreadPoolExecutor | None = None
        self.size = 0
        self.bytes_copied = 0  # copied by the store, not sent
        self._done = False
        try:
            self._upload_id: str | None = store.client.create_multipart_upload(
                Bucket=store.bucket, Key=self._key)["UploadId"]
        except Exception as exc:  # noqa: BLE001 - botocore's errors, translated
            raise ArchiveWriteError(f"cannot start the upload of {final_name}: "
                                    f"{_describe(exc)}") from None

    def write(self, data: bytes | memoryview) -> None:
        assert self._upload_id is not None and not self._done, "writer already closed"
        if not data:
            return  # nothing that would end a run
        self._end_run()
        self._hash.update(data)
        self.size += len(data)
        self._buf += data
        self._flush_parts()

    def copy_range(self, source: str, offset: int, data: bytes) -> None:
        """``data`` are the bytes at ``offset`` of the stored archive
        ``source``: hashed here, copied by the store once the run they
        continue is long enough, else uploaded."""
        assert self._upload_id is not None and not self._done, "writer already closed"
        if not data:
            return
        self._hash.update(data)
        self.size += len(data)
        run = self._run
        if run is not None and (run.source != source or run.end != offset):
            self._end_run()
            run = None
        if run is None:
            if len(self._buf) >= MIN_PART:
                self._upload(bytes(self._buf))
                self._buf = bytearray()
            # Bytes waiting to be uploaded must make a part of MIN_PART: the
            # run's first bytes top them up.
            run = self._run = _Run(source, offset, MIN_PART - len(self._buf) if self._buf else 0)
        run.length += len(data)
        if run.copied is None:
            run.kept.append(data)
            if not run.long_enough():
                return
            # It will be copied: the bytes before it go with its head.
            if self._buf or run.head:
                self._buf += b"".join(run.kept)[:run.head]
                self._upload(bytes(self._buf))
                self._buf = bytearray()
            run.kept = []
            run.copied = run.offset + run.head
        # Copy parts start while the run still grows (the copying overlaps
        # the reading), always leaving >= MIN_PART for the last one.
        part = self._store.copy_part
        while run.end - run.copied >= part + MIN_PART:
            self._copy(source, run.copied, part)
            run.copied += part

    def _end_run(self) -> None:
        run, self._run = self._run, None
        if run is None:
            return
        if run.copied is None:  # too short for a part of its own: uploaded
            for piece in run.kept:
                self._buf += piece
            self._flush_parts()
            return
        # What is left, MIN_PART <= rest < copy_part + MIN_PART: one part,
        # or two halves of >= MIN_PART each (copy_part >= 2 * MIN_PART).
        rest = run.end - run.copied
        if rest <= self._store.copy_part:
            self._copy(run.source, run.copied, rest)
        else:
            self._copy(run.source, run.copied, rest // 2)
            self._copy(run.source, run.copied + rest // 2, rest - rest // 2)

    def _flush_parts(self) -> None:
        while len(self._buf) >= self._store.part_size:
            chunk = bytes(self._buf[:self._store.part_size])
            del self._buf[:self._store.part_size]
            self._upload(chunk)

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1 + COPIES_IN_FLIGHT,
                                            thread_name_prefix="s3-part")
        return self._pool

    def _upload(self, chunk: bytes) -> None:
        self._wait()
        self._queued += 1
        self._pending = self._executor().submit(self._send, chunk, self._queued)

    def _copy(self, source: str, offset: int, length: int) -> None:
        for f in [f for f in self._copying if f.done()]:
            self._copying.remove(f)
            f.result()  # an error surfaces at the next part, not only at commit
        if len(self._copying) >= COPIES_IN_FLIGHT:
            self._copying.pop(0).result()
        self._queued += 1
        self.bytes_copied += length
        self._copying.append(self._executor().submit(
            self._send_copy, source, offset, length, self._queued))

    def _wait(self) -> None:
        """The part in flight is stored (or its error raised here)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _wait_all(self) -> None:
        self._wait()
        copying, self._copying = self._copying, []
        for f in copying:
            f.result()

    def _send(self, chunk: bytes, number: int) -> None:
        try:
            etag = self._store.client.upload_part(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, Body=chunk)["ETag"]
        except Exception as exc:  # noqa: BLE001
            raise ArchiveWriteError(f"cannot upload part {number} of {self.final_name}: "
                                    f"{_describe(exc)}") from None
        if etag.strip('"') != hashlib.md5(chunk, usedforsecurity=False).hexdigest():
            raise ArchiveWriteError(f"part {number} of {self.final_name} was stored with "
                                    "other bytes (ETag differs from its MD5)")
        self._parts.append({"PartNumber": number, "ETag": etag})

    def _send_copy(self, source: str, offset: int, length: int, number: int) -> None:
        store = self._store
        try:
            got = store.client.upload_part_copy(
                Bucket=store.bucket, Key=self._key, UploadId=self._upload_id,
                PartNumber=number, CopySource={"Bucket": store.bucket, "Key": store.key(source)},
                CopySourceRange=f"bytes={offset}-{offset + length - 1}")
        except Exception as exc:  # noqa: BLE001
            raise ArchiveWriteError(f"cannot copy part {number} of {self.final_name} from "
                                    f"{source}: {_describe(exc)}") from None
        # No MD5 check here: a copied part's ETag is not its MD5 on every
        # server (SeaweedFS answers a multipart-style one); the completed
        # object's size is checked, and the source never changes.
        self._parts.append({"PartNumber": number, "ETag": got["CopyPartResult"]["ETag"]})

    def commit(self, index: Any = None) -> ArchiveFacts:
        """Complete the upload (the caller has verified the stream); with
        ``index``, the index object is written first, like the directory store."""
        assert self._upload_id is not None and not self._done, "writer already closed"
        digest = self._hash.hexdigest()
        self._end_run()
        if self._buf or not self._queued:
            self._upload(bytes(self._buf))  # the last part may be short
            self._buf = bytearray()
        self._wait_all()
        self._parts.sort(key=lambda p: p["PartNumber"])
        if index is not None:
            if getattr(index, "archive_sha256", None) not in (None, digest) or (
                    getattr(index, "archive_size", None) and index.archive_size != self.size):
                raise ArchiveWriteError(f"the index of {self.final_name} describes other bytes")
            index.archive_sha256, index.archive_size = digest, self.size
            self._store._write_index(self.final_name, index)
        client, bucket = self._store.client, self._store.bucket
        try:
            client.complete_multipart_upload(Bucket=bucket, Key=self._key,
                                             UploadId=self._upload_id,
                                             MultipartUpload={"Parts": self._parts})
            self._done = True
            stored = client.head_object(Bucket=bucket, Key=self._key)["ContentLength"]
        except Exception as exc:  # noqa: BLE001
            if index is not None and not self._done:
                self._store._delete_key(self._store.key(index_name(self.final_name)))
            raise ArchiveWriteError(f"cannot commit {self.final_name}: {_describe(exc)}") \
                from None
        if stored != self.size:
            self._store._delete_key(self._key)
            raise ArchiveWriteError(f"{self.final_name} was stored with {stored} bytes, "
                                    f"{self.size} were sent")
        if self.bytes_copied:
            log.info("%s: %d of %d bytes copied by the store from the previous archive",
                     self.final_name, self.bytes_copied, self.size)
        return ArchiveFacts(self.final_name, self.size, digest, self.created_at)

    def abort(self) -> None:
        for pending in [self._pending, *self._copying]:
            try:
                if pending is not None:
                    pending.result()
            except Exception:  # noqa: BLE001 - the upload is aborted below anyway
                pass
        self._pending, self._copying = None, []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._done or self._upload_id is None:
            return
        self._done = True
        self._buf = bytearray()
        self._run = None
        try:
            self._store.client.abort_multipart_upload(
                Bucket=self._store.bucket, Key=self._key, UploadId=self._upload_id)
        except Exception as exc:  # noqa: BLE001 - the start-up sweep gets it later
            log.warning("could not abort the upload of %s (%s): the next start sweeps it",
                        self.final_name, _describe(exc))

    def __enter__(self) -> S3ArchiveWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


class S3ArchiveStore:
    """Archives as objects under ``s3://bucket/prefix``."""

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 region: str | None = None, part_size: int = 8 * 2**20,
                 client: Any = None) -> None:
        """Raises ``StorageError`` in one line when the bucket is missing or
        the credentials are refused."""
        self.bucket, self.prefix = parse_store_url(url)
        self.url = url
        if part_size < MIN_PART:
            raise ValueError(f"part_size must be >= {MIN_PART}")
        self.part_size = part_size
        self.copy_part = COPY_PART  # >= 2 * MIN_PART: see S3ArchiveWriter._end_run
        if client is None:
            import boto3
            from botocore.config import Config
            # A session of its own: boto3's default one keeps the credentials
            # it resolved first, whatever the environment says later.
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None,
                                  region_name=region or None,
                                  config=Config(retries={"max_attempts": 5, "mode": "standard"},
                                                s3={"addressing_style": "path"}))
        self.client = client
        self._blocks: OrderedDict[tuple[str, int], bytes] = OrderedDict()
        self._blocks_lock = threading.Lock()
        self._ahead: dict[tuple[str, int], Future[bytes]] = {}  # blocks being read ahead
        self._ahead_pool: ThreadPoolExecutor | None = None
        self._last_block: dict[str, int] = {}  # per archive, the last block fetched
        try:
            # a listing, not HeadBucket: some servers answer HeadBucket
            # without checking the signature
            self.client.list_objects_v2(Bucket=self.bucket, MaxKeys=1,
                                        Prefix=f"{self.prefix}/" if self.prefix else "")
        except Exception as exc:  # noqa: BLE001
            code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
            where = endpoint_url or "the default S3 endpoint"
            if code in ("404", "NoSuchBucket"):
                raise StorageError(f"the bucket {self.bucket!r} does not exist at {where}") \
                    from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StorageError(f"the bucket {self.bucket!r} at {where} refused the "
                                   "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
                                   "or the credentials file)") from None
            raise StorageError(f"cannot reach the bucket {self.bucket!r} at {where}: "
                               f"{_describe(exc)}") from None

    def key(self, file_name: str) -> str:
        if not _KEY.match(file_name) or any(p in (".", "..") for p in file_name.split("/")):
            raise ArchiveWriteError(f"archive name {file_name!r} leaves the store")
        return f"{self.prefix}/{file_name}" if self.prefix else file_name

    def _name(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def writer(self, node_dir: str, target_id: int, run_id: int,
               created_at: dt.datetime) -> S3ArchiveWriter:
        stamp = created_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        return S3ArchiveWriter(self, f"{node_dir}/{target_id}/{stamp}-{run_id}{ARCHIVE_SUFFIX}",
                               created_at)

    def _delete_key(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=key)
        except Exception as exc:  # noqa: BLE001
            raise ArchiveWriteError(f"cannot delete {self._name(key)}: {_describe(exc)}") \
                from None

    def delete(self, file_name: str) -> None:
        """The archive, then its index (an index left alone by a crash in
        between is swept at the next start)."""
        self._forget(file_name)
        self._delete_key(self.key(file_name))
        if file_name.endswith(ARCHIVE_SUFFIX):
            self._delete_key(self.key(index_name(file_name)))

    def size_of(self, file_name: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket,
                                               Key=self.key(file_name))["ContentLength"])
        except Exception as exc:  # noqa: BLE001
            raise ArchiveWriteError(f"cannot read {file_name}: {_describe(exc)}") from None

    def read_range(self, file_name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a stored object from ``offset`` (fewer at its end).

        Small reads are served from aligned blocks of ``READ_BLOCK`` bytes
        fetched whole and kept in a small shared LRU: the readers walk an
        archive member by member (<= 1 MiB each), and one GET per member costs
        its round trip each time (~12 ms on loopback). Archive objects never
        change once complete (a name is used once), so a block stays valid
        until the archive is deleted."""
        if length <= 0:
            return b""
        if length >= READ_BLOCK:
            return self._get_range(file_name, offset, length)
        out = bytearray()
        pos, end = offset, offset + length
        while pos < end:
            block = self._block(file_name, pos // READ_BLOCK)
            start = pos - (pos // READ_BLOCK) * READ_BLOCK
            piece = block[start:start + (end - pos)]
            if not piece:
                break  # the object ends here
            out += piece
            pos += len(piece)
            if len(block) < READ_BLOCK:
                break  # the last block: nothing lies past it
        return bytes(out)

    def _block(self, file_name: str, number: int) -> bytes:
        key = (file_name, number)
        with self._blocks_lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
            ahead = self._ahead.pop(key, None)
            sequential = self._last_block.get(file_name) == number - 1
            self._last_block[file_name] = number
        data = ahead.result() if ahead is not None else \
            self._get_range(file_name, number * READ_BLOCK, READ_BLOCK)
        with self._blocks_lock:
            self._blocks[key] = data
            while len(self._blocks) > READ_BLOCKS_KEPT:
                self._blocks.popitem(last=False)
            # A reader walking the archive (a delta reads every member it
            # reuses, in order) gets the next block fetched while it works
            # on this one.
            nxt = (file_name, number + 1)
            if sequential and len(data) == READ_BLOCK and nxt not in self._blocks \
                    and nxt not in self._ahead and len(self._ahead) < READ_AHEAD:
                if self._ahead_pool is None:
                    self._ahead_pool = ThreadPoolExecutor(max_workers=READ_AHEAD,
                                                          thread_name_prefix="s3-read")
                self._ahead[nxt] = self._ahead_pool.submit(
                    self._get_range, file_name, (number + 1) * READ_BLOCK, READ_BLOCK)
        return data

    def _forget(self, file_name: str) -> None:
        with self._blocks_lock:
            for key in [k for k in self._blocks if k[0] == file_name]:
                del self._blocks[key]
            for key in [k for k in self._ahead if k[0] == file_name]:
                del self._ahead[key]
            self._last_block.pop(file_name, None)

    def _get_range(self, file_name: str, offset: int, length: int) -> bytes:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(file_name),
                                          Range=f"bytes={offset}-{offset + length - 1}")["Body"]
            return body.read()
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "response", {}).get("Error", {}).get("Code") \
                    == "InvalidRange":
                return b""  # offset at or past the end, as pread
            raise ArchiveWriteError(f"cannot read {file_name}: {_describe(exc)}") from None

    def iter_bytes(self, file_name: str, chunk: int = 2**20) -> Iterator[bytes]:
        """The whole object as a stream (downloads), never whole in memory."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(file_name))["Body"]
        except Exception as exc:  # noqa: BLE001
            raise ArchiveWriteError(f"cannot read {file_name}: {_describe(exc)}") from None
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()

    def exists(self, file_name: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(file_name))
            return True
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in (
                    "404", "NoSuchKey", "NotFound"):
                return False
            raise ArchiveWriteError(f"cannot read {file_name}: {_describe(exc)}") from None

    def read_index_bytes(self, file_name: str) -> bytes | None:
        """The stored index object of ``file_name`` as it is (None: there is none)."""
        try:
            got = self.client.get_object(Bucket=self.bucket,
                                         Key=self.key(index_name(file_name)))
            return got["Body"].read()
        except Exception as exc:  # noqa: BLE001
            if getattr(exc, "response", {}).get("Error", {}).get("Code") in (
                    "404", "NoSuchKey", "NotFound"):
                return None
            raise ArchiveWriteError(f"cannot read the index of {file_name}: "
                                    f"{_describe(exc)}") from None

    def free_bytes(self) -> int | None:
        """Object storage has no free space to report: None (the metric and
        the status page leave it out)."""
        return None

    def _write_index(self, file_name: str, index: Any) -> None:
        buf = io.BytesIO()
        index.dump(buf)
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(index_name(file_name)),
                                   Body=buf.getvalue())
        except Exception as exc:  # noqa: BLE001
            raise ArchiveWriteError(f"cannot write the index of {file_name}: "
                                    f"{_describe(exc)}") from None

    def load_index(self, file_name: str) -> Any:
        """The archive's index; a missing or damaged one (or one describing
        other bytes) is rebuilt from the archive by ranged reads and stored."""
        from storage.tgz.index import ArchiveIndex, InvalidIndex

        size = self.size_of(file_name)
        try:
            got = self.client.get_object(Bucket=self.bucket,
                                         Key=self.key(index_name(file_name)))
            index = ArchiveIndex.load(io.BytesIO(got["Body"].read()))
            if index.archive_size == size:
                return index
            reason = "it describes an archive of another size"
        except InvalidIndex as exc:
            reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - missing or unreadable
            reason = _describe(exc)
        log.warning("rebuilding the index of %s: %s", file_name, reason)
        return self.rebuild_index(file_name, size)

    def rebuild_index(self, file_name: str, size: int | None = None) -> Any:
        """A new index from the archive alone (ranged reads), stored in place
        of the old one."""
        from storage.tgz.reader import rebuild_index

        if size is None:
            size = self.size_of(file_name)
        try:
            index = rebuild_index(lambda off, n: self.read_range(file_name, off, n), size)
        except InvalidArchive as exc:
            raise StorageError(f"archive {file_name} is damaged: {exc.message}") from None
        self._write_index(file_name, index)
        return index

    def _keys(self) -> Iterator[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"]

    def files(self) -> set[str]:
        """Every committed archive object, by name relative to the prefix."""
        return {self._name(k) for k in self._keys() if k.endswith(ARCHIVE_SUFFIX)}

    def index_files(self) -> set[str]:
        return {self._name(k) for k in self._keys() if k.endswith(INDEX_SUFFIX)}

    def sweep_temp_files(self) -> list[str]:
        """Abort the multipart uploads under the prefix left by a crash (the
        object store's temp files). Call only when no writer is open."""
        aborted = []
        pages = self.client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=f"{self.prefix}/" if self.prefix else "")
        for page in pages:
            for up in page.get("Uploads", []) or []:
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=up["Key"],
                                                   UploadId=up["UploadId"])
                aborted.append(self._name(up["Key"]))
        return aborted

    def sweep_unlisted(self, listed: set[str]) -> list[str]:
        """Delete archive objects the catalog does not list as retained (a
        crash between completing the upload and the catalog commit), then
        index objects without their archive."""
        stray = sorted(self.files() - listed)
        for name in stray:
            self.delete(name)
        kept = {index_name(n) for n in self.files()}
        orphans = sorted(self.index_files() - kept)
        for name in orphans:
            self._delete_key(self.key(name))
        return stray + orphans
