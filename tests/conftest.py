"""Shared fixtures: a real sshd on loopback, a real SQLite catalog, a real
archive directory. Nothing here reads ~/.ssh or talks to an ssh-agent."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fixtures.sshd.launcher import SSHD
from orchestrator.backup import BackupEngine, CatalogHostKeys
from orchestrator.ssh import NodeAddress, ServerKey, SSHPool
from storage.archives import ArchiveStore
from storage.catalog import Catalog, Target


@pytest.fixture(autouse=True)
def _no_user_ssh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("SSH_AGENT_PID", raising=False)


@pytest.fixture(scope="session")
def server_key(tmp_path_factory: pytest.TempPathFactory) -> ServerKey:
    return ServerKey(tmp_path_factory.mktemp("serverkey") / "id_ed25519")


@pytest.fixture(scope="session")
def node(tmp_path_factory: pytest.TempPathFactory, server_key: ServerKey) -> Iterator[SSHD]:
    """One sshd shared by the tests that do not break it."""
    with SSHD(tmp_path_factory.mktemp("node"), server_key.public_line) as sshd:
        yield sshd


@pytest.fixture
def own_node(tmp_path: Path, server_key: ServerKey) -> Iterator[SSHD]:
    """A fresh sshd for a test that stops it, kills its sessions or rekeys it."""
    with SSHD(tmp_path / "own-node", server_key.public_line, host="127.0.0.2") as sshd:
        yield sshd


@dataclass
class Engine:
    catalog: Catalog
    store: ArchiveStore
    pool: SSHPool
    engine: BackupEngine
    data: Path

    def register(self, sshd: SSHD, path: Path | str, *, every: int = 5, keep: int = 10) -> Target:
        n = self.catalog.ensure_node(sshd.user, sshd.host, sshd.port)
        return self.catalog.add_target(n.id, str(path), every, keep)

    def temp_files(self) -> list[Path]:
        return [p for p in self.store.root.rglob("*") if ".partial-" in p.name]

    def archive_files(self) -> list[Path]:
        return sorted(self.store.root.rglob("*.tar.gz"))


def make_engine(data: Path, key: ServerKey, *, io_timeout: float = 15.0) -> Engine:
    data.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(data / "catalog.db")
    store = ArchiveStore(data / "archives")
    pool = SSHPool(key, CatalogHostKeys(catalog), connect_timeout=5, io_timeout=io_timeout)
    return Engine(catalog, store, pool, BackupEngine(catalog, store, pool), data)


@pytest.fixture
def eng(tmp_path: Path, server_key: ServerKey) -> Iterator[Engine]:
    e = make_engine(tmp_path / "data", server_key)
    yield e
    e.pool.close()
    e.catalog.close()


def address(sshd: SSHD) -> NodeAddress:
    return NodeAddress(sshd.user, sshd.host, sshd.port)


def pytest_report_header() -> str:
    return f"backhaul tests as uid {os.geteuid()}"


# -- a live backhauld ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``backhauld`` as a real subprocess on a free port, with its own data dir.

    The server's SSH key is copied in before the first start so the test
    nodes can authorise it in advance."""

    def __init__(self, data_dir: Path, key: ServerKey, **settings: object) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.settings = {"retry_min": 1, "retry_max": 4, "connect_timeout": 3,
                         "io_timeout": 10, "shutdown_grace": 5, **settings}
        (data_dir / "ssh").mkdir(parents=True, exist_ok=True)
        shutil.copy(key.path, data_dir / "ssh" / "id_ed25519")
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"backhauld-{self.port}.log"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
        env.update({f"BACKHAUL_{k.upper()}": str(v) for k, v in self.settings.items()})
        env["BACKHAUL_DATA_DIR"] = str(self.data_dir)
        env["BACKHAUL_LISTEN"] = f"127.0.0.1:{self.port}"
        return env

    def start(self, timeout: float = 20.0) -> LiveServer:
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator"], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backhauld exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"backhauld did not answer in {timeout}s:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rc, self.proc = self.proc.returncode, None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self.proc = None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def token(self) -> str:
        return (self.data_dir / "api-token").read_text().strip()

    def api(self, method: str, path: str, **kw: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"}
        return httpx.request(method, self.url + "/api/v1" + path, headers=headers,
                             timeout=120, **kw)

    def register(self, sshd: SSHD, path: Path | str, every: int = 1, **extra: object) -> dict:
        r = self.api("POST", "/targets", json={"host": sshd.host, "port": sshd.port,
                                               "user": sshd.user, "path": str(path),
                                               "every_minutes": every, **extra})
        assert r.status_code == 201, r.text
        return r.json()["target"]

    def runs(self, target_id: int) -> list[dict]:
        return self.api("GET", "/runs", params={"target_id": target_id,
                                                "limit": 1000}).json()["runs"]

    def wait_for(self, predicate, timeout: float, what: str, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}\n"
                             f"--- server log ---\n{self.log()[-4000:]}")


@pytest.fixture
def live(tmp_path: Path, server_key: ServerKey) -> Iterator[LiveServer]:
    srv = LiveServer(tmp_path / "server", server_key)
    srv.start()
    yield srv
    srv.stop()
