"""Whether an archive's index still describes the archive (``backhaul verify``).

The index must load (gzip, JSON lines, version, counts), name the archive's
sha256 and size as they are now, its members must tile the file and the tar
stream (``ArchiveIndex.load`` checks that), and every entry's header blocks
must sit where the index says: read there through the index, their sha256
is the one recorded and they name the recorded path.
"""

from __future__ import annotations

import hashlib
import io
import tarfile

from storage.errors import InvalidArchive, StorageError
from storage.stores.base import Store
from storage.tgz import ArchiveIndex, ArchiveReader, InvalidIndex, parse_header


def index_problem(store: Store, file_name: str, sha256: str, size: int) -> str | None:
    """What is wrong with the index of ``file_name`` (whose bytes now hash to
    ``sha256`` and are ``size`` long), or None when it is consistent."""
    try:
        raw = store.read_index_bytes(file_name)
        if raw is None:
            return "the index is missing"
        index = ArchiveIndex.load(io.BytesIO(raw))
    except InvalidIndex as exc:
        return exc.message
    except StorageError as exc:
        return f"the index cannot be read: {exc.message}"
    if index.archive_size != size:
        return (f"the index describes an archive of {index.archive_size} bytes, "
                f"the file has {size}")
    if index.archive_sha256 != sha256:
        return "the index names another archive sha256"
    try:
        reader = ArchiveReader(lambda off, n: store.read_range(file_name, off, n), index)
        for e in index.entries:
            header = reader.read_raw_bytes(e.h_off, e.d_off)
            if e.header_sha256 and hashlib.sha256(header).digest() != e.header_sha256:
                return f"the header of {e.path!r} is not where the index says"
            if parse_header(header).path != e.path:
                return f"the index places {e.path!r} on another entry's header"
    except (InvalidArchive, StorageError) as exc:
        return f"the archive does not match its index: {exc.message}"
    except (ValueError, IndexError, tarfile.TarError) as exc:
        return f"the archive does not match its index: {exc}"
    return None
