"""Builds and wires the server: catalog, archive store, SSH pool, backup
engine, scheduler; owns the retry-on-availability policy.

The object graph is built once here and passed explicitly; the only global is
the handle in ``jobs.py`` that APScheduler's textual job references use.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import getpass
import logging
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import jobs, remote, roles, validation
from orchestrator.backup import BackupEngine, CatalogHostKeys, RunResult, same_endpoint
from orchestrator.errors import (
    AuthFailed,
    BackhaulError,
    CommandRefused,
    HostKeyMismatch,
    InvalidInput,
    NodeError,
)
from orchestrator.hooks import Hooks, validate_command, validate_url
from orchestrator.limits import run_limits
from orchestrator.notify import Notifier, Sender
from orchestrator.scheduler import Scheduler
from orchestrator.settings import Settings
from orchestrator.ssh import NodeAddress, ServerKey, SSHPool
from orchestrator.throttle import TokenBucket
from orchestrator.verify_cmd import ArchiveCheck, Scrubber, archive_root, check_archive
from storage.archives import rotate
from storage.catalog import Catalog, Node, Target, TargetOptions, format_address, utcnow
from storage.errors import NotFound, StorageError, TargetExists
from storage.stores import open_store

if TYPE_CHECKING:
    from orchestrator.dispatch.procrastinate import NodeSlots, RunQueue

log = logging.getLogger(__name__)

__version__ = "0.1.0"


@dataclass(frozen=True)
class Registration:
    target: Target
    warnings: list[str]


class Server:
    def __init__(self, settings: Settings, *, clock: Callable[[], dt.datetime] = utcnow,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.data_dir = Path(settings.data_dir).resolve()
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.data_dir, 0o700)
        self.role = settings.role
        if self.role != "all" and not str(settings.catalog_url).startswith("postgresql"):
            raise ServerError(f"--role {self.role} needs a PostgreSQL catalog (--catalog-url "
                              "postgresql+psycopg://...): the roles meet there")
        # The scale-out roles share one catalog and may share a data dir (key,
        # token, archives); the APScheduler store's one owner is the elected leader.
        self._lock_fd = _lock_data_dir(self.data_dir / "backhauld.lock") \
            if self.role == "all" else None
        self.token = _load_or_create_token(self.data_dir / "api-token")
        # The archive store (default: ``archives`` in the data dir; or S3): a
        # missing bucket or refused credentials stop us here, in one line,
        # before the catalog is created or migrated.
        self.store = open_store(settings.store_url, default_dir=self.data_dir / "archives",
                                endpoint_url=settings.store_endpoint,
                                region=settings.store_region)
        # The catalog (default: SQLite in the data dir) is opened and its schema
        # upgraded before anything else starts: a bad URL stops us here.
        self.catalog = Catalog(settings.catalog_url or self.data_dir / "catalog.db",
                               clock=clock, busy_timeout=settings.db_busy_timeout)
        # A delta's fetched pieces spool here, on local disk, whatever the store.
        self.spool_dir = self.data_dir / "tmp"
        self.spool_dir.mkdir(mode=0o700, exist_ok=True)
        self.key = ServerKey(self.data_dir / "ssh" / "id_ed25519",
                             comment=f"backhaul@{os.uname().nodename}")
        limits = run_limits(settings)
        self.pool = SSHPool(self.key, CatalogHostKeys(self.catalog),
                            connect_timeout=settings.connect_timeout,
                            io_timeout=settings.io_timeout, idle_timeout=settings.idle_timeout,
                            output_limit=limits.command_output)
        bucket = TokenBucket(settings.bwlimit) if settings.bwlimit else None
        self.engine = BackupEngine(self.catalog, self.store, self.pool,
                                   per_node=settings.per_node, max_runs=settings.workers,
                                   throttle=bucket.take if bucket else None,
                                   use_pigz=settings.compressor == "auto",
                                   hooks=Hooks(self.catalog, timeout=settings.hook_timeout),
                                   limits=limits, full_every=settings.full_every,
                                   use_node_python=settings.node_python == "auto",
                                   spool_dir=str(self.spool_dir))
        self.sender = Sender(max_queue=settings.notify_queue)
        self.notifier = Notifier(self.catalog, self.sender, settings.notify_url,
                                 repeat_seconds=settings.notify_repeat, clock=clock)
        self.scheduler: Any = Scheduler(job_store_url(self.catalog.url, self.data_dir),
                                        workers=settings.workers,
                                        minute_seconds=settings.minute_seconds)
        # --role scheduler/worker/api: runs go through the PostgreSQL run queue
        # (orchestrator/roles.py wires the rest); None: the in-process pools.
        self.queue: RunQueue | None = None
        self.slots: NodeSlots | None = None
        self._on_stop: list[Callable[[], None]] = []
        if self.role != "all":
            roles.prepare(self)
        self.manual = ThreadPoolExecutor(max_workers=settings.workers,
                                         thread_name_prefix="manual-run")
        self.default_user = settings.default_user or getpass.getuser()
        self._stopping = threading.Event()
        self._janitor: threading.Thread | None = None
        self._probe_lock = threading.Lock()
        self._inflight_lock = threading.Lock()
        self._inflight: set[int] = set()  # targets whose scheduled job runs now
        self._due_again: dict[int, tuple[str, dt.datetime | None]] = {}
        self._probing: set[int] = set()  # nodes whose probe runs right now
        self.started = False

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        """Recover from whatever the last process left, then start scheduling."""
        if self.role != "all":
            roles.start(self)
            self.started = True
            return
        # First: another live server on this catalog would see its runs
        # marked interrupted below.
        self.scheduler.take_ownership()
        interrupted = self.catalog.interrupt_running()
        if interrupted:
            log.warning("runs %s were in flight when the server stopped: marked interrupted",
                        interrupted)
        for p in self.store.sweep_temp_files():
            log.warning("removed orphan temp file %s", p)
        for name in self.store.sweep_unlisted(self.catalog.retained_file_names()):
            log.warning("removed archive file %s that the catalog never listed", name)
        self.scheduler.start(paused=True)
        listed = self.catalog.list_targets()
        active = {t.id: t.every_minutes for t in listed}
        added, removed = self.scheduler.reconcile(active)
        if added or removed:
            log.info("job store reconciled with the catalog: added %s, removed %s",
                     added, removed)
        self._restore_retries()
        self._catch_up(listed)
        jobs.install(self)
        self.sender.start()
        self.scheduler.resume()
        self._janitor = threading.Thread(target=self._janitor_loop, name="ssh-janitor",
                                         daemon=True)
        self._janitor.start()
        if self.settings.scrub_every > 0:
            Scrubber(self.catalog, self.store,
                     dt.timedelta(days=self.settings.scrub_every), self._stopping).start()
        self.started = True
        log.info("backhauld %s started: data dir %s, archives in %s, %d active targets",
                 __version__, self.data_dir, self.store.url, len(active))

    def stop(self) -> None:
        """Stop taking work; let in-flight runs finish within ``shutdown_grace``,
        then abort them (recorded as ``interrupted``)."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        for stop in self._on_stop:
            stop()
        self.scheduler.shutdown()
        self.manual.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + self.settings.shutdown_grace
        while self.engine.in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.engine.in_flight():
            log.warning("aborting %d runs still in flight after %gs", self.engine.in_flight(),
                        self.settings.shutdown_grace)
            self.engine.stopping.set()
            self.pool.close()
            deadline = time.monotonic() + 10
            while self.engine.in_flight() and time.monotonic() < deadline:
                time.sleep(0.05)
        self.pool.close()
        self.sender.stop()
        jobs.install(None)
        self.catalog.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
        if self.queue is not None:
            self.queue.close()
        if self.started:
            log.info("backhauld stopped")

    def _janitor_loop(self) -> None:
        while not self._stopping.wait(min(30.0, self.settings.idle_timeout / 2)):
            try:
                self.pool.close_idle()
            except Exception:  # noqa: BLE001 - the janitor must not die
                log.exception("closing idle connections failed")

    def _restore_retries(self) -> None:
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

    def _catch_up(self, active: list[Target]) -> None:
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

    # -- backoff ----------------------------------------------------------------

    def backoff(self, attempt: int) -> float:
        """Seconds before retry number ``attempt`` (1-based): exponential from
        ``retry_min``, capped at ``retry_max``, minus up to 20 % jitter so
        many targets failing together do not retry in lockstep."""
        base = self.settings.retry_min * 2 ** max(0, attempt - 1)
        return min(self.settings.retry_max, base) * self.rng.uniform(0.8, 1.0)

    # -- runs ---------------------------------------------------------------------

    def run_job(self, target_id: int, trigger: str) -> RunResult | None:
        """What the scheduler calls. Never raises: a failing job must not take
        the scheduler down."""
        # First thing, whatever happens next: each job instance takes its own due time.
        kind = {"schedule": "target", "retry": "retry", "recovery": "recover"}[trigger]
        due = self.scheduler.scheduled_time(kind, target_id)
        if self._stopping.is_set():
            return None
        if self.queue is not None:  # the leader: a worker runs it
            self.queue.enqueue(target_id, trigger, due=due)
            return None
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
                self._ensure_probe(target.node)
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
                    self.after_run(target, result)
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
            self._retry_later(target_id, 1, None)
            return None
        except Exception:  # noqa: BLE001
            log.exception("job for target %s crashed", target_id)
            return None

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
            self._ensure_probe(self.catalog.get_node(target.node.id))
            return
        failures = self.catalog.record_failure(target.id, None)
        self._retry_later(target.id, failures, target.every_minutes)

    def _retry_later(self, target_id: int, failures: int, every_minutes: int | None) -> None:
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

    def _ensure_probe(self, node: Node) -> None:
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

    def run_now(self, target_id: int, *, wait: bool,
                timeout: float | None = None, full: bool = False) -> dict[str, Any] | None:
        """Back up now (the API's ``run``). With ``wait``, returns the run row."""
        target = self.catalog.get_target(target_id)
        if not target.active:
            raise TargetInactive(target_id)
        if self.queue is not None:
            return roles.run_queued(self, target_id, wait=wait, timeout=timeout, full=full)

        def manual() -> RunResult:
            result = self.engine.run(target_id, "manual", queue=True, full=full)
            try:
                self.after_run(target, result)
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

    # -- registration -------------------------------------------------------------

    def register(self, *, host: str, port: int, user: str | None, path: str,
                 every_minutes: int, keep: int = 10,
                 host_key_fingerprint: str | None = None,
                 options: dict[str, Any] | None = None) -> Registration:
        host = validation.host(host)
        port = validation.port(port)
        user = validation.user(user if user else self.default_user)
        path = remote.validate_path(path)
        every_minutes = validation.every_minutes(every_minutes)
        keep = validation.keep(keep)
        if host_key_fingerprint is not None:
            host_key_fingerprint = validation.fingerprint(host_key_fingerprint)
        options = validate_options(options or {})

        existing_nodes = self.catalog.find_node(user, host, port)
        if existing_nodes:
            for t in self.catalog.list_targets(node_id=existing_nodes[0].id, path=path):
                raise TargetExists(t.node.address, path, t.id)
        # A known node needs no write (the common case: many paths per node).
        node = (existing_nodes[0] if existing_nodes and existing_nodes[0].forgotten_at is None
                else self.catalog.ensure_node(user, host, port))
        if host_key_fingerprint is not None:
            for other in same_endpoint(self.catalog, host, port):
                if other.host_key_b64 is not None and other.host_key_fingerprint != \
                        host_key_fingerprint:
                    self._forget_node_if_new(node, existing_nodes)
                    raise HostKeyMismatch(other.address, other.host_key_fingerprint or "?",
                                          host_key_fingerprint)
            self.catalog.set_host_key_expected(node.id, host_key_fingerprint)

        warnings: list[str] = []
        reachable = True
        try:
            self.engine.check_path(NodeAddress(user, host, port), path)
        except (AuthFailed, CommandRefused) as exc:
            warnings.append(f"{exc.message}; registered anyway, backups start once it works")
        except NodeError as exc:
            if not exc.node_unreachable:
                self._forget_node_if_new(node, existing_nodes)
                raise
            reachable = False
            if not (node.reachable is False and node.last_error_code == exc.code):
                self.catalog.node_unreachable(node.id, exc.message, code=exc.code)
            warnings.append(f"{exc.message}; registered anyway: backhaul probes the node "
                            "and backs up as soon as it answers")

        # One catalog commit: the target, its options and (node down) its first failure.
        target = self.catalog.add_target(node.id, path, every_minutes, keep,
                                         failures=0 if reachable else 1, options=options)
        node_changed = reachable and not warnings and node.reachable is not True
        if node_changed:
            self.catalog.node_reachable(node.id)
        if reachable:
            self.scheduler.add_target(target.id, every_minutes)
        else:
            first = self.clock() + dt.timedelta(seconds=every_minutes *
                                                self.settings.minute_seconds)
            self.scheduler.add_target(target.id, every_minutes, first_run_at=first)
            if not self.scheduler.has_probe(node.id):  # else one is on its way already
                self._ensure_probe(self.catalog.get_node(node.id))
                node_changed = True
        log.info("registered target %s: %s %s every %d min, keep %d", target.id,
                 node.address, path, every_minutes, keep)
        return Registration(self.catalog.get_target(target.id) if node_changed else target,
                            warnings)

    def set_target_options(self, target_id: int, **changes: Any) -> TargetOptions:
        """Change a target's pre/post commands, ``pre_optional`` or ping URL
        (what ``edit`` sets); a value of None or "" removes a command or URL."""
        return self.catalog.set_target_options(target_id, **validate_options(changes))

    def _forget_node_if_new(self, node: Node, existing: list[Node]) -> None:
        if not existing:
            self.catalog.delete_node_if_unused(node.id)

    def unregister(self, target_id: int, *, purge: bool = False) -> tuple[Target, int]:
        current = self.catalog.get_target(target_id)
        if not current.active and not (
                purge and self.catalog.list_archives(target_id, retained_only=True)):
            # Saying "unregistered" twice would hide a typo or a stale script;
            # purging what an earlier unregister kept is still allowed.
            raise NotRegistered(current)
        target = self.catalog.unregister_target(target_id)
        self.scheduler.remove_target(target_id)
        purged = 0
        if purge:
            retained = self.catalog.list_archives(target_id, retained_only=True)
            self.catalog.mark_archives_deleted([a["id"] for a in retained], reason="purged")
            for a in retained:
                self.store.delete(a["file_name"])
            purged = len(retained)
        log.info("unregistered target %s (%s %s)%s", target_id, target.node.address,
                 target.path, f", purged {purged} archives" if purge else "")
        return target, purged

    def forget_node(self, node_id: int) -> Node:
        """``nodes --forget``: hide a node nothing is registered on any more (a
        mistyped port, a retired machine). Its history stays in the catalog."""
        node = self.catalog.get_node(node_id)
        active = self.catalog.list_targets(node_id=node_id)
        if active:
            raise NodeInUse(node, [t.path for t in active])
        self.scheduler.remove_probe(node_id)
        self.pool.discard(NodeAddress(node.user, node.host, node.port))
        log.info("node %s forgotten", node.address)
        return self.catalog.forget_node(node_id)

    def edit_target(self, target_id: int, *, every_minutes: int | None = None,
                    keep: int | None = None) -> tuple[Target, list[int]]:
        """``backhaul edit``: new frequency and/or keep for a registered target,
        its history untouched. A lower keep rotates at once; returns the ids
        of the archives that rotated out."""
        target = self.catalog.get_target(target_id)
        if not target.active:
            raise TargetInactive(target_id)
        if every_minutes is not None:
            every_minutes = validation.every_minutes(every_minutes)
        if keep is not None:
            keep = validation.keep(keep)
        updated = self.catalog.update_target(target_id, every_minutes=every_minutes, keep=keep)
        if every_minutes is not None and every_minutes != target.every_minutes:
            self.scheduler.set_interval(target_id, every_minutes)
        rotated: list[int] = []
        if keep is not None:
            rotated = rotate(self.catalog, self.store, target_id, keep)
        log.info("edited target %s (%s %s): every %d min, keep %d%s", target_id,
                 target.node.address, target.path, updated.every_minutes, updated.keep,
                 f"; rotated out archives {rotated}" if rotated else "")
        return updated, rotated

    def verify_archives(self, archive_ids: list[int] | None) -> list[ArchiveCheck]:
        """``backhaul verify``: re-read the given archives (None: every kept one)."""
        if archive_ids is None:
            wanted = self.catalog.archives_due_for_scrub(self.clock() + dt.timedelta(days=1),
                                                         limit=1_000_000)
        else:
            wanted = [self.catalog.get_archive(aid) for aid in archive_ids]
        return [check_archive(self.catalog, self.store, a, archive_root(self.catalog, a))
                for a in wanted]

    def trust_node(self, node_id: int, fingerprint: str | None) -> Node:
        """Forget a node's pinned host key after a deliberate change; the next
        contact pins the new one (or only ``fingerprint``, when given)."""
        if fingerprint is not None:
            fingerprint = validation.fingerprint(fingerprint)
        node = self.catalog.get_node(node_id)
        # The key is pinned per host:port: forget it for every user there.
        for other in same_endpoint(self.catalog, node.host, node.port):
            self.catalog.expect_host_key(other.id, fingerprint)
            self.pool.discard(NodeAddress(other.user, other.host, other.port))
            log.warning("host key of %s forgotten (was %s)%s", other.address,
                        other.host_key_fingerprint,
                        f"; only {fingerprint} will be accepted" if fingerprint else "")
            for t in self.catalog.overdue_targets(other.id):
                self.scheduler.recover_now(t.id)
        return self.catalog.get_node(node_id)

    def authorized_keys_line(self, *, restricted: bool, host: str | None = None,
                             port: int = 22, user: str | None = None) -> str:
        """The line a node's authorized_keys should hold. Restricted to a node,
        the key may run only backhaul's commands on that node's active paths."""
        line = self.key.public_line
        if not restricted:
            return line
        if host is None:
            # ``restrict`` alone forbids forwarding and ptys but lets the key run
            # any command: not what a user asking for a restricted key expects.
            raise InvalidInput("a restricted line is made for one node: name it "
                               "(backhaul pubkey --restricted USER@HOST:PORT); without a "
                               "node's paths the key could still run any command")
        # The line goes into one user's authorized_keys: only that user's paths,
        # the server's default user when none is named (as in `register`).
        user = validation.user(user or self.default_user)
        host, port = validation.host(host), validation.port(port)
        matches = self.catalog.find_node(user, host, port)
        if not matches:
            others = sorted(n.user for n in self.catalog.find_node(None, host, port))
            raise NotFound("node", format_address(user, host, port)
                           + (f" (registered there: {', '.join(others)}; name one as "
                              "USER@HOST:PORT)" if others else ""))
        targets = [t for n in matches for t in self.catalog.list_targets(node_id=n.id)]
        hooks = [remote.hook_command(c, self.settings.hook_timeout)
                 for o in self.catalog.target_options([t.id for t in targets]).values()
                 for c in (o.pre_command, o.post_command) if c]
        return remote.restricted_key_line(line, [t.path for t in targets], hooks)


def validate_options(changes: dict[str, Any]) -> dict[str, Any]:
    """Target options as given by the API, validated; unknown names refused."""
    out: dict[str, Any] = {}
    for name, value in changes.items():
        if name in ("pre_command", "post_command"):
            out[name] = validate_command(value, name.replace("_", " "))
        elif name == "ping_url":
            out[name] = validate_url(value)
        elif name == "pre_optional":
            out[name] = bool(value)
        else:
            raise ServerError(f"unknown target option {name!r}")
    return out


class TargetInactive(BackhaulError):
    code = "target_unregistered"
    http_status = 409

    def __init__(self, target_id: int) -> None:
        super().__init__(f"target {target_id} is unregistered; register it again to back it up")


class NotRegistered(BackhaulError):
    code = "target_unregistered"
    http_status = 409

    def __init__(self, target: Target) -> None:
        when = target.unregistered_at.isoformat(timespec="seconds") \
            if target.unregistered_at else "earlier"
        super().__init__(f"{target.node.address} {target.path} is not registered "
                         f"(target {target.id} was unregistered at {when})")


class NodeInUse(BackhaulError):
    code = "node_in_use"
    http_status = 409

    def __init__(self, node: Node, paths: list[str]) -> None:
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        super().__init__(f"{node.address} still has {len(paths)} registered target(s) "
                         f"({shown}); unregister them first")


class WaitTimeout(BackhaulError):
    code = "timeout"
    http_status = 504

    def __init__(self, target_id: int, seconds: float) -> None:
        super().__init__(f"target {target_id} is still running after {seconds:g} s; "
                         "see `backhaul history` for its outcome")


class ServerError(BackhaulError):
    code = "server_error"


def job_store_url(catalog_url: str, data_dir: Path) -> str:
    """APScheduler's jobs sit beside a PostgreSQL catalog (a table of their
    own); with a SQLite catalog, in a SQLite file of their own."""
    if catalog_url.startswith("postgresql"):
        return catalog_url
    return f"sqlite:///{data_dir / 'jobs.db'}"


def _lock_data_dir(path: Path) -> int:
    """One backhauld per data dir: APScheduler's job store supports one owner."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ServerError(f"another backhauld already uses {path.parent} "
                          "(only one server may own a data dir)") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _load_or_create_token(path: Path) -> str:
    if path.exists():
        token = path.read_text().strip()
        if token:
            os.chmod(path, 0o600)
            return token
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
