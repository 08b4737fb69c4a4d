"""Composing a new full archive from the previous one plus what changed.

The caller hands over the entries of the new tree in canonical order, each
either copied from the previous archive (unchanged content; maybe a new
header), added whole (fetched from the node) or patched (old content with
new pieces). Members whose raw bytes are the same as a previous member's
(same key) are copied compressed, verbatim; only the rest is compressed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator

from storage.errors import InvalidArchive
from storage.tgz.format import (
    CHUNK,
    Entry,
    HeaderInfo,
    Member,
    block_size_for,
    canonical_key,
    eof_bytes,
    group_key,
    padded,
)
from storage.tgz.framing import EntryStream, Framer, RawSource
from storage.tgz.index import ArchiveIndex
from storage.tgz.reader import ArchiveReader
from storage.tgz.scan import parse_header

_ZEROS = bytes(CHUNK)


class Composer:
    """Writes one complete, standard tar.gz (member-aligned) and its index.

    ``stats()`` says how much was copied and how much compressed. With
    ``verify_copies`` every member about to be copied is inflated first (gzip
    checks its CRC32; ~3 ms per raw MB), so a member of the previous archive
    damaged on disk raises ``InvalidArchive`` instead of being carried into
    the new archive (the caller then takes a true full backup).

    A member copied verbatim goes to ``copied(offset, data)`` (its offset in
    the previous archive and its bytes) when given, else to ``out`` like the
    rest: the archive's bytes are the same either way, in the same order;
    a store writer's ``copy_range`` may copy long runs of such ranges
    without sending them again.
    """

    def __init__(self, out: Callable[[bytes], None], prev: ArchiveReader | None, *,
                 level: int | None = None, backend: str | None = None,
                 block_size: Callable[[int], int] = block_size_for,
                 verify_copies: bool = False, hash_archive: bool = True,
                 copied: Callable[[int, bytes], None] | None = None) -> None:
        self.prev = prev
        self._f = Framer(out, level, prev, backend, verify_copies, hash_archive, copied)
        self._stream = EntryStream(self._f, block_size)
        self._last: tuple[bytes, ...] | None = None
        self._finished = False
        self._old_pos: dict[int, int] | None = None  # id(previous entry) -> position
        self._old_members: dict[int, Member] = {}  # keyed previous members by raw offset

    def stats(self) -> dict[str, int]:
        return self._f.stats()

    @property
    def members_copied(self) -> int:
        return self._f.members_copied

    @property
    def members_compressed(self) -> int:
        return self._f.members_compressed

    @property
    def raw_bytes_compressed(self) -> int:
        return self._f.raw_bytes_compressed

    def _order(self, path: str) -> None:
        if self._finished:
            raise RuntimeError("the composer has finished")
        key = canonical_key(path)
        if self._last is not None and key <= self._last:
            raise ValueError(f"{path!r} is out of canonical (tar --sort=name) order")
        self._last = key

    def _prev(self) -> ArchiveReader:
        if self.prev is None:
            raise ValueError("no previous archive to copy from")
        return self.prev

    def copy(self, old: Entry, header: bytes | None = None) -> Entry:
        """An entry whose content is unchanged; ``header`` (raw header
        block(s)) replaces the old one when metadata changed."""
        prev = self._prev()
        if header is None:
            info: HeaderInfo = old
            header_sha = old.header_sha256
            if not header_sha:
                header_sha = hashlib.sha256(prev.header_bytes(old)).digest()
            header_len = old.header_len
            header_src: RawSource = lambda: prev.header_bytes(old)  # noqa: E731
        else:
            info = parse_header(header)
            if (info.type in "123456") != (old.type in "123456") or (
                    old.has_data and info.size != old.size):
                raise ValueError(f"copy of {old.path!r}: the new header changes its content")
            header_sha = hashlib.sha256(header).digest()
            header_len = len(header)
            header_src = header
        self._order(info.path)
        e = Entry(**info.header_fields(), h_off=0, d_off=0, sha256=old.sha256,
                  block_size=old.block_size, block_hashes=list(old.block_hashes),
                  record=old.record, header_sha256=header_sha)
        self._f.place(e, header_len)
        data_len = old.end - old.d_off
        if not e.is_large:
            sources: list[RawSource] = [header_src]
            if data_len:
                sources.append(lambda: prev.read_raw_bytes(old.d_off, old.end))
            self._f.add_small(e, sources, header_len + data_len)
            return e
        self._f.add_large_header(e, header_src, header_len)
        for off in range(0, old.size, CHUNK):
            r_start = old.d_off + off
            # The last chunk carries the padding.
            r_len = data_len - off if off + CHUNK >= old.size else CHUNK
            self._f.add_chunk(self._old_chunk_key(r_start, r_len),
                              [lambda a=r_start, n=r_len: prev.read_raw_bytes(a, a + n)], r_len)
        return e

    def copy_run(self, olds: list[Entry]) -> list[Entry]:
        """Entries whose content and headers are unchanged, in order: as
        ``copy`` each, but wherever the run holds every entry of a previous
        group member, that member is copied in one step (no per-entry
        layout, no re-reading of headers). The pending group, if any, is
        closed first: members need not fall where a fresh layout would put
        them, only tile the archive (their keys say what they hold)."""
        prev = self._prev()
        if self._old_pos is None:
            self._old_pos = {id(e): i for i, e in enumerate(prev.index.entries)}
            self._old_members = {m.r_off: m for m in prev.index.members if m.key}
        old_entries = prev.index.entries
        out: list[Entry] = []
        i, n = 0, len(olds)
        while i < n:
            old = olds[i]
            m = self._old_members.get(old.h_off) if not old.is_large else None
            p = self._old_pos.get(id(old)) if m is not None else None
            if m is not None and p is not None:
                m_end = m.r_off + m.r_len
                j = i
                while (j < n and p + j - i < len(old_entries)
                       and olds[j] is old_entries[p + j - i] and olds[j].end <= m_end
                       and not olds[j].is_large and olds[j].header_sha256):
                    j += 1
                run = olds[i:j]
                if run and run[-1].end == m_end and group_key(
                        [e.key_part() for e in run]) == m.key:
                    out.extend(self._copy_member(m, run))
                    i = j
                    continue
            out.append(self.copy(old))
            i += 1
        return out

    def _copy_member(self, m: Member, run: list[Entry]) -> list[Entry]:
        prev = self._prev()
        self._f.flush_group()
        for e in run:
            self._order(e.path)
        shift = self._f.pos - m.r_off
        # Keywords spelled out, not **e.header_fields(): this is the hot path of
        # an unchanged tree (every entry of every reused member), and building
        # the dict costs ~1.5x the construction itself.
        new = [Entry(path=e.path, type=e.type, mode=e.mode, uid=e.uid, gid=e.gid,
                     uname=e.uname, gname=e.gname, size=e.size, mtime=e.mtime, link=e.link,
                     h_off=e.h_off + shift, d_off=e.d_off + shift, sha256=e.sha256,
                     block_size=e.block_size, block_hashes=list(e.block_hashes),
                     record=e.record, header_sha256=e.header_sha256) for e in run]
        start, end = m.r_off, m.r_off + m.r_len
        self._f.add_member(new, m.key, m.r_len,
                           [lambda: prev.read_raw_bytes(start, end)])
        return new

    def _old_chunk_key(self, r_start: int, r_len: int) -> str | None:
        """The key of the previous member holding exactly these raw bytes, if
        one does (then the member is copied without inflating it)."""
        idx = self._prev().index
        try:
            m = idx.members[idx.member_at(r_start)]
        except IndexError:
            return None
        if m.r_off == r_start and m.r_len == r_len and m.key:
            return m.key
        return None

    def add(self, header: bytes, data_chunks: Iterable[bytes]) -> Entry:
        """An entry fetched from the node: its raw header block(s) as the
        node's tar wrote them, and its content."""
        info = parse_header(header)
        self._order(info.path)
        self._stream.entry(info, header)
        has_data = info.type not in "123456"
        for chunk in data_chunks:
            if not chunk:
                continue
            if not has_data:
                raise InvalidArchive(f"{info.path!r} is a type {info.type!r} entry with data")
            self._stream.data(bytes(chunk))
        pad = padded(info.size) - info.size if has_data else 0
        return self._stream.entry_end(bytes(pad))

    def patch(self, old: Entry, header: bytes, size: int,
              pieces: Iterable[tuple[int, bytes]]) -> Entry:
        """New content = the old entry's content with ``pieces`` (offset,
        bytes; ascending, not overlapping) written over it, cut or extended
        (with zeros) to ``size``. Unchanged chunks of a large file come out
        as the same members, so they are copied, not recompressed."""
        info = parse_header(header)
        if info.size != size or info.type in "123456":
            raise ValueError(f"patch of {old.path!r}: the header does not describe "
                             f"{size} bytes of content")
        return self.add(header, self._patched(old, size, pieces))

    def _patched(self, old: Entry, size: int,
                 pieces: Iterable[tuple[int, bytes]]) -> Iterator[bytes]:
        pos = 0
        for off, data in pieces:
            if off < pos:
                raise InvalidArchive(f"patch of {old.path!r}: pieces overlap or are unordered")
            if off + len(data) > size:
                raise InvalidArchive(f"patch of {old.path!r}: a piece lies beyond the end")
            yield from self._old_range(old, pos, off)
            yield bytes(data)
            pos = off + len(data)
        yield from self._old_range(old, pos, size)

    def _old_range(self, old: Entry, start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return
        if start < old.size:
            yield from self._prev().iter_data(old, start, min(end, old.size))
        pos = max(start, old.size)
        while pos < end:
            n = min(end - pos, CHUNK)
            yield _ZEROS[:n]
            pos += n

    def finish(self, records: dict[str, bytes] | None = None) -> ArchiveIndex:
        """Appends the end-of-archive member; returns the new archive's index."""
        if self._finished:
            raise RuntimeError("the composer has finished")
        if not self._f.entries:
            raise ValueError("an archive needs at least one entry")
        self._finished = True
        index = self._f.finish(eof_bytes(self._f.pos))
        if records:
            index.set_records(records)
        return index
