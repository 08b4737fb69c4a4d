"""Bounds on what one archive stream may cost the server.

A node is trusted to run tar, not to be well-behaved: it may send a gzip bomb
(a few MB inflating to many GB), a stream that never ends, or one that fills
the disk. These limits are checked while the stream is received, so a run
that crosses one fails (``archive_too_large``) and nothing is kept.

``0`` switches a limit off.
"""

from __future__ import annotations

from dataclasses import dataclass

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40

# Inflated bytes handed to the tar parser per step: the most the verifier ever
# holds of a decompressed stream, however well it compresses.
INFLATE_STEP = 1 * MiB

# A pax / GNU long-name header payload larger than this is not a name.
MAX_SPECIAL_HEADER = 1 * MiB


@dataclass(frozen=True)
class ArchiveLimits:
    # Compressed bytes written to the store for one archive.
    max_archive_size: int = 1 * TiB
    # Bytes the gzip layer may inflate to.
    max_uncompressed: int = 16 * TiB
    # Inflated / compressed bytes. gzip tops out at ~1030:1 (all zeros); tar.gz
    # of source trees and logs land between 3:1 and 20:1. Judged only past
    # ``ratio_floor`` inflated bytes so a tiny, very regular archive passes.
    max_ratio: float = 1000.0
    ratio_floor: int = 64 * MiB


UNLIMITED = ArchiveLimits(0, 0, 0.0, 0)


def format_size(n: float) -> str:
    for unit, size in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= size:
            return f"{n / size:.4g} {unit}"
    return f"{int(n)} B"
