"""Shared fixtures: a real sshd on loopback, a real SQLite catalog, a real
archive directory. Nothing here reads ~/.ssh or talks to an ssh-agent."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

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
