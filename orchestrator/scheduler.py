"""APScheduler 3.x with a persistent SQLAlchemy job store.

Job ids and what they run (always by textual reference, primitive args only,
so a stored job never fails to unpickle after a refactor):

- ``target:<id>``  interval job, ``orchestrator.jobs:run_target``
- ``retry:<id>:<n>``    one-off date job, ``orchestrator.jobs:retry_target``
- ``probe:<id>:<n>``    one-off date job per node, ``orchestrator.jobs:probe_node``
- ``recover:<id>:<n>``  one-off, run at once, ``orchestrator.jobs:recover_target``

Retries are separate date jobs, never ``modify_job(next_run_time=...)``, which
would shift the interval for good. Only one process may own the job store.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

from storage import dialect

log = logging.getLogger(__name__)

RUN_TARGET = "orchestrator.jobs:run_target"
RETRY_TARGET = "orchestrator.jobs:retry_target"
PROBE_NODE = "orchestrator.jobs:probe_node"
RECOVER_TARGET = "orchestrator.jobs:recover_target"
TABLE = "apscheduler_jobs"


def job_store_url(catalog_url: str, data_dir: Path) -> str:
    """APScheduler's jobs sit beside a PostgreSQL catalog (a table of their
    own); with a SQLite catalog, in a SQLite file of their own."""
    if catalog_url.startswith("postgresql"):
        return catalog_url
    return f"sqlite:///{data_dir / 'jobs.db'}"


def target_job(target_id: int) -> str:
    return f"target:{target_id}"


def _one_off(kind: str, ident: int) -> str:
    # One-off jobs get a fresh id each time: a job that schedules its own
    # successor under the same id would have it deleted by APScheduler, which
    # removes a fired date job after handing it to a worker.
    return f"{kind}:{ident}:{next(_SEQ)}-{time.monotonic_ns() % 10**9}"


def job_ident(job_id: str) -> tuple[str, int] | None:
    """``("retry", 12)`` for ``retry:12:...``; None for ids that are not ours."""
    kind, _, rest = job_id.partition(":")
    ident = rest.partition(":")[0]
    return (kind, int(ident)) if ident.isdigit() else None


_SEQ = itertools.count(1)


class Scheduler:
    def __init__(self, store: Path | str, *, workers: int, minute_seconds: float = 60.0) -> None:
        """``store``: a SQLite file of its own (the default) or the URL of the
        PostgreSQL catalog database, where the jobs get a table of their own."""
        self.minute_seconds = minute_seconds
        self.engine = dialect.create_engine(dialect.normalise_url(store), busy_timeout=30,
                                            immediate=False)
        self._dialect = self.engine.dialect.name
        self._owner: sa.Connection | None = None
        self.store = SQLAlchemyJobStore(engine=self.engine, tablename=TABLE)
        self._due: dict[str, deque[dt.datetime]] = {}
        self._due_lock = threading.Lock()
        self.aps = _Background(
            jobstores={"default": self.store},
            executors={"default": _RecordingExecutor(workers, self._submitted)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=dt.UTC,
        )

    def _submitted(self, job_id: str, due: dt.datetime) -> None:
        parsed = job_ident(job_id)
        if parsed is None:
            return
        with self._due_lock:
            self._due.setdefault(parsed, deque()).append(due)

    def scheduled_time(self, kind: str, ident: int) -> dt.datetime | None:
        """When the ``kind`` job (target, retry, recover) of ``ident`` just handed
        to a worker was due (coalesced: the latest missed time). Each job
        instance reads its own once, first thing."""
        with self._due_lock:
            queue = self._due.get((kind, ident))
            if not queue:
                return None
            due = queue.popleft()
            if not queue:
                del self._due[(kind, ident)]
            return due

    # -- lifecycle ------------------------------------------------------------

    def take_ownership(self) -> None:
        """Only one scheduler may own a job store (APScheduler): a second
        backhauld on the same PostgreSQL catalog is refused here, before it
        touches anything (``OwnerLockHeld``)."""
        if self._owner is None:
            self._owner = dialect.take_owner_lock(self.engine, "scheduler")

    def owned_by(self, holder: Any) -> None:
        """Ownership proven elsewhere: the scheduler role's leader lock
        (orchestrator/leader.py); ``holder.close()`` gives it up on shutdown."""
        self._owner = holder

    def start(self, paused: bool = False) -> None:
        self.take_ownership()
        self.aps.start(paused=paused)

    def resume(self) -> None:
        self.aps.resume()

    def shutdown(self) -> None:
        if self.aps.running:
            self.aps.shutdown(wait=False)
            # let the scheduler thread leave its loop before its store goes away
            thread = getattr(self.aps, "_thread", None)
            if thread is not None:
                thread.join(10)
        if self._owner is not None:
            self._owner.close()
            self._owner = None
        self.engine.dispose()

    # -- targets --------------------------------------------------------------

    def interval(self, every_minutes: int) -> IntervalTrigger:
        return IntervalTrigger(seconds=every_minutes * self.minute_seconds, timezone=dt.UTC)

    def add_target(self, target_id: int, every_minutes: int,
                   first_run_at: dt.datetime | None = None) -> dt.datetime:
        """A new interval job; its first run is at ``first_run_at`` (default:
        now), which is returned (what ``next_runs`` reads for it)."""
        first = first_run_at or dt.datetime.now(dt.UTC)
        # Two instances: a run due while the previous one still goes on must
        # reach the server (which queues it behind that run) instead of being
        # dropped by APScheduler; the server never lets two overlap.
        self.aps.add_job(RUN_TARGET, trigger=self.interval(every_minutes), args=[target_id],
                         id=target_job(target_id), name=f"backup target {target_id}",
                         replace_existing=True, max_instances=2, next_run_time=first)
        return first

    def set_interval(self, target_id: int, every_minutes: int) -> None:
        """A new frequency for the target's job. Its next run comes no later
        than one new interval from now (a shorter interval applies at once)."""
        soonest = dt.datetime.now(dt.UTC) + dt.timedelta(
            seconds=every_minutes * self.minute_seconds)
        job = self.aps.get_job(target_job(target_id))
        if job is None:
            self.add_target(target_id, every_minutes, first_run_at=soonest)
            return
        nxt = job.next_run_time
        self.aps.modify_job(job.id, trigger=self.interval(every_minutes),
                            next_run_time=min(nxt, soonest) if nxt else soonest)

    def remove_probe(self, node_id: int) -> None:
        for job_id in self._ids(f"probe:{node_id}:"):
            self._remove(job_id)

    def remove_target(self, target_id: int) -> None:
        self._remove(target_job(target_id))
        self.cancel_retry(target_id)

    def job_ids(self) -> set[str]:
        """Ids of every stored job, read without unpickling any of them."""
        with self.engine.connect() as conn:
            return set(conn.execute(sa.text(f"SELECT id FROM {TABLE}")).scalars())

    def reconcile(self, active: dict[int, int]) -> tuple[list[int], list[str]]:
        """Make the job store match the catalog: one interval job per active
        target (``{target_id: every_minutes}``), none for others. Pending
        next-run times of existing jobs are kept. Returns (added, removed)."""
        stored = self.job_ids()
        added = []
        for tid, every in sorted(active.items()):
            if target_job(tid) not in stored:
                self.add_target(tid, every)
                added.append(tid)
        removed = []
        for job_id in sorted(stored):
            parsed = job_ident(job_id)
            if parsed is None or (parsed[0] in ("target", "retry", "recover")
                                  and parsed[1] not in active):
                self._remove(job_id)
                removed.append(job_id)
        return added, removed

    def next_runs(self, target_id: int | None = None) -> dict[int, dt.datetime]:
        """Next run of every target (or of one), interval or pending retry,
        whichever is sooner; one query, no job unpickled."""
        if target_id is None:
            where = "(id LIKE 'target:%' OR id LIKE 'retry:%')"
            params: dict[str, Any] = {}
        else:
            # the retry range
            where = f"(id = :t OR {dialect.prefix_range('id', self._dialect)})"
            params = {"t": target_job(target_id), "lo": f"retry:{target_id}:",
                      "hi": f"retry:{target_id};"}
        out: dict[int, dt.datetime] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT id, next_run_time FROM {TABLE} WHERE {where} "
                                        "AND next_run_time IS NOT NULL"), params)
            for job_id, ts in rows:
                parsed = job_ident(job_id)
                if parsed is None:
                    continue
                when = dt.datetime.fromtimestamp(ts, dt.UTC)
                tid = parsed[1]
                if tid not in out or when < out[tid]:
                    out[tid] = when
        return out

    def next_runs_of(self, target_ids: list[int]) -> dict[int, dt.datetime]:
        """``next_runs`` of a page of targets: their interval jobs by key and the
        pending retries by one index range (not every job of 10,000 targets)."""
        if not target_ids:
            return {}
        wanted = set(target_ids)
        query = sa.text(f"SELECT id, next_run_time FROM {TABLE} WHERE (id IN :ids OR "
                        f"{dialect.prefix_range('id', self._dialect)}) "
                        "AND next_run_time IS NOT NULL"
                        ).bindparams(sa.bindparam("ids", expanding=True))
        out: dict[int, dt.datetime] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(query, {"ids": [target_job(t) for t in wanted],
                                        "lo": "retry:", "hi": "retry;"})
            for job_id, ts in rows:
                parsed = job_ident(job_id)
                if parsed is None or parsed[1] not in wanted:
                    continue
                when = dt.datetime.fromtimestamp(ts, dt.UTC)
                if parsed[1] not in out or when < out[parsed[1]]:
                    out[parsed[1]] = when
        return out

    def overdue(self, now: dt.datetime) -> list[dt.datetime]:
        """Due times of backup runs that should have started by ``now`` and have
        not: stored jobs whose time has passed (the scheduler has not fired
        them yet) and fired jobs still waiting for a free worker."""
        with self.engine.connect() as conn:
            stored = conn.execute(sa.text(
                f"SELECT next_run_time FROM {TABLE} WHERE next_run_time <= :now AND "
                "(id LIKE 'target:%' OR id LIKE 'retry:%' OR id LIKE 'recover:%')"),
                {"now": now.timestamp()}).scalars().all()
        out = [dt.datetime.fromtimestamp(ts, dt.UTC) for ts in stored]
        with self._due_lock:
            out += [due for (kind, _), queue in self._due.items() if kind != "probe"
                    for due in queue if due <= now]
        return out

    # -- retries and probes ------------------------------------------------------

    def _ids(self, prefix: str) -> list[str]:
        """Ids starting with ``prefix`` (which ends in ':'), by an index range
        rather than a LIKE that scans the whole table."""
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(f"SELECT id FROM {TABLE} WHERE "
                                             + dialect.prefix_range("id", self._dialect)),
                                     {"lo": prefix, "hi": prefix[:-1] + ";"}).scalars())

    def schedule_retry(self, target_id: int, when: dt.datetime) -> None:
        """The target's one pending retry (an earlier one is replaced)."""
        self.cancel_retry(target_id)
        self.aps.add_job(RETRY_TARGET, trigger=DateTrigger(when, timezone=dt.UTC),
                         args=[target_id], id=_one_off("retry", target_id),
                         name=f"retry target {target_id}")

    def cancel_retry(self, target_id: int) -> None:
        for job_id in self._ids(f"retry:{target_id}:"):
            self._remove(job_id)

    def has_retry(self, target_id: int) -> bool:
        return bool(self._ids(f"retry:{target_id}:"))

    def has_probe(self, node_id: int) -> bool:
        return bool(self._ids(f"probe:{node_id}:"))

    def schedule_probe(self, node_id: int, when: dt.datetime) -> None:
        """The node's one pending probe (an earlier one is replaced)."""
        for job_id in self._ids(f"probe:{node_id}:"):
            self._remove(job_id)
        self.aps.add_job(PROBE_NODE, trigger=DateTrigger(when, timezone=dt.UTC),
                         args=[node_id], id=_one_off("probe", node_id),
                         name=f"probe node {node_id}")

    def recover_now(self, target_id: int) -> None:
        """Back the target up as soon as a worker is free (after its node came back)."""
        self.aps.add_job(RECOVER_TARGET, trigger=DateTrigger(dt.datetime.now(dt.UTC),
                                                             timezone=dt.UTC),
                         args=[target_id], id=_one_off("recover", target_id),
                         name=f"recover target {target_id}")

    def _remove(self, job_id: str) -> None:
        try:
            self.aps.remove_job(job_id)
        except JobLookupError:
            pass


class _Background(BackgroundScheduler):
    """APScheduler 3 guards only its due-jobs query against job store errors:
    one raised while it stores a fired job's next time or reads the next
    wake-up ends its thread, and nothing is scheduled again. With the job store
    in a PostgreSQL server that may restart under us, such a pass is logged and
    retried after ``jobstore_retry_interval`` instead (a job whose new time was
    not stored fires again; the server never runs a target twice at once)."""

    # A job added while the scheduler thread sleeps until a time no later
    # than the job's first run does not wake it: that pass would only read
    # the job store again to find nothing due (2-3 ms of CPU per registration
    # at 10,000 targets). The check runs once the job is stored, so the pass
    # the thread makes at its wake-up reads it. While a pass is under way its
    # wake-up time is not known yet: an add then wakes the thread as before.
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._wake_lock = threading.Lock()
        self._in_pass = False
        self._sleeps_until: dt.datetime | None = None  # None: no wake-up planned
        self._adding = threading.local()  # .job: the job this thread is adding
        super().__init__(*args, **kwargs)

    def _process_jobs(self) -> float | None:
        with self._wake_lock:
            self._in_pass = True
        wait: float | None = None
        try:
            wait = super()._process_jobs()
        except Exception as exc:  # noqa: BLE001 - the scheduler thread must not die
            log.warning("scheduler pass failed, retrying in %gs: %s",
                        self.jobstore_retry_interval, dialect.describe(exc))
            wait = self.jobstore_retry_interval
        finally:
            with self._wake_lock:
                self._in_pass = False
                self._sleeps_until = None if wait is None else \
                    dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait)
        return wait

    def _real_add_job(self, job: Any, jobstore_alias: str, replace_existing: bool) -> None:
        # add_job holds _jobstores_lock around this call: one add at a time;
        # it stores the job, then calls wakeup().
        self._adding.job = job
        try:
            super()._real_add_job(job, jobstore_alias, replace_existing)
        finally:
            self._adding.job = None

    def wakeup(self) -> None:
        with self._wake_lock:
            # (its next run time is set by now, also when add_job had none)
            first = getattr(getattr(self._adding, "job", None), "next_run_time", None)
            until = self._sleeps_until
            if first is not None and until is not None and not self._in_pass \
                    and first >= until:
                return
        super().wakeup()


class _RecordingExecutor(ThreadPoolExecutor):
    """Notes each job's due time before a worker can start it, so the job can
    record its start delay (APScheduler does not pass the time to the job)."""

    def __init__(self, workers: int, on_submit: Any) -> None:
        super().__init__(workers)
        self._on_submit = on_submit
        self._closed = False

    def _do_submit_job(self, job: Any, run_times: list[dt.datetime]) -> None:
        self._on_submit(job.id, run_times[-1])
        try:
            super()._do_submit_job(job, run_times)
        except RuntimeError:
            # APScheduler shuts its executors down while its thread may still
            # be in a pass over due jobs (a stop, or a leader that lost its
            # lock): such a job is not run here. Its next time is stored
            # anyway; the next start or leader catches the run up (_catch_up).
            if not self._closed:
                raise
            log.info("%s due at %s not started: the scheduler is stopping", job.id,
                     run_times[-1].isoformat(timespec="seconds"))

    def shutdown(self, wait: bool = True) -> None:
        self._closed = True
        super().shutdown(wait)
