"""Bounded gzip inflation and a spool file for what the node sends."""

from __future__ import annotations

import io
import zlib
from collections.abc import Callable, Iterator
from typing import IO

from storage.errors import InvalidArchive
from storage.limits import ArchiveLimits
from storage.verify import check_inflation

# Raw bytes produced per decompress call: a gzip bomb inflates in steps of
# this size into the consumer (a verifier, a framer, a file), never in memory.
STEP = 1 << 20


class Inflater:
    """gzip bytes in (one or more members, any chunking), raw bytes out."""

    def __init__(self, out: Callable[[bytes], None], limits: ArchiveLimits | None = None) -> None:
        self.out = out
        # Inflated size and ratio caps (a gzip bomb fails the run early).
        self.limits = limits or ArchiveLimits()
        self.bytes_in = 0
        self._z = zlib.decompressobj(wbits=31)
        self._open = False  # inside a member
        self.members = 0
        self.raw_bytes = 0

    def feed(self, data: bytes) -> None:
        buf = data
        try:
            while buf:
                self._open = True
                raw = self._z.decompress(buf, STEP)
                if self._z.eof:
                    self.members += 1
                    self._open = False
                    rest = self._z.unused_data
                    self._z = zlib.decompressobj(wbits=31)
                else:
                    rest = self._z.unconsumed_tail
                # Input counted as consumed, so a bomb sent in one read does not
                # earn the ratio of its whole size at once.
                self.bytes_in += len(buf) - len(rest)
                buf = rest
                if raw:
                    self.raw_bytes += len(raw)
                    check_inflation(self.limits, self.bytes_in, self.raw_bytes)
                    self.out(raw)
        except zlib.error as exc:
            raise InvalidArchive(f"the stream is not valid gzip: {exc}") from None

    def finish(self) -> None:
        if self._open:
            try:
                while True:
                    raw = self._z.decompress(self._z.unconsumed_tail, STEP) \
                        if self._z.unconsumed_tail else self._z.flush(STEP)
                    if not raw:
                        break
                    self.raw_bytes += len(raw)
                    check_inflation(self.limits, self.bytes_in, self.raw_bytes)
                    self.out(raw)
            except zlib.error as exc:
                raise InvalidArchive(f"the gzip stream is corrupt at its end: {exc}") from None
            if not self._z.eof:
                raise InvalidArchive("the gzip stream is truncated (no end of stream)")
            self.members += 1
            self._open = False
        if self.members == 0:
            raise InvalidArchive("the stream holds no gzip data")


def inflate_all(data: bytes, limit: int, limits: ArchiveLimits | None = None) -> bytes:
    """A small gzip'd reply (a listing, a scan section) into memory, refusing
    more than ``limit`` raw bytes."""
    out = bytearray()

    def take(raw: bytes) -> None:
        out.extend(raw)
        if len(out) > limit:
            raise InvalidArchive(f"the node's reply inflates to more than {limit} bytes")

    inf = Inflater(take, limits)
    inf.feed(data)
    inf.finish()
    return bytes(out)


class Spool:
    """An unnamed temp file: appended to, read back by offset."""

    def __init__(self, directory: str) -> None:
        import tempfile
        self.f: IO[bytes] = tempfile.TemporaryFile(dir=directory)
        self.size = 0

    def append(self, data: bytes) -> None:
        self.f.seek(0, io.SEEK_END)
        self.f.write(data)
        self.size += len(data)

    def read(self, off: int, n: int) -> bytes:
        self.f.seek(off)
        data = self.f.read(n)
        if len(data) != n:
            raise InvalidArchive("spooled node data is shorter than announced")
        return data

    def chunks(self, off: int, n: int, step: int = STEP) -> Iterator[bytes]:
        end = off + n
        while off < end:
            k = min(step, end - off)
            yield self.read(off, k)
            off += k

    def close(self) -> None:
        self.f.close()
