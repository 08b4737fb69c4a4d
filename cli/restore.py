"""Safe extraction of a backhaul archive into a local directory (``backhaul restore``).

Standard library only. ``tarfile``'s ``filter="data"`` is not enough on Python
builds that predate the 2025 tarfile fixes (an archive built like
CVE-2025-4517's, a chain of symlinks and then a member written through them,
escaped ``extractall(filter="data")``), so this module decides every write
itself:

- member and link names are checked as text: no absolute names, no ``..``;
- every directory on the way to a member is checked with ``lstat``: it must be
  a real directory inside DEST, never a symlink (one from the archive, or one
  that was in DEST before a ``--force`` restore);
- files are created with ``O_EXCL | O_NOFOLLOW`` after removing what was there;
- hard links may only point at files this restore wrote;
- symlinks from the archive are created last, after every file and directory,
  so nothing is ever written through one; a symlink whose target is absolute
  or leaves DEST (checked on its text, then on the finished tree with
  ``realpath``) is not created or is removed again;
- devices and FIFOs are skipped; modes lose setuid/setgid/sticky and
  group/other write, as ``filter="data"`` does.

The archive's top directory (the backed-up tree's name) is stripped: DEST
becomes the tree, as ``tar --strip-components=1`` would make it.
"""

from __future__ import annotations

import os
import posixpath
import stat
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from cli.client import ClientError

CHUNK = 1024 * 1024


class RestoreError(ClientError):
    def __init__(self, message: str, code: str = "restore_failed") -> None:
        super().__init__(code, message)


@dataclass
class RestoreReport:
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    bytes: int = 0
    refused: list[str] = field(default_factory=list)  # hostile or unsafe members
    skipped: list[str] = field(default_factory=list)  # devices, FIFOs, unresolvable links
    matched_only: set[str] = field(default_factory=set)


def prepare_dest(dest: str, force: bool) -> str:
    """Create DEST if needed; refuse a non-empty one unless ``force``. Returns its real path."""
    if os.path.lexists(dest) and not os.path.isdir(dest):
        raise RestoreError(f"{dest} exists and is not a directory", "not_a_directory")
    if os.path.isdir(dest):
        if os.listdir(dest) and not force:
            raise RestoreError(
                f"{dest} is not empty; restore into a new directory or add --force "
                "to write over what is there",
                "dest_not_empty",
            )
    else:
        try:
            os.makedirs(dest, mode=0o700)
        except OSError as exc:
            raise RestoreError(f"cannot create {dest}: {exc.strerror or exc}") from None
    return os.path.realpath(dest)


def normalize_only(paths: tuple[str, ...] | list[str], tree_path: str | None) -> list[str]:
    """``--only`` names relative to the backed-up tree (``sub/file``), or absolute
    paths inside it on the node (``/srv/app/sub/file``)."""
    out = []
    for p in paths:
        original = p
        if p.startswith("/"):
            root = (tree_path or "").rstrip("/")
            if not root or not (p == root or p.startswith(root + "/")):
                raise RestoreError(
                    f"--only {original}: not inside the backed-up path {tree_path}", "invalid_path"
                )
            p = p[len(root) :]
        parts = [x for x in p.split("/") if x not in ("", ".")]
        if ".." in parts:
            raise RestoreError(f"--only {original}: '..' is not allowed", "invalid_path")
        out.append("/".join(parts))
    return out


def _member_parts(name: str, top_level_kept: bool = False) -> list[str] | None:
    """The member's path inside DEST as components, or None when it is hostile.
    The tree's own top directory is stripped; ``top_level_kept``: a one-part
    name that is not a directory (a target that is a single file) is kept."""
    if name.startswith("/") or "\0" in name:
        return None
    parts = [x for x in name.split("/") if x not in ("", ".")]
    if ".." in parts:
        return None
    if len(parts) == 1 and top_level_kept:
        return parts
    return parts[1:]


def _selected(rel: str, only: list[str] | None, report: RestoreReport) -> bool:
    """A member is restored when it is, or lies under, one of ``only``; the
    directories above a selection are made on demand."""
    if not only:
        return True
    hit = False
    for o in only:
        if o == "" or rel == o or rel.startswith(o + "/"):
            report.matched_only.add(o)
            hit = True
    return hit


class _Extractor:
    def __init__(self, root: str, report: RestoreReport) -> None:
        self.root = root
        self.report = report
        self.written: set[str] = set()  # relative paths of regular files we wrote
        self.dir_meta: list[tuple[list[str], int, float]] = []

    def _safe_dir(self, parts: list[str], create: bool = True) -> str:
        """The real directory DEST/parts, each component checked with lstat:
        a real directory, never a symlink. Missing ones are created."""
        path = self.root
        for part in parts:
            path = os.path.join(path, part)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(path, 0o700)
                continue
            if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
                raise _Unsafe(f"{'/'.join(parts)} goes through a symlink or a non-directory")
        return path

    def directory(self, parts: list[str], member: tarfile.TarInfo) -> None:
        self._safe_dir(parts)
        self.dir_meta.append((parts, member.mode, member.mtime))
        self.report.dirs += 1

    def _clear(self, path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise _Unsafe("a directory is in the way")
        os.unlink(path)

    def file(self, parts: list[str], member: tarfile.TarInfo, data: BinaryIO) -> None:
        parent = self._safe_dir(parts[:-1])
        path = os.path.join(parent, parts[-1])
        self._clear(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            while chunk := data.read(CHUNK):
                out.write(chunk)
                self.report.bytes += len(chunk)
            os.fchmod(out.fileno(), member.mode & 0o755)
        os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        self.written.add("/".join(parts))
        self.report.files += 1

    def hardlink(self, parts: list[str], target: list[str]) -> None:
        rel = "/".join(target)
        if rel not in self.written:
            raise _Unsafe(f"hard link to {rel!r}, which this restore did not write")
        src = os.path.join(self._safe_dir(target[:-1], create=False), target[-1])
        if not stat.S_ISREG(os.lstat(src).st_mode):
            raise _Unsafe(f"hard link to {rel!r}, which is not a regular file")
        parent = self._safe_dir(parts[:-1])
        path = os.path.join(parent, parts[-1])
        self._clear(path)
        os.link(src, path, follow_symlinks=False)
        self.report.hardlinks += 1

    def symlink(self, parts: list[str], linkname: str) -> str:
        if linkname.startswith("/"):
            raise _Unsafe(f"symlink to the absolute path {linkname!r}")
        inside = posixpath.normpath(posixpath.join(*(parts[:-1] or ["."]), linkname))
        if inside == ".." or inside.startswith("../"):
            raise _Unsafe(f"symlink to {linkname!r} leaves the restore directory")
        parent = self._safe_dir(parts[:-1])
        path = os.path.join(parent, parts[-1])
        self._clear(path)
        os.symlink(linkname, path)
        self.report.symlinks += 1
        return path

    def finish_dirs(self) -> None:
        # Deepest first, after all writes: a read-only directory must not stop them.
        for parts, mode, mtime in sorted(self.dir_meta, key=lambda x: -len(x[0])):
            try:
                path = self._safe_dir(parts, create=False)
                os.chmod(path, (mode & 0o755) | 0o700)
                os.utime(path, (mtime, mtime))
            except (OSError, _Unsafe):
                pass


class _Unsafe(Exception):
    pass


def extract(
    stream: BinaryIO,
    root: str,
    only: list[str] | None = None,
) -> RestoreReport:
    """Extract the tar.gz ``stream`` into the real directory ``root`` (see module doc)."""
    report = RestoreReport()
    ex = _Extractor(root, report)
    links: list[tuple[str, list[str], str]] = []  # (kind, parts, link)
    try:
        # Not mode "r|gz": tarfile's stream reader inflates only the first gzip
        # member and then takes the end of it for the end of the archive, and
        # backhaul's archives are many members.
        gunzip = GunzipReader(stream)
        tar = tarfile.open(fileobj=gunzip, mode="r|")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise RestoreError(f"the archive cannot be read: {exc}") from None
    try:
        for member in tar:
            name = member.name
            parts = _member_parts(name, top_level_kept=not member.isdir())
            if parts is None:
                report.refused.append(f"{name}: absolute or '..' name")
                continue
            if not parts:  # the tree's top directory itself: DEST
                continue
            rel = "/".join(parts)
            if not _selected(rel, only, report):
                continue
            try:
                if member.isdir():
                    ex.directory(parts, member)
                elif member.isreg():
                    data = tar.extractfile(member)
                    assert data is not None
                    ex.file(parts, member, data)
                elif member.issym():
                    links.append(("sym", parts, member.linkname))
                elif member.islnk():
                    target = _member_parts(member.linkname)
                    if target is None or not target:
                        report.refused.append(f"{name}: hard link to {member.linkname!r}")
                    else:
                        links.append(("hard", parts, "/".join(target)))
                else:
                    report.skipped.append(f"{name}: device or FIFO")
            except _Unsafe as exc:
                report.refused.append(f"{name}: {exc}")
            except OSError as exc:
                raise RestoreError(f"cannot write {rel}: {exc.strerror or exc}") from None
        # tarfile stops at the end-of-archive blocks: read the rest, so every
        # member's CRC32 and length are checked and a cut-short stream is found.
        while gunzip.read(CHUNK):
            pass
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise RestoreError(f"the archive is corrupt or cut short: {exc}") from None
    finally:
        tar.close()

    for kind, parts, link in links:
        if kind != "hard":
            continue
        try:
            ex.hardlink(parts, link.split("/"))
        except (_Unsafe, OSError) as exc:
            report.refused.append(f"{'/'.join(parts)}: {exc}")
    created = []
    for kind, parts, link in links:  # symlinks last: nothing is written through them
        if kind != "sym":
            continue
        try:
            created.append(ex.symlink(parts, link))
        except (_Unsafe, OSError) as exc:
            report.refused.append(f"{'/'.join(parts)}: {exc}")
    _drop_escaping_symlinks(root, created, report)
    ex.finish_dirs()
    return report


def _drop_escaping_symlinks(root: str, created: list[str], report: RestoreReport) -> None:
    """Text checks cannot see a link that leaves through another link (a chain);
    the finished tree can: remove every link whose real target is outside
    ``root``, until none is left (removing one can change where others lead)."""
    remaining = list(created)
    changed = True
    while changed:
        changed = False
        for path in list(remaining):
            real = os.path.realpath(path)
            if real != root and not real.startswith(root + os.sep):
                os.unlink(path)
                remaining.remove(path)
                report.symlinks -= 1
                report.refused.append(f"{os.path.relpath(path, root)}: symlink leads outside")
                changed = True


class GunzipReader:
    """The raw bytes of a gzip stream of any number of members, read on
    demand; each member's CRC32 and length are checked (zlib does, with
    gzip framing), and a cut-short stream or trailing garbage is an error."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self._d = zlib.decompressobj(wbits=31)
        self._pending = b""  # compressed bytes not given to the inflater yet
        self._started = False  # the current member has received input
        self._eof = False

    def read(self, n: int = -1) -> bytes:
        want = CHUNK if n is None or n < 0 else max(n, 1)
        while not self._eof:
            if not self._pending:
                self._pending = self.raw.read(CHUNK)
                if not self._pending:
                    if self._started or self._d.unconsumed_tail:
                        raise tarfile.ReadError("the gzip stream is cut short")
                    self._eof = True
                    break
            try:
                out = self._d.decompress(self._pending, want)
            except zlib.error as exc:
                raise tarfile.ReadError(f"invalid gzip data: {exc}") from None
            self._started = True
            self._pending = self._d.unconsumed_tail
            if self._d.eof:  # one member done: the next starts in unused_data
                self._pending = self._d.unused_data
                self._d = zlib.decompressobj(wbits=31)
                self._started = False
            if out:
                return out
        return b""


class HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(
        self, raw: BinaryIO, progress: Callable[[int, int | None], None] | None, total: int | None
    ) -> None:
        import hashlib

        self.raw = raw
        self.digest = hashlib.sha256()
        self.count = 0
        self.total = total
        self.progress = progress

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read() if n is None or n < 0 else self.raw.read(n)
        self.digest.update(data)
        self.count += len(data)
        if self.progress is not None and data:
            self.progress(self.count, self.total)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass
