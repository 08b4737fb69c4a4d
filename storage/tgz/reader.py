"""Reading an archive through its index with ranged reads, and rebuilding a
lost index from the archive alone."""

from __future__ import annotations

import bisect
import hashlib
import zlib
from collections.abc import Callable, Iterator

from storage.errors import InvalidArchive
from storage.tgz.deflate import INFLATE_STEP, inflate_member
from storage.tgz.format import (
    CHUNK,
    LARGE,
    Entry,
    HeaderInfo,
    Member,
    block_size_for,
    chunk_key,
    eof_key,
    group_key,
)
from storage.tgz.framing import BlockHasher, new_entry
from storage.tgz.index import ArchiveIndex
from storage.tgz.scan import TarScanner

ReadRange = Callable[[int, int], bytes]  # (offset, length) -> exactly length bytes
CACHE_MAX = 4 << 20  # keep the last inflated member if it is at most this big
READ_STEP = 1 << 20


class ArchiveReader:
    """Ranged access to one archive: ``read_range(offset, length)`` fetches
    compressed bytes (a local file now, an object store later)."""

    def __init__(self, read_range: ReadRange, index: ArchiveIndex) -> None:
        self._read_range = read_range
        self.index = index
        self._cache: tuple[int, bytes] | None = None  # (member position, raw bytes)

    def member_bytes(self, m: Member) -> bytes:
        """The member's compressed bytes, to copy verbatim."""
        data = self._read_range(m.c_off, m.c_len)
        if len(data) != m.c_len:
            raise InvalidArchive(f"the archive is shorter than its index says "
                                 f"(member at {m.c_off})")
        return data

    def _member_raw(self, i: int) -> Iterator[bytes]:
        """The member's raw bytes. A member of at most CACHE_MAX raw bytes is
        inflated whole and kept, so reading its entries one by one (a group
        being recompressed) inflates it once; a bigger one is streamed."""
        if self._cache is not None and self._cache[0] == i:
            yield self._cache[1]
            return
        m = self.index.members[i]
        if m.r_len <= CACHE_MAX:
            raw = b"".join(self._inflate(m))
            self._cache = (i, raw)
            yield raw
            return
        yield from self._inflate(m)

    def _inflate(self, m: Member) -> Iterator[bytes]:
        n = 0
        for piece in inflate_member(self.member_bytes(m), INFLATE_STEP):
            n += len(piece)
            if n > m.r_len:
                raise InvalidArchive(f"an archive member at {m.c_off} is longer than indexed")
            yield piece
        if n != m.r_len:
            raise InvalidArchive(f"an archive member at {m.c_off} is shorter than indexed")

    def read_raw(self, start: int, end: int) -> Iterator[bytes]:
        """The raw (inflated) tar bytes ``[start, end)``, in pieces."""
        pos = start
        while pos < end:
            i = self.index.member_at(pos)
            m = self.index.members[i]
            m_pos = m.r_off
            for piece in self._member_raw(i):
                lo, hi = m_pos, m_pos + len(piece)
                m_pos = hi
                if hi <= pos:
                    continue
                take = piece[pos - lo:min(hi, end) - lo]
                if take:
                    yield take
                    pos += len(take)
                if pos >= end:
                    return
            if m_pos != m.r_off + m.r_len:  # pragma: no cover - checked in _member_raw
                raise InvalidArchive("an archive member is shorter than indexed")

    def read_raw_bytes(self, start: int, end: int) -> bytes:
        return b"".join(self.read_raw(start, end))

    def header_bytes(self, e: Entry) -> bytes:
        if e.header is not None:
            return e.header
        return self.read_raw_bytes(e.h_off, e.d_off)

    def iter_data(self, e: Entry, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """The entry's content bytes ``[start, end)`` (end defaults to its size)."""
        stop = e.size if end is None else min(end, e.size)
        if not e.has_data or start >= stop:
            return iter(())
        return self.read_raw(e.d_off + start, e.d_off + stop)


class _Collect:
    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self._hasher: BlockHasher | None = None
        self._block_size: Callable[[int], int]

    def entry(self, info: HeaderInfo, header: bytes, h_off: int) -> None:
        e = new_entry(info, header)
        e.h_off, e.d_off = h_off, h_off + len(header)
        self.entries.append(e)
        if e.has_data:
            large = e.size >= LARGE
            self._hasher = BlockHasher(block_size_for(e.size) if large else 0)
        else:
            self._hasher = None

    def data(self, chunk: bytes) -> None:
        assert self._hasher is not None
        self._hasher.update(chunk)

    def entry_end(self, padding: bytes) -> None:
        e = self.entries[-1]
        if self._hasher is not None:
            e.sha256 = self._hasher.content.digest()
            if self._hasher.block_size:
                e.block_size = self._hasher.block_size
                e.block_hashes = self._hasher.finish()
        self._hasher = None


def rebuild_index(read_range: ReadRange, size: int) -> ArchiveIndex:
    """The index of an archive, from the archive alone: gzip members found by
    walking them, entries by parsing the tar stream. Members that do not lie
    on entry (or chunk) boundaries get no key, and ``framed`` is then False:
    such an archive (e.g. one written before members were aligned) is read
    fine but its members are never reused. ``rec``, fingerprint and node time
    are not in the archive and stay None."""
    collect = _Collect()
    scanner = TarScanner(collect)  # type: ignore[arg-type]
    archive_sha = hashlib.sha256()
    members: list[Member] = []
    raw_shas: list[bytes] = []
    c_pos = 0  # compressed offset of the current member's start
    c_read = 0
    r_pos = 0
    m_raw = 0
    m_sha = hashlib.sha256()
    d = zlib.decompressobj(wbits=31)
    pending = b""
    try:
        while True:
            if not pending and c_read < size:
                pending = read_range(c_read, min(READ_STEP, size - c_read))
                if not pending:
                    raise InvalidArchive("the archive is shorter than its size")
                archive_sha.update(pending)
                c_read += len(pending)
            out = d.decompress(pending, INFLATE_STEP)
            pending = d.unconsumed_tail
            if out:
                scanner.feed(out)
                m_sha.update(out)
                m_raw += len(out)
            if d.eof:
                # At the end of a member all input not used is in unused_data
                # (unconsumed_tail may still hold a stale copy of it).
                tail = d.unused_data
                c_end = c_read - len(tail)
                members.append(Member(c_pos, c_end - c_pos, r_pos, m_raw, ""))
                raw_shas.append(m_sha.digest())
                c_pos, r_pos, m_raw, m_sha = c_end, r_pos + m_raw, 0, hashlib.sha256()
                pending = tail
                d = zlib.decompressobj(wbits=31)
            elif not out and not pending and c_read >= size:
                break
    except zlib.error as exc:
        raise InvalidArchive(f"the archive is not valid gzip: {exc}") from None
    if m_raw or c_pos != size:
        raise InvalidArchive("the archive's last gzip member is truncated")
    raw_size = scanner.finish()
    idx = ArchiveIndex(members=members, entries=collect.entries,
                       archive_sha256=archive_sha.hexdigest(), archive_size=size,
                       raw_size=raw_size)
    _key_members(idx, raw_shas, scanner.end_offset or 0)
    return idx


def _key_members(idx: ArchiveIndex, raw_shas: list[bytes], eof_start: int) -> None:
    h_offs = [e.h_off for e in idx.entries]
    starts = {e.h_off: i for i, e in enumerate(idx.entries)}
    ends = {e.end: i for i, e in enumerate(idx.entries)}
    heads = {e.d_off: i for i, e in enumerate(idx.entries) if e.is_large}
    framed = True
    for m, raw_sha in zip(idx.members, raw_shas, strict=True):
        end = m.r_off + m.r_len
        if m.r_off == eof_start and end == idx.raw_size:
            m.key = eof_key(bytes(m.r_len))
        elif m.r_off in starts and end in ends and end <= eof_start:
            a, b = starts[m.r_off], ends[end]
            m.key = group_key([e.key_part() for e in idx.entries[a:b + 1]])
        elif m.r_off in starts and end in heads and heads[end] == starts[m.r_off]:
            m.key = group_key([idx.entries[starts[m.r_off]].header_key_part()])
        else:
            m.key = ""
            i = bisect.bisect_right(h_offs, m.r_off) - 1
            e = idx.entries[i] if i >= 0 else None
            if (e is not None and e.d_off <= m.r_off and end <= e.end
                    and (m.r_off - e.d_off) % CHUNK == 0):
                m.key = chunk_key(raw_sha)
            else:
                framed = False
    idx.framed = framed
