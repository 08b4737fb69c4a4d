"""The S3 archive store against the directory store, at the store level:
stream the same bytes through each store's writer (sha256 on the fly, commit)
and read them back with ranged reads; report the wall-time ratio S3 : directory
and the RSS growth while streaming to S3 (goal <= 64 MiB).

    python -m bench.s3_store [--gib 2] [--pairs 3]

The S3 server is SeaweedFS's ``weed mini`` on loopback (fixtures/seaweed.py).
Whole-server sections (``full``/``delta`` with ``--store-url``) wait until
backhauld can be started on the S3 store.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

from bench.measure import RssSampler, median, rss_bytes
from fixtures.seaweed import SeaweedS3
from storage.archives import ArchiveStore
from storage.stores.s3 import S3ArchiveStore

MiB = 2**20
CHUNK = 256 * 1024  # what a run hands the writer at a time, about


def stream(store: object, total: int, block: bytes, run_id: int) -> float:
    started = time.perf_counter()
    w = store.writer("bench@127.0.0.1_22", 1, run_id,  # type: ignore[attr-defined]
                     dt.datetime.now(dt.UTC))
    sent = 0
    view = memoryview(block)
    while sent < total:
        n = min(CHUNK, total - sent)
        off = sent % (len(block) - CHUNK)
        w.write(view[off:off + n])
        sent += n
    facts = w.commit()
    assert facts.size == total
    store.delete(facts.file_name)  # type: ignore[attr-defined]
    return time.perf_counter() - started


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3_store")
    ap.add_argument("--gib", type=float, default=2.0, help="bytes streamed per run, GiB")
    ap.add_argument("--pairs", type=int, default=1, help="directory/S3 runs side by side")
    args = ap.parse_args()
    total = int(args.gib * 1024 * MiB)
    block = os.urandom(64 * MiB)  # incompressible; both stores get the same bytes
    with SeaweedS3() as s3, tempfile.TemporaryDirectory(prefix="bench-dir-") as d:
        for k, v in s3.env().items():
            os.environ[k] = v
        bucket = s3.create_bucket("bench")
        s3_store = S3ArchiveStore(f"s3://{bucket}/bench", endpoint_url=s3.endpoint,
                                  region="us-east-1")
        dir_store = ArchiveStore(Path(d) / "archives")
        stream(s3_store, 32 * MiB, block, 0)  # warm the connection pool
        baseline = rss_bytes(os.getpid())
        times: dict[str, list[float]] = {"directory": [], "s3": []}
        with RssSampler(os.getpid(), 0.05) as sampler:
            for i in range(args.pairs):
                times["directory"].append(stream(dir_store, total, block, 2 * i + 1))
                times["s3"].append(stream(s3_store, total, block, 2 * i + 2))
        growth = max(0, sampler.peak - baseline)
    ratios = [s / f for s, f in zip(times["s3"], times["directory"], strict=True)]
    gb = total / 1e9
    print(f"stream {gb:.2f} GB per run, {args.pairs} pairs")
    print(f"  directory store: median {median(times['directory']):.2f} s "
          f"({gb / median(times['directory']):.2f} GB/s)")
    print(f"  S3 store (SeaweedFS, loopback): median {median(times['s3']):.2f} s "
          f"({gb / median(times['s3']):.2f} GB/s)")
    print(f"  wall ratio S3 : directory, median of pairs: {median(ratios):.2f}x "
          f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})")
    # the 64 MiB source block exists before the baseline is taken
    print(f"  RSS growth while streaming (both stores): {growth / MiB:.1f} MiB "
          f"(goal <= 64 MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
