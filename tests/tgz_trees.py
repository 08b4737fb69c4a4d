"""Real trees and real GNU tar streams for the storage/tgz tests (helpers,
not tests)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import stat
import subprocess
import zlib
from pathlib import Path

from storage.tgz import ArchiveIndex, ArchiveReader, FramingWriter

MiB = 1 << 20


def make_tree(base: Path, seed: int = 1) -> Path:
    """A tree with the names and types that break naive tar code."""
    rng = random.Random(seed)
    root = base / "root"
    root.mkdir()
    (root / "empty dir").mkdir()
    (root / "a").write_bytes(b"hello\n")
    (root / "empty-file").write_bytes(b"")
    (root / "it's \"quoted\" $(x); y").write_bytes(b"quotes\n")
    (root / "new\nline").write_bytes(b"newline in the name\n")
    os.mkdir(os.path.join(bytes(root), b"caf\xe9-latin1"))
    Path(os.fsdecode(bytes(root) + b"/caf\xe9-latin1/\xff\xfe raw")).write_bytes(b"bytes\n")
    deep = root / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("long-name-" + "x" * 120)).write_bytes(b"long\n" * 100)
    os.symlink("a", root / "link-to-a")
    os.symlink("../" + "t" * 150, root / "link-long-target")
    os.link(root / "a", root / "hard-to-a")
    os.mkfifo(root / "fifo")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    (root / "exec.sh").chmod(0o755)
    # A large file: compressible text then random bytes, not a multiple of 512.
    big = bytearray()
    while len(big) < int(2.6 * MiB):
        big += f"line {len(big)} of a log\n".encode()
    big[MiB:MiB + 300_000] = rng.randbytes(300_000)
    (root / "big.log").write_bytes(bytes(big[:int(2.6 * MiB) + 77]))
    (root / "exactly-2MiB").write_bytes(rng.randbytes(2 * MiB))
    (root / "just-below-large").write_bytes(rng.randbytes(MiB - 1))
    many = root / "many"
    many.mkdir()
    for i in range(500):
        (many / f"f{i:04d}.txt").write_bytes((f"file {i}\n" * rng.randint(1, 400)).encode())
    return root


def tar_raw(root: Path, *names: str) -> bytes:
    """GNU ``tar --sort=name -czf -`` of ``root`` (as the node runs it), inflated."""
    args = list(names) or [root.name]
    gz = subprocess.run(["tar", "-C", str(root.parent), "--sort=name", "-czf", "-", *args],
                        check=True, capture_output=True).stdout
    return gunzip(gz)


def gunzip(data: bytes) -> bytes:
    out = io.BytesIO()
    while data:
        d = zlib.decompressobj(wbits=31)
        out.write(d.decompress(data))
        out.write(d.flush())
        assert d.eof
        data = d.unused_data
    return out.getvalue()


def frame(raw: bytes, seed: int = 0) -> tuple[bytes, ArchiveIndex]:
    """Feeds ``raw`` to a FramingWriter in random-sized pieces."""
    rng = random.Random(seed)
    out = io.BytesIO()
    w = FramingWriter(out.write)
    pos = 0
    view = memoryview(raw)
    while pos < len(raw):
        n = rng.choice([1, 511, 512, 513, 4096, 65536, 300_000])
        w.feed(view[pos:pos + n] if n % 2 else raw[pos:pos + n])
        pos += n
    index = w.finish()
    return out.getvalue(), index


def reader_of(archive: bytes, index: ArchiveIndex) -> ArchiveReader:
    return ArchiveReader(lambda off, n: archive[off:off + n], index)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def snapshot(root: Path) -> dict[bytes, tuple]:
    """Everything an extraction must reproduce: type, mode, mtime, content,
    link target, and which files are hard links of each other."""
    out: dict[bytes, tuple] = {}
    inodes: dict[int, bytes] = {}
    broot = bytes(root)
    for dirpath, dirnames, filenames in os.walk(broot):
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, broot)
            st = os.lstat(p)
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", mode, int(st.st_mtime))
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("p", mode, int(st.st_mtime))
            else:
                first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
                with open(p, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                out[rel] = ("f", mode, int(st.st_mtime), digest, first)
    return out


def extract_with(tool: str, archive: Path, dest: Path) -> Path:
    dest.mkdir()
    if tool == "gnutar":
        subprocess.run(["tar", "-xzf", str(archive), "-C", str(dest)], check=True)
    elif tool == "bsdtar":
        subprocess.run(["bsdtar", "-xpf", str(archive), "-C", str(dest)], check=True)
    else:
        import tarfile

        with tarfile.open(archive) as tf:
            tf.extractall(dest, filter="fully_trusted")
    return dest


def bsdtar_available() -> bool:
    return shutil.which("bsdtar") is not None


def tar_entries(raw: bytes) -> list[tuple[str, bytes, bytes]]:
    """(path, raw header blocks, content) of each entry, as tarfile sees them."""
    import tarfile

    out = []
    with tarfile.open(fileobj=io.BytesIO(raw), encoding="utf-8",
                      errors="surrogateescape") as tf:
        for ti in tf.getmembers():
            data = raw[ti.offset_data:ti.offset_data + ti.size] if ti.isreg() else b""
            out.append((ti.name, raw[ti.offset:ti.offset_data], data))
    return out


def compose_like_a_delta(prev_archive: bytes, prev_index: ArchiveIndex, new_raw: bytes,
                         patches: dict | None = None):
    """Builds the archive of ``new_raw`` from the previous one the way the
    orchestrator does: unchanged content is copied (with the new header when
    metadata changed), ``patches`` (path -> pieces) patch, the rest is added."""
    from storage.tgz import Composer

    out = io.BytesIO()
    comp = Composer(out.write, reader_of(prev_archive, prev_index))
    index = feed_like_a_delta(comp, prev_index, new_raw, patches)
    return out.getvalue(), index, comp


def feed_like_a_delta(comp, prev_index: ArchiveIndex, new_raw: bytes,  # noqa: ANN001
                      patches: dict | None = None) -> ArchiveIndex:
    """``compose_like_a_delta``'s steps into a given Composer; its index."""
    patches = patches or {}
    for path, header, data in tar_entries(new_raw):
        old = prev_index.by_path(path)
        if path in patches:
            assert old is not None
            comp.patch(old, header, len(data), patches[path])
        elif old is not None and old.type == "0" and old.sha256 == hashlib.sha256(data).digest() \
                and old.size == len(data):
            comp.copy(old, None if hashlib.sha256(header).digest() == old.header_sha256
                      else header)
        elif old is not None and old.type != "0" and old.header_sha256 == \
                hashlib.sha256(header).digest():
            comp.copy(old)
        else:
            comp.add(header, [data[i:i + 100_000] for i in range(0, len(data), 100_000)])
    return comp.finish()
