"""The composable tar.gz format: constants, entries, members and their keys.

An archive is a standard tar stream in GNU ``--sort=name`` order, compressed
as a run of independent gzip members whose boundaries fall on tar entry
boundaries (or on 1 MiB steps inside a large file's data). Each member has a
*key*: a sha256 that names its raw (inflated) content and can be computed from
the index alone, so a later archive copies a member's compressed bytes
verbatim whenever it needs the same raw bytes. See docs/ARCHITECTURE.md,
"Archive format and index".
"""

from __future__ import annotations

import hashlib
import math
import tarfile
from dataclasses import dataclass, field

from storage.errors import InvalidArchive

BLOCK = 512
RECORD = 10240  # tar's default record (20 blocks): the end of an archive is padded to it
LARGE = 1 << 20  # a file with at least this much data gets chunk members of its own
CHUNK = 1 << 20  # data bytes per chunk member of a large file
GROUP_MAX = 512 << 10  # a group member never grows past this (unless one entry is bigger)
BOUNDARY_MOD = 64  # a group ends after ~1 entry in 64, chosen by a hash of its path
BLOCK_SIZE_DEFAULT = 64 << 10
BLOCK_SIZE_MIN = 8 << 10
BLOCK_SIZE_MAX = 1 << 20
ENCODING = "utf-8"
ERRORS = "surrogateescape"  # non-UTF-8 names round-trip through str

# As GNU tar and tarfile read them: these types carry no data after the header.
NO_DATA = frozenset("123456")
# Header blocks that belong to the entry after them (GNU long name/link, pax).
PREFIX_TYPES = frozenset("LKxg")
ZERO_HASH = b"\0" * 32


def padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def path_bytes(path: str) -> bytes:
    return path.encode(ENCODING, ERRORS)


def canonical_key(path: str) -> tuple[bytes, ...]:
    """Sort key of GNU ``tar --sort=name``: depth first, siblings by strcmp."""
    return tuple(path_bytes(path).split(b"/"))


def block_size_for(size: int) -> int:
    """Block size for a large file's block hashes: about sqrt(size), a power of
    two between 8 KiB and 1 MiB, so a changed block costs little to resend and
    the list of hashes stays small (sqrt(size)/16 bytes per file)."""
    if size <= 0:
        return BLOCK_SIZE_MIN
    bs = 1 << (math.isqrt(size).bit_length() - 1)
    return max(BLOCK_SIZE_MIN, min(BLOCK_SIZE_MAX, bs))


def is_boundary(path: str) -> bool:
    """A group member ends after this entry (content-defined, so an insertion
    or deletion only changes the group around it)."""
    digest = hashlib.sha256(path_bytes(path)).digest()
    return int.from_bytes(digest[:2], "big") % BOUNDARY_MOD == 0


def entry_key_part(header_sha: bytes, content_sha: bytes | None, size: int) -> bytes:
    return header_sha + (content_sha or ZERO_HASH) + size.to_bytes(8, "big")


def group_key(parts: list[bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part)
    return h.hexdigest()


def chunk_key(raw_sha: bytes) -> str:
    return hashlib.sha256(b"chunk" + raw_sha).hexdigest()


def eof_key(raw: bytes) -> str:
    return hashlib.sha256(b"eof" + raw).hexdigest()


def eof_bytes(raw_size_before: int) -> bytes:
    """Two zero blocks, then zeros up to tar's record size, as GNU tar ends."""
    end = raw_size_before + 2 * BLOCK
    return b"\0" * (2 * BLOCK + (-end) % RECORD)


@dataclass(slots=True)
class Member:
    """One gzip member: where it sits compressed and raw, and its key."""

    c_off: int
    c_len: int
    r_off: int
    r_len: int
    key: str  # "" when the member does not follow the framing (no reuse)


@dataclass(slots=True)  # an index may hold millions
class Entry:
    path: str
    type: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime: int | float
    link: str
    h_off: int  # raw offset of the first header block (long name / pax included)
    d_off: int  # raw offset of the data (= end of the header blocks)
    sha256: bytes | None = None  # content hash; None for entries without data
    block_size: int = 0
    block_hashes: list[bytes] = field(default_factory=list)
    record: bytes | None = None  # the node's listing record (set by the orchestrator)
    header_sha256: bytes = b""  # sha256 of the raw header block(s): part of member keys
    header: bytes | None = None  # raw header block(s) when at hand; else via ArchiveReader

    @property
    def has_data(self) -> bool:
        return self.type not in NO_DATA

    @property
    def header_len(self) -> int:
        return self.d_off - self.h_off

    @property
    def end(self) -> int:
        """Raw offset just past this entry's padded data."""
        return self.d_off + (padded(self.size) if self.has_data else 0)

    @property
    def is_large(self) -> bool:
        return self.has_data and self.size >= LARGE

    def key_part(self) -> bytes:
        return entry_key_part(self.header_sha256, self.sha256, self.size)

    def header_key_part(self) -> bytes:
        """Key part of a large entry's header member, which holds no content:
        written before the content is seen, so the content hash is left out."""
        return entry_key_part(self.header_sha256, None, self.size)


@dataclass
class HeaderInfo:
    """What the header block(s) of one entry say."""

    path: str
    type: str
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    size: int
    mtime: int | float
    link: str


class HeaderParser:
    """Parses header blocks one at a time, keeping the state that GNU long
    names/links and pax headers carry over to the entry they precede."""

    def __init__(self) -> None:
        self._global: dict[str, str] = {}
        self.reset()

    def reset(self) -> None:
        self._long_name: str | None = None
        self._long_link: str | None = None
        self._pax: dict[str, str] = {}

    @staticmethod
    def block_info(block: bytes) -> tarfile.TarInfo:
        try:
            return tarfile.TarInfo.frombuf(block, ENCODING, ERRORS)
        except tarfile.HeaderError as exc:
            raise InvalidArchive(f"the tar stream has a corrupt header: {exc}") from None

    def prefix_payload(self, kind: str, payload: bytes) -> None:
        """The data of an 'L', 'K', 'x' or 'g' header."""
        if kind == "L":
            self._long_name = payload.split(b"\0", 1)[0].decode(ENCODING, ERRORS)
        elif kind == "K":
            self._long_link = payload.split(b"\0", 1)[0].decode(ENCODING, ERRORS)
        elif kind == "x":
            self._pax.update(_pax_records(payload))
        else:  # 'g': applies to every later entry
            self._global.update(_pax_records(payload))

    def finish(self, info: tarfile.TarInfo) -> HeaderInfo:
        """The entry a main header block describes, with the carried state."""
        pax = {**self._global, **self._pax}
        kind = info.type.decode("latin-1") if info.type not in (b"", b"\0") else "0"
        if kind == "S" or any(k.startswith("GNU.sparse") for k in pax):
            raise InvalidArchive("the tar stream holds a sparse file (not supported)")
        if kind in ("M", "V", "N", "D"):
            raise InvalidArchive(f"the tar stream holds an unsupported entry type {kind!r}")
        path = self._long_name if self._long_name is not None else info.name
        link = self._long_link if self._long_link is not None else info.linkname
        path = pax.get("path", path)
        link = pax.get("linkpath", link)
        try:
            size = int(pax["size"]) if "size" in pax else info.size
            uid = int(pax["uid"]) if "uid" in pax else info.uid
            gid = int(pax["gid"]) if "gid" in pax else info.gid
            mtime: int | float = info.mtime
            if "mtime" in pax:
                mt = float(pax["mtime"])
                mtime = int(mt) if mt.is_integer() else mt
        except ValueError:
            raise InvalidArchive("the tar stream has a corrupt pax header") from None
        if size < 0:
            raise InvalidArchive("the tar stream has a negative size")
        if kind in NO_DATA and size:
            # GNU tar and tarfile disagree on whether such data exists: refuse it.
            raise InvalidArchive(f"the tar stream has a type {kind!r} entry with data")
        if kind == "5":
            path = path.rstrip("/") or path
        self.reset()
        return HeaderInfo(path=path, type=kind, mode=info.mode, uid=uid, gid=gid,
                          uname=pax.get("uname", info.uname), gname=pax.get("gname", info.gname),
                          size=size, mtime=mtime, link=link)


def _pax_records(payload: bytes) -> dict[str, str]:
    """Records ``"<len> key=value\\n"`` of a pax header; values as str
    (surrogateescape, so a binary path round-trips)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(payload):
        if payload[pos] == 0:
            break
        space = payload.find(b" ", pos)
        try:
            length = int(payload[pos:space])
        except ValueError:
            raise InvalidArchive("the tar stream has a corrupt pax header") from None
        if space < 0 or length <= 0 or pos + length > len(payload):
            raise InvalidArchive("the tar stream has a corrupt pax header")
        record = payload[space + 1:pos + length]
        if not record.endswith(b"\n") or b"=" not in record:
            raise InvalidArchive("the tar stream has a corrupt pax header")
        key, value = record[:-1].split(b"=", 1)
        out[key.decode(ENCODING, ERRORS)] = value.decode(ENCODING, ERRORS)
        pos += length
    return out


def make_header(template: Entry | None = None, **changes: object) -> bytes:
    """GNU-format header block(s) for an entry, via tarfile (long names get
    'L'/'K' blocks). Fields: path, type, mode, uid, gid, uname, gname, size,
    mtime, link; unset ones come from ``template``."""
    fields: dict[str, object] = {}
    if template is not None:
        fields = {k: getattr(template, k) for k in
                  ("path", "type", "mode", "uid", "gid", "uname", "gname", "size", "mtime",
                   "link")}
    unknown = set(changes) - {"path", "type", "mode", "uid", "gid", "uname", "gname", "size",
                              "mtime", "link"}
    if unknown:
        raise TypeError(f"make_header: unknown fields {sorted(unknown)}")
    fields.update(changes)
    if "path" not in fields:
        raise TypeError("make_header: path is required")
    ti = tarfile.TarInfo(str(fields["path"]))
    ti.type = str(fields.get("type", "0")).encode("latin-1")
    ti.mode = int(fields.get("mode", 0o644))  # type: ignore[call-overload]
    ti.uid = int(fields.get("uid", 0))  # type: ignore[call-overload]
    ti.gid = int(fields.get("gid", 0))  # type: ignore[call-overload]
    ti.uname = str(fields.get("uname", ""))
    ti.gname = str(fields.get("gname", ""))
    ti.size = int(fields.get("size", 0)) if ti.type.decode() not in NO_DATA else 0  # type: ignore[call-overload]
    ti.mtime = int(fields.get("mtime", 0))  # type: ignore[call-overload]
    ti.linkname = str(fields.get("link", ""))
    return ti.tobuf(tarfile.GNU_FORMAT, ENCODING, ERRORS)
