"""The node's find listing: parsing records, rebuilding the new listing from
the previous one plus the scan's changes, and the fingerprint over it.

A record is ``%y %m %U %G %s %T@ %C@ %i %l %P`` (remote.FIND_FORMAT without
its NUL). For a symlink %s is the byte length of its target, which tells
where %l ends inside ``%l %P`` whatever bytes either holds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

from storage.errors import InvalidArchive

# find's %y letter -> the tar type flag GNU tar writes for it (hard links,
# '1', are regular files in the listing).
TAR_TYPE = {"f": "0", "d": "5", "l": "2", "p": "6", "c": "3", "b": "4"}


@dataclass(frozen=True)
class Record:
    raw: bytes  # the record as the node printed it, without the NUL
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime: str
    ctime: str
    inode: int
    link: bytes
    rel: bytes  # path relative to the target; b"" for the target itself

    @property
    def mtime_s(self) -> int:
        """Whole seconds, as a GNU-format tar header holds them."""
        whole = self.mtime.split(".", 1)[0]
        return int(whole)


def parse_record(raw: bytes) -> Record:
    try:
        parts = raw.split(b" ", 8)
        if len(parts) != 9:
            raise ValueError("too few fields")
        y, m, u, g, s, t, c, i, rest = parts
        kind = y.decode("ascii")
        size = int(s)
        if kind == "l":
            link, sep, rel = rest[:size], rest[size:size + 1], rest[size + 1:]
            if sep != b" " or len(link) != size:
                raise ValueError("symlink target length")
        else:
            if not rest.startswith(b" "):
                raise ValueError("link field on a non-symlink")
            link, rel = b"", rest[1:]
        mtime, ctime = t.decode("ascii"), c.decode("ascii")
        float(mtime), float(ctime)  # noqa: B018 - validation
        if len(kind) != 1:
            raise ValueError("type")
        if rel and (rel.startswith(b"/") or any(
                p in (b"", b".", b"..") for p in rel.split(b"/"))):
            raise ValueError("a path that is not a plain relative name")
        return Record(raw, kind, int(m, 8), int(u), int(g), size, mtime, ctime, int(i),
                      link, rel)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArchive(f"the node's listing holds a malformed record "
                             f"{raw[:120]!r}: {exc}") from None


def split_records(data: bytes) -> list[bytes]:
    items = data.split(b"\0")
    if items and items[-1] == b"":
        items.pop()
    return items


def parse_listing(data: bytes) -> dict[bytes, bytes]:
    """rel path -> raw record, from a full listing (validated)."""
    out: dict[bytes, bytes] = {}
    for raw in split_records(data):
        out[parse_record(raw).rel] = raw
    return out


def fingerprint(records: Iterable[bytes]) -> str:
    """What the node prints: sha256 of the records, LC_ALL=C ``sort -z``
    sorted (bytewise), each NUL-terminated."""
    h = hashlib.sha256()
    for raw in sorted(r + b"\0" for r in records):
        h.update(raw)
    return h.hexdigest()


def _with_rel(raw: bytes, name: bytes, rel: bytes) -> bytes:
    """A child record (its %P is ``name``) re-pathed to ``rel``."""
    if not raw.endswith(name):
        raise InvalidArchive("the node's scan holds a child record that does not end "
                             "with its name")
    return raw[:len(raw) - len(name)] + rel


def rebuild(prev: dict[bytes, bytes], section: bytes) -> dict[bytes, bytes]:
    """The previous listing with the scan's changes applied (see
    remote.scan_command for the section's layout). The caller checks the
    result against the node's fingerprint: a wrong rebuild costs a full
    listing, never a wrong archive."""
    new = dict(prev)
    dead: set[bytes] = set()
    changed: list[tuple[bytes, bytes]] = []
    current: bytes | None = None
    seen: set[bytes] = set()
    children: dict[bytes, list[bytes]] = {}
    for rel in prev:
        if rel:
            children.setdefault(rel.rpartition(b"/")[0], []).append(rel)

    def close_dir() -> None:
        if current is None:
            return
        for rel in children.get(current, ()):
            if rel not in seen:
                dead.add(rel)

    for item in split_records(section):
        tag, body = item[:1], item[1:]
        if tag == b"D":
            close_dir()
            current, seen = body, set()
        elif tag == b"c":
            if current is None:
                raise InvalidArchive("the node's scan holds a child record outside a directory")
            rec = parse_record(body)
            rel = current + b"/" + rec.rel if current else rec.rel
            if b"/" in rec.rel or not rec.rel:
                raise InvalidArchive("the node's scan holds a malformed child name")
            seen.add(rel)
            changed.append((rel, _with_rel(body, rec.rel, rel)))
        elif tag == b"C":
            close_dir()
            current = None
            rec = parse_record(body)
            changed.append((rec.rel, body))
        else:
            raise InvalidArchive("the node's scan holds an unknown section item")
    close_dir()
    for rel in dead:
        new.pop(rel, None)
    for rel, raw in changed:
        dead.discard(rel)
        new[rel] = raw
    # Drop whatever lost its parent (a removed or retyped directory).
    out: dict[bytes, bytes] = {}
    kinds: dict[bytes, bytes] = {}
    for rel in sorted(new, key=lambda r: r.split(b"/")):
        if rel:
            parent = rel.rpartition(b"/")[0]
            if kinds.get(parent) != b"d":
                continue
        out[rel] = new[rel]
        kinds[rel] = new[rel][:1]
    return out
