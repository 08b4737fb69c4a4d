"""An incremental parser of a raw (inflated) tar stream.

It splits the stream into entries exactly as GNU tar and tarfile do: the
header block(s) of an entry (GNU long name/link 'L'/'K' and pax 'x'/'g'
blocks belong to the entry after them), its data, the zero padding to 512,
and at the end the end-of-archive zero blocks and the zero padding after
them. Anything else (a bad checksum, a stream cut short, bytes after the end
marker that are not zeros) raises ``InvalidArchive``.
"""

from __future__ import annotations

from typing import Protocol

from storage.errors import InvalidArchive
from storage.tgz.format import BLOCK, NO_DATA, PREFIX_TYPES, HeaderInfo, HeaderParser, padded

PREFIX_MAX = 1 << 20  # a long name or pax header larger than this is refused
_ZERO_BLOCK = bytes(BLOCK)


class ScanHandler(Protocol):
    def entry(self, info: HeaderInfo, header: bytes, h_off: int) -> None: ...
    def data(self, chunk: bytes) -> None: ...
    def entry_end(self, padding: bytes) -> None: ...


class TarScanner:
    """Feed raw tar bytes in any chunking; calls the handler per entry."""

    def __init__(self, handler: ScanHandler) -> None:
        self._h = handler
        self._buf = bytearray()
        self._pos = 0  # consumed part of _buf
        self.offset = 0  # raw offset of _buf[_pos]
        self._state = "header"
        self._hp = HeaderParser()
        self._header = bytearray()  # header blocks of the entry being read
        self._h_off = 0
        self._need = 0  # bytes still to read in the current state
        self._size = 0  # prefix payload size or entry data size
        self._pad = 0
        self._kind = ""
        self.end_offset: int | None = None  # where the end-of-archive blocks start
        self.entries = 0

    def feed(self, raw: bytes | bytearray | memoryview) -> None:
        if self._state == "end":
            if bytes(raw).count(0) != len(raw):
                raise InvalidArchive("the tar stream has data after its end-of-archive marker")
            self.offset += len(raw)
            return
        self._buf += raw
        self._pump()
        del self._buf[:self._pos]
        self._pos = 0

    def finish(self) -> int:
        """Checks the stream ended cleanly; returns the raw size."""
        if self._state != "end":
            raise InvalidArchive("the tar stream is truncated (no end-of-archive marker)")
        assert self.end_offset is not None
        if self.offset - self.end_offset < 2 * BLOCK:
            raise InvalidArchive("the tar stream is truncated (incomplete end-of-archive marker)")
        return self.offset

    def _avail(self) -> int:
        return len(self._buf) - self._pos

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        self.offset += n
        return out

    def _pump(self) -> None:
        while True:
            state = self._state
            if state == "header":
                if self._avail() < BLOCK:
                    return
                self._header_block(self._take(BLOCK))
            elif state == "prefix":
                if self._avail() < self._need:
                    return
                block = self._take(self._need)
                self._header += block
                self._hp.prefix_payload(self._kind, block[:self._size])
                self._state = "header"
            elif state == "data":
                n = min(self._avail(), self._need)
                if n == 0:
                    return
                self._h.data(self._take(n))
                self._need -= n
                if self._need == 0:
                    self._state = "pad"
                    self._need = self._pad
            elif state == "pad":
                if self._avail() < self._need:
                    return
                self._h.entry_end(self._take(self._need))
                self._state = "header"
            else:  # end: only zeros may follow
                rest = self._buf[self._pos:]
                if rest.count(0) != len(rest):
                    raise InvalidArchive(
                        "the tar stream has data after its end-of-archive marker")
                self._pos += len(rest)
                self.offset += len(rest)
                return

    def _header_block(self, block: bytes) -> None:
        if not self._header:
            self._h_off = self.offset - BLOCK
        if block == _ZERO_BLOCK:
            if self._header:
                raise InvalidArchive("the tar stream ends inside an entry's headers")
            self.end_offset = self.offset - BLOCK
            self._state = "end"
            return
        info = HeaderParser.block_info(block)
        self._header += block
        kind = info.type.decode("latin-1") if info.type not in (b"", b"\0") else "0"
        if kind in PREFIX_TYPES:
            if info.size > PREFIX_MAX:
                raise InvalidArchive("the tar stream has an oversized long-name or pax header")
            self._kind = kind
            self._size = info.size
            self._need = padded(info.size)
            self._state = "prefix"
            return
        hi = self._hp.finish(info)
        header, self._header = bytes(self._header), bytearray()
        self.entries += 1
        self._h.entry(hi, header, self._h_off)
        size = hi.size if hi.type not in NO_DATA else 0
        self._pad = padded(size) - size
        if size:
            self._state = "data"
            self._need = size
        else:
            self._state = "pad"
            self._need = 0


def parse_header(header: bytes) -> HeaderInfo:
    """The entry described by ``header``: one entry's complete header block(s)
    (prefix blocks included), as a node's tar or ``make_header`` wrote them."""
    if not header or len(header) % BLOCK:
        raise InvalidArchive("an entry header is not a whole number of 512-byte blocks")
    hp = HeaderParser()
    pos = 0
    while pos < len(header):
        block = header[pos:pos + BLOCK]
        if block == _ZERO_BLOCK:
            raise InvalidArchive("an entry header holds a zero block")
        info = HeaderParser.block_info(block)
        pos += BLOCK
        kind = info.type.decode("latin-1") if info.type not in (b"", b"\0") else "0"
        if kind in PREFIX_TYPES:
            need = padded(info.size)
            if info.size > PREFIX_MAX or pos + need > len(header):
                raise InvalidArchive("an entry header has a truncated long-name or pax block")
            hp.prefix_payload(kind, header[pos:pos + info.size])
            pos += need
            continue
        if pos != len(header):
            raise InvalidArchive("an entry header has blocks after its main header")
        return hp.finish(info)
    raise InvalidArchive("an entry header has no main header block")
