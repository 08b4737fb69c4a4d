"""Compression of one gzip member, and bounded inflation of one.

Every member is compressed in one go from at most ~1.5 MiB of raw bytes, so a
member is a complete gzip stream (header, deflate data, CRC32, ISIZE) that any
gzip reader accepts on its own or concatenated with others.

The deflate implementation is chosen by name: ``zlib`` (stdlib), ``isal``
(Intel ISA-L, levels 0-3) or ``zlib-ng``; bench/deflate.py measures them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator
from typing import Any

from storage.errors import InvalidArchive

INFLATE_STEP = 256 << 10  # inflate at most this much raw data per call

Compress = Callable[[bytes | bytearray | memoryview], bytes]


def _module(backend: str) -> Any:
    if backend == "zlib":
        return zlib
    if backend == "isal":
        from isal import isal_zlib

        return isal_zlib
    if backend == "zlib-ng":
        from zlib_ng import zlib_ng

        return zlib_ng
    raise ValueError(f"unknown deflate backend {backend!r}")


def available(backend: str) -> bool:
    try:
        _module(backend)
    except ImportError:
        return False
    return True


# The default, by the figures of bench/deflate.py (docs/ARCHITECTURE.md): ISA-L
# level 2 re-frames at ~170 MB/s of raw tar per core, 6.6x zlib -6 and ~3x a
# node's pigz on two cores, for archives ~9 % larger than gzip -6's. zlib -1
# (same size, 2.7x slower than ISA-L) is the fallback where isal is missing.
DEFAULT_BACKEND = "isal" if available("isal") else "zlib"
DEFAULT_LEVEL = 2 if DEFAULT_BACKEND == "isal" else 1


def compressor(backend: str | None = None, level: int | None = None) -> Compress:
    """A function that returns one complete gzip member holding its input."""
    name = backend or DEFAULT_BACKEND
    mod = _module(name)
    if level is None:
        level = DEFAULT_LEVEL if name == DEFAULT_BACKEND else 6
    if name == "isal":
        level = min(level, 3)  # ISA-L's levels are 0-3
    wbits = 31  # gzip framing
    mod.compressobj(level, mod.DEFLATED, wbits)  # an unsupported level fails here, early

    def compress(raw: bytes | bytearray | memoryview) -> bytes:
        c = mod.compressobj(level, mod.DEFLATED, wbits)
        return c.compress(raw) + c.flush()

    return compress


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
