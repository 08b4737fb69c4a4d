"""Section ``transport``: the SSH layer's channel throughput (``Connection.exec``
of ``cat`` on a precreated incompressible file into a discarding sink) against
``ssh -c aes128-gcm@openssh.com node cat FILE > /dev/null``."""

from __future__ import annotations

import shlex
import subprocess
import time

from bench import data
from bench.harness import BenchError, Context, address, run_timed, ssh_env
from bench.measure import median, run_pairs
from bench.report import Metric, at_least, info
from orchestrator.ssh import SSHPool, StaticHostKeys

MB = 1e6
CIPHER = "aes128-gcm@openssh.com"


def _discard(_data: bytes) -> None:
    pass


def run_transport(ctx: Context) -> list[Metric]:
    size = ctx.sizes.transport
    path = data.random_file(ctx.cache / f"transport-{size >> 20}M.bin", size, seed=size)
    node = ctx.node()
    command = f"cat {shlex.quote(str(path))}"
    ctx.log(f"transport: {size / MB:.0f} MB through Connection.exec vs OpenSSH -c {CIPHER}")
    with SSHPool(ctx.key, StaticHostKeys(), connect_timeout=10, io_timeout=120) as pool:
        conn = pool.connection(address(node))
        cipher = getattr(conn.transport, "remote_cipher", "?")

        def ours() -> float:
            t0 = time.perf_counter()
            res = conn.exec(command, sink=_discard, what="bench cat")
            elapsed = time.perf_counter() - t0
            if res.exit_status != 0 or res.stdout_bytes != size:
                raise BenchError(f"cat via paramiko: exit {res.exit_status}, "
                                 f"{res.stdout_bytes} of {size} bytes")
            return elapsed

        def openssh() -> float:
            elapsed, _cp = run_timed(ctx.ssh_argv(node, command, cipher=CIPHER), env=ssh_env(),
                                     stdout=subprocess.DEVNULL)
            return elapsed

        ours()
        openssh()
        pairs = run_pairs(ours, openssh, ctx.sizes.pairs, lambda m: ctx.log(f"  {m}"),
                          ("paramiko", "openssh"))
    ours_mbs = median([size / MB / t for t in pairs.a])
    openssh_mbs = median([size / MB / t for t in pairs.b])
    share = median([b / a for a, b in zip(pairs.a, pairs.b, strict=True)])
    return [
        info("transport", f"SSH layer (paramiko, {cipher})", ours_mbs, "MB/s", "{:.0f}"),
        info("transport", f"OpenSSH client ({CIPHER})", openssh_mbs, "MB/s", "{:.0f}"),
        at_least("transport", "SSH layer throughput / OpenSSH", share, "x", 0.5, "{:.2f}",
                 bytes=size, **pairs.as_detail()),
    ]
