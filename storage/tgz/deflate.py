"""Compression of one gzip member, and bounded inflation of one.

Every member is compressed in one go from at most ~1.5 MiB of raw bytes, so a
member is a complete gzip stream (header, deflate data, CRC32, ISIZE) that any
gzip reader accepts on its own or concatenated with others.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

from storage.errors import InvalidArchive

INFLATE_STEP = 256 << 10  # inflate at most this much raw data per call

try:  # a faster deflate with the zlib API; see bench/deflate.py for the figures
    from isal import isal_zlib as _fast  # type: ignore[import-not-found]
except ImportError:  # pragma: no cover - depends on the installed extras
    _fast = None

DEFAULT_LEVEL = 6


def compress_member(raw: bytes | bytearray | memoryview, level: int = DEFAULT_LEVEL) -> bytes:
    """One complete gzip member holding ``raw``."""
    if _fast is not None and level <= 3:
        c = _fast.compressobj(level, _fast.DEFLATED, 31)
    else:
        c = zlib.compressobj(level, zlib.DEFLATED, 31)
    return c.compress(raw) + c.flush()


def inflate_member(compressed: bytes, step: int = INFLATE_STEP) -> Iterator[bytes]:
    """The raw bytes of exactly one gzip member, ``step`` bytes at most at a
    time (never an unbounded inflate); raises ``InvalidArchive`` if the bytes
    are not one complete member."""
    d = zlib.decompressobj(wbits=31)
    data = compressed
    try:
        while True:
            out = d.decompress(data, step)
            if out:
                yield out
            if d.eof:
                break
            data = d.unconsumed_tail
            if not data and not out:
                raise InvalidArchive("an archive member is truncated")
    except zlib.error as exc:
        raise InvalidArchive(f"an archive member is not valid gzip: {exc}") from None
    if d.unused_data:
        raise InvalidArchive("an archive member has trailing bytes")
