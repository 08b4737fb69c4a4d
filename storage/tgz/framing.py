"""Writing member-aligned archives: the member writer shared by full backups
(``FramingWriter``, re-framing a node's tar stream) and deltas (``Composer``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from storage.errors import InvalidArchive
from storage.tgz.deflate import compressor, inflate_member
from storage.tgz.format import (
    CHUNK,
    GROUP_MAX,
    LARGE,
    Entry,
    HeaderInfo,
    Member,
    block_size_for,
    chunk_key,
    eof_key,
    group_key,
    is_boundary,
)
from storage.tgz.index import ArchiveIndex
from storage.tgz.scan import TarScanner

if TYPE_CHECKING:
    from storage.tgz.reader import ArchiveReader

log = logging.getLogger(__name__)

RawSource = bytes | Callable[[], bytes]


class BlockHasher:
    """Per-block hashes (first 16 bytes of sha256) and the whole-content sha256."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self.hashes: list[bytes] = []
        self._cur = hashlib.sha256()
        self._fill = 0
        self.content = hashlib.sha256()

    def update(self, data: bytes | memoryview) -> None:
        self.content.update(data)
        if not self.block_size:
            return
        view = memoryview(data)
        while view:
            n = min(len(view), self.block_size - self._fill)
            self._cur.update(view[:n])
            self._fill += n
            view = view[n:]
            if self._fill == self.block_size:
                self.hashes.append(self._cur.digest()[:16])
                self._cur = hashlib.sha256()
                self._fill = 0

    def finish(self) -> list[bytes]:
        if self._fill:
            self.hashes.append(self._cur.digest()[:16])
            self._fill = 0
        return self.hashes


class Framer:
    """Lays entries out in members and writes them; reuses a previous
    archive's member (compressed bytes verbatim) whenever the keys match."""

    def __init__(self, out: Callable[[bytes], None], level: int | None = None,
                 prev: ArchiveReader | None = None, backend: str | None = None,
                 verify_copies: bool = False, hash_archive: bool = True,
                 copied: Callable[[int, bytes], None] | None = None) -> None:
        self._out = out
        # A member reused verbatim goes to ``copied(offset in the previous
        # archive, bytes)`` when given, so a store that copies stored ranges
        # itself (S3's UploadPartCopy) need not send those bytes again.
        self._copied = copied
        # False when the sink hashes what it writes anyway (ArchiveWriter):
        # then the index's archive_sha256 stays None until the writer's commit.
        self._hash_archive = hash_archive
        self._verify_copies = verify_copies
        self._compress = compressor(backend, level)
        self.prev = prev
        self._prev_by_key = prev.index.members_by_key() if prev is not None else {}
        self.members: list[Member] = []
        self.entries: list[Entry] = []
        self.c_off = 0
        self.r_off = 0  # raw offset of the next member
        self.pos = 0  # raw offset of the next entry (members pending included)
        self._sha = hashlib.sha256()
        self._group: list[tuple[bytes, list[RawSource]]] = []
        self._group_raw = 0
        self.members_copied = 0
        self.members_compressed = 0
        self.raw_bytes_compressed = 0
        self.bytes_copied = 0

    # -- members ----------------------------------------------------------------

    def emit(self, key: str | None, r_len: int, sources: list[RawSource]) -> Member:
        """Writes one member of ``r_len`` raw bytes. With ``key`` None the key
        is the chunk key of the raw bytes."""
        raw: bytes | None = None
        if key is None:
            raw = _join(sources)
            key = chunk_key(hashlib.sha256(raw).digest())
        old = self._prev_by_key.get(key)
        data: bytes | None = None
        copied_from: int | None = None
        if old is not None and old.r_len == r_len and self.prev is not None:
            data = self.prev.member_bytes(old)
            # A cheap check that we copy what the index says: gzip's ISIZE.
            if len(data) != old.c_len or int.from_bytes(data[-4:], "little") != r_len % (1 << 32):
                log.warning("previous archive member at %d does not match its index; "
                            "recompressing", old.c_off)
                data = None
            elif self._verify_copies and not self._copy_intact(data, old):
                data = None
            else:
                copied_from = old.c_off
                self.members_copied += 1
                self.bytes_copied += len(data)
        if data is None:
            if raw is None:
                raw = _join(sources)
            if len(raw) != r_len:
                raise AssertionError(f"member raw length {len(raw)} != {r_len}")
            data = self._compress(raw)
            self.members_compressed += 1
            self.raw_bytes_compressed += r_len
        m = Member(self.c_off, len(data), self.r_off, r_len, key)
        if copied_from is not None and self._copied is not None:
            self._copied(copied_from, data)
        else:
            self._out(data)
        if self._hash_archive:
            self._sha.update(data)
        self.members.append(m)
        self.c_off += len(data)
        self.r_off += r_len
        return m

    def _copy_intact(self, data: bytes, old: Member) -> bool:
        """Inflates a member about to be copied (gzip checks its CRC32), so a
        damaged previous archive is not carried into the next one."""
        n = 0
        try:
            for piece in inflate_member(data):
                n += len(piece)
        except InvalidArchive as exc:
            log.warning("previous archive member at %d is damaged (%s); recompressing",
                        old.c_off, exc.message)
            return False
        return n == old.r_len

    # -- entries ----------------------------------------------------------------

    def place(self, entry: Entry, header_len: int) -> None:
        entry.h_off = self.pos
        entry.d_off = self.pos + header_len

    def add_small(self, entry: Entry, sources: list[RawSource], raw_len: int) -> None:
        """An entry whose whole raw bytes (header, data, padding) go in a group."""
        if self._group and self._group_raw + raw_len > GROUP_MAX:
            self.flush_group()
        self.entries.append(entry)
        self._group.append((entry.key_part(), sources))
        self._group_raw += raw_len
        self.pos += raw_len
        if is_boundary(entry.path):
            self.flush_group()

    def add_member(self, entries: list[Entry], key: str, r_len: int,
                   sources: list[RawSource]) -> None:
        """Whole small entries (placed already) that make up one member of
        their own, e.g. a previous archive's member copied as a unit."""
        self.flush_group()
        self.entries.extend(entries)
        self.pos += r_len
        self.emit(key, r_len, sources)

    def flush_group(self) -> None:
        if not self._group:
            return
        key = group_key([part for part, _ in self._group])
        sources = [s for _, srcs in self._group for s in srcs]
        r_len = self._group_raw
        self._group, self._group_raw = [], 0
        self.emit(key, r_len, sources)

    def add_large_header(self, entry: Entry, header: RawSource, header_len: int) -> None:
        """A large entry's header block(s), in a member of their own."""
        self.flush_group()
        self.entries.append(entry)
        self.pos += header_len
        self.emit(group_key([entry.header_key_part()]), header_len, [header])

    def add_chunk(self, key: str | None, sources: list[RawSource], r_len: int) -> None:
        self.pos += r_len
        self.emit(key, r_len, sources)

    def finish(self, eof_raw: bytes) -> ArchiveIndex:
        self.flush_group()
        self.pos += len(eof_raw)
        self.emit(eof_key(eof_raw), len(eof_raw), [eof_raw])
        return ArchiveIndex(members=self.members, entries=self.entries,
                            archive_sha256=self._sha.hexdigest() if self._hash_archive
                            else None, archive_size=self.c_off,
                            raw_size=self.r_off)

    def stats(self) -> dict[str, int]:
        return {"members_copied": self.members_copied,
                "members_compressed": self.members_compressed,
                "raw_bytes_compressed": self.raw_bytes_compressed,
                "bytes_copied": self.bytes_copied}


def _join(sources: list[RawSource]) -> bytes:
    return b"".join(s if isinstance(s, bytes | bytearray) else s() for s in sources)


def new_entry(info: HeaderInfo, header: bytes) -> Entry:
    return Entry(**info.header_fields(), h_off=0, d_off=0,
                 header_sha256=hashlib.sha256(header).digest())


class EntryStream:
    """Receives one entry (header, then data in any chunking, then padding) and
    lays it out through a ``Framer``: small entries into groups, large ones as
    a header member plus CHUNK-sized data members. Hashes content and blocks."""

    def __init__(self, framer: Framer,
                 block_size: Callable[[int], int] = block_size_for) -> None:
        self._f = framer
        self._block_size = block_size
        self._entry: Entry | None = None
        self._header = b""
        self._hasher: BlockHasher | None = None
        self._buf: list[bytes] = []
        self._fill = 0  # data bytes in _buf
        self._done = 0  # data bytes of the entry already passed on

    def entry(self, info: HeaderInfo, header: bytes, h_off: int = 0) -> None:
        e = new_entry(info, header)
        self._f.place(e, len(header))
        self._entry, self._header = e, header
        self._buf, self._fill, self._done = [], 0, 0
        if e.has_data:
            large = e.size >= LARGE
            self._hasher = BlockHasher(self._block_size(e.size) if large else 0)
            if large:
                self._f.add_large_header(e, header, len(header))
        else:
            self._hasher = None

    def data(self, chunk: bytes) -> None:
        e = self._entry
        assert e is not None and self._hasher is not None
        if self._done + self._fill + len(chunk) > e.size:
            raise InvalidArchive(f"{e.path!r} has more data than its header says")
        self._hasher.update(chunk)
        if e.size < LARGE:
            self._buf.append(chunk)
            self._fill += len(chunk)
            return
        view = memoryview(chunk)
        while view:
            n = min(len(view), CHUNK - self._fill)
            self._buf.append(bytes(view[:n]))
            self._fill += n
            view = view[n:]
            if self._fill == CHUNK and self._done + CHUNK < e.size:
                self._flush_chunk(b"")

    def _flush_chunk(self, padding: bytes) -> None:
        sources: list[RawSource] = [*self._buf, padding] if padding else list(self._buf)
        r_len = self._fill + len(padding)
        self._done += self._fill
        self._buf, self._fill = [], 0
        self._f.add_chunk(None, sources, r_len)

    def entry_end(self, padding: bytes) -> Entry:
        e = self._entry
        assert e is not None
        if e.has_data:
            assert self._hasher is not None
            if self._done + self._fill != e.size:
                raise InvalidArchive(f"{e.path!r} has less data than its header says")
            e.sha256 = self._hasher.content.digest()
            if e.size >= LARGE:
                e.block_size = self._hasher.block_size
                e.block_hashes = self._hasher.finish()
                self._flush_chunk(padding)
                self._entry = None
                return e
        raw_len = len(self._header) + self._fill + len(padding)
        sources: list[RawSource] = [self._header, *self._buf]
        if padding:
            sources.append(padding)
        self._f.add_small(e, sources, raw_len)
        self._buf, self._fill, self._entry = [], 0, None
        return e


class FramingWriter:
    """A full backup: the node's raw tar stream in, a member-aligned tar.gz out.

    ``feed`` takes the inflated tar bytes in any chunking; ``finish`` writes
    the end-of-archive member and returns the index (raises
    ``InvalidArchive`` for a stream that is not one complete tar archive).
    """

    def __init__(self, out: Callable[[bytes], None], *, level: int | None = None,
                 backend: str | None = None,
                 block_size: Callable[[int], int] = block_size_for,
                 hash_archive: bool = True) -> None:
        self._framer = Framer(out, level, None, backend, hash_archive=hash_archive)
        self._stream = EntryStream(self._framer, block_size)
        self._scanner = TarScanner(self._stream)  # type: ignore[arg-type]
        self._finished = False

    @property
    def raw_bytes(self) -> int:
        return self._scanner.offset

    def feed(self, raw: bytes | bytearray | memoryview) -> None:
        self._scanner.feed(raw)

    def finish(self) -> ArchiveIndex:
        if self._finished:
            raise RuntimeError("finish() called twice")
        size = self._scanner.finish()
        self._finished = True
        end = self._scanner.end_offset
        assert end is not None and end == self._framer.pos
        if self._scanner.entries == 0:
            raise InvalidArchive("the archive holds no files")
        return self._framer.finish(bytes(size - end))

    def stats(self) -> dict[str, int]:
        return self._framer.stats()
