"""The retry-on-availability policy: what happens after a run, and to a
node that does not answer.

A failed run is retried with exponential backoff (``backoff``); a node that
cannot be reached gets one probe (not one attempt per target) and its
targets run once it answers; runs missed while the server was down run once
at start (``catch_up``). Whichever process sees a failure applies it: the
in-process runner (``dispatch/local.py``) or a queue worker (``roles.py``).
"""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from orchestrator.backup import BackupEngine, RunResult
from orchestrator.errors import HostKeyMismatch, NodeError
from orchestrator.notify import Notifier
from orchestrator.settings import Settings
from orchestrator.ssh import NodeAddress
from storage.catalog import Catalog, Node, Target
from storage.errors import StorageError

log = logging.getLogger(__name__)


class RunPolicy:
    def __init__(self, settings: Settings, catalog: Catalog, engine: BackupEngine,
                 notifier: Notifier, scheduler: Any, *, clock: Callable[[], dt.datetime],
                 rng: random.Random, stopping: threading.Event) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = engine
        self.notifier = notifier
        # The ``Scheduler``, or the run queue's stand-in (``QueuedSchedule``);
        # the server swaps it when this process becomes the leader.
        self.scheduler = scheduler
        self.clock = clock
        self.rng = rng
        self._stopping = stopping
        self._probe_lock = threading.Lock()
        self._probing: set[int] = set()  # nodes whose probe runs right now

    def restore_retries(self) -> None:
        """Failed targets and unreachable nodes keep waiting across a restart."""
        now = self.clock()
        for node in self.catalog.list_nodes():
            if node.reachable is False and not self.scheduler.has_probe(node.id) \
                    and self.catalog.list_targets(node_id=node.id):
                self.scheduler.schedule_probe(node.id, now)
        for t in self.catalog.list_targets():
            if t.failures and t.node.reachable is not False \
                    and not self.scheduler.has_retry(t.id):
                self.scheduler.schedule_retry(t.id, t.next_retry_at or now)

    def catch_up(self, active: list[Target]) -> None:
        """Runs that were due but never ran (queued when the server stopped:
        APScheduler had already moved their next run on) or were cut short by
        the stop run once now, instead of a whole interval later."""
        next_runs = self.scheduler.next_runs()
        summaries = self.catalog.target_summaries()
        now = self.clock()
        late = []
        for t in active:
            tid, nxt = t.id, next_runs.get(t.id)
            if nxt is None or t.node.reachable is False:  # its node's probe catches up
                continue
            last_due = nxt - dt.timedelta(seconds=t.every_minutes * self.settings.minute_seconds)
            info = summaries.get(tid, {})
            last = info.get("last_run_at")
            if info.get("last_status") == "interrupted" or (
                    last_due <= now and (last is None or last < last_due)):
                late.append(tid)
        for tid in late:
            self.scheduler.recover_now(tid)
        if late:
            log.info("%d targets missed a due run while the server was down: running them now",
                     len(late))

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based): exponential from
        ``retry_min``, capped at ``retry_max``, minus up to 20 % jitter so
        many targets failing together do not retry in lockstep."""
        base = self.settings.retry_min * 2 ** max(0, attempt - 1)
        return min(self.settings.retry_max, base) * self.rng.uniform(0.8, 1.0)

    def after_run(self, target: Target, result: RunResult) -> None:
        self.notifier.after_run(target, result)
        if result.status in ("success", "unchanged"):
            if target.failures or target.next_retry_at:
                self.scheduler.cancel_retry(target.id)
            return
        if self._stopping.is_set():
            return  # recorded; the next start restores the retry
        if result.node_unreachable:
            self.catalog.record_failure(target.id, None)
            self.scheduler.cancel_retry(target.id)
            self.ensure_probe(self.catalog.get_node(target.node.id))
            return
        failures = self.catalog.record_failure(target.id, None)
        self.retry_later(target.id, failures, target.every_minutes)

    def retry_later(self, target_id: int, failures: int, every_minutes: int | None) -> None:
        delay = self.backoff(failures)
        if every_minutes is not None:
            delay = min(delay, every_minutes * self.settings.minute_seconds)
        when = self.clock() + dt.timedelta(seconds=delay)
        try:
            self.catalog.set_next_retry(target_id, when)
        except StorageError:
            pass
        self.scheduler.schedule_retry(target_id, when)
        log.info("target %s: retry %d in %.1fs", target_id, failures, delay)

    def ensure_probe(self, node: Node) -> None:
        with self._probe_lock:
            if node.id in self._probing or self.scheduler.has_probe(node.id):
                return
        attempts = node.probe_attempts + 1
        when = self.clock() + dt.timedelta(seconds=self.backoff(attempts))
        self.catalog.node_unreachable(node.id, node.last_error or "unreachable",
                                      next_probe_at=when, probe_attempts=attempts,
                                      code=node.last_error_code or "unreachable")
        self.scheduler.schedule_probe(node.id, when)
        log.info("node %s unreachable: probe %d at %s", node.address, attempts,
                 when.isoformat(timespec="seconds"))

    def probe_node(self, node_id: int) -> None:
        if self._stopping.is_set():
            return
        with self._probe_lock:
            if node_id in self._probing:
                return
            self._probing.add(node_id)
        try:
            self._probe(node_id)
        finally:
            with self._probe_lock:
                self._probing.discard(node_id)

    def _probe(self, node_id: int) -> None:
        try:
            node = self.catalog.get_node(node_id)
            if not self.catalog.list_targets(node_id=node_id):
                return
            addr = NodeAddress(node.user, node.host, node.port)
            try:
                self.engine.probe(addr)
            except NodeError as exc:
                attempts = node.probe_attempts + 1
                when = self.clock() + dt.timedelta(seconds=self.backoff(attempts))
                self.catalog.node_unreachable(node_id, exc.message, next_probe_at=when,
                                              probe_attempts=attempts, code=exc.code)
                if isinstance(exc, HostKeyMismatch):
                    log.error("node %s: %s", node.address, exc.message)
                self.scheduler.schedule_probe(node_id, when)
                log.info("probe %d of node %s failed (%s); next in %.0fs", attempts,
                         node.address, exc.code, (when - self.clock()).total_seconds())
                return
            self.catalog.node_reachable(node_id)
            self.notifier.node_changed(node, True, known=node.reachable)
            overdue = self.catalog.overdue_targets(node_id)
            log.info("node %s is reachable again: running %d overdue targets", node.address,
                     len(overdue))
            for t in overdue:
                self.scheduler.cancel_retry(t.id)
                self.scheduler.recover_now(t.id)
        except Exception:  # noqa: BLE001
            log.exception("probe of node %s crashed", node_id)
