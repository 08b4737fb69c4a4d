"""The scheduler thread is not woken for a job due after its next pass (a
registration's job, due one interval later), and every job still runs on
time: one due sooner wakes it, one due later is read at the wake-up.

Real APScheduler with its SQLite job store; the jobs are ``time:sleep``.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.triggers.date import DateTrigger

from orchestrator.scheduler import Scheduler


def _wait(cond, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def test_later_job_does_not_wake_the_thread_and_every_job_runs_on_time(tmp_path: Path) -> None:
    sched = Scheduler(tmp_path / "jobs.db", workers=2)
    passes: list[float] = []
    real_pass = sched.aps._process_jobs

    def counted() -> float | None:
        passes.append(time.monotonic())
        return real_pass()

    sched.aps._process_jobs = counted  # type: ignore[method-assign]
    ran: dict[str, dt.datetime] = {}
    done = threading.Event()

    def executed(event) -> None:  # noqa: ANN001
        ran[event.job_id] = dt.datetime.now(dt.UTC)
        if len(ran) == 3:
            done.set()

    sched.aps.add_listener(executed, EVENT_JOB_EXECUTED)
    sched.start()
    try:
        assert _wait(lambda: len(passes) >= 1)
        now = dt.datetime.now(dt.UTC)
        at = {"a": now + dt.timedelta(seconds=3), "b": now + dt.timedelta(seconds=4),
              "c": now + dt.timedelta(seconds=1)}

        def add(job_id: str) -> None:
            sched.aps.add_job("time:sleep", trigger=DateTrigger(at[job_id], timezone=dt.UTC),
                              args=[0], id=job_id)

        # The first job wakes the thread (it had nothing planned).
        before = len(passes)
        add("a")
        assert _wait(lambda: len(passes) > before)
        assert _wait(lambda: sched.aps._sleeps_until is not None
                     and not sched.aps._in_pass)
        # A job due after that wake-up is stored without waking it ...
        settled = len(passes)
        add("b")
        time.sleep(0.5)
        assert len(passes) == settled
        # ... and one due sooner wakes it.
        add("c")
        assert _wait(lambda: len(passes) > settled)
        assert done.wait(30), f"ran only {sorted(ran)}"
        for job_id, due in at.items():
            assert ran[job_id] >= due
        # c ran at its own time, not at a's (the next wake-up before c came)
        assert ran["c"] < at["a"]
        assert ran["b"] >= ran["a"]
    finally:
        sched.shutdown()
