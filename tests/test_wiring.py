"""What ``server.py`` wires per ``--role``: the in-process runner for
``all``, the run queue for the scale-out roles, and one scheduler shared by
every component that schedules later work, also after the leader swaps its
stand-in for the real one (``roles._lead``).

Real servers on a real data dir (SQLite) and a real PostgreSQL catalog.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fixtures.postgres import PostgresCluster
from orchestrator import jobs
from orchestrator.dispatch.local import LocalRunner
from orchestrator.scheduler import Scheduler
from orchestrator.server import Server
from orchestrator.settings import Settings
from orchestrator.ssh import ServerKey


def _settings(tmp_path: Path, server_key: ServerKey, **changes: object) -> Settings:
    data = tmp_path / "data"
    (data / "ssh").mkdir(parents=True)
    # The session's key, so no key is generated per test.
    shutil.copy(server_key.path, data / "ssh" / "id_ed25519")
    return Settings.defaults(data_dir=str(data), **changes)


def test_role_all_runs_in_process_and_its_parts_share_the_scheduler(
        tmp_path: Path, server_key: ServerKey) -> None:
    server = Server(_settings(tmp_path, server_key))
    try:
        assert isinstance(server.runner, LocalRunner)
        assert isinstance(server.scheduler, Scheduler)
        assert server.queue is None
        for part in (server.policy, server.control, server.runner):
            assert part.scheduler is server.scheduler
        assert server.control.policy is server.policy
        assert server.runner.policy is server.policy
        server.start()
        assert jobs.installed() is server
    finally:
        server.stop()
    assert jobs.installed() is None


def test_a_scale_out_role_queues_its_runs_and_follows_a_swapped_scheduler(
        tmp_path: Path, server_key: ServerKey, pg: PostgresCluster) -> None:
    from orchestrator.dispatch.procrastinate import QueuedRunner, QueuedSchedule

    server = Server(_settings(tmp_path, server_key, role="api",
                              catalog_url=pg.create_database()))
    try:
        assert isinstance(server.runner, QueuedRunner)
        assert server.runner.queue is server.queue
        stand_in = server.scheduler
        assert isinstance(stand_in, QueuedSchedule)
        for part in (server.policy, server.control):
            assert part.scheduler is stand_in
        # What the leader does once it holds the lock (roles._lead): every
        # component that schedules retries and probes must use the real one.
        leading = stand_in.reader
        server.scheduler = leading
        for part in (server.policy, server.control):
            assert part.scheduler is leading
    finally:
        server.stop()

