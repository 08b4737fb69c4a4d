"""The composable tar.gz archive format and its index (see format.py and
docs/ARCHITECTURE.md, "Archive format and index")."""

from storage.tgz.composer import Composer
from storage.tgz.format import (
    BLOCK_SIZE_DEFAULT,
    CHUNK,
    GROUP_MAX,
    LARGE,
    Entry,
    Member,
    block_size_for,
    canonical_key,
    make_header,
)
from storage.tgz.framing import FramingWriter
from storage.tgz.index import ArchiveIndex, InvalidIndex
from storage.tgz.reader import ArchiveReader, rebuild_index
from storage.tgz.scan import parse_header

__all__ = [
    "BLOCK_SIZE_DEFAULT", "CHUNK", "GROUP_MAX", "LARGE", "ArchiveIndex", "ArchiveReader",
    "Composer", "Entry", "FramingWriter", "InvalidIndex", "Member", "block_size_for",
    "canonical_key", "make_header", "parse_header", "rebuild_index",
]
