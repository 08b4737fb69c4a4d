"""The archive-store interface every reader and writer in the server uses.

Two backends implement it: the local directory (``storage.archives.
ArchiveStore``, the default) and S3-compatible object storage
(``storage.stores.s3.S3ArchiveStore``). Nothing outside ``storage/`` may
assume archives are local files: reads go through ``read_range`` (ranged,
for delta composition and selective restore) or ``iter_bytes`` (a whole
archive as a stream, for downloads, verify and restore), never whole in memory.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from storage.archives import ArchiveFacts


class StoreWriter(Protocol):
    """One archive being written: nothing is visible before ``commit()``;
    leaving the ``with`` block without it (or on any error) discards it."""

    final_name: str
    size: int

    def write(self, data: bytes | memoryview) -> None: ...

    def copy_range(self, source: str, offset: int, data: bytes) -> None:
        """Appends ``data``, which are the bytes at ``offset`` of the stored
        archive ``source`` (a delta reuses the previous archive's members).
        The same as ``write(data)`` for the archive's bytes and sha256; a
        store that can copy a stored range without sending it (S3's
        UploadPartCopy) may do so for long runs of consecutive ranges."""
        ...

    def commit(self, index: Any = None) -> ArchiveFacts: ...

    def abort(self) -> None: ...

    def __enter__(self) -> StoreWriter: ...

    def __exit__(self, et: Any, ev: Any, tb: Any) -> None: ...


@runtime_checkable
class Store(Protocol):
    """Archives by name (``<node>/<target-id>/<stamp>-<run>.tar.gz``), each
    with its index beside it."""

    url: str  # where the archives are, for logs (no credentials in it)

    def writer(self, node_dir: str, target_id: int, run_id: int,
               created_at: dt.datetime) -> StoreWriter: ...

    def exists(self, file_name: str) -> bool: ...

    def size_of(self, file_name: str) -> int: ...

    def read_range(self, file_name: str, offset: int, length: int) -> bytes: ...

    def iter_bytes(self, file_name: str, chunk: int = 2**20) -> Iterator[bytes]: ...

    def read_index_bytes(self, file_name: str) -> bytes | None:
        """The stored index of ``file_name`` as it is (None: there is none)."""
        ...

    def load_index(self, file_name: str) -> Any: ...

    def rebuild_index(self, file_name: str) -> Any: ...

    def delete(self, file_name: str) -> None: ...

    def files(self) -> set[str]: ...

    def index_files(self) -> set[str]: ...

    def sweep_temp_files(self) -> list[Any]: ...

    def sweep_unlisted(self, listed: set[str]) -> list[str]: ...

    def free_bytes(self) -> int | None:
        """Free space for archives; None when the store has no such limit
        to report (object storage)."""
        ...
