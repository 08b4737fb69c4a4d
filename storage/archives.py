"""The archive store on a local directory.

Layout: ``<root>/<node>/<target-id>/<UTC timestamp>-<run id>.tar.gz``, files
0600, directories 0700. An archive is written to a temp file in its final
directory, fsynced, renamed into place and the directory fsynced; only then is
it listed in the catalog. A temp file never outlives its writer, and a start-up
sweep removes those left by a crash.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import logging
import os
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from storage.catalog import Catalog
from storage.errors import ArchiveWriteError, InvalidArchive, StorageError
from storage.tgz.index import ArchiveIndex, InvalidIndex
from storage.tgz.reader import rebuild_index

log = logging.getLogger(__name__)

TEMP_MARK = ".partial-"
ARCHIVE_SUFFIX = ".tar.gz"
INDEX_SUFFIX = ".index"
_SAFE = re.compile(r"[^A-Za-z0-9._@-]")


def index_name(file_name: str) -> str:
    """The index file beside an archive: same directory, same stem."""
    if not file_name.endswith(ARCHIVE_SUFFIX):
        raise ValueError(f"{file_name!r} is not an archive name")
    return file_name[:-len(ARCHIVE_SUFFIX)] + INDEX_SUFFIX


def node_dir_name(user: str, host: str, port: int) -> str:
    """A file-system safe, unambiguous directory name for a node."""
    return _SAFE.sub("_", f"{user}@{host}_{port}")


@dataclass(frozen=True)
class ArchiveFacts:
    file_name: str  # relative to the store root
    size: int
    sha256: str
    created_at: dt.datetime


class _Fsync(threading.Thread):
    """fsync of one file descriptor in a thread (fsync releases the GIL)."""

    def __init__(self, fd: int) -> None:
        super().__init__(name="archive-fsync", daemon=True)
        self._fd = fd
        self.error: OSError | None = None
        self.start()

    def run(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = exc

    def check(self) -> None:
        if self.error is not None:
            raise self.error


class ArchiveWriter:
    """Receives one archive's bytes; ``commit()`` makes it durable and visible.

    Leaving the ``with`` block without ``commit()`` (or on any exception)
    removes the temp file.
    """

    def __init__(self, store: ArchiveStore, rel_dir: str, stem: str,
                 created_at: dt.datetime) -> None:
        self._store = store
        self._dir = store.root / rel_dir
        self.final_name = f"{rel_dir}/{stem}.tar.gz"
        self._final = store.root / self.final_name
        self._tmp = self._dir / f".{stem}.tar.gz{TEMP_MARK}{secrets.token_hex(4)}"
        self.created_at = created_at
        self._hash = hashlib.sha256()
        self.size = 0
        self._fd: int | None = None
        self._done = False
        try:
            store._makedirs(self._dir)
            self._fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot create {self._tmp}")) from exc

    def write(self, data: bytes | memoryview) -> None:
        assert self._fd is not None, "writer already closed"
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                self._hash.update(view[:n])
                self.size += n
                view = view[n:]
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot write {self.final_name}")) from exc

    def copy_range(self, source: str, offset: int, data: bytes) -> None:
        """Bytes of a stored archive, reused: on a local disk writing them is
        the copy (they were just read from the page cache)."""
        self.write(data)

    def commit(self, index: ArchiveIndex | None = None) -> ArchiveFacts:
        """Makes the archive durable and visible; with ``index``, its index
        first (the index learns the archive's sha256 and size here)."""
        assert self._fd is not None, "writer already closed"
        # The archive's fsync (tens of MB to flush) runs while the index is
        # written: both must be durable before the archive's rename, which
        # stays last, so an archive is still never visible without its index.
        synced = _Fsync(self._fd)
        try:
            if index is not None:
                digest = self._hash.hexdigest()
                if index.archive_sha256 not in (None, digest) or (
                        index.archive_size and index.archive_size != self.size):
                    raise ArchiveWriteError(f"the index of {self.final_name} describes "
                                            "other bytes")
                index.archive_sha256, index.archive_size = digest, self.size
                self._store._write_index(self.final_name, index)
        finally:
            synced.join()
        try:
            synced.check()
            os.close(self._fd)
            self._fd = None
            os.rename(self._tmp, self._final)
            self._done = True
            _fsync_dir(self._dir)
        except OSError as exc:
            if index is not None and not self._done:
                self._store._unlink(index_name(self.final_name))
            raise ArchiveWriteError(_describe(exc, f"cannot commit {self.final_name}")) from exc
        return ArchiveFacts(self.final_name, self.size, self._hash.hexdigest(), self.created_at)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if not self._done:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._done = True

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()


class ArchiveStore:
    """Archives as files under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._makedirs(self.root)
        self.url = str(self.root)

    def _makedirs(self, path: Path) -> None:
        # Each level 0700, not only the last: ``mkdir(parents=True)`` makes the
        # parents (the per-node directories) with the umask's mode.
        missing = []
        while not path.exists():
            missing.append(path)
            path = path.parent
        for p in reversed(missing):
            try:
                p.mkdir(mode=0o700)
            except FileExistsError:
                pass

    def writer(self, node_dir: str, target_id: int, run_id: int,
               created_at: dt.datetime) -> ArchiveWriter:
        stamp = created_at.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        return ArchiveWriter(self, f"{node_dir}/{target_id}", f"{stamp}-{run_id}", created_at)

    def path_of(self, file_name: str) -> Path:
        path = (self.root / file_name).resolve()
        if self.root.resolve() not in path.parents:
            raise ArchiveWriteError(f"archive name {file_name!r} leaves the store")
        return path

    def delete(self, file_name: str) -> None:
        """Deletes an archive and then its index (an index left alone by a
        crash in between is swept at the next start)."""
        self._unlink(file_name)
        if file_name.endswith(ARCHIVE_SUFFIX):
            self._unlink(index_name(file_name))

    def _unlink(self, file_name: str) -> None:
        try:
            os.unlink(self.path_of(file_name))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot delete {file_name}")) from exc

    def _write_index(self, file_name: str, index: ArchiveIndex) -> None:
        """Temp + fsync + rename + directory fsync, like an archive."""
        name = index_name(file_name)
        final = self.path_of(name)
        tmp = final.parent / f".{final.name}{TEMP_MARK}{secrets.token_hex(4)}"
        try:
            with open(tmp, "xb") as f:
                os.fchmod(f.fileno(), 0o600)
                index.dump(f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ArchiveWriteError(_describe(exc, f"cannot write the index of {file_name}")) \
                from exc

    def read_range(self, file_name: str, offset: int, length: int) -> bytes:
        """``length`` bytes of a stored file from ``offset`` (fewer at its end)."""
        try:
            fd = os.open(self.path_of(file_name), os.O_RDONLY)
            try:
                return os.pread(fd, length, offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot read {file_name}")) from exc

    def exists(self, file_name: str) -> bool:
        return self.path_of(file_name).is_file()

    def size_of(self, file_name: str) -> int:
        try:
            return self.path_of(file_name).stat().st_size
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot read {file_name}")) from exc

    def iter_bytes(self, file_name: str, chunk: int = 2**20) -> Iterator[bytes]:
        """The whole file as a stream (downloads, verify, restore)."""
        try:
            f = open(self.path_of(file_name), "rb")
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot read {file_name}")) from exc
        with f:
            while True:
                try:
                    data = f.read(chunk)
                except OSError as exc:
                    raise ArchiveWriteError(_describe(exc, f"cannot read {file_name}")) \
                        from exc
                if not data:
                    return
                yield data

    def read_index_bytes(self, file_name: str) -> bytes | None:
        """The stored index of ``file_name`` as it is (None: there is none)."""
        try:
            with open(self.path_of(index_name(file_name)), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot read the index of {file_name}")) \
                from exc

    def free_bytes(self) -> int | None:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def load_index(self, file_name: str) -> ArchiveIndex:
        """The archive's index; a missing or damaged one (or one describing
        other bytes) is rebuilt from the archive and written back."""
        path = self.path_of(file_name)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot read {file_name}")) from exc
        try:
            with open(self.path_of(index_name(file_name)), "rb") as f:
                index = ArchiveIndex.load(f)
            if index.archive_size == size:
                return index
            reason = "it describes an archive of another size"
        except FileNotFoundError:
            reason = "it is missing"
        except (OSError, InvalidIndex) as exc:
            reason = str(exc)
        log.warning("rebuilding the index of %s: %s", file_name, reason)
        return self.rebuild_index(file_name)

    def rebuild_index(self, file_name: str) -> ArchiveIndex:
        """A new index from the archive alone, written in place of the old one."""
        path = self.path_of(file_name)
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise ArchiveWriteError(_describe(exc, f"cannot read {file_name}")) from exc
        with open(path, "rb") as f:
            def read(offset: int, length: int) -> bytes:
                return os.pread(f.fileno(), length, offset)
            try:
                index = rebuild_index(read, size)
            except InvalidArchive as exc:
                raise StorageError(f"archive {file_name} is damaged: {exc.message}") from None
        self._write_index(file_name, index)
        return index

    def files(self) -> set[str]:
        """Every committed archive file, relative to the root."""
        return {p.relative_to(self.root).as_posix() for p in self.root.glob("*/*/*.tar.gz")
                if TEMP_MARK not in p.name}

    def index_files(self) -> set[str]:
        """Every committed index file, relative to the root."""
        return {p.relative_to(self.root).as_posix() for p in self.root.glob(f"*/*/*{INDEX_SUFFIX}")
                if TEMP_MARK not in p.name}

    def sweep_temp_files(self) -> list[Path]:
        """Remove temp files left by a crash. Call only when no writer is open."""
        removed = []
        for p in self.root.glob(f"*/*/.*{TEMP_MARK}*"):
            p.unlink(missing_ok=True)
            removed.append(p)
        return removed

    def sweep_run_temp_files(self, target_id: int, run_ids: list[int]) -> list[Path]:
        """Remove the temp files of runs a dead process left (a killed worker's;
        other writers may be busy in the store meanwhile)."""
        removed = []
        for run_id in run_ids:
            for p in self.root.glob(f"*/{target_id}/.*-{run_id}.tar.gz{TEMP_MARK}*"):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed

    def sweep_unlisted(self, listed: set[str]) -> list[str]:
        """Remove archive files the catalog does not list as retained: a crash
        between the rename and the catalog commit leaves such a file."""
        stray = sorted(self.files() - listed)
        for name in stray:
            self.delete(name)
        kept = {index_name(n) for n in self.files()}
        orphans = sorted(self.index_files() - kept)
        for name in orphans:  # a crash between the index's and the archive's rename
            self._unlink(name)
        return stray + orphans


def rotate(catalog: Catalog, store: ArchiveStore, target_id: int, keep: int) -> list[int]:
    """Delete the oldest retained archives beyond ``keep``; returns their ids.

    Only ever called after a successful commit, so a failed run never causes
    a deletion, and it never deletes below ``keep``.
    """
    if keep < 1:
        raise ValueError("keep must be >= 1")
    retained = catalog.list_archives(target_id, retained_only=True)  # newest first
    doomed = retained[keep:]
    # Unlist first, then delete: a crash in between leaves an unlisted file,
    # which the start-up sweep removes, never a listed archive without a file.
    catalog.mark_archives_deleted([a["id"] for a in doomed])
    for arch in doomed:
        store.delete(arch["file_name"])
    return [a["id"] for a in doomed]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: OSError, what: str) -> str:
    reason = {errno.ENOSPC: "no space left on the archive disk",
              errno.EDQUOT: "disk quota exceeded on the archive disk",
              errno.EACCES: "permission denied",
              errno.EROFS: "the archive disk is read-only"}.get(exc.errno or 0, exc.strerror)
    return f"{what}: {reason}"
