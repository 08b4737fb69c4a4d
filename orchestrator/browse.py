"""Browsing stored archives through their index: ``backhaul ls``, ``backhaul
find`` and the selective stream behind ``restore --only``.

Everything here reads the archive's index (docs/ARCHITECTURE.md, "Archive
format and index"), not the archive: listing and searching never inflate a
byte of it. A selective restore reads only the gzip members that hold the
selected entries, through ``ArchiveReader``'s ranged reads.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import logging
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from orchestrator.errors import ArchiveGone, BackhaulError, InvalidPath
from storage.catalog import Catalog
from storage.stores.base import Store
from storage.tgz import ArchiveIndex, ArchiveReader, Entry
from storage.tgz.deflate import compressor

log = logging.getLogger(__name__)

TYPES = {"0": "file", "1": "hardlink", "2": "symlink", "3": "chardev", "4": "blockdev",
         "5": "dir", "6": "fifo"}
FLUSH_RAW = 1 << 20  # re-compress selected bytes in members of about this size
END_OF_ARCHIVE = bytes(10240)  # two zero blocks, padded to tar's record


class NoSuchEntry(BackhaulError):
    code = "entry_not_found"
    http_status = 404


@dataclass(frozen=True)
class Listed:
    """An archive's entries as ``rel`` (relative to the tree) -> entry."""

    archive: dict[str, Any]
    tree_path: str
    index: ArchiveIndex

    def rel(self, e: Entry) -> str:
        return relative_name(e)

    def entry_json(self, e: Entry) -> dict[str, Any]:
        rel = self.rel(e)
        return {"path": rel or ".", "archive_path": e.path,
                "node_path": _node_path(self.tree_path, rel),
                "type": TYPES.get(e.type, e.type), "mode": e.mode & 0o7777, "size": e.size,
                "mtime": e.mtime, "uid": e.uid, "gid": e.gid, "user": e.uname,
                "group": e.gname, "link": e.link or None,
                "sha256": e.sha256.hex() if e.sha256 is not None else None}


def relative_name(e: Entry) -> str:
    """The entry's path relative to the backed-up tree: its top directory is
    dropped, as a restore drops it ('' for that directory itself). A target
    that is a single file is archived under its own name and keeps it."""
    parts = [p for p in e.path.split("/") if p not in ("", ".")]
    if len(parts) == 1 and e.type != "5":
        return parts[0]
    return "/".join(parts[1:])


def _node_path(tree_path: str, rel: str) -> str:
    root = tree_path.rstrip("/") or "/"
    if not rel:
        return root
    if posixpath.basename(root) == rel:  # a single-file target
        return root
    return posixpath.join(root, rel)


def selected(rel: str, only: list[str]) -> str | None:
    """The ``only`` name that selects ``rel`` (it is, or lies under, it)."""
    for o in only:
        if o == "" or rel == o or rel.startswith(o + "/"):
            return o
    return None


def relative_members(only: list[str], tree_path: str) -> list[str]:
    """``--only`` names, relative to the tree or absolute under its path on the node."""
    out = []
    root = tree_path.rstrip("/")
    for name in only:
        original = name
        if "\0" in name or "\n" in name:
            raise InvalidPath(f"--only {original!r}: NUL or newline in the name")
        if name.startswith("/"):
            if not (name == root or name.startswith(root + "/")):
                raise InvalidPath(f"--only {original}: not inside {tree_path}")
            name = name[len(root):]
        parts = [p for p in name.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise InvalidPath(f"--only {original}: '..' is not allowed")
        out.append("/".join(parts))
    return out


def open_listing(catalog: Catalog, store: Store, archive_id: int) -> Listed:
    """A kept archive's index (rebuilt first when it is missing or damaged)."""
    archive = catalog.get_archive(archive_id)
    if archive["deleted_at"] is not None:
        raise ArchiveGone(f"archive {archive_id} was rotated out; its entries are gone")
    if not store.exists(archive["file_name"]):
        raise ArchiveGone(f"archive {archive_id} is listed but its file is gone from the store")
    target = catalog.get_target(archive["target_id"])
    return Listed(archive, target.path, store.load_index(archive["file_name"]))


def list_entries(catalog: Catalog, store: Store, archive_id: int,
                 path: str | None, limit: int) -> dict[str, Any]:
    """``backhaul ls``: the entries, or those of one file or subtree."""
    listed = open_listing(catalog, store, archive_id)
    only = relative_members([path], listed.tree_path) if path else []
    out = []
    truncated = False
    for e in listed.index.entries:
        rel = listed.rel(e)
        if only and selected(rel, only) is None:
            continue
        if len(out) >= limit:
            truncated = True
            break
        out.append(listed.entry_json(e))
    if path and not out:
        raise NoSuchEntry(f"{path} is not in archive {archive_id}")
    return {"archive_id": archive_id, "tree": listed.tree_path, "path": path,
            "entries": out, "truncated": truncated}


def find_entries(catalog: Catalog, store: Store, target_id: int, pattern: str,
                 limit: int) -> dict[str, Any]:
    """``backhaul find``: per kept archive of the target's node and path (every
    registration), the entries whose relative path or basename match the glob."""
    target = catalog.get_target(target_id)
    archives = [a for a in catalog.list_archives_of_path(target.node.id, target.path)
                if a["deleted_at"] is None]
    found: list[dict[str, Any]] = []
    searched = matches = 0
    truncated = False
    for a in archives:  # newest first
        try:
            listed = open_listing(catalog, store, a["id"])
        except ArchiveGone:
            continue
        searched += 1
        hits = []
        for e in listed.index.entries:
            rel = listed.rel(e)
            if not rel:
                continue
            if fnmatch.fnmatchcase(rel, pattern) or fnmatch.fnmatchcase(
                    posixpath.basename(rel), pattern):
                if matches >= limit:
                    truncated = True
                    break
                hits.append(listed.entry_json(e))
                matches += 1
        if hits:
            found.append({"archive_id": a["id"], "created_at": _iso(a["created_at"]),
                          "entries": hits})
        if truncated:
            break
    return {"target_id": target_id, "path": target.path, "pattern": pattern,
            "archives_searched": searched, "matches": matches, "archives": found,
            "truncated": truncated}


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def selection(listed: Listed, only: list[str]) -> tuple[list[Entry], set[str]]:
    """The entries ``only`` selects, in archive order, and the names that matched."""
    picked, hit = [], set()
    for e in listed.index.entries:
        o = selected(listed.rel(e), only)
        if o is not None and listed.rel(e):
            picked.append(e)
            hit.add(o)
    return picked, hit


def selected_stream(store: Store, listed: Listed, entries: list[Entry]
                    ) -> Iterator[bytes]:
    """A tar.gz holding just ``entries`` (header blocks, data and padding as
    stored), ending with the end-of-archive blocks. A gzip member that lies
    wholly inside the selection is copied as stored; the selected parts of
    the others are inflated and compressed again. Only the members holding
    selected bytes are read."""
    ranges: list[list[int]] = []
    for e in entries:  # merge neighbours: a selected subtree is one range
        if ranges and ranges[-1][1] == e.h_off:
            ranges[-1][1] = e.end
        else:
            ranges.append([e.h_off, e.end])
    compress = compressor()
    index = listed.index
    file_name = listed.archive["file_name"]
    # ranged reads through the store (a directory or object storage)
    reader = ArchiveReader(lambda off, n: store.read_range(file_name, off, n), index)
    pending = bytearray()
    for start, end in ranges:
        pos = start
        while pos < end:
            m = index.members[index.member_at(pos)]
            m_end = m.r_off + m.r_len
            if pos == m.r_off and m_end <= end:
                if pending:
                    yield compress(pending)
                    pending.clear()
                yield reader.member_bytes(m)
                pos = m_end
                continue
            stop = min(end, m_end)
            for piece in reader.read_raw(pos, stop):
                pending += piece
                if len(pending) >= FLUSH_RAW:
                    yield compress(pending)
                    pending.clear()
            pos = stop
    pending += END_OF_ARCHIVE
    yield compress(pending)
