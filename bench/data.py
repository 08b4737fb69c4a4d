"""The benchmark's data, built once under the cache dir and reused.

Trees are complete when their ``.done`` stamp exists next to them; a build
that was interrupted is removed and made again. Random data is written from a
seeded generator: incompressible for gzip, and the same on every machine.
"""

from __future__ import annotations

import os
import random
import shutil
import stat
import sysconfig
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

MiB = 1024 * 1024

# Real files, in the order they are copied until the tree is big enough.
REAL_SOURCES = (
    ("stdlib", Path(sysconfig.get_paths()["stdlib"])),
    ("doc", Path("/usr/share/doc")),
    ("locale", Path("/usr/share/locale")),
    ("man", Path("/usr/share/man")),
    ("share", Path("/usr/share")),
)
_SKIP_DIRS = {"site-packages", "dist-packages"}


def _stamped(path: Path) -> Path:
    return path.with_name(path.name + ".done")


def _ready(path: Path) -> bool:
    return _stamped(path).exists() and path.exists()


def _start(path: Path) -> None:
    _stamped(path).unlink(missing_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)


def _finish(path: Path) -> None:
    _stamped(path).write_text("ok\n")


def _walk(root: Path) -> Iterator[Path]:
    """Files and symlinks under root, in a stable order."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath) / name


def real_tree(cache: Path, size: int, log: Callable[[str], None]) -> Path:
    """A tree of at least ``size`` bytes of real files (Python's standard
    library, /usr/share/doc, /usr/share/locale, ...)."""
    path = cache / f"tree-{size // MiB}M"
    if _ready(path):
        return path
    log(f"building {path} ({size // MiB} MiB of real files, once)")
    _start(path)
    total = 0
    seen: set[Path] = set()
    for label, source in REAL_SOURCES:
        if not source.is_dir():
            continue
        for src in _walk(source):
            if total >= size:
                break
            real = src.resolve() if not src.is_symlink() else src
            if real in seen:
                continue
            seen.add(real)
            dst = path / label / src.relative_to(source)
            try:
                st = src.lstat()
                if stat.S_ISLNK(st.st_mode):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(os.readlink(src), dst)
                elif stat.S_ISREG(st.st_mode):
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dst, follow_symlinks=False)
                    total += st.st_size
            except (OSError, shutil.Error):
                continue  # unreadable or vanished: skip it
        if total >= size:
            break
    if total < size:
        raise RuntimeError(f"only {total // MiB} MiB of real files found for {path}")
    _finish(path)
    return path


def random_file(path: Path, size: int, seed: int) -> Path:
    """``size`` incompressible bytes at ``path``."""
    if path.exists() and path.stat().st_size == size and _ready(path):
        return path
    _start(path)
    rng = random.Random(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    tmp.replace(path)
    _finish(path)
    return path


def random_tree(cache: Path, name: str, size: int, parts: int,
                log: Callable[[str], None]) -> Path:
    """A directory of ``parts`` random files totalling ``size`` bytes."""
    path = cache / f"{name}-{size // MiB}M"
    if _ready(path):
        return path
    log(f"building {path} ({size // MiB} MiB of random data, once)")
    _start(path)
    path.mkdir()
    for i in range(parts):
        part = size // parts + (size % parts if i == parts - 1 else 0)
        random_file(path / f"part-{i}.bin", part, seed=zlib.crc32(f"{name}/{size}/{i}".encode()))
        _stamped(path / f"part-{i}.bin").unlink()  # the tree's stamp covers its files
    _finish(path)
    return path


def files_tree(cache: Path, count: int) -> Path:
    """``count`` small text files in 10 directories."""
    path = cache / f"files-{count}"
    if _ready(path):
        return path
    _start(path)
    rng = random.Random(count)
    words = [f"w{i}" for i in range(500)]
    for i in range(count):
        d = path / f"dir{i % 10:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"file{i:05d}.txt").write_text(" ".join(rng.choices(words, k=200)) + "\n")
    _finish(path)
    return path


def small_dirs(cache: Path, count: int) -> list[Path]:
    """``count`` small directories (two short files each)."""
    dirs = [cache / "small" / f"d{i:05d}" for i in range(count)]
    for i, d in enumerate(dirs):
        if not (d / "b.conf").exists():  # written last: the dir is complete
            d.mkdir(parents=True, exist_ok=True)
            (d / "a.txt").write_text(f"small dir {i}\n")
            (d / "b.conf").write_text(f"id = {i}\nname = dir{i}\n")
    return dirs


def tree_listing(root: Path) -> dict[str, tuple[str, int | str]]:
    """``{name relative to root's parent: (type, size or link target)}`` of a tree."""
    base = root.parent
    out: dict[str, tuple[str, int | str]] = {root.name: ("d", 0)}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(base))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", 0)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("f", st.st_size)
            else:
                out[rel] = ("o", 0)
    return out


def archive_listing(archive: Path) -> dict[str, tuple[str, int | str]]:
    """The same listing read from a tar.gz (every member). "r:gz", not the
    stream mode "r|gz": archives are concatenated gzip members (storage/tgz)
    and tarfile's stream mode stops at the end of the first one."""
    out: dict[str, tuple[str, int | str]] = {}
    with tarfile.open(archive, "r:gz") as tf:  # r|gz stops after the first gzip member
        for m in tf:
            name = m.name.rstrip("/")
            if m.issym():
                out[name] = ("l", m.linkname)
            elif m.isdir():
                out[name] = ("d", 0)
            elif m.isreg() or m.islnk():
                out[name] = ("f", m.size)
            else:
                out[name] = ("o", 0)
    return out
