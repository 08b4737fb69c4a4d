"""What a hostile node or client costs a live backhauld: server RSS during a
4 GiB gzip bomb, a 1.5 GB fingerprint answer and an 800 MiB unauthenticated
body, and how long a trickling node holds a run.

    python -m bench.reliability_bounds          # prints the table
    python -m bench.reliability --only hostile  # the same rows in the report

The node is a real sshd forcing ``fixtures.hostile_node``'s script; the
server is ``python -m orchestrator`` on loopback. RSS is sampled from
/proc/<pid>/status every 20 ms; "above idle" is the peak during the attack
minus the RSS just before it.
"""

from __future__ import annotations

import contextlib
import socket
import tarfile
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from fixtures.server import Backhauld

MiB = 2**20
RSS_BOUND_MIB = 200  # the bound each attack must stay under, above idle
BOMB_SIZE = 4 * 2**30
FLOOD_BYTES = 1_500_000_000
BODY_BYTES = 800 * MiB
RUN_TIMEOUT = 20.0
IO_TIMEOUT = 5.0


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, float]]:
    """Samples RSS while inside; fills ``idle_mib``, ``peak_mib``, ``above_idle_mib``."""
    out: dict[str, float] = {"idle_mib": rss_kib(pid) / 1024}
    peak = [out["idle_mib"]]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], rss_kib(pid) / 1024)
            stop.wait(0.02)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    started = time.monotonic()
    try:
        yield out
    finally:
        stop.set()
        t.join()
        out["peak_mib"] = round(peak[0], 1)
        out["above_idle_mib"] = round(peak[0] - out["idle_mib"], 1)
        out["idle_mib"] = round(out["idle_mib"], 1)
        out["seconds"] = round(time.monotonic() - started, 2)


def write_zero_bomb(path: Path, size: int) -> int:
    """A valid tar.gz of ``app/zeros`` (``size`` zero bytes), streamed to ``path``."""
    z = zlib.compressobj(6, zlib.DEFLATED, 31)
    d = tarfile.TarInfo("app")
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    f = tarfile.TarInfo("app/zeros")
    f.size = size
    block = b"\0" * (8 * MiB)
    with open(path, "wb") as out:
        out.write(z.compress(d.tobuf(tarfile.GNU_FORMAT) + f.tobuf(tarfile.GNU_FORMAT)))
        left = size
        while left:
            n = min(left, len(block))
            out.write(z.compress(block[:n]))
            left -= n
        out.write(z.compress(b"\0" * (-size % 512 + 1024)))
        out.write(z.flush())
    return path.stat().st_size


def good_archive() -> bytes:
    import io
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        d = tarfile.TarInfo("app")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    return buf.getvalue()


def _api(srv: Backhauld, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, srv.url + "/api/v1" + path, timeout=600,
                         headers={"Authorization": f"Bearer {srv.token}"}, **kw)


def _run(srv: Backhauld, target_id: int) -> dict[str, Any]:
    return _api(srv, "POST", f"/targets/{target_id}/run", params={"wait": "true"}).json()["run"]


def _register(srv: Backhauld, node: Any) -> int:
    r = _api(srv, "POST", "/targets", json={"host": node.sshd.host, "port": node.sshd.port,
                                            "user": node.sshd.user, "path": "/srv/app",
                                            "every_minutes": 600})
    r.raise_for_status()
    tid = r.json()["target"]["id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # let the first (benign) run end
        runs = _api(srv, "GET", "/runs", params={"target_id": tid}).json()["runs"]
        if runs and runs[0]["status"] != "running":
            break
        time.sleep(0.2)
    return tid


def _unauthenticated_body(srv: Backhauld, chunked: bool) -> dict[str, Any]:
    """Stream up to BODY_BYTES without a token; stop when the server answers."""
    head = ["POST /api/v1/targets HTTP/1.1", "Host: 127.0.0.1",
            "Content-Type: application/json"]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {BODY_BYTES}")
    sent = 0
    status = None
    block = b" " * MiB
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        s.setblocking(False)
        answer = b""
        while sent < BODY_BYTES:
            with contextlib.suppress(BlockingIOError):
                answer += s.recv(65536)
            if b"\r\n\r\n" in answer:
                break
            piece = (f"{len(block):x}\r\n".encode() + block + b"\r\n") if chunked else block
            try:
                s.setblocking(True)
                s.settimeout(5)
                s.sendall(piece)
                s.setblocking(False)
            except OSError:
                break  # the server answered and closed
            sent += len(block)
        s.setblocking(True)
        s.settimeout(10)
        with contextlib.suppress(OSError):
            while b"\r\n\r\n" not in answer:
                chunk = s.recv(65536)
                if not chunk:
                    break
                answer += chunk
        if answer.startswith(b"HTTP/1.1 "):
            status = int(answer.split()[1])
    return {"status": status, "body_bytes_sent_mib": round(sent / MiB, 1)}


def run_bounds(report: dict[str, Any]) -> None:
    from fixtures.hostile_node import HostileNode
    from orchestrator.ssh import ServerKey

    with tempfile.TemporaryDirectory(prefix="bh-bounds-") as tmp:
        root = Path(tmp)
        key = ServerKey(root / "server" / "ssh" / "id_ed25519")
        bomb = root / "bomb.tar.gz"
        bomb_size = write_zero_bomb(bomb, BOMB_SIZE)
        with HostileNode(root / "node", key.public_line, host="127.0.0.6") as node:
            node.payload(good_archive())
            settings = {"connect_timeout": 3, "io_timeout": IO_TIMEOUT, "retry_min": 60,
                        "retry_max": 600, "shutdown_grace": 5}
            # Ratio cap off: the whole 4 GiB is inflated, in bounded steps.
            srv = Backhauld(root / "server", max_compression_ratio=0, run_timeout=600,
                            **settings).start()
            try:
                tid = _register(srv, node)
                time.sleep(1)
                out: dict[str, Any] = {"bomb_compressed_mib": round(bomb_size / MiB, 1),
                                       "bomb_inflated_gib": BOMB_SIZE / 2**30,
                                       "rss_bound_mib": RSS_BOUND_MIB}
                node.answer("tar", f"cat {bomb}\n")
                with peak_rss(srv.pid) as m:
                    run = _run(srv, tid)
                out["bomb_inflated"] = {**m, "status": run["status"],
                                        "error_code": run["error_code"]}
                node.reset(good_archive())
                node.answer("fingerprint", f"head -c {FLOOD_BYTES} /dev/zero | tr '\\0' a\n")
                with peak_rss(srv.pid) as m:
                    run = _run(srv, tid)
                out["fingerprint_flood"] = {**m, "status": run["status"],
                                            "error_code": run["error_code"]}
                node.reset(good_archive())
                for chunked in (False, True):
                    with peak_rss(srv.pid) as m:
                        res = _unauthenticated_body(srv, chunked)
                    out["body_chunked" if chunked else "body_content_length"] = {**m, **res}
            finally:
                srv.stop()
            # The default limits, a short run deadline: the bomb is refused by
            # its ratio, the trickle by the deadline.
            srv = Backhauld(root / "server", run_timeout=RUN_TIMEOUT, **settings).start()
            try:
                node.answer("tar", f"cat {bomb}\n")
                with peak_rss(srv.pid) as m:
                    run = _run(srv, tid)
                out["bomb_default_limits"] = {**m, "status": run["status"],
                                              "error_code": run["error_code"]}
                node.answer("tar", f"i=0; while :; do dd if={node.payload_path} bs=1 "
                                   "skip=$i count=1 2>/dev/null; i=$((i+1)); sleep 1; done\n")
                with peak_rss(srv.pid) as m:
                    run = _run(srv, tid)
                out["trickle"] = {**m, "status": run["status"], "error_code": run["error_code"],
                                  "run_seconds": run["duration_seconds"],
                                  "run_timeout": RUN_TIMEOUT, "io_timeout": IO_TIMEOUT}
            finally:
                srv.stop()
    report["bounds"] = out


def rows(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    b = report.get("bounds")
    if not b:
        return []
    bound = b["rss_bound_mib"]

    def mem(m: dict[str, Any]) -> str:
        return f"+{m['above_idle_mib']} MiB RSS (idle {m['idle_mib']}) in {m['seconds']}s"

    out = []
    for key, what, ok_status in (
            ("bomb_inflated", "4 GiB gzip bomb, ratio cap off", ("success",)),
            ("bomb_default_limits", "4 GiB gzip bomb, default limits", ("failed",)),
            ("fingerprint_flood", "1.5 GB fingerprint answer", ("failed",))):
        m = b[key]
        out.append((what, f"{mem(m)}: {m['status']} {m['error_code'] or ''}".strip(),
                    m["above_idle_mib"] <= bound and m["status"] in ok_status))
    for key, what in (("body_content_length", "800 MiB body, no token"),
                      ("body_chunked", "800 MiB chunked body, no token")):
        m = b[key]
        out.append((what, f"{mem(m)}: {m['status']} after {m['body_bytes_sent_mib']} MiB sent",
                    m["above_idle_mib"] <= bound and m["status"] == 401))
    t = b["trickle"]
    out.append(("trickle, 1 byte/s", f"ended after {t['run_seconds']}s ({t['error_code']}), "
                f"deadline {t['run_timeout']:g}s", t["error_code"] == "run_timeout"
                and t["run_seconds"] <= t["run_timeout"] + t["io_timeout"]))
    return out


def format_table(report: dict[str, Any]) -> str:
    lines = [f"{'what':<34} {'figure':<70} verdict", "-" * 112]
    lines += [f"{w:<34} {f:<70} {'ok' if ok else 'FAIL'}" for w, f, ok in rows(report)]
    return "\n".join(lines)


if __name__ == "__main__":
    result: dict[str, Any] = {}
    run_bounds(result)
    print(format_table(result))
