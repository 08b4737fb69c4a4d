"""Whether an archive's index still describes the archive (``backhaul verify``).

The index must load (gzip, JSON lines, version, counts), name the archive's
sha256 and size as they are now, its members must tile the file and the tar
stream (``ArchiveIndex.load`` checks that), and every entry's header blocks
must sit where the index says: read there through the index, their sha256
is the one recorded and they name the recorded path.
"""

from __future__ import annotations

import hashlib
import os
import tarfile

from storage.archives import ArchiveStore, index_name
from storage.errors import InvalidArchive, StorageError
from storage.tgz import ArchiveIndex, ArchiveReader, InvalidIndex, parse_header


def index_problem(store: ArchiveStore, file_name: str, sha256: str, size: int) -> str | None:
    """What is wrong with the index of ``file_name`` (whose bytes now hash to
    ``sha256`` and are ``size`` long), or None when it is consistent."""
    try:
        with open(store.path_of(index_name(file_name)), "rb") as f:
            index = ArchiveIndex.load(f)
    except FileNotFoundError:
        return "the index is missing"
    except InvalidIndex as exc:
        return exc.message
    except OSError as exc:
        return f"the index cannot be read: {exc.strerror or exc}"
    if index.archive_size != size:
        return (f"the index describes an archive of {index.archive_size} bytes, "
                f"the file has {size}")
    if index.archive_sha256 != sha256:
        return "the index names another archive sha256"
    try:
        fd = os.open(store.path_of(file_name), os.O_RDONLY)
    except OSError as exc:
        return f"the archive cannot be read: {exc.strerror or exc}"
    try:
        reader = ArchiveReader(lambda off, n: os.pread(fd, n, off), index)
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
    finally:
        os.close(fd)
    return None
