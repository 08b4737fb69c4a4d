"""The stable job entry points that APScheduler's job store references by text.

These names and signatures are part of the persistent job store's format: a
stored job whose function no longer resolves is deleted by APScheduler. Never
rename them; keep their arguments primitive. They reach the running server
through the one module-level handle below, set once by ``Server.start``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from orchestrator.server import Server

log = logging.getLogger(__name__)

_server: Server | None = None


def install(server: Server | None) -> None:
    global _server
    _server = server


def installed() -> Server | None:
    """The running server, for the run queue's tasks (dispatch/procrastinate.py)."""
    return _server


def run_target(target_id: int) -> None:
    if _server is None:
        log.warning("job for target %s fired with no server installed", target_id)
        return
    _server.run_job(target_id, "schedule")


def retry_target(target_id: int) -> None:
    if _server is None:
        return
    _server.run_job(target_id, "retry")


def recover_target(target_id: int) -> None:
    if _server is None:
        return
    _server.run_job(target_id, "recovery")


def probe_node(node_id: int) -> None:
    if _server is None:
        return
    _server.probe_node(node_id)
