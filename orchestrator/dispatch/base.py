"""The interface a dispatch backend offers the server.

``Server.run_job`` (what APScheduler fires) and ``Server.run_now`` (the
API's ``run``) hand their run to ``Dispatch.enqueue``; the retry and probe
policy asks it for later work through the ``Scheduler``-shaped methods of
``QueuedSchedule`` (see ``procrastinate.py``)."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


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
