"""Profile one delta backup of each bench scenario, in process.

``python -m bench.delta_profile [SCRATCH] [--full]`` builds the ``delta``
section's tree (the cached 210 MiB real tree + a 65 MiB SQLite db + a 20 MiB
log) under SCRATCH, starts a real sshd on loopback, drives ``BackupEngine``
directly (no HTTP server), and prints per scenario the wall time, this
process's CPU time and cProfile's top functions by cumulative and own time.
``--full`` profiles a forced full backup as well. Not part of ``python -m
bench``: a tool for finding where a delta's time goes.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from bench.cli import default_cache
from bench.delta import SCENARIOS, _build, _Mutations
from fixtures.sshd.launcher import SSHD
from orchestrator.backup import BackupEngine, CatalogHostKeys
from orchestrator.ssh import ServerKey, SSHPool
from storage.archives import ArchiveStore
from storage.catalog import Catalog

MiB = 1024 * 1024


def _profiled(label: str, fn, top: int = 25) -> None:
    prof = cProfile.Profile()
    t0, c0 = time.perf_counter(), time.process_time()
    prof.enable()
    result = fn()
    prof.disable()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"\n=== {label}: {result.status} {result.transfer} wall {wall:.3f} s, "
          f"server CPU {cpu:.3f} s, {result.bytes_transferred / 1024:.1f} KiB", flush=True)
    for order in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(order).print_stats(top)
        print("\n".join(ln for ln in buf.getvalue().splitlines()[6:] if ln.strip()))


def main(argv: list[str]) -> None:
    scratch = Path(argv[0] if argv and not argv[0].startswith("-") else "/tmp/backhaul-prof")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    ctx = SimpleNamespace(scratch=scratch, cache=default_cache(), log=print)
    src = _build(ctx, 210 * MiB, 65 * MiB, 20 * MiB)  # type: ignore[arg-type]
    key = ServerKey(scratch / "id_ed25519")
    with SSHD(scratch / "node", key.public_line) as sshd:
        catalog = Catalog(scratch / "catalog.db")
        store = ArchiveStore(scratch / "archives")
        pool = SSHPool(key, CatalogHostKeys(catalog), connect_timeout=5, io_timeout=60)
        engine = BackupEngine(catalog, store, pool)
        n = catalog.ensure_node(sshd.user, sshd.host, sshd.port)
        target = catalog.add_target(n.id, str(src), 100000, 10)
        t0 = time.perf_counter()
        first = engine.run(target.id)
        print(f"first backup: {first.status} {first.transfer} {time.perf_counter() - t0:.2f} s")
        if "--full" in argv:
            _profiled("full", lambda: engine.run(target.id, full=True), 40)
        mut = _Mutations(src)
        for rnd in range(2):
            for key_, label in SCENARIOS:
                getattr(mut, key_)()
                _profiled(f"round {rnd + 1} {label}", lambda: engine.run(target.id))
        pool.close()
        catalog.close()


if __name__ == "__main__":
    main(sys.argv[1:])
