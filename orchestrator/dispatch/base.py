"""The interfaces of the dispatch backends.

``Server.run_job`` (what APScheduler fires) and ``Server.run_now`` (the
API's ``run``) hand their run to a ``Runner``: ``local.LocalRunner`` runs it
in this process (``--role all``), ``procrastinate.QueuedRunner`` queues it
for a worker through ``Dispatch.enqueue``. The retry and probe policy asks
the queue for later work through the ``Scheduler``-shaped methods of
``QueuedSchedule`` (see ``procrastinate.py``)."""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from orchestrator.backup import RunResult
    from storage.catalog import Target


class Runner(Protocol):
    def run_due(self, target_id: int, trigger: str,
                due: dt.datetime | None) -> RunResult | None:
        """A scheduled, retry or recovery run that is due (``due``: the time
        it was due at). Never raises: a failing job must not take the
        scheduler down. Returns the result when the run happened here."""
        ...

    def run_manual(self, target: Target, *, wait: bool, timeout: float | None,
                   full: bool) -> dict[str, Any] | None:
        """``backhaul run``: with ``wait``, the finished run's row (or
        ``WaitTimeout`` after ``timeout`` seconds)."""
        ...

    def shutdown(self) -> None:
        """Take no more manual runs (runs in flight finish or are aborted by
        the server's stop)."""
        ...


class Dispatch(Protocol):
    def enqueue(self, target_id: int, trigger: str, *, due: dt.datetime | None = None,
                at: dt.datetime | None = None, full: bool = False) -> int | None:
        """Queue one run of ``target_id`` (``trigger``: schedule, retry,
        recovery, manual), to start at ``at`` (default: now). Returns the
        queued job's id, or None when an equal run already waits in the queue
        (that one covers this one)."""
        ...

    def close(self) -> None:
        ...
