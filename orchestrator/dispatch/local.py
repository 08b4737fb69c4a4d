"""The in-process dispatch backend (``--role all``): due runs execute on
APScheduler's own worker threads, manual runs on a pool of their own."""

from __future__ import annotations

import datetime as dt
import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from orchestrator.backup import BackupEngine, RunResult
from orchestrator.errors import WaitTimeout
from orchestrator.policy import RunPolicy
from storage.catalog import Catalog, Target
from storage.errors import NotFound, StorageError

log = logging.getLogger(__name__)


class LocalRunner:
    def __init__(self, catalog: Catalog, engine: BackupEngine, policy: RunPolicy,
                 scheduler: Any, *, workers: int, stopping: threading.Event) -> None:
        self.catalog = catalog
        self.engine = engine
        self.policy = policy
        self.scheduler = scheduler
        self._stopping = stopping
        self.manual = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="manual-run")
        self._inflight_lock = threading.Lock()
        self._inflight: set[int] = set()  # targets whose scheduled job runs now
        self._due_again: dict[int, tuple[str, dt.datetime | None]] = {}

    def run_due(self, target_id: int, trigger: str,
                due: dt.datetime | None) -> RunResult | None:
        """Run it here, on the calling (APScheduler) thread. Never raises."""
        try:
            try:
                target = self.catalog.get_target(target_id)
            except NotFound:
                self.scheduler.remove_target(target_id)
                return None
            if not target.active:
                self.scheduler.remove_target(target_id)
                return None
            if trigger == "schedule" and target.node.reachable is False:
                # The node is down: one probe per node, not one attempt per target.
                log.info("target %s skipped: node %s is unreachable (waiting for its probe)",
                         target_id, target.node.address)
                self.catalog.record_failure(target_id, None)
                self.policy.ensure_probe(target.node)
                return None
            with self._inflight_lock:
                if target_id in self._inflight:
                    # Due while its previous run still goes on: that run repeats
                    # at once when done (late rather than lost, never overlapping).
                    self._due_again[target_id] = (trigger, due)
                    return None
                self._inflight.add(target_id)
            try:
                while True:
                    result = self.engine.run(target_id, trigger, queue=True, scheduled_at=due)
                    self.policy.after_run(target, result)
                    with self._inflight_lock:
                        again = self._due_again.pop(target_id, None)
                        if again is None or self._stopping.is_set():
                            self._inflight.discard(target_id)
                            return result
                    trigger, due = again
                    target = self.catalog.get_target(target_id)
                    if not target.active:
                        return result
            finally:
                with self._inflight_lock:
                    self._inflight.discard(target_id)
        except StorageError as exc:
            log.error("target %s: catalog unavailable: %s; retrying", target_id, exc.message)
            self.policy.retry_later(target_id, 1, None)
            return None
        except Exception:  # noqa: BLE001
            log.exception("job for target %s crashed", target_id)
            return None

    def run_manual(self, target: Target, *, wait: bool, timeout: float | None,
                   full: bool) -> dict[str, Any] | None:
        target_id = target.id

        def manual() -> RunResult:
            result = self.engine.run(target_id, "manual", queue=True, full=full)
            try:
                self.policy.after_run(target, result)
            except Exception:  # noqa: BLE001
                log.exception("after manual run of target %s", target_id)
            return result

        future: Future[RunResult] = self.manual.submit(manual)
        if not wait:
            return None
        try:
            result = future.result(timeout=timeout)
        except FutureTimeout:
            raise WaitTimeout(target_id, timeout or 0) from None
        return self.catalog.get_run(result.run_id)

    def shutdown(self) -> None:
        self.manual.shutdown(wait=False, cancel_futures=True)
