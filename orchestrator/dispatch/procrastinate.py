"""Runs dispatched through Procrastinate, a task queue in the PostgreSQL catalog.

One queued job is one run of one target. Its locks carry the guarantees:

- ``queueing_lock`` ``run-<target>`` (scheduled and catch-up runs),
  ``retry-<target>``, ``manual-<target>``: Procrastinate refuses a second
  *waiting* job with the same one, so a due run is never queued twice (the
  waiting one covers it);
- ``lock`` ``target-<target>`` on all of them: a job is not started while
  another with its lock runs, so two runs of one target never overlap;
- a run for later (a retry, up to ``retry_max`` ahead; a run that found its
  node full) waits as a timer job (``LATER_TASK``) without that lock, under
  the run's own queueing lock: Procrastinate starts no job while an *older
  waiting* job with the same lock exists, due or not, so a locked job for
  later would hold back the target's manual and scheduled runs until its
  time. At its time the timer queues the run itself, locked, and ends;
- the per-node limit K holds across all workers through K PostgreSQL advisory
  lock slots per node (``NodeSlots``), tried without blocking: a run that gets
  none is queued again as a new job a little later (``roles.execute``), so a
  run waiting for its node holds no worker thread.

A worker's heartbeats (Procrastinate's worker table) tell the leader which
workers died; ``Reaper`` records their runs ``interrupted`` and queues the
jobs again (``retry_job``), for another worker to complete.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import procrastinate
import psycopg
import sqlalchemy as sa
from procrastinate.exceptions import AlreadyEnqueued, UniqueViolation
from procrastinate.jobs import Status

from orchestrator import jobs
from orchestrator.errors import WaitTimeout
from storage import dialect
from storage.errors import CatalogError

if TYPE_CHECKING:
    from orchestrator.scheduler import Scheduler
    from storage.catalog import Catalog, Target

log = logging.getLogger(__name__)

RUN_TASK = "backhaul.run"
PROBE_TASK = "backhaul.probe"
LATER_TASK = "backhaul.later"
NODE_BUSY_WAIT = 2  # seconds before a run that found its node full tries again
_NODE_SLOT_BASE = dialect.owner_lock_key("node-slot") % 2**30  # key1 = base + slot


class NodeBusy(Exception):
    """All of a node's K run slots are taken by runs on other workers."""


def conninfo(url: str, *, keepalives: bool = True) -> str:
    """libpq's form of the catalog's SQLAlchemy URL, with TCP keepalives so a
    connection to a vanished peer is noticed in seconds, not hours."""
    parsed = sa.engine.make_url(url).set(drivername="postgresql")
    text = parsed.render_as_string(hide_password=False)
    if keepalives:
        text += ("&" if "?" in text else "?") + \
            "keepalives=1&keepalives_idle=5&keepalives_interval=2&keepalives_count=3"
    return text


def check_schema(url: str) -> None:
    """The run queue's tables are part of the catalog's schema (migration
    0004, run when the catalog opened): a catalog without them is refused here,
    in one line, rather than at the first queued job."""
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        found = conn.execute("SELECT to_regclass('procrastinate_jobs')").fetchone()
    if found is None or found[0] is None:
        raise CatalogError(f"the catalog {dialect.redacted(url)} has no run queue tables "
                           "(procrastinate_jobs): run `backhauld migrate` on it")


def _register_tasks(app: procrastinate.App) -> None:
    # No Procrastinate retry for a busy node: retrying puts the same job back
    # to ``todo`` under its queueing lock, which fails (unique violation) once
    # the next due run of the target waits there; the job then stays ``doing``
    # on a live worker and its ``target-N`` lock blocks the target for good.
    # ``roles.execute`` queues a new job instead (or lets the waiting one cover it).
    @app.task(name=RUN_TASK)
    def run(target_id: int, trigger: str, due: str | None = None,
            full: bool = False) -> None:
        server = jobs.installed()
        if server is None:
            raise RuntimeError("no server installed in this worker")
        server.execute(target_id, trigger, dt.datetime.fromisoformat(due) if due else None,
                       full=full)

    @app.task(name=LATER_TASK, pass_context=True)
    async def later(context: procrastinate.JobContext, target_id: int, trigger: str,
                    due: str | None = None, full: bool = False) -> None:
        # This job still counts as waiting under the run's queueing lock until
        # it is taken (``doing``), so the run queued here is the one waiting
        # there; one already waiting covers it (``AlreadyEnqueued``).
        assert context.app is not None
        queueing_lock, lock = _lock_names(target_id, trigger)
        try:
            job_id = await context.app.tasks[RUN_TASK].configure(
                queueing_lock=queueing_lock, lock=lock).defer_async(
                target_id=target_id, trigger=trigger, due=due, full=full)
        except AlreadyEnqueued:
            log.debug("target %s: a %s run already waits in the queue", target_id, trigger)
            return
        log.debug("target %s: %s run due, queued as job %s", target_id, trigger, job_id)

    @app.task(name=PROBE_TASK)
    def probe(node_id: int) -> None:
        server = jobs.installed()
        if server is not None:
            server.probe_node(node_id)


def make_app(url: str, *, sync: bool) -> procrastinate.App:
    connector: Any
    if sync:
        connector = procrastinate.SyncPsycopgConnector(conninfo=conninfo(url),
                                                       min_size=1, max_size=4)
    else:
        connector = procrastinate.PsycopgConnector(conninfo=conninfo(url),
                                                   min_size=1, max_size=8)
    app = procrastinate.App(connector=connector)
    _register_tasks(app)
    return app


def _lock_names(target_id: int, trigger: str) -> tuple[str, str]:
    kind = {"retry": "retry", "manual": "manual"}.get(trigger, "run")
    return f"{kind}-{target_id}", f"target-{target_id}"


class RunQueue:
    """The ``Dispatch`` of the scale-out roles: defers jobs, synchronously."""

    def __init__(self, url: str) -> None:
        self.app = make_app(url, sync=True)
        self.app.open()
        self._closed = False

    def enqueue(self, target_id: int, trigger: str, *, due: dt.datetime | None = None,
                at: dt.datetime | None = None, full: bool = False) -> int | None:
        queueing_lock, lock = _lock_names(target_id, trigger)
        task = self.app.tasks[RUN_TASK]
        if at is not None:  # a timer first, holding no lock (see the module's doc)
            task, lock = self.app.tasks[LATER_TASK], None
        try:
            job_id = task.configure(queueing_lock=queueing_lock, lock=lock,
                                    schedule_at=at).defer(
                target_id=target_id, trigger=trigger,
                due=due.isoformat() if due else None, full=full)
        except AlreadyEnqueued:
            log.debug("target %s: a %s run already waits in the queue", target_id, trigger)
            return None
        log.debug("target %s: %s run queued as job %s", target_id, trigger, job_id)
        return job_id

    def probe(self, node_id: int, at: dt.datetime | None = None) -> None:
        try:
            self.app.tasks[PROBE_TASK].configure(
                queueing_lock=f"probe-{node_id}", lock=f"probe-{node_id}",
                schedule_at=at).defer(node_id=node_id)
        except AlreadyEnqueued:
            pass

    def cancel_waiting(self, queueing_lock: str) -> None:
        for job in self.app.job_manager.list_jobs(queueing_lock=queueing_lock, status="todo"):
            if job.id is not None:
                self.app.job_manager.cancel_job_by_id(job.id)

    def job_status(self, job_id: int) -> str:
        return self.app.job_manager.get_job_status(job_id).value

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.app.close()


class QueuedRunner:
    """The ``Runner`` of the scale-out roles: a due run (on the leader) or a
    manual one (on any api process) becomes a queued job; a worker runs it
    (``roles.execute``)."""

    def __init__(self, queue: RunQueue, catalog: Catalog, stopping: threading.Event) -> None:
        self.queue = queue
        self.catalog = catalog
        self._stopping = stopping

    def run_due(self, target_id: int, trigger: str, due: dt.datetime | None) -> None:
        self.queue.enqueue(target_id, trigger, due=due)

    def run_manual(self, target: Target, *, wait: bool, timeout: float | None,
                   full: bool) -> dict[str, Any] | None:
        """Queue a manual run; with ``wait``, return its run row once a
        worker has finished it."""
        target_id = target.id
        newest = self.catalog.list_runs(target_ids=[target_id], limit=1)
        after = newest[0]["id"] if newest else 0
        self.queue.enqueue(target_id, "manual", full=full)
        if not wait:
            return None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            rows = self.catalog.list_runs(target_ids=[target_id], limit=20)
            done = [r for r in rows if r["id"] > after and r["trigger"] == "manual"
                    and r["status"] != "running"]
            if done:
                return min(done, key=lambda r: r["id"])
            if deadline is not None and time.monotonic() > deadline:
                raise WaitTimeout(target_id, timeout or 0)
            if self._stopping.wait(0.2):
                return None

    def shutdown(self) -> None:
        pass  # the queue itself is closed last, by the server's stop


class QueuedSchedule:
    """What the retry/probe policy in ``Server`` asks of ``Scheduler``, for
    the processes that do not own the job store (workers, api, a standby):
    later runs and probes become queued jobs; reads go to the job store
    table; target jobs are left to the leader, which follows the catalog."""

    def __init__(self, queue: RunQueue, reader: Scheduler) -> None:
        self.queue = queue
        self.reader = reader

    def schedule_retry(self, target_id: int, when: dt.datetime) -> None:
        # The target's one pending retry: an earlier one is replaced, as by
        # ``Scheduler.schedule_retry`` (a failed manual run re-times it).
        self.cancel_retry(target_id)
        self.queue.enqueue(target_id, "retry", at=when)

    def cancel_retry(self, target_id: int) -> None:
        self.queue.cancel_waiting(f"retry-{target_id}")

    def has_retry(self, target_id: int) -> bool:
        return bool(self.queue.app.job_manager.list_jobs(queueing_lock=f"retry-{target_id}",
                                                          status="todo"))

    def recover_now(self, target_id: int) -> None:
        self.queue.enqueue(target_id, "recovery")

    def schedule_probe(self, node_id: int, when: dt.datetime) -> None:
        self.queue.probe(node_id, when)

    def has_probe(self, node_id: int) -> bool:
        # As on ``--role all``: a node whose probe waits is not counted down
        # again (``RunPolicy.ensure_probe``) by each of its targets' runs.
        return bool(self.queue.app.job_manager.list_jobs(queueing_lock=f"probe-{node_id}",
                                                          status="todo"))

    def remove_probe(self, node_id: int) -> None:
        self.queue.cancel_waiting(f"probe-{node_id}")

    # The leader reads the catalog every ``sync_every`` seconds and adds,
    # re-times or removes target jobs itself (``Leader.sync``).
    def add_target(self, target_id: int, every_minutes: int,
                   first_run_at: dt.datetime | None = None) -> None:
        pass

    def set_interval(self, target_id: int, every_minutes: int) -> None:
        pass

    def remove_target(self, target_id: int) -> None:
        pass

    def next_runs(self, target_id: int | None = None) -> dict[int, dt.datetime]:
        try:
            return self.reader.next_runs(target_id)
        except sa.exc.SQLAlchemyError:  # no leader has created the job store yet
            return {}

    def next_runs_of(self, target_ids: list[int]) -> dict[int, dt.datetime]:
        try:
            return self.reader.next_runs_of(target_ids)
        except sa.exc.SQLAlchemyError:
            return {}

    def overdue(self, now: dt.datetime) -> list[dt.datetime]:
        try:
            return self.reader.overdue(now)
        except sa.exc.SQLAlchemyError:
            return []

    def shutdown(self) -> None:
        self.reader.engine.dispose()  # the queue itself closes last (Server.stop)


class NodeSlots:
    """K runs at once per node over all workers: slot ``i`` of node ``n`` is
    the advisory lock (base + i, n), held by a connection for the run's length
    (a killed worker's connection closes and frees it)."""

    def __init__(self, url: str, per_node: int) -> None:
        self.dsn = conninfo(url)
        self.per_node = per_node

    @contextmanager
    def slot(self, node_id: int) -> Iterator[int]:
        conn = psycopg.connect(self.dsn, autocommit=True)
        try:
            for i in range(self.per_node):
                row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)",
                                   (_NODE_SLOT_BASE + i, node_id)).fetchone()
                if row and row[0]:
                    break
            else:
                raise NodeBusy(f"node {node_id}: all {self.per_node} run slots taken")
            yield i
        finally:
            conn.close()


class WorkerThread:
    """A Procrastinate worker in a thread of its own (the main thread serves
    the API): runs queued jobs, ``concurrency`` at a time, heartbeating."""

    def __init__(self, url: str, *, concurrency: int, heartbeat: float,
                 stall_timeout: float, name: str) -> None:
        self.app = make_app(url, sync=False)
        self.options = dict(concurrency=concurrency, name=name, wait=True,
                            install_signal_handlers=False, update_heartbeat_interval=heartbeat,
                            stalled_worker_timeout=stall_timeout,
                            fetch_job_polling_interval=min(5.0, heartbeat),
                            shutdown_graceful_timeout=None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: Any = None
        self._thread = threading.Thread(target=self._main, name="queue-worker", daemon=True)
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(30)

    def _main(self) -> None:
        from procrastinate.worker import Worker

        async def run() -> None:
            self._loop = asyncio.get_running_loop()
            async with self.app.open_async():
                self._worker = Worker(self.app, **self.options)  # type: ignore[arg-type]
                self._ready.set()
                await self._worker.run()

        try:
            asyncio.run(run())
        except Exception:  # noqa: BLE001 - logged; the process keeps serving its API
            log.exception("the queue worker stopped")
        finally:
            self._ready.set()

    def stop(self) -> None:
        """Take no more jobs; the runs in flight end within ``shutdown_grace``."""
        if self._loop is not None and self._worker is not None:
            self._loop.call_soon_threadsafe(self._worker.stop)


class Reaper:
    """The leader's watch over the workers: jobs of a worker whose heartbeat
    is older than ``stall_timeout`` are recorded interrupted and queued again."""

    def __init__(self, url: str, catalog: Catalog, *, stall_timeout: float,
                 every: float, stopping: threading.Event,
                 after_interrupt: Callable[[int, list[int]], None] | None = None) -> None:
        self.url = url
        self.catalog = catalog
        self.stall_timeout = stall_timeout
        self.every = every
        self.stopping = stopping
        self.after_interrupt = after_interrupt
        self._thread = threading.Thread(target=self._main, name="queue-reaper", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _main(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        app = make_app(self.url, sync=False)
        async with app.open_async():
            while not self.stopping.is_set():
                try:
                    await self.reap(app)
                except Exception:  # noqa: BLE001 - the next pass tries again
                    log.exception("checking for stalled runs failed")
                await asyncio.sleep(self.every)

    async def reap(self, app: procrastinate.App) -> None:
        manager = app.job_manager
        await manager.prune_stalled_workers(self.stall_timeout)
        for job in await manager.get_stalled_jobs(seconds_since_heartbeat=self.stall_timeout):
            try:
                await self._requeue(manager, job)
            except Exception:  # noqa: BLE001 - the other stalled jobs still get theirs
                log.exception("requeueing stalled job %s failed", job.id)

    def _recorded(self, target_id: int, due: str | None) -> bool:
        """Whether the catalog holds a finished run of ``target_id`` for the
        due time ``due`` (a job's ``due`` argument): its worker ran it to the
        end and died before telling the queue."""
        if due is None:
            return False
        at = dt.datetime.fromisoformat(due)
        return any(r["scheduled_at"] == at and r["status"] not in ("running", "interrupted")
                   for r in self.catalog.list_runs(target_ids=[target_id], limit=100))

    async def _requeue(self, manager: Any, job: Any) -> None:
        if job.task_name == RUN_TASK:
            tid = int(job.task_kwargs["target_id"])
            ids = await asyncio.to_thread(self.catalog.interrupt_running, tid)
            if not ids and await asyncio.to_thread(self._recorded, tid,
                                                   job.task_kwargs.get("due")):
                # Queued again, the due run would run twice.
                await manager.finish_job(job, status=Status.SUCCEEDED, delete_job=False)
                log.warning("target %s: the worker running job %s stopped heartbeating after "
                            "its run was recorded: the job ends", tid, job.id)
                return
            log.warning("target %s: the worker running job %s stopped heartbeating: "
                        "runs %s recorded interrupted, the job queued again", tid, job.id, ids)
            if self.after_interrupt is not None:
                await asyncio.to_thread(self.after_interrupt, tid, ids)
        try:
            await manager.retry_job(job)
        except UniqueViolation:
            # A later job with the same queueing lock already waits (the next
            # due run came while this one was stalled): it covers this run,
            # late rather than lost. This one ends, freeing the target's lock.
            await manager.finish_job(job, status=Status.FAILED, delete_job=False)
            log.info("stalled job %s: a waiting job of the same target covers it", job.id)
