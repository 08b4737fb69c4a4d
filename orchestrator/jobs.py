"""The stable job entry points that APScheduler's job store references by text.

These names and signatures are part of the persistent job store's format: a
stored job whose function no longer resolves is deleted by APScheduler. Never
rename them; keep their arguments primitive. They reach the running server
through the one module-level handle below, set once by ``Server.start``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Protocol

log = logging.getLogger(__name__)


class Host(Protocol):
    """What the entry points below (and the run queue's tasks) call on the
    running server (``Server``); a Protocol, so this module imports no server
    code (``server.py`` imports this one)."""

    def run_job(self, target_id: int, trigger: str) -> object: ...

    def probe_node(self, node_id: int) -> None: ...

    def execute(self, target_id: int, trigger: str, due: dt.datetime | None, *,
                full: bool = False) -> None: ...


_server: Host | None = None


def install(server: Host | None) -> None:
    global _server
    _server = server


def installed() -> Host | None:
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
