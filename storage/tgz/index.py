"""The index beside an archive: gzip-compressed JSON lines, versioned.

Line 1 is the header, then one ``{"m": [c_off, c_len, r_off, r_len, key]}``
line per gzip member in order, then one line per tar entry in archive order.
Paths are ``str`` with surrogateescape, written with JSON ``\\udcXX`` escapes,
so a non-UTF-8 name round-trips. See docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import base64
import bisect
import gzip
import io
import json
import zlib
from dataclasses import dataclass, field
from typing import IO, Any

from storage.errors import StorageError
from storage.tgz.format import BLOCK_SIZE_DEFAULT, Entry, Member

FORMAT = "backhaul-index"
VERSION = 1


class InvalidIndex(StorageError):
    """An index file is missing, unreadable or not of a version we know."""

    code = "invalid_index"


@dataclass
class ArchiveIndex:
    members: list[Member] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)
    archive_sha256: str | None = None
    archive_size: int = 0
    raw_size: int = 0
    fingerprint: str | None = None
    node_time: str | None = None  # the node's clock when its listing was taken
    block_size_default: int = BLOCK_SIZE_DEFAULT
    framed: bool = True  # every member keyed: its members may be reused
    _by_path: dict[str, Entry] | None = field(default=None, repr=False, compare=False)
    _member_starts: list[int] | None = field(default=None, repr=False, compare=False)

    def by_path(self, path: str) -> Entry | None:
        if self._by_path is None:
            self._by_path = {e.path: e for e in self.entries}
        return self._by_path.get(path)

    def members_by_key(self) -> dict[str, Member]:
        return {m.key: m for m in self.members if m.key}

    def member_at(self, raw_offset: int) -> int:
        """Position in ``members`` of the member holding raw byte ``raw_offset``."""
        if self._member_starts is None:
            self._member_starts = [m.r_off for m in self.members]
        i = bisect.bisect_right(self._member_starts, raw_offset) - 1
        if i < 0 or raw_offset >= self.members[i].r_off + self.members[i].r_len:
            raise IndexError(f"raw offset {raw_offset} is outside the archive")
        return i

    def set_records(self, records: dict[str, bytes]) -> None:
        """Attach the node's listing records (by path) to the entries."""
        for e in self.entries:
            if e.path in records:
                e.record = records[e.path]

    # -- serialisation -------------------------------------------------------------

    def dump(self, fileobj: IO[bytes]) -> None:
        with gzip.GzipFile(fileobj=fileobj, mode="wb", mtime=0, compresslevel=6) as gz:
            w = io.BufferedWriter(gz, 1 << 16)  # type: ignore[arg-type]
            w.write(_line({"format": FORMAT, "version": VERSION,
                           "archive_sha256": self.archive_sha256,
                           "archive_size": self.archive_size, "raw_size": self.raw_size,
                           "fingerprint": self.fingerprint, "node_time": self.node_time,
                           "block_size_default": self.block_size_default,
                           "framed": self.framed, "members": len(self.members),
                           "entries": len(self.entries)}))
            for m in self.members:
                w.write(_line({"m": [m.c_off, m.c_len, m.r_off, m.r_len, m.key]}))
            for e in self.entries:
                w.write(_line(_entry_json(e)))
            w.flush()
            w.detach()

    def dumps(self) -> bytes:
        buf = io.BytesIO()
        self.dump(buf)
        return buf.getvalue()

    @classmethod
    def load(cls, fileobj: IO[bytes]) -> ArchiveIndex:
        try:
            with gzip.GzipFile(fileobj=fileobj, mode="rb") as gz:
                return cls._parse(gz)
        except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError,
                IndexError, AttributeError) as exc:
            raise InvalidIndex(f"the archive index is damaged: {exc}") from None

    @classmethod
    def loads(cls, data: bytes) -> ArchiveIndex:
        return cls.load(io.BytesIO(data))

    @classmethod
    def _parse(cls, lines: IO[bytes]) -> ArchiveIndex:
        it = iter(lines)
        head = json.loads(next(it, b"null"))
        if not isinstance(head, dict) or head.get("format") != FORMAT:
            raise InvalidIndex("not a backhaul archive index")
        if head.get("version") != VERSION:
            raise InvalidIndex(f"archive index version {head.get('version')!r} is not supported")
        idx = cls(archive_sha256=head["archive_sha256"], archive_size=head["archive_size"],
                  raw_size=head["raw_size"], fingerprint=head["fingerprint"],
                  node_time=head["node_time"], block_size_default=head["block_size_default"],
                  framed=head.get("framed", True))
        for line in it:
            obj = json.loads(line)
            if "m" in obj:
                c_off, c_len, r_off, r_len, key = obj["m"]
                idx.members.append(Member(int(c_off), int(c_len), int(r_off), int(r_len),
                                          str(key)))
            else:
                idx.entries.append(_entry_from(obj))
        if len(idx.members) != head["members"] or len(idx.entries) != head["entries"]:
            raise InvalidIndex("the archive index is truncated")
        idx._check()
        return idx

    def _check(self) -> None:
        """Members tile the archive and the tar stream; entries lie inside it
        in order. A parseable index that fails this is damaged all the same."""
        c = r = 0
        for m in self.members:
            if m.c_off != c or m.r_off != r or m.c_len <= 0 or m.r_len < 0:
                raise InvalidIndex("the archive index's members do not tile the archive")
            c, r = c + m.c_len, r + m.r_len
        if c != self.archive_size or r != self.raw_size:
            raise InvalidIndex("the archive index's members do not add up to the archive")
        prev = -1
        for e in self.entries:
            if not prev < e.h_off < e.d_off <= e.end <= self.raw_size:
                raise InvalidIndex(f"the archive index places {e.path!r} wrongly")
            prev = e.h_off


def _line(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("ascii") + b"\n"


def _entry_json(e: Entry) -> dict[str, Any]:
    return {"p": e.path, "t": e.type, "mode": e.mode, "uid": e.uid, "gid": e.gid,
            "un": e.uname, "gn": e.gname, "size": e.size, "mtime": e.mtime, "link": e.link,
            "h": e.h_off, "d": e.d_off, "sha": e.sha256.hex() if e.sha256 is not None else None,
            "bs": e.block_size, "bh": b"".join(e.block_hashes).hex(),
            "hh": e.header_sha256.hex(),
            "rec": base64.b64encode(e.record).decode("ascii") if e.record is not None else None}


def _entry_from(o: dict[str, Any]) -> Entry:
    bh = bytes.fromhex(o["bh"])
    return Entry(path=o["p"], type=o["t"], mode=int(o["mode"]), uid=int(o["uid"]),
                 gid=int(o["gid"]), uname=o["un"], gname=o["gn"], size=int(o["size"]),
                 mtime=o["mtime"], link=o["link"], h_off=int(o["h"]), d_off=int(o["d"]),
                 sha256=bytes.fromhex(o["sha"]) if o["sha"] is not None else None,
                 block_size=int(o["bs"]),
                 block_hashes=[bh[i:i + 16] for i in range(0, len(bh), 16)],
                 record=base64.b64decode(o["rec"]) if o["rec"] is not None else None,
                 header_sha256=bytes.fromhex(o.get("hh", "")))
