"""What a delta on the S3 store costs the gateway, per operation: the same
random object uploaded (``UploadPart``, 8 MiB parts), read back in 4 MiB
ranged GETs (how a delta reads the members it reuses, to hash them), and
copied into a new object with ``UploadPartCopy`` (16 MiB source ranges, as
the S3 writer copies a reused run), against SeaweedFS's ``weed mini`` on
loopback. MB/s of wall time, one stream each.

    python -m bench.s3_copy [--mib 96] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import time

from fixtures.seaweed import SeaweedS3

MiB = 2**20


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.s3_copy")
    ap.add_argument("--mib", type=int, default=96, help="object size, MiB (a multiple of 16)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    size = args.mib // 16 * 16 * MiB
    data = os.urandom(size)
    with SeaweedS3() as s3:
        c = s3.client()
        bucket = s3.create_bucket("bench")
        rates: dict[str, list[float]] = {"UploadPart": [], "GET 4 MiB ranges": [],
                                         "UploadPartCopy": []}
        for _ in range(args.repeat):
            t = time.monotonic()
            up = c.create_multipart_upload(Bucket=bucket, Key="src")["UploadId"]
            parts = []
            for i, off in enumerate(range(0, size, 8 * MiB), 1):
                etag = c.upload_part(Bucket=bucket, Key="src", UploadId=up, PartNumber=i,
                                     Body=data[off:off + 8 * MiB])["ETag"]
                parts.append({"PartNumber": i, "ETag": etag})
            c.complete_multipart_upload(Bucket=bucket, Key="src", UploadId=up,
                                        MultipartUpload={"Parts": parts})
            rates["UploadPart"].append(size / (time.monotonic() - t))
            t = time.monotonic()
            got = bytearray()
            for off in range(0, size, 4 * MiB):
                got += c.get_object(Bucket=bucket, Key="src",
                                    Range=f"bytes={off}-{off + 4 * MiB - 1}")["Body"].read()
            rates["GET 4 MiB ranges"].append(size / (time.monotonic() - t))
            assert got == data
            t = time.monotonic()
            up = c.create_multipart_upload(Bucket=bucket, Key="dst")["UploadId"]
            parts = []
            for i, off in enumerate(range(0, size, 16 * MiB), 1):
                r = c.upload_part_copy(Bucket=bucket, Key="dst", UploadId=up, PartNumber=i,
                                       CopySource={"Bucket": bucket, "Key": "src"},
                                       CopySourceRange=f"bytes={off}-{off + 16 * MiB - 1}")
                parts.append({"PartNumber": i, "ETag": r["CopyPartResult"]["ETag"]})
            c.complete_multipart_upload(Bucket=bucket, Key="dst", UploadId=up,
                                        MultipartUpload={"Parts": parts})
            rates["UploadPartCopy"].append(size / (time.monotonic() - t))
    load = os.getloadavg()[0]
    print(f"{size // MiB} MiB object, SeaweedFS on loopback, load {load:.1f}:")
    for name, values in rates.items():
        print(f"  {name}: " + ", ".join(f"{v / 1e6:.0f}" for v in values) + " MB/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
