"""Re-framing throughput: how fast the server turns a raw tar stream into a
member-aligned archive (storage/tgz FramingWriter) with each deflate binding,
against the rate a node's gzip / pigz produces that stream.

    .venv/bin/python -m bench.deflate [PATH ...]

isal is a [server] dependency; zlib-ng is measured when installed
(``.venv/bin/pip install zlib-ng``), else its rows say "not installed".

The server inflates the node's gzip stream and re-frames it while receiving,
so re-framing (plus inflating) must run faster than the node compresses, or
the full backup gets slower than ``ssh node tar czf -``. Figures are MB/s of
raw tar (1 MB = 10^6 bytes), by CPU time of this process (the machine is
shared) and by wall time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

from storage.tgz import ArchiveIndex, ArchiveReader, Composer, FramingWriter, canonical_key
from storage.tgz.deflate import available

DEFAULT_PATHS = ["/usr/lib/python3.11", "/usr/lib/python3", "/usr/share/doc",
                 "/usr/share/locale"]
CONFIGS = [("zlib", 1), ("zlib", 6), ("isal", 1), ("isal", 2), ("isal", 3),
           ("zlib-ng", 1), ("zlib-ng", 6)]
READ = 64 << 10
MB = 1e6


def _timed(fn) -> tuple[float, float, object]:
    c0, w0 = time.process_time(), time.perf_counter()
    out = fn()
    return time.process_time() - c0, time.perf_counter() - w0, out


def _frame(raw_path: Path, backend: str, level: int, keep: Path | None = None) -> int:
    size = 0
    sink = open(keep, "wb") if keep else None

    def count(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if sink:
            sink.write(data)

    w = FramingWriter(count, backend=backend, level=level)
    with open(raw_path, "rb") as f:
        while chunk := f.read(READ):
            w.feed(chunk)
    index = w.finish()
    if sink:
        sink.close()
        assert keep is not None
        keep.with_suffix(".index").write_bytes(index.dumps())
    return size


def _compose_all(archive: Path, verify: bool) -> int:
    """A delta where nothing changed: every member copied, none compressed."""
    index = ArchiveIndex.loads(archive.with_suffix(".index").read_bytes())
    size = 0

    def count(data: bytes) -> None:
        nonlocal size
        size += len(data)

    with open(archive, "rb") as f:
        reader = ArchiveReader(lambda off, n: os.pread(f.fileno(), n, off), index)
        comp = Composer(count, reader, verify_copies=verify)
        for e in index.entries:
            comp.copy(e)
        comp.finish()
    assert comp.members_compressed == 0
    return size


def _inflate(gz_path: Path) -> int:
    n = 0
    d = zlib.decompressobj(wbits=31)
    with open(gz_path, "rb") as f:
        while chunk := f.read(READ):
            n += len(d.decompress(chunk))
    return n


def _child_cpu(cmd: list[str], src: Path, dst: Path) -> tuple[float, float]:
    """CPU and wall seconds of a compressor child process."""
    before = os.times()
    w0 = time.perf_counter()
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        subprocess.run(cmd, stdin=fi, stdout=fo, check=True)
    wall = time.perf_counter() - w0
    after = os.times()
    return (after.children_user - before.children_user
            + after.children_system - before.children_system), wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paths", nargs="*", default=DEFAULT_PATHS)
    args = ap.parse_args(argv)
    # tar keeps its arguments' order: give them in canonical order, as one tree would be.
    args.paths = sorted(args.paths, key=lambda p: canonical_key(p.strip("/")))
    with tempfile.TemporaryDirectory(prefix="bench-deflate-") as tmp:
        raw_path = Path(tmp) / "tree.tar"
        with open(raw_path, "wb") as f:
            res = subprocess.run(["tar", "--sort=name", "-cf", "-", *args.paths], stdout=f,
                                 stderr=subprocess.DEVNULL)
        if res.returncode not in (0, 1):
            print(f"tar failed with exit status {res.returncode}", file=sys.stderr)
            return 1
        raw = raw_path.stat().st_size
        files = int(subprocess.run(["tar", "-tf", str(raw_path)], capture_output=True,
                                   check=True).stdout.count(b"\n"))
        print(f"tree: {' '.join(args.paths)}: {raw / MB:.1f} MB raw tar, {files} entries")
        print(f"{'what':<34}{'CPU s':>8}{'wall s':>8}{'raw MB/s cpu':>14}"
              f"{'raw MB/s wall':>15}{'out MB':>9}{'ratio':>7}")

        def row(what: str, cpu: float, wall: float, out: int) -> None:
            print(f"{what:<34}{cpu:>8.2f}{wall:>8.2f}{raw / MB / cpu:>14.1f}"
                  f"{raw / MB / wall:>15.1f}{out / MB:>9.1f}{out / raw:>7.3f}")

        gz_path = Path(tmp) / "tree.tar.gz"
        cpu, wall = _child_cpu(["gzip", "-6", "-c"], raw_path, gz_path)
        row("node: gzip -6 (1 core)", cpu, wall, gz_path.stat().st_size)
        if shutil.which("pigz"):
            pz = Path(tmp) / "tree.pigz.gz"
            cpu, wall = _child_cpu(["pigz", "-6", "-c"], raw_path, pz)
            row(f"node: pigz -6 ({os.cpu_count()} cores)", cpu, wall, pz.stat().st_size)
            pz.unlink()
        cpu, wall, _ = _timed(lambda: _inflate(gz_path))
        row("server: inflate (zlib)", cpu, wall, raw)
        for backend, level in CONFIGS:
            if not available(backend):
                print(f"{backend + ' ' + str(level):<34}(not installed)")
                continue
            cpu, wall, out = _timed(lambda b=backend, lv=level: _frame(raw_path, b, lv))
            row(f"server: frame {backend} -{level}", cpu, wall, out)  # type: ignore[arg-type]
        framed = Path(tmp) / "framed.tar.gz"
        _frame(raw_path, "isal", 2, keep=framed)
        for verify in (False, True):
            cpu, wall, out = _timed(lambda v=verify: _compose_all(framed, v))
            row(f"server: compose, copy all{' +verify' if verify else ''}", cpu, wall,
                out)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
