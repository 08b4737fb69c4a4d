"""One backup run of one target: fingerprint -> compare -> stream -> commit -> rotate.

Every attempt writes exactly one run row. An archive is listed only after its
bytes are fsynced and renamed into place, in the same catalog transaction that
records the run and the new fingerprint; rotation runs only after that commit.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import posixpath
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import remote
from orchestrator.errors import (
    AuthFailed,
    BackhaulError,
    CommandRefused,
    HostKeyMismatch,
    NodeError,
    PathNotFound,
    PermissionDenied,
    RemoteCommandFailed,
    RunInProgress,
)
from orchestrator.hooks import Hooks
from orchestrator.limits import Deadline, RunLimits
from orchestrator.sanitize import escape_controls
from orchestrator.ssh import Connection, ExecResult, NodeAddress, SSHPool
from storage.archives import ArchiveStore, node_dir_name, rotate
from storage.catalog import Catalog, Node, Target
from storage.errors import ArchiveTooLarge, StorageError
from storage.limits import format_size
from storage.verify import TarGzVerifier

log = logging.getLogger(__name__)

TAR_WARNINGS_EXIT = 1  # GNU tar: some files changed or vanished while read
LAST_SEEN_EVERY = dt.timedelta(seconds=60)  # at most one "last seen" write per node a minute
# Failures that an already authenticated (pooled) connection may keep causing
# after the node's authorized_keys changed: reconnect for the next attempt.
_REAUTHENTICATE = (CommandRefused, AuthFailed, PermissionDenied)


class CatalogHostKeys:
    """Host keys pinned in the catalog, like OpenSSH's ``accept-new``: the first
    key seen is recorded, a different one later is refused and never replaced
    silently. A fingerprint given at registration is enforced from the start.

    A host key belongs to host:port, not to a login: every node row on the
    same host:port (any user; an IPv4-mapped IPv6 address counts as its IPv4
    address) must agree with the key offered, so a second user name cannot
    pin a second key. ``trust`` is the only way to change it."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def verify(self, node: NodeAddress, key_type: str, key_b64: str, fingerprint: str) -> None:
        found = self.catalog.find_node(node.user, node.host, node.port)
        if not found:
            raise HostKeyMismatch(str(node), "(node not registered)", fingerprint)
        row = found[0]
        for other in same_endpoint(self.catalog, node.host, node.port):
            pinned = other.host_key_b64 is not None and other.host_key_b64 != key_b64
            expected = other.host_key_b64 is None and \
                other.host_key_fingerprint not in (None, fingerprint)
            if pinned or expected:
                raise HostKeyMismatch(
                    str(node) if other.id == row.id else f"{node} (pinned for {other.address})",
                    other.host_key_fingerprint or "?", fingerprint)
        if row.host_key_b64 is None:
            if self.catalog.pin_host_key(row.id, key_type, key_b64, fingerprint):
                log.info("pinned host key of %s: %s %s", node, key_type, fingerprint)
                return
            row = self.catalog.get_node(row.id)  # pinned concurrently: compare with it
        if row.host_key_b64 != key_b64:
            raise HostKeyMismatch(str(node), row.host_key_fingerprint or "?", fingerprint)


def same_endpoint(catalog: Catalog, host: str, port: int) -> list[Node]:
    """Every node row reaching ``host:port``, whatever its user, including rows
    stored before IPv4-mapped IPv6 addresses were written as IPv4."""
    spellings = {host}
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        v4 = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip
        if isinstance(v4, ipaddress.IPv4Address):
            mapped = ipaddress.IPv6Address("::ffff:" + str(v4))
            spellings |= {str(v4), str(mapped), f"::ffff:{v4}"}
    return [n for h in sorted(spellings) for n in catalog.find_node(None, h, port)]


@dataclass(frozen=True)
class RunResult:
    run_id: int
    target_id: int
    status: str  # success | unchanged | failed
    bytes_transferred: int
    archive_id: int | None = None
    error_code: str | None = None
    message: str | None = None
    warnings: str | None = None
    node_unreachable: bool = False
    duration: float = 0.0


def node_address(target: Target) -> NodeAddress:
    return NodeAddress(target.node.user, target.node.host, target.node.port)


class BackupEngine:
    """Runs backups. Thread-safe: many targets run at once, one run per target,
    at most ``per_node`` runs per node."""

    def __init__(self, catalog: Catalog, store: ArchiveStore, pool: SSHPool, *,
                 per_node: int = 2, max_runs: int = 8, stderr_limit: int = 64 * 1024,
                 throttle: Callable[[int], None] | None = None,
                 use_pigz: bool = True, hooks: Hooks | None = None,
                 limits: RunLimits | None = None) -> None:
        self.catalog = catalog
        self.limits = limits or RunLimits()
        self.store = store
        self.pool = pool
        self.per_node = per_node
        self.stderr_limit = stderr_limit
        self.throttle = throttle
        self.use_pigz = use_pigz
        self.hooks = hooks  # the targets' pre/post commands (orchestrator/hooks.py)
        # Scheduled and manual runs together: the global concurrency bound.
        self._run_slots = threading.BoundedSemaphore(max_runs)
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._target_locks: dict[int, threading.Lock] = {}
        self._node_slots: dict[NodeAddress, threading.BoundedSemaphore] = {}
        # Set by a server that is shutting down: runs it aborts are recorded
        # as ``interrupted`` rather than ``failed``.
        self.stopping = threading.Event()

    def _node_slot(self, node: NodeAddress) -> threading.BoundedSemaphore:
        with self._lock:
            return self._node_slots.setdefault(node, threading.BoundedSemaphore(self.per_node))

    def in_flight(self) -> int:
        with self._lock:
            return len(self._running)

    def is_running(self, target_id: int) -> bool:
        with self._lock:
            return target_id in self._running

    def _target_lock(self, target_id: int) -> threading.Lock:
        with self._lock:
            return self._target_locks.setdefault(target_id, threading.Lock())

    def run(self, target_id: int, trigger: str = "schedule", *,
            queue: bool = False, scheduled_at: dt.datetime | None = None) -> RunResult:
        """Back up one target now. When it already runs: raise ``RunInProgress``,
        or with ``queue`` wait for that run to end and then run again (a user
        who asks for a backup now wants one that starts after the request)."""
        lock = self._target_lock(target_id)
        if not lock.acquire(blocking=queue):
            raise RunInProgress(target_id)
        try:
            with self._lock:
                self._running.add(target_id)
            target = self.catalog.get_target(target_id)
            node = node_address(target)
            with self._run_slots, self._node_slot(node):
                return self._run(target, node, trigger, scheduled_at)
        finally:
            with self._lock:
                self._running.discard(target_id)
            lock.release()

    def _run(self, target: Target, node: NodeAddress, trigger: str,
             scheduled_at: dt.datetime | None) -> RunResult:
        started = time.monotonic()
        run_id = self.catalog.start_run(target.id, trigger, scheduled_at)
        wire = _Payload()
        deadline = self.limits.deadline()
        try:
            with self.pool.session(node) as conn:
                result = self._backup(conn, target, run_id, wire, deadline)
            self._mark_reachable(target)
        except BackhaulError as exc:
            if isinstance(exc, _REAUTHENTICATE):
                self.pool.discard(node)
            if isinstance(exc, HostKeyMismatch):
                self._note_node_error(target, exc)
            result = self._fail(target, run_id, exc.code, exc.message, wire.total(),
                                node_unreachable=isinstance(exc, NodeError)
                                and exc.node_unreachable)
        except StorageError as exc:
            result = self._fail(target, run_id, exc.code, exc.message, wire.total())
        except Exception as exc:  # a bug: record it, never kill the scheduler thread
            log.exception("run %s of target %s crashed", run_id, target.id)
            result = self._fail(target, run_id, "internal_error",
                                f"{exc.__class__.__name__}: {exc}", wire.total())
        result = _with_duration(result, time.monotonic() - started)
        # A failure is logged once, at WARNING, with target, node and run id.
        level = logging.WARNING if result.status in ("failed", "interrupted") else logging.INFO
        log.log(level, "run %s target %s node %s path %s: %s bytes=%d duration=%.2fs%s",
                run_id, target.id, node, target.path, result.status, result.bytes_transferred,
                result.duration,
                f" error={result.error_code}: {result.message}" if result.error_code else "")
        return result

    def _backup(self, conn: Connection, target: Target, run_id: int,
                wire: _Payload, deadline: Deadline | None = None) -> RunResult:
        options = self.hooks.options(target) if self.hooks is not None else None
        if options is None:
            return self._backup_tree(conn, target, run_id, wire, deadline)
        assert self.hooks is not None
        pre = self.hooks.pre(conn, target, options, run_id)  # before the fingerprint
        if pre is not None:
            wire.add(pre)
        try:
            return self._backup_tree(conn, target, run_id, wire, deadline)
        finally:
            # After the backup, also a failed one (a post command often undoes
            # the pre command), unless the connection itself is gone.
            if conn.alive:
                post = self.hooks.post(conn, target, options, run_id)
                if post is not None:
                    wire.add(post)

    def _backup_tree(self, conn: Connection, target: Target, run_id: int,
                     wire: _Payload, deadline: Deadline | None = None) -> RunResult:
        address = str(conn.node)
        fp_res = wire.add(conn.exec(remote.fingerprint_command(target.path),
                                    what="fingerprint", deadline=deadline))
        _check_status(fp_res.exit_status, fp_res.stderr_text, address, target.path,
                      "fingerprint", ok=(0,))
        fingerprint = remote.parse_fingerprint(fp_res.stdout)
        if fingerprint is None:
            raise RemoteCommandFailed(address, "fingerprint", fp_res.exit_status,
                                      "output is not a sha256 digest: " + escape_controls(
                                          fp_res.stdout[:80].decode("utf-8", "replace")))
        if fingerprint == target.last_fingerprint:
            self.catalog.finish_unchanged(run_id, target.id, fingerprint, wire.total())
            return RunResult(run_id, target.id, "unchanged", wire.total())

        pigz = self.use_pigz and conn.has_pigz(deadline)
        node_dir = node_dir_name(target.node.user, target.node.host, target.node.port)
        created_at = self.catalog.clock()
        limits = self.limits.archive
        verifier = TarGzVerifier(posixpath.basename(target.path), limits)
        with self.store.writer(node_dir, target.id, run_id, created_at) as writer:

            def sink(data: bytes) -> None:
                if limits.max_archive_size and writer.size + len(data) > limits.max_archive_size:
                    raise ArchiveTooLarge(
                        f"the archive grew past {format_size(limits.max_archive_size)} "
                        "(--max-archive-size); nothing was kept")
                if self.throttle is not None:
                    self.throttle(len(data))
                verifier.feed(data)
                writer.write(data)

            res = wire.add(conn.exec(remote.tar_command(target.path, pigz=pigz), sink=sink,
                                     what="tar", stderr_limit=self.stderr_limit,
                                     deadline=deadline))
            _check_status(res.exit_status, res.stderr_text, address, target.path, "tar",
                          ok=(0, TAR_WARNINGS_EXIT))
            if res.stdout_bytes == 0:
                raise RemoteCommandFailed(address, "tar", res.exit_status, "empty stream")
            verifier.finish()  # a stream cut short or escaping its root is never kept
            facts = writer.commit()
        warnings = res.stderr_text.strip() or None
        try:
            archive_id = self.catalog.commit_archive(
                run_id, target.id, created_at=facts.created_at, size=facts.size,
                sha256=facts.sha256, file_name=facts.file_name, fingerprint=fingerprint,
                bytes_transferred=wire.total(), warnings=warnings)
        except StorageError:
            self.store.delete(facts.file_name)  # never leave an unlisted archive behind
            raise
        try:
            rotate(self.catalog, self.store, target.id, target.keep)
        except StorageError as exc:  # the new archive is safe; rotation retries next run
            log.warning("rotation of target %s failed: %s", target.id, exc.message)
        return RunResult(run_id, target.id, "success", wire.total(), archive_id=archive_id,
                         warnings=warnings)

    def _fail(self, target: Target, run_id: int, code: str, message: str, transferred: int,
              *, node_unreachable: bool = False) -> RunResult:
        status = "interrupted" if self.stopping.is_set() else "failed"
        try:
            self.catalog.fail_run(run_id, code, message, bytes_transferred=transferred,
                                  status=status)
        except StorageError as exc:
            log.error("cannot record failed run %s: %s", run_id, exc.message)
        if node_unreachable:
            try:
                self.catalog.node_unreachable(target.node.id, message, code=code)
            except StorageError as exc:
                log.error("cannot mark node %s unreachable: %s", target.node.id, exc.message)
        return RunResult(run_id, target.id, status, transferred, error_code=code,
                         message=message, node_unreachable=node_unreachable)

    def _mark_reachable(self, target: Target) -> None:
        """Record a successful contact: ``nodes`` shows it as LAST SEEN. The node
        row read at the start of the run says whether a write is due."""
        n = target.node
        if n.reachable is not True or n.last_error is not None or n.last_seen_at is None \
                or self.catalog.clock() - n.last_seen_at >= LAST_SEEN_EVERY:
            self.catalog.node_reachable(n.id)

    def _note_node_error(self, target: Target, exc: BackhaulError) -> None:
        try:
            self.catalog.node_error(target.node.id, exc.code, exc.message)
        except StorageError as err:
            log.error("cannot record the error of node %s: %s", target.node.id, err.message)

    def check_path(self, node: NodeAddress, path: str) -> None:
        """Raise unless ``path`` exists and is readable on the node (registration)."""
        with self.pool.session(node) as conn:
            res = conn.exec(remote.check_command(path), what="path check",
                            deadline=self.limits.deadline())
            _check_status(res.exit_status, res.stderr_text, str(node), path, "path check",
                          ok=(0,))

    def probe(self, node: NodeAddress) -> None:
        """Connect (banner, host key, auth) and run a no-op; raise on failure."""
        with self.pool.session(node) as conn:
            res = conn.exec(remote.probe_command(), what="probe",
                            deadline=self.limits.deadline())
            if res.exit_status != 0:
                raise RemoteCommandFailed(str(node), "probe", res.exit_status, res.stderr_text)


def _check_status(status: int, stderr: str, address: str, path: str, what: str,
                  ok: tuple[int, ...]) -> None:
    if status in ok:
        return
    if status == remote.EXIT_REFUSED and remote.REFUSED_MARK in stderr:
        raise CommandRefused(address, path)
    if status == remote.EXIT_NO_SUCH_PATH:
        raise PathNotFound(address, path)
    if status == remote.EXIT_NOT_READABLE or "Permission denied" in stderr:
        raise PermissionDenied(address, path, _last_line(stderr))
    raise RemoteCommandFailed(address, what, status, stderr)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else ""


class _Payload:
    """Bytes this run received from the node (stdout and stderr of its
    commands), exact even when other runs share the connection."""

    def __init__(self) -> None:
        self._total = 0

    def add(self, res: ExecResult) -> ExecResult:
        self._total += res.stdout_bytes + res.stderr_bytes
        return res

    def total(self) -> int:
        return self._total


def _with_duration(r: RunResult, seconds: float) -> RunResult:
    return RunResult(**{**r.__dict__, "duration": seconds})
