"""What each ``--role`` of backhauld wires beyond the shared object graph.

``all`` (the default) is ``Server.start`` as it always was: one process
schedules and runs. The scale-out roles meet in the PostgreSQL catalog and
its run queue (``dispatch/procrastinate.py``); every one serves the HTTP API:

- ``scheduler``: waits for the leader lock (``leader.py``); the leader owns
  the APScheduler job store, turns due runs into queued jobs, follows the
  catalog for targets changed elsewhere, and requeues the runs of dead workers;
- ``worker``: runs queued jobs, at most ``workers`` at once and ``per_node``
  per node over all workers;
- ``api``: the API alone (manual runs are queued like the rest).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from orchestrator import jobs
from storage.errors import NotFound, StorageError

if TYPE_CHECKING:
    from orchestrator.backup import BackupEngine
    from orchestrator.dispatch.base import Runner
    from orchestrator.dispatch.procrastinate import NodeSlots, RunQueue
    from orchestrator.notify import Sender
    from orchestrator.policy import RunPolicy
    from orchestrator.settings import Settings
    from storage.catalog import Catalog
    from storage.stores.base import Store

log = logging.getLogger(__name__)


class Server(jobs.Host, Protocol):
    """The object graph ``server.py`` builds (its ``Server``), as the roles
    use it: a Protocol, so this module imports no server code."""

    role: str
    settings: Settings
    clock: Callable[[], dt.datetime]
    data_dir: Path
    catalog: Catalog
    store: Store
    engine: BackupEngine
    sender: Sender
    policy: RunPolicy
    scheduler: Any
    runner: Runner
    queue: RunQueue | None
    slots: NodeSlots | None
    _stopping: threading.Event
    _on_stop: list[Callable[[], None]]

    def _janitor_loop(self) -> None: ...


def prepare(server: Server) -> None:
    """Called from ``Server.__init__`` for the scale-out roles: the run queue,
    and a ``Scheduler`` stand-in until (unless) this process leads."""
    from orchestrator.dispatch.procrastinate import (
        NodeSlots,
        QueuedRunner,
        QueuedSchedule,
        RunQueue,
        check_schema,
    )
    url = server.catalog.url
    check_schema(url)
    server.queue = RunQueue(url)
    server.slots = NodeSlots(url, server.settings.per_node)
    # The real Scheduler is only read (next runs) until this process leads.
    server.scheduler = QueuedSchedule(server.queue, server.scheduler)
    server.runner = QueuedRunner(server.queue, server.catalog, server._stopping)


def start(server: Server) -> None:
    jobs.install(server)
    server.sender.start()
    janitor = threading.Thread(target=server._janitor_loop, name="ssh-janitor", daemon=True)
    janitor.start()
    if server.role == "worker":
        _start_worker(server)
    elif server.role == "scheduler":
        threading.Thread(target=_lead, args=(server,), name="leader-election",
                         daemon=True).start()
    log.info("backhauld started as %s: data dir %s", server.role, server.data_dir)


def _start_worker(server: Server) -> None:
    from orchestrator.dispatch.procrastinate import WorkerThread
    s = server.settings
    worker = WorkerThread(server.catalog.url, concurrency=s.workers, heartbeat=s.heartbeat,
                          stall_timeout=s.stall_timeout,
                          name=f"{os.uname().nodename}-{os.getpid()}")
    worker.start()
    # Stop taking jobs first; runs in flight then get ``shutdown_grace``.
    server._on_stop.append(worker.stop)


def _lead(server: Server) -> None:
    """Standby until the leader lock is ours, then schedule until it is lost."""
    from orchestrator.dispatch.procrastinate import Reaper
    from orchestrator.leader import Leadership
    from orchestrator.scheduler import Scheduler, job_store_url

    leading: list[Any] = []  # the Scheduler, once there is one

    def lost() -> None:
        for scheduler in leading:
            if scheduler.aps.running:
                scheduler.aps.pause()
        # Leading again needs a fresh lock and job store state: exit, and let
        # the supervisor start this process again (as a standby).
        os.kill(os.getpid(), signal.SIGTERM)

    s = server.settings
    leadership = Leadership(server.catalog.url, check_every=s.leader_check, on_lost=lost)
    if not leadership.wait(server._stopping):
        return
    scheduler = Scheduler(job_store_url(server.catalog.url, server.data_dir),
                          workers=s.workers, minute_seconds=s.minute_seconds)
    leading.append(scheduler)
    # Released by the Scheduler's shutdown, after APScheduler has stopped:
    # a standby must not start scheduling while this one still fires.
    scheduler.owned_by(leadership)
    try:
        scheduler.start(paused=True)
        # The counter first: a change committed after it is seen by the next check.
        seen = server.catalog.schedule_changes()
        listed = server.catalog.list_targets()
        known = {t.id: t.every_minutes for t in listed}
        scheduler.reconcile(known)
        queued_schedule = server.scheduler
        server.scheduler = scheduler
        queued_schedule.reader.engine.dispose()
        server.policy.restore_retries()
        server.policy.catch_up(listed)
        scheduler.resume()
    except Exception:  # noqa: BLE001 - a leader that cannot schedule must not lead
        log.exception("the leader could not start scheduling; stopping")
        os.kill(os.getpid(), signal.SIGTERM)
        return
    def sweep(target_id: int, run_ids: list[int]) -> None:
        for p in server.store.sweep_run_temp_files(target_id, run_ids):
            log.warning("removed the temp file %s of a dead worker's run", p)

    Reaper(server.catalog.url, server.catalog, stall_timeout=s.stall_timeout,
           every=min(1.0, s.stall_timeout / 4), stopping=server._stopping,
           after_interrupt=sweep).start()
    log.info("leading: %d active targets scheduled", len(known))
    follow = CatalogFollower(server.catalog, scheduler, known, seen)
    while not server._stopping.wait(s.sync_every):
        try:
            follow.check()
        except Exception:  # noqa: BLE001 - the next pass tries again
            log.exception("reading the catalog for changed targets failed")


class CatalogFollower:
    """Targets registered, edited or removed through other processes reach
    the leader's schedule.

    Each check reads one row, the catalog's count of schedule changes
    (``Catalog.schedule_changes``, bumped in the transaction of every write
    that adds, re-times or unregisters a target, from any process); only when
    it moved are the active targets' ``(id, every_minutes)`` read and the
    difference applied. At 100,000 targets a full ``list_targets`` cost 2.4 s
    of CPU per check (bench/README.md, scale section); the counter costs a
    single-row read. Chosen over LISTEN/NOTIFY: the same code on SQLite and
    PostgreSQL, and nothing lost while the leader's connection is down (a
    notification sent then is gone; a counter stays moved). Every
    ``FULL_EVERY`` seconds the targets are read anyway: a safety net for a
    write made outside ``storage/catalog.py`` (e.g. by hand in SQL).
    """

    FULL_EVERY = 300.0

    def __init__(self, catalog: Catalog, scheduler: Any, known: dict[int, int], seen: int, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog, self.scheduler, self.known, self.seen = catalog, scheduler, known, seen
        self.clock = clock
        self.full_at = clock() + self.FULL_EVERY

    def check(self) -> bool:
        """Bring the schedule up to date; True when the targets were re-read."""
        changes = self.catalog.schedule_changes()
        now = self.clock()
        if changes == self.seen and now < self.full_at:
            return False
        active = self.catalog.scheduled_targets()
        self.known = _follow_catalog(self.scheduler, self.known, active)
        self.seen = changes
        self.full_at = now + self.FULL_EVERY
        return True


def _follow_catalog(scheduler: Any, known: dict[int, int],
                    active: dict[int, int]) -> dict[int, int]:
    """Apply the difference between the schedule (``known``) and the
    catalog's active targets (``active``)."""
    if active == known:
        return known
    added, removed = scheduler.reconcile(active)
    for tid, every in active.items():
        if tid in known and known[tid] != every:
            scheduler.set_interval(tid, every)
    if added or removed:
        log.info("schedule follows the catalog: added %s, removed %s", added, removed)
    return active


def execute(server: Server, target_id: int, trigger: str, due: dt.datetime | None, *,
            full: bool = False) -> None:
    """One queued run, on a worker. When the node's K slots are taken by
    other workers the run is queued again for ``NODE_BUSY_WAIT`` seconds later
    (a new job: this one ends and frees its worker thread and target lock)."""
    from orchestrator.dispatch.procrastinate import NODE_BUSY_WAIT, NodeBusy
    try:
        target = server.catalog.get_target(target_id)
    except NotFound:
        return
    if not target.active:
        return
    try:
        if trigger == "schedule" and target.node.reachable is False:
            log.info("target %s skipped: node %s is unreachable (waiting for its probe)",
                     target_id, target.node.address)
            server.catalog.record_failure(target_id, None)
            server.policy.ensure_probe(target.node)
            return
        assert server.slots is not None and server.queue is not None
        try:
            with server.slots.slot(target.node.id):
                result = server.engine.run(target_id, trigger, queue=True, scheduled_at=due,
                                           full=full)
        except NodeBusy:
            # None back: a job of the same kind already waits and covers this
            # run (late rather than lost, as for a due run queued twice).
            later = server.clock() + dt.timedelta(seconds=NODE_BUSY_WAIT)
            job = server.queue.enqueue(target_id, trigger, due=due, at=later, full=full)
            log.debug("target %s: node %s busy; %s", target_id, target.node.id,
                      f"queued again as job {job}" if job else "a waiting run covers it")
            return
        server.policy.after_run(target, result)
        if result.status == "interrupted":
            # This worker is stopping: another one takes the run over.
            server.queue.enqueue(target_id, "recovery")
    except StorageError as exc:
        log.error("target %s: catalog unavailable: %s; retrying", target_id, exc.message)
        server.policy.retry_later(target_id, 1, None)
