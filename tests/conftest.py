"""Shared fixtures: a real sshd on loopback, a real SQLite catalog, a real
archive directory. Nothing here reads ~/.ssh or talks to an ssh-agent."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner, Result

from cli.main import main as cli_main
from fixtures.postgres import PostgresCluster
from fixtures.seaweed import SeaweedS3
from fixtures.server import Backhauld
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


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresCluster]:
    """One real PostgreSQL cluster for the session (started on first use)."""
    with PostgresCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def s3() -> Iterator[SeaweedS3]:
    """One real S3 server (SeaweedFS) for the session; each test makes its own bucket."""
    with SeaweedS3() as server:
        yield server


@pytest.fixture
def s3_env(s3: SeaweedS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SeaweedS3:
    """Credentials as an operator gives them (the standard AWS variables; a
    live server inherits them), and no AWS file of this machine."""
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return s3


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty catalog database on each engine: the contract suites run
    on both. PostgreSQL: a new database in the session's cluster."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.db'}"
    return request.getfixturevalue("pg").create_database()


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


def make_engine(data: Path, key: ServerKey, *, io_timeout: float = 15.0,
                catalog_url: str | None = None) -> Engine:
    data.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(catalog_url or data / "catalog.db")
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

class LiveServer(Backhauld):
    """backhauld for a test: short retry and timeout settings, the session's
    server key, and helpers over its API."""

    def __init__(self, data_dir: Path, key: ServerKey, **settings: object) -> None:
        super().__init__(data_dir, key.path, **{
            "retry_min": 1, "retry_max": 4, "connect_timeout": 3, "io_timeout": 10,
            "shutdown_grace": 5, **settings})

    def start(self, timeout: float = 20.0) -> LiveServer:
        super().start(timeout)
        return self

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


# -- the client against a live backhauld ------------------------------------------

# The client's settings from the environment are cleared for every invocation,
# so no URL or token from the developer's shell can help a test pass.
NO_ENV = {"BACKHAUL_URL": None, "BACKHAUL_TOKEN": None, "BACKHAUL_DATA_DIR": None}


@pytest.fixture(scope="module")
def srv(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        server_key: ServerKey) -> Iterator[LiveServer]:
    """One backhauld shared by a module's tests (each uses its own paths)."""
    name = request.module.__name__.removeprefix("test_")
    s = LiveServer(tmp_path_factory.mktemp(name) / "server", server_key)
    s.start()
    yield s
    s.stop()


def cli(srv: LiveServer, *args: str, token: str | None = None) -> Result:
    """``backhaul --server URL --token TOKEN ARGS...`` in-process, through click."""
    argv = ["--server", srv.url, "--token", srv.token if token is None else token, *args]
    return CliRunner().invoke(cli_main, argv, env=NO_ENV)


def addr(node: SSHD) -> str:
    """A node as the client's USER@HOST:PORT argument."""
    return f"{node.user}@{node.host}:{node.port}"


def cli_on_tty(srv: LiveServer, *args: str, timeout: float = 60,
               **env: str) -> tuple[subprocess.CompletedProcess[bytes], bytes]:
    """The installed ``backhaul`` as a user runs it, the server from
    BACKHAUL_URL/BACKHAUL_TOKEN and its stderr on a pseudo-terminal (where
    progress is shown): the finished process and what the terminal showed."""
    backhaul = Path(sys.executable).parent / "backhaul"
    full = {k: v for k, v in os.environ.items() if not k.startswith("BACKHAUL_")}
    full.update(BACKHAUL_URL=srv.url, BACKHAUL_TOKEN=srv.token, **env)
    main_fd, sub_fd = pty.openpty()
    proc = subprocess.run([str(backhaul), *args], env=full, stdout=subprocess.PIPE,
                          stderr=sub_fd, timeout=timeout)
    os.close(sub_fd)
    shown = b""
    try:
        while chunk := os.read(main_fd, 65536):
            shown += chunk
    except OSError:  # EIO once the terminal's other end is closed
        pass
    os.close(main_fd)
    return proc, shown
