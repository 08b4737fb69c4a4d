"""``backhauld migrate --from-data-dir``: the copy of an embedded install into
PostgreSQL + S3 streams. Builds an install with one large archive (a real
tar.gz of incompressible data, with its index) and one tiny one, copies each
with the real command into a fresh database and bucket, and reports the
command's throughput and its peak RSS for the large archive against the tiny
one (the growth streaming costs; goal <= 64 MiB, as for a backup).

    python -m bench.migrate_copy [--gib 1]

PostgreSQL (fixtures/postgres.py) and SeaweedFS's S3 gateway
(fixtures/seaweed.py) run on loopback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.measure import RssSampler
from fixtures.postgres import PostgresCluster
from fixtures.seaweed import SeaweedS3
from storage.archives import ArchiveStore
from storage.catalog import Catalog

MiB = 2**20


class _Sink:
    """A file object over an archive writer (what tarfile writes into)."""

    def __init__(self, writer: object) -> None:
        self.writer = writer

    def write(self, data: bytes) -> int:
        self.writer.write(data)  # type: ignore[attr-defined]
        return len(data)

    def flush(self) -> None:
        pass


class _Random:
    """``n`` random bytes, read as a file (never all in memory)."""

    def __init__(self, n: int) -> None:
        self.left = n

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        self.left -= size
        return os.urandom(size)


def make_install(data_dir: Path, payload: int) -> int:
    """A data dir with a catalog listing one archive of ``payload`` random
    bytes (tar.gz at gzip level 1, index beside it); returns its size."""
    store = ArchiveStore(data_dir / "archives")
    catalog = Catalog(data_dir / "catalog.db")
    try:
        node = catalog.ensure_node("bench", "127.0.0.1", 22)
        target = catalog.add_target(node.id, "/srv/bench", 60, 10)
        run = catalog.start_run(target.id, "manual")
        created = dt.datetime.now(dt.UTC)
        with store.writer("bench@127.0.0.1_22", target.id, run, created) as w:
            sink = _Sink(w)
            with gzip.GzipFile(fileobj=sink, mode="wb", compresslevel=1) as gz, \
                    tarfile.open(fileobj=gz, mode="w|") as tar:
                info = tarfile.TarInfo("bench/random.bin")
                info.size = payload
                tar.addfile(info, _Random(payload))
            facts = w.commit()
        store.rebuild_index(facts.file_name)
        catalog.commit_archive(run, target.id, created_at=created, size=facts.size,
                               sha256=facts.sha256, file_name=facts.file_name,
                               fingerprint="bench", bytes_transferred=facts.size,
                               warnings=None)
        return facts.size
    finally:
        catalog.close()


def copy(data_dir: Path, pg: PostgresCluster, s3: SeaweedS3) -> tuple[float, int]:
    """(seconds, peak RSS bytes) of one ``backhauld migrate --from-data-dir``."""
    bucket = s3.create_bucket("mig")
    env = {**os.environ, **s3.env()}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "migrate", "--from-data-dir", str(data_dir),
         "--catalog-url", pg.create_database(), "--store-url", f"s3://{bucket}/b",
         "--store-endpoint", s3.endpoint, "--store-region", "us-east-1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    with RssSampler(proc.pid, 0.05) as sampler:
        out, err = proc.communicate()
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"migrate failed:\n{err}")
    return took, sampler.peak


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.migrate_copy")
    ap.add_argument("--gib", type=float, default=1.0, help="random bytes in the large archive")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-migrate-") as d, \
            PostgresCluster() as pg, SeaweedS3() as s3:
        tiny, large = Path(d) / "tiny", Path(d) / "large"
        make_install(tiny, MiB)
        size = make_install(large, int(args.gib * 1024 * MiB))
        tiny_s, tiny_rss = copy(tiny, pg, s3)
        large_s, large_rss = copy(large, pg, s3)
    print(f"copy an install of one {size / MiB:.0f} MiB archive (tar.gz + index) into "
          "PostgreSQL + S3 (SeaweedFS, loopback)")
    print(f"  wall {large_s:.1f} s ({size / MiB / large_s:.1f} MiB/s; the command with a "
          f"1 MiB archive: {tiny_s:.1f} s)")
    print(f"  peak RSS {large_rss / MiB:.1f} MiB; with a 1 MiB archive {tiny_rss / MiB:.1f} "
          f"MiB: growth {(large_rss - tiny_rss) / MiB:.1f} MiB (goal <= 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
