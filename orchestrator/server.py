"""Builds the object graph of one backhauld process per ``--role``: catalog,
archive store, SSH pool, backup engine, scheduler, and the components that
act on them (``control.py``: registration and trust; ``policy.py``: retry,
probe and catch-up; ``dispatch/``: where runs execute). Owns start/stop, the
data-dir lock, the API token and the idle-connection janitor.

``Server``'s methods are a thin facade over those components, for the API
and the job entry points. The object graph is built once here and passed
explicitly; the only global is the handle in ``jobs.py`` that APScheduler's
textual job references use.
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator import jobs, roles
from orchestrator.backup import BackupEngine, CatalogHostKeys, RunResult
from orchestrator.control import Control, Registration
from orchestrator.dispatch.base import Runner
from orchestrator.dispatch.local import LocalRunner
from orchestrator.errors import ServerError, TargetInactive
from orchestrator.hooks import Hooks
from orchestrator.limits import run_limits
from orchestrator.notify import Notifier, Sender
from orchestrator.policy import RunPolicy
from orchestrator.scheduler import Scheduler, job_store_url
from orchestrator.settings import Settings
from orchestrator.ssh import ServerKey, SSHPool
from orchestrator.throttle import TokenBucket
from orchestrator.verify_cmd import ArchiveCheck, Scrubber
from storage.catalog import Catalog, Node, Target, TargetOptions, utcnow
from storage.stores import open_store

if TYPE_CHECKING:
    from orchestrator.dispatch.procrastinate import NodeSlots, RunQueue

log = logging.getLogger(__name__)

__version__ = "0.1.0"


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
        self._scheduler: Any = None
        self._parts: list[Any] = []  # the components that follow a swapped scheduler
        self.scheduler = Scheduler(job_store_url(self.catalog.url, self.data_dir),
                                   workers=settings.workers,
                                   minute_seconds=settings.minute_seconds)
        # --role scheduler/worker/api: runs go through the PostgreSQL run queue
        # (orchestrator/roles.py wires the rest); None: the in-process pools.
        self.queue: RunQueue | None = None
        self.slots: NodeSlots | None = None
        self._on_stop: list[Callable[[], None]] = []
        self.default_user = settings.default_user or getpass.getuser()
        self._stopping = threading.Event()
        self.policy = RunPolicy(settings, self.catalog, self.engine, self.notifier,
                                self.scheduler, clock=clock, rng=self.rng,
                                stopping=self._stopping)
        self.control = Control(settings, self.catalog, self.store, self.pool, self.engine,
                               self.key, self.policy, self.scheduler, clock=clock,
                               default_user=self.default_user)
        self._parts += [self.policy, self.control]
        self.runner: Runner
        if self.role != "all":
            roles.prepare(self)  # the run queue: sets queue, slots, scheduler and runner
        else:
            self.runner = LocalRunner(self.catalog, self.engine, self.policy, self.scheduler,
                                      workers=settings.workers, stopping=self._stopping)
            self._parts.append(self.runner)
        self._janitor: threading.Thread | None = None
        self.started = False

    @property
    def scheduler(self) -> Any:
        """The ``Scheduler`` (or, for the scale-out roles, the run queue's
        ``QueuedSchedule`` stand-in until this process leads)."""
        return self._scheduler

    @scheduler.setter
    def scheduler(self, scheduler: Any) -> None:
        # The leader swaps the stand-in for the real one (roles.py): the
        # components that schedule later work follow.
        self._scheduler = scheduler
        for part in self._parts:
            part.scheduler = scheduler

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
        self.policy.restore_retries()
        self.policy.catch_up(listed)
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
        self.runner.shutdown()
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

    # -- the facade: runs and the retry policy ------------------------------------

    def backoff(self, attempt: int) -> float:
        return self.policy.backoff(attempt)

    def run_job(self, target_id: int, trigger: str) -> RunResult | None:
        """What the scheduler calls. Never raises: a failing job must not take
        the scheduler down."""
        # First thing, whatever happens next: each job instance takes its own due time.
        kind = {"schedule": "target", "retry": "retry", "recovery": "recover"}[trigger]
        due = self.scheduler.scheduled_time(kind, target_id)
        if self._stopping.is_set():
            return None
        return self.runner.run_due(target_id, trigger, due)

    def execute(self, target_id: int, trigger: str, due: dt.datetime | None, *,
                full: bool = False) -> None:
        """One queued run, on a worker (the run queue's task calls this)."""
        roles.execute(self, target_id, trigger, due, full=full)

    def after_run(self, target: Target, result: RunResult) -> None:
        self.policy.after_run(target, result)

    def probe_node(self, node_id: int) -> None:
        self.policy.probe_node(node_id)

    def run_now(self, target_id: int, *, wait: bool,
                timeout: float | None = None, full: bool = False) -> dict[str, Any] | None:
        """Back up now (the API's ``run``). With ``wait``, returns the run row."""
        target = self.catalog.get_target(target_id)
        if not target.active:
            raise TargetInactive(target_id)
        return self.runner.run_manual(target, wait=wait, timeout=timeout, full=full)

    # -- the facade: registration and trust ---------------------------------------

    def register(self, *, host: str, port: int, user: str | None, path: str,
                 every_minutes: int, keep: int = 10,
                 host_key_fingerprint: str | None = None,
                 options: dict[str, Any] | None = None) -> Registration:
        return self.control.register(host=host, port=port, user=user, path=path,
                                     every_minutes=every_minutes, keep=keep,
                                     host_key_fingerprint=host_key_fingerprint,
                                     options=options)

    def set_target_options(self, target_id: int, **changes: Any) -> TargetOptions:
        return self.control.set_target_options(target_id, **changes)

    def unregister(self, target_id: int, *, purge: bool = False) -> tuple[Target, int]:
        return self.control.unregister(target_id, purge=purge)

    def forget_node(self, node_id: int) -> Node:
        return self.control.forget_node(node_id)

    def edit_target(self, target_id: int, *, every_minutes: int | None = None,
                    keep: int | None = None) -> tuple[Target, list[int]]:
        return self.control.edit_target(target_id, every_minutes=every_minutes, keep=keep)

    def verify_archives(self, archive_ids: list[int] | None) -> list[ArchiveCheck]:
        return self.control.verify_archives(archive_ids)

    def trust_node(self, node_id: int, fingerprint: str | None) -> Node:
        return self.control.trust_node(node_id, fingerprint)

    def authorized_keys_line(self, *, restricted: bool, host: str | None = None,
                             port: int = 22, user: str | None = None) -> str:
        return self.control.authorized_keys_line(restricted=restricted, host=host, port=port,
                                                 user=user)


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
