"""What every section uses: sizes, sshd nodes, backhauld subprocesses, the
OpenSSH client command line and a small HTTP client for the API.

Every process started here is registered on the context's ``ExitStack`` (or
the ``with`` block of its section) and is stopped by its PID, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fixtures.server import Backhauld as _Backhauld
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import NodeAddress, ServerKey

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
GiB = 1024 * MiB


class BenchError(RuntimeError):
    """A measurement could not be taken (a run failed, a process died, ...)."""


@dataclass(frozen=True)
class Sizes:
    """Everything that scales between ``--quick`` and the full run."""

    pairs: int
    tree: int            # bytes of real files for the full-backup sections
    transport: int       # bytes cat'ed through the SSH layer
    check_files: int     # files in the tree of the unchanged check
    checks: int          # sequential unchanged checks timed
    sweep_nodes: int
    sweep_targets: int
    sweeps: int
    stream: int          # bytes of incompressible tree streamed for the RSS figure
    fleet_targets: int   # targets registered through the API
    fleet_nodes: int
    cli_runs: int
    bw_bytes: int
    bwlimit: int

    @classmethod
    def full(cls) -> Sizes:
        return cls(pairs=5, tree=210 * MiB, transport=GiB, check_files=1000, checks=200,
                   sweep_nodes=10, sweep_targets=1000, sweeps=3, stream=2 * GiB,
                   fleet_targets=10_000, fleet_nodes=10, cli_runs=5, bw_bytes=200 * MiB,
                   bwlimit=20 * MiB)

    @classmethod
    def quick(cls) -> Sizes:
        return cls(pairs=3, tree=16 * MiB, transport=64 * MiB, check_files=1000, checks=40,
                   sweep_nodes=10, sweep_targets=100, sweeps=3, stream=96 * MiB,
                   fleet_targets=100, fleet_nodes=10, cli_runs=3, bw_bytes=40 * MiB,
                   bwlimit=20 * MiB)


def ssh_env() -> dict[str, str]:
    """The environment of ssh and backhaul subprocesses: no agent, no BACKHAUL_*."""
    return {k: v for k, v in os.environ.items()
            if k not in ("SSH_AUTH_SOCK", "SSH_AGENT_PID") and not k.startswith("BACKHAUL_")}


def address(node: SSHD) -> NodeAddress:
    assert node.port is not None
    return NodeAddress(node.user, node.host, node.port)


def node_arg(node: SSHD) -> str:
    """The ``USER@HOST:PORT`` argument of the backhaul client."""
    return f"{node.user}@{node.host}:{node.port}"


class Context:
    """One benchmark run: its cache and scratch dirs, the shared SSH key, the
    sshd nodes (started on demand, 127.0.0.2, .3, ...) and long-lived servers."""

    def __init__(self, *, quick: bool, cache: Path, scratch: Path,
                 log: Callable[[str], None]) -> None:
        self.quick = quick
        self.sizes = Sizes.quick() if quick else Sizes.full()
        self.cache = cache
        self.scratch = scratch
        self.log = log
        self.stack = contextlib.ExitStack()
        self.memo: dict[str, Any] = {}
        self._nodes: list[SSHD] = []
        # One key for everything: backhauld processes get a copy, the
        # in-process sections use it directly, and so does the OpenSSH client.
        self.key = ServerKey(scratch / "key" / "id_ed25519", comment="backhaul-bench")
        self.known_hosts = scratch / "known_hosts"
        self.known_hosts.write_text("")
        self.backhaul = _console_script("backhaul")

    def close(self) -> None:
        self.stack.close()

    def nodes(self, count: int) -> list[SSHD]:
        """The first ``count`` nodes, starting any not yet running."""
        while len(self._nodes) < count:
            i = len(self._nodes)
            sshd = SSHD(self.scratch / "nodes" / f"node{i}", self.key.public_line,
                        host=f"127.0.0.{2 + i}")
            self.stack.enter_context(sshd)
            self._nodes.append(sshd)
            with self.known_hosts.open("a") as f:
                f.write(sshd.known_hosts_line + "\n")
        return self._nodes[:count]

    def node(self) -> SSHD:
        return self.nodes(1)[0]

    def ssh_argv(self, node: SSHD, command: str, *, cipher: str | None = None) -> list[str]:
        """The OpenSSH client, isolated from the user's config, keys and agent."""
        argv = ["ssh", "-F", "/dev/null", "-i", str(self.key.path),
                "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "StrictHostKeyChecking=yes",
                "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-p", str(node.port)]
        if cipher:
            argv += ["-c", cipher]
        return [*argv, f"{node.user}@{node.host}", command]

    @contextlib.contextmanager
    def backhauld(self, name: str, **settings: object) -> Iterator[Backhauld]:
        """A backhauld for one section, stopped when the block ends."""
        srv = Backhauld(self.scratch / name, self.key, **settings)
        try:
            srv.start()
            yield srv
        finally:
            srv.stop()

    def lasting_backhauld(self, name: str, **settings: object) -> Backhauld:
        """A backhauld that lives until the end of the benchmark."""
        srv = Backhauld(self.scratch / name, self.key, **settings)
        self.stack.callback(srv.stop)
        srv.start()
        return srv


def _console_script(name: str) -> str:
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise BenchError(f"console script {name!r} not found; run `make setup` first")
    return found


class Backhauld(_Backhauld):
    """backhauld for a section: the shared launcher plus the bench's API helpers."""

    def __init__(self, data_dir: Path, key: ServerKey, **settings: object) -> None:
        super().__init__(data_dir, key.path, **settings)

    def start(self, timeout: float = 30.0) -> Backhauld:
        try:
            super().start(timeout)
        except RuntimeError as exc:
            raise BenchError(str(exc)) from None
        return self

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def client(self) -> ApiClient:
        return ApiClient(self.port, lambda: self.token)

    def cli_env(self) -> dict[str, str]:
        env = ssh_env()
        env["BACKHAUL_URL"] = self.url
        env["BACKHAUL_TOKEN"] = self.token
        return env

    # -- API helpers ---------------------------------------------------------

    def register(self, node: SSHD, path: Path | str, every: int = 1440) -> dict[str, Any]:
        status, doc = self.client().request("POST", "/api/v1/targets", body={
            "host": node.host, "port": node.port, "user": node.user, "path": str(path),
            "every_minutes": every})
        if status != 201:
            raise BenchError(f"register {node_arg(node)} {path}: HTTP {status} {doc}")
        return doc["target"]

    def runs(self, target_id: int, limit: int = 20) -> list[dict[str, Any]]:
        status, doc = self.client().request("GET", "/api/v1/runs",
                                            query={"target_id": target_id, "limit": limit})
        if status != 200:
            raise BenchError(f"runs of target {target_id}: HTTP {status} {doc}")
        return doc["runs"]

    def wait_run(self, target_id: int, *, after: int = 0, timeout: float = 600.0,
                 interval: float = 0.1) -> dict[str, Any]:
        """The first finished run of the target with an id above ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            done = [r for r in self.runs(target_id)
                    if r["id"] > after and r["status"] != "running"]
            if done:
                return min(done, key=lambda r: r["id"])
            if self.proc is None or self.proc.poll() is not None:
                raise BenchError(f"backhauld died:\n{self.log_tail()}")
            time.sleep(interval)
        raise BenchError(f"no finished run of target {target_id} after {timeout:g} s")

    def download(self, archive_id: int, dest: Path) -> Path:
        """Fetch an archive through the API (as ``backhaul download`` does) and
        check it against the server's sha256."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        try:
            conn.request("GET", f"/api/v1/archives/{archive_id}/download",
                         headers={"Authorization": f"Bearer {self.token}"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise BenchError(f"download of archive {archive_id}: HTTP {resp.status} "
                                 f"{resp.read()[:200]!r}")
            digest = hashlib.sha256()
            with open(dest, "wb") as f:
                while chunk := resp.read(1024 * 1024):
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != resp.getheader("X-Backhaul-SHA256"):
                raise BenchError(f"archive {archive_id}: sha256 differs from the catalog's")
        finally:
            conn.close()
        return dest


class ApiClient:
    """A keep-alive HTTP/JSON connection to backhauld (one per thread)."""

    def __init__(self, port: int, token: Callable[[], str]) -> None:
        self.port = port
        self._token = token
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def request(self, method: str, path: str, *, body: object = None,
                query: dict[str, Any] | None = None,
                timeout: float = 600.0) -> tuple[int, Any]:
        if query:
            path += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if path.startswith("/api/"):
            headers["Authorization"] = f"Bearer {self._token()}"
        payload = None
        if body is not None:
            payload = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        with self._lock:
            for attempt in (1, 2):
                if self._conn is None:
                    self._conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                            timeout=timeout)
                try:
                    self._conn.request(method, path, body=payload, headers=headers)
                    resp = self._conn.getresponse()
                    raw = resp.read()
                    break
                except (http.client.RemoteDisconnected, ConnectionResetError,
                        BrokenPipeError):
                    # The server closed an idle keep-alive connection: reopen once.
                    self._conn.close()
                    self._conn = None
                    if attempt == 2:
                        raise
            try:
                doc = json.loads(raw) if raw else None
            except ValueError:
                doc = raw[:200]
            return resp.status, doc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def run_timed(argv: list[str], *, env: dict[str, str] | None = None,
              stdout: Any = subprocess.PIPE, check: bool = True,
              timeout: float = 1800.0) -> tuple[float, subprocess.CompletedProcess[bytes]]:
    """Run a command; return its wall time and the completed process."""
    t0 = time.perf_counter()
    cp = subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE,
                        stdin=subprocess.DEVNULL, timeout=timeout, check=False)
    elapsed = time.perf_counter() - t0
    if check and cp.returncode != 0:
        raise BenchError(f"{' '.join(argv[:3])} ... exited {cp.returncode}: "
                         f"{cp.stderr.decode(errors='replace').strip()[-500:]}")
    return elapsed, cp
