"""Streaming verification of a tar.gz archive while it is received.

A node is trusted to run tar, not to send a well-formed or harmless archive.
Every byte of the stream is fed here on its way to disk: the gzip layer must
decompress cleanly to its end, and every tar member name must stay inside the
one top-level directory that was asked for (no absolute names, no ``..``).
A stream that is not gzip, is cut short, or escapes its root is refused, so
nothing that could not be restored safely is ever listed.

Inflation is bounded (``BoundedInflater``): at most ``INFLATE_STEP`` inflated
bytes exist at a time, and the limits of ``storage.limits.ArchiveLimits``
(inflated size, compression ratio) stop a gzip bomb early.
"""

from __future__ import annotations

import posixpath
import zlib
from collections.abc import Iterator

from storage.errors import ArchiveTooLarge, InvalidArchive
from storage.limits import INFLATE_STEP, MAX_SPECIAL_HEADER, ArchiveLimits, format_size

BLOCK = 512
_NO_DATA = frozenset("123456")


class BoundedInflater:
    """Inflates a gzip stream (one or more members) in bounded steps.

    ``feed`` yields the inflated bytes in chunks of at most ``step`` bytes,
    using ``decompress(data, max_length)`` and its ``unconsumed_tail``, so a
    few MB of gzip bomb never become GBs in memory. It raises
    ``ArchiveTooLarge`` once the inflated total crosses ``limits`` and
    ``InvalidArchive`` on corrupt gzip. Reusable by any reader of node streams.
    """

    def __init__(self, limits: ArchiveLimits | None = None, step: int = INFLATE_STEP) -> None:
        self.limits = limits or ArchiveLimits()
        self.step = step
        self._z = zlib.decompressobj(wbits=31)  # gzip framing
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def eof(self) -> bool:
        """The last gzip member seen so far is complete."""
        return self._z.eof

    def feed(self, data: bytes) -> Iterator[bytes]:
        pending = data
        try:
            while pending:
                if self._z.eof:
                    # pigz and cat'ed streams may carry several gzip members.
                    self._z = zlib.decompressobj(wbits=31)
                out = self._z.decompress(pending, self.step)
                rest = self._z.unconsumed_tail or (self._z.unused_data if self._z.eof
                                                   else b"")
                # Count input as it is consumed, not as it arrives: a bomb sent
                # in one read must not earn the ratio of its whole size at once.
                self.bytes_in += len(pending) - len(rest)
                pending = rest
                if out:
                    self._account(len(out))
                    yield out
        except zlib.error as exc:
            raise InvalidArchive(f"the stream is not valid gzip: {exc}") from None

    def finish(self) -> Iterator[bytes]:
        """Whatever the inflater still holds; then the stream must be complete."""
        try:
            while not self._z.eof:
                out = self._z.decompress(b"", self.step)
                if not out:
                    break
                self._account(len(out))
                yield out
        except zlib.error as exc:
            raise InvalidArchive(f"the gzip stream is corrupt at its end: {exc}") from None
        if not self._z.eof:
            raise InvalidArchive("the gzip stream is truncated (no end of stream)")

    def _account(self, n: int) -> None:
        self.bytes_out += n
        check_inflation(self.limits, self.bytes_in, self.bytes_out)


def check_inflation(lim: ArchiveLimits, bytes_in: int, bytes_out: int) -> None:
    """Raise ``ArchiveTooLarge`` once ``bytes_out`` inflated from ``bytes_in``
    crosses the size or ratio cap of ``lim`` (a gzip bomb)."""
    if lim.max_uncompressed and bytes_out > lim.max_uncompressed:
        raise ArchiveTooLarge(
            f"the archive inflates to more than {format_size(lim.max_uncompressed)} "
            "(--max-uncompressed-size); nothing was kept")
    if lim.max_ratio and bytes_out > lim.ratio_floor \
            and bytes_out > lim.max_ratio * max(bytes_in, 1):
        raise ArchiveTooLarge(
            f"the archive inflates more than {lim.max_ratio:g}:1 "
            f"({format_size(bytes_in)} to over {format_size(bytes_out)}; "
            "a gzip bomb? see --max-compression-ratio); nothing was kept")


class TarGzVerifier:
    """Feed it the compressed stream with ``feed``; ``finish`` raises
    ``InvalidArchive`` unless it was one complete, well-formed archive whose
    members all live under ``root``."""

    def __init__(self, root: str, limits: ArchiveLimits | None = None) -> None:
        self.root = root
        self._inflater = BoundedInflater(limits)
        self._buf = bytearray()
        self._skip = 0  # bytes of member data (padded) still to skip
        self._long_name: str | None = None
        self._pax_path: str | None = None
        self._pax_size: int | None = None
        self._long_link: str | None = None
        self._pax_link: str | None = None
        self._pending_special: str | None = None  # 'L' or 'x' payload being read
        self._special = bytearray()
        self._special_left = 0
        self.members = 0
        self.end_seen = False
        self.raw_bytes = 0
        # Symlinks this archive made: no later member may pass through or replace one.
        self._symlinks: set[str] = set()

    # -- gzip layer ------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        for out in self._inflater.feed(data):
            self.raw_bytes += len(out)
            self._tar(out)

    def feed_raw(self, raw: bytes) -> None:
        """The tar layer alone, for a caller that inflates the stream itself."""
        self.raw_bytes += len(raw)
        self._tar(raw)

    def finish_raw(self) -> None:
        """``finish`` for a stream fed through ``feed_raw``."""
        if not self.end_seen:
            raise InvalidArchive("the tar archive is truncated (no end-of-archive marker)")
        if self.members == 0:
            raise InvalidArchive("the archive holds no files")

    def finish(self) -> None:
        for out in self._inflater.finish():
            self.raw_bytes += len(out)
            self._tar(out)
        if not self.end_seen:
            raise InvalidArchive("the tar archive is truncated (no end-of-archive marker)")
        if self.members == 0:
            raise InvalidArchive("the archive holds no files")

    # -- tar layer ----------------------------------------------------------------

    def _tar(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.end_seen:
                # Only zero padding may follow the end marker: a reader that
                # ignores the marker would extract whatever comes after it.
                if bytes(view).strip(b"\0"):
                    raise InvalidArchive("the archive holds data after its end-of-archive "
                                         "marker")
                return
            if self._skip:
                n = min(self._skip, len(view))
                if self._pending_special is not None and self._special_left:
                    take = min(n, self._special_left)
                    self._special += view[:take]
                    self._special_left -= take
                self._skip -= n
                view = view[n:]
                if not self._skip and self._pending_special is not None:
                    self._close_special()
                continue
            need = BLOCK - len(self._buf)
            self._buf += view[:need]
            view = view[need:]
            if len(self._buf) == BLOCK:
                header, self._buf = bytes(self._buf), bytearray()
                self._header(header)

    def _header(self, h: bytes) -> None:
        if h == b"\0" * BLOCK:
            self.end_seen = True
            return
        if not _checksum_ok(h):
            raise InvalidArchive("the tar stream has a corrupt header")
        size = _number(h[124:136])
        kind = chr(h[156]) if h[156] else "0"
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if kind in ("L", "x", "K", "g"):
            # GNU long name/link, pax per-file or global header: read its payload.
            if size > MAX_SPECIAL_HEADER:
                raise InvalidArchive(f"the tar stream has a {size}-byte extended header")
            self._pending_special = kind
            self._special = bytearray()
            self._special_left = size
            self._skip = padded
            if padded == 0:
                self._close_special()
            return
        name = self._long_name or self._pax_path or _ustar_name(h)
        link = self._long_link or self._pax_link or _field(h[157:257])
        if self._pax_size is not None:
            size = self._pax_size
            padded = (size + BLOCK - 1) // BLOCK * BLOCK
        self._long_name = self._pax_path = self._pax_size = None
        self._long_link = self._pax_link = None
        self._check_name(name)
        if kind == "1":  # a hard link names another member: it must stay inside too
            self._check_name(link)
            self._check_symlinks(link)
        self._check_symlinks(name, whole=True)
        if kind == "2":
            self._symlinks.add(_norm(name))
        self.members += 1
        # As tarfile reads it: links, directories and devices carry no data.
        self._skip = 0 if kind in _NO_DATA else padded

    def _close_special(self) -> None:
        kind, payload = self._pending_special, bytes(self._special)
        self._pending_special = None
        if kind == "L":
            self._long_name = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == "K":
            self._long_link = payload.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == "x":
            self._pax_path = _pax_field(payload, b"path")
            self._pax_link = _pax_field(payload, b"linkpath")
            size = _pax_field(payload, b"size")
            if size is not None:
                if not size.isdigit():
                    raise InvalidArchive("the tar stream has a corrupt pax size")
                self._pax_size = int(size)

    def _check_name(self, name: str) -> None:
        if not name:
            raise InvalidArchive("the archive holds a member with an empty name")
        if name.startswith("/"):
            raise InvalidArchive(f"the archive holds an absolute member name {name[:200]!r}")
        parts = name.split("/")
        if ".." in parts:
            raise InvalidArchive(f"the archive holds a member escaping its root {name[:200]!r}")
        top = posixpath.normpath(name).split("/", 1)[0]
        if top != self.root:
            raise InvalidArchive(f"the archive holds {name[:200]!r}, outside {self.root!r}")


    def _check_symlinks(self, name: str, *, whole: bool = False) -> None:
        """Refuse a member reached through a symlink of this archive (``app/l ->
        /etc`` then ``app/l/evil``), or one replacing such a symlink: an
        extractor following it would write outside the destination."""
        if not self._symlinks:
            return
        parts = _norm(name).split("/")
        for i in range(1, len(parts) + (1 if whole else 0)):
            prefix = "/".join(parts[:i])
            if prefix in self._symlinks:
                raise InvalidArchive(f"the archive holds {name[:200]!r}, which passes through "
                                     f"its own symlink {prefix[:200]!r}")


def _norm(name: str) -> str:
    return posixpath.normpath(name).strip("/")


def _field(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _ustar_name(h: bytes) -> str:
    name = h[0:100].split(b"\0", 1)[0]
    if h[257:262] == b"ustar":
        prefix = h[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 for large sizes
        value = int.from_bytes(field[1:], "big")
        return value
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise InvalidArchive("the tar stream has a corrupt size field") from None


def _checksum_ok(h: bytes) -> bool:
    try:
        stored = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return False
    unsigned = sum(h[:148]) + 8 * 32 + sum(h[156:])
    return stored == unsigned


def _pax_field(payload: bytes, key: bytes) -> str | None:
    """Value of ``key`` in a pax extended header (records ``"<len> key=value\\n"``)."""
    pos = 0
    found = None
    while pos < len(payload):
        space = payload.find(b" ", pos)
        if space < 0:
            break
        try:
            length = int(payload[pos:space])
        except ValueError:
            raise InvalidArchive("the tar stream has a corrupt pax header") from None
        if length <= 0:
            raise InvalidArchive("the tar stream has a corrupt pax header")
        record = payload[space + 1: pos + length - 1]
        k, _, v = record.partition(b"=")
        if k == key:
            found = v.decode("utf-8", "surrogateescape")
        pos += length
    return found
