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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from orchestrator import remote
from orchestrator.errors import (
    AuthFailed,
    BackhaulError,
    CommandRefused,
    HostKeyMismatch,
    NodeError,
    OutputTooLarge,
    PathNotFound,
    PermissionDenied,
    RemoteCommandFailed,
    RunInProgress,
)
from orchestrator.hooks import Hooks
from orchestrator.limits import Deadline, RunLimits
from orchestrator.sanitize import escape_controls
from orchestrator.ssh import Connection, ExecResult, NodeAddress, SSHPool
from orchestrator.transfer.delta import (
    FULL_FRACTION,
    DeltaPlan,
    DeltaRun,
    archive_path,
)
from orchestrator.transfer.listing import fingerprint as listing_fingerprint
from orchestrator.transfer.listing import parse_listing, rebuild
from orchestrator.transfer.stream import Inflater, Spool
from storage.archives import ArchiveFacts, ArchiveWriter, node_dir_name, rotate
from storage.catalog import Catalog, Node, Target
from storage.errors import ArchiveTooLarge, InvalidArchive, StorageError
from storage.limits import format_size
from storage.stores.base import Store
from storage.tgz import ArchiveIndex, ArchiveReader, FramingWriter
from storage.verify import TarGzVerifier

log = logging.getLogger(__name__)

TAR_WARNINGS_EXIT = 1  # GNU tar: some files changed or vanished while read
LISTING_LIMIT = 256 << 20  # raw bytes of a node's listing we are willing to hold
INDEX_CACHE = 8  # indexes kept in memory (a 6,000-entry index is a few MB)
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
    transfer: str | None = None  # full | delta | none


def node_address(target: Target) -> NodeAddress:
    return NodeAddress(target.node.user, target.node.host, target.node.port)


class BackupEngine:
    """Runs backups. Thread-safe: many targets run at once, one run per target,
    at most ``per_node`` runs per node."""

    def __init__(self, catalog: Catalog, store: Store, pool: SSHPool, *,
                 per_node: int = 2, max_runs: int = 8, stderr_limit: int = 64 * 1024,
                 throttle: Callable[[int], None] | None = None,
                 use_pigz: bool = True, full_every: int = 0,
                 use_node_python: bool = True, delta: bool = True,
                 level: int | None = None, hooks: Hooks | None = None,
                 limits: RunLimits | None = None, spool_dir: str | None = None) -> None:
        self.catalog = catalog
        # Local scratch for a delta's fetched pieces: never the store (which
        # may be object storage). None: the system's temp dir.
        self.spool_dir = spool_dir
        self.limits = limits or RunLimits()
        self.hooks = hooks  # the targets' pre/post commands (orchestrator/hooks.py)
        self.store = store
        self.pool = pool
        self.per_node = per_node
        self.stderr_limit = stderr_limit
        self.throttle = throttle
        self.use_pigz = use_pigz
        # Every Nth backup of a target is a true full (0: only when needed).
        self.full_every = full_every
        # False: the node's python3 is never used (the coreutils path).
        self.use_node_python = use_node_python
        self.delta = delta
        self.level = level  # deflate level for the server (None: storage.tgz default)
        # The indexes of the newest archives this engine wrote, by file name:
        # the next delta of the target starts from it without re-reading it.
        self._indexes: OrderedDict[str, ArchiveIndex] = OrderedDict()
        # Scheduled and manual runs together: the global concurrency bound.
        self._run_slots = threading.BoundedSemaphore(max_runs)
        self._lock = threading.Lock()
        self._running: set[int] = set()
        self._wires: dict[int, tuple[int, _Payload]] = {}  # target -> its run's bytes
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

    def progress(self, target_id: int) -> tuple[int, int] | None:
        """(run id, bytes received so far) of the target's run in progress."""
        with self._lock:
            found = self._wires.get(target_id)
        return None if found is None else (found[0], found[1].so_far())

    def is_running(self, target_id: int) -> bool:
        with self._lock:
            return target_id in self._running

    def _target_lock(self, target_id: int) -> threading.Lock:
        with self._lock:
            return self._target_locks.setdefault(target_id, threading.Lock())

    def run(self, target_id: int, trigger: str = "schedule", *,
            queue: bool = False, scheduled_at: dt.datetime | None = None,
            full: bool = False) -> RunResult:
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
                return self._run(target, node, trigger, scheduled_at, full)
        finally:
            with self._lock:
                self._running.discard(target_id)
            lock.release()

    def _run(self, target: Target, node: NodeAddress, trigger: str,
             scheduled_at: dt.datetime | None, full: bool = False) -> RunResult:
        started = time.monotonic()
        run_id = self.catalog.start_run(target.id, trigger, scheduled_at)
        wire = _Payload()
        with self._lock:
            self._wires[target.id] = (run_id, wire)
        deadline = self.limits.deadline()
        try:
            with self.pool.session(node) as conn:
                result = self._backup(conn, target, run_id, wire, full, deadline)
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
        with self._lock:
            self._wires.pop(target.id, None)
        result = _with_duration(result, time.monotonic() - started)
        # A failure is logged once, at WARNING, with target, node and run id.
        level = logging.WARNING if result.status in ("failed", "interrupted") else logging.INFO
        log.log(level, "run %s target %s node %s path %s: %s bytes=%d duration=%.2fs%s",
                run_id, target.id, node, target.path, result.status, result.bytes_transferred,
                result.duration,
                f" error={result.error_code}: {result.message}" if result.error_code else "")
        return result

    def _backup(self, conn: Connection, target: Target, run_id: int, wire: _Payload,
                full: bool = False, deadline: Deadline | None = None) -> RunResult:
        options = self.hooks.options(target) if self.hooks is not None else None
        if options is None:
            return self._backup_tree(conn, target, run_id, wire, full, deadline)
        assert self.hooks is not None
        pre = self.hooks.pre(conn, target, options, run_id)  # before the fingerprint
        if pre is not None:
            wire.add(pre)
        try:
            return self._backup_tree(conn, target, run_id, wire, full, deadline)
        finally:
            # After the backup, also a failed one (a post command often undoes
            # the pre command), unless the connection itself is gone.
            if conn.alive:
                post = self.hooks.post(conn, target, options, run_id)
                if post is not None:
                    wire.add(post)

    def _backup_tree(self, conn: Connection, target: Target, run_id: int, wire: _Payload,
                     full: bool = False, deadline: Deadline | None = None) -> RunResult:
        address = str(conn.node)
        node = _Node(self, conn, target.path, wire, deadline)
        since = None if full else target.last_node_time
        # A backup that is certainly a full one (if the tree changed) asks the
        # scan for the whole listing: one exec less than scan, listing, tar.
        want_all = full or since is None or not target.last_fingerprint or not self.delta
        scan, section = node.reply(remote.scan_command(target.path), what="fingerprint",
                                   stdin=(b"all\n" if want_all else _since_line(since))
                                   + ("" if full else target.last_fingerprint or "").encode()
                                   + b"\n",
                                   head_lines=2)
        parsed = remote.parse_scan(scan.stdout)
        if parsed is None:
            raise RemoteCommandFailed(address, "fingerprint", scan.exit_status,
                                      "output is not a node time and a sha256 digest: "
                                      + escape_controls(
                                          scan.stdout[:80].decode("utf-8", "replace")))
        node_time, fingerprint, _ = parsed
        if fingerprint == target.last_fingerprint and not full:
            self.catalog.finish_unchanged(run_id, target.id, fingerprint, wire.total())
            return RunResult(run_id, target.id, "unchanged", wire.total(), transfer="none")

        node.pigz = self.use_pigz and conn.has_pigz(deadline)
        root = posixpath.basename(target.path)
        node_dir = node_dir_name(target.node.user, target.node.host, target.node.port)
        created_at = self.catalog.clock()
        why_full = self._why_full(target, full, since)
        prev = None
        if why_full is None:
            prev, why_full = self._previous(target)
        records: dict[bytes, bytes] | None = None
        if why_full is None:
            assert prev is not None
            records = self._records(node, target, prev[1], section, fingerprint)
            attempt = self._delta(node, target, run_id, root, records, prev, node_dir,
                                  created_at, node_time, fingerprint)
            if isinstance(attempt, str):
                why_full = attempt
            else:
                facts, warnings = attempt
                return self._commit(target, run_id, facts, fingerprint, wire, warnings,
                                    "delta", node_time)
        log.info("target %s: full backup (%s)", target.id, why_full)
        if records is None and want_all and isinstance(section, bytes) and section:
            try:
                records = parse_listing(section)
            except InvalidArchive as exc:
                log.warning("target %s: unusable listing in the scan (%s); fetching it "
                            "again", target.id, exc.message)
        if records is None:
            records = self._listing(node, target)
        facts, warnings = self._full(node, target, run_id, root, records, node_dir,
                                     created_at, node_time, fingerprint)
        return self._commit(target, run_id, facts, fingerprint, wire, warnings, "full",
                            node_time)

    def _remember(self, file_name: str, index: ArchiveIndex) -> None:
        with self._lock:
            self._indexes[file_name] = index
            while len(self._indexes) > INDEX_CACHE:
                self._indexes.popitem(last=False)

    def _why_full(self, target: Target, full: bool, since: str | None) -> str | None:
        if full:
            return "asked for"
        if not self.delta:
            return "delta transfer is off"
        if since is None or target.last_fingerprint is None:
            return "no previous backup to build on"
        if self.full_every and self.catalog.deltas_since_full(target.id) >= self.full_every - 1:
            return f"every {self.full_every}th backup is a full one"
        return None

    def _previous(self, target: Target) -> tuple[tuple[str, ArchiveIndex] | None, str | None]:
        """The newest retained archive and its index, if a delta can build on it."""
        retained = self.catalog.list_archives(target.id, retained_only=True)
        if not retained:
            return None, "no retained archive to build on"
        newest = retained[0]
        if newest["fingerprint"] != target.last_fingerprint:
            return None, "the newest archive is not the last backup"
        try:
            with self._lock:
                index = self._indexes.get(newest["file_name"])
            if index is None:
                index = self.store.load_index(newest["file_name"])
        except StorageError as exc:
            return None, f"the newest archive's index is unusable: {exc.message}"
        # An entry without a record (created between the listing and tar)
        # is simply fetched again; an index without any (rebuilt from its
        # archive) cannot say what changed.
        if not index.framed or not any(e.record is not None for e in index.entries):
            return None, "the newest archive's index has no listing records"
        return (newest["file_name"], index), None

    def _records(self, node: _Node, target: Target, prev: ArchiveIndex,
                 section: bytes | InvalidArchive,
                 fingerprint: str) -> dict[bytes, bytes]:
        """The node's current listing: the previous one plus the scan's changes
        when they hash to the node's fingerprint, else fetched whole."""
        try:
            old = {}
            skip = len(posixpath.basename(target.path)) + 1
            for e in prev.entries:
                if e.record is not None:
                    old[e.path[skip:].encode("utf-8", "surrogateescape")] = e.record
            if isinstance(section, InvalidArchive):
                raise section
            rebuilt = rebuild(old, section)
            if listing_fingerprint(rebuilt.values()) == fingerprint:
                return rebuilt
            log.info("target %s: the scan's changes do not add up to the node's "
                     "fingerprint; fetching the whole listing", target.id)
        except InvalidArchive as exc:
            log.warning("target %s: unusable scan section (%s); fetching the whole listing",
                        target.id, exc.message)
        return self._listing(node, target)

    def _listing(self, node: _Node, target: Target) -> dict[bytes, bytes]:
        _res, raw = node.reply(remote.listing_command(target.path), what="listing")
        if isinstance(raw, InvalidArchive):
            raise raw
        return parse_listing(raw)

    def _delta(self, node: _Node, target: Target, run_id: int, root: str,
               records: dict[bytes, bytes], prev: tuple[str, ArchiveIndex], node_dir: str,
               created_at: dt.datetime, node_time: str,
               fingerprint: str) -> tuple[ArchiveFacts, list[str]] | str:
        """A composed archive, or why a full is the better choice."""
        prev_file, prev_index = prev
        plan = DeltaPlan(root, records, prev_index)
        need, total = plan.wire_estimate()
        if total and need > FULL_FRACTION * total:
            return f"the delta would fetch {need} of {total} bytes"
        try:
            if not self.store.exists(prev_file):
                return "the previous archive is gone from the store"
        except StorageError as exc:
            return f"the previous archive cannot be read: {exc}"
        spool = Spool(self.spool_dir)
        try:
            reader = ArchiveReader(lambda off, n: self.store.read_range(prev_file, off, n),
                                   prev_index)
            run = DeltaRun(node, root, plan, reader, spool)
            run.refine()
            run.fetch([it for it in plan.items if it.kind == "fetch"])
            for attempt in (1, 2):
                with self.store.writer(node_dir, target.id, run_id, created_at) as writer:
                    index, bad, stats = run.compose(
                        self._capped(writer), self.level,
                        self._capped_copy(writer, prev_file))
                    if bad and attempt == 1:
                        # Changed while its pieces were read: fetch it whole.
                        for it in bad:
                            it.kind = "fetch"
                            it.pieces = []
                            it.refs = []
                        run.fetch(bad)
                        continue
                    run.check(index)
                    for it in bad:
                        run.warnings.append(f"{it.apath}: changed while the backup ran "
                                            "(kept as read)")
                    index.fingerprint, index.node_time = fingerprint, node_time
                    facts = writer.commit(index)
                    self._remember(facts.file_name, index)
                    log.info("target %s: delta %s", target.id, stats)
                    return facts, run.warnings
            raise AssertionError("unreachable")
        finally:
            spool.close()

    def _full(self, node: _Node, target: Target, run_id: int, root: str,
              records: dict[bytes, bytes], node_dir: str, created_at: dt.datetime,
              node_time: str, fingerprint: str) -> tuple[ArchiveFacts, list[str]]:
        """The node's tar stream, inflated in bounded steps, verified and
        re-framed into member-aligned gzip as it arrives."""
        verifier = TarGzVerifier(root, self.limits.archive)
        with self.store.writer(node_dir, target.id, run_id, created_at) as writer:
            # The archive writer hashes the archive as it writes: once is enough.
            framer = FramingWriter(self._capped(writer), level=self.level, hash_archive=False)

            def raw_out(raw: bytes) -> None:
                verifier.feed_raw(raw)
                framer.feed(raw)

            inflater = Inflater(raw_out, self.limits.archive)
            res = node.exec(remote.tar_command(target.path, pigz=node.pigz), what="tar",
                            sink=inflater.feed, ok=(0, TAR_WARNINGS_EXIT))
            if res.stdout_bytes == 0:
                raise RemoteCommandFailed(node.address, "tar", res.exit_status, "empty stream")
            # A stream cut short or escaping its root is never kept.
            inflater.finish()
            verifier.finish_raw()
            index = framer.finish()
            index.set_records({archive_path(root, rel): raw for rel, raw in records.items()})
            index.fingerprint, index.node_time = fingerprint, node_time
            facts = writer.commit(index)
            self._remember(facts.file_name, index)
        warnings = [res.stderr_text.strip()] if res.stderr_text.strip() else []
        return facts, warnings

    def _capped(self, writer: ArchiveWriter) -> Callable[[bytes], None]:
        """``writer.write`` refusing to grow the archive past --max-archive-size."""
        cap = self.limits.archive.max_archive_size

        def write(data: bytes) -> None:
            if cap and writer.size + len(data) > cap:
                raise ArchiveTooLarge(f"the archive grew past {format_size(cap)} "
                                      "(--max-archive-size); nothing was kept")
            writer.write(data)

        return write

    def _capped_copy(self, writer: ArchiveWriter,
                     source: str) -> Callable[[int, bytes], None]:
        """``writer.copy_range`` from the previous archive ``source``, under
        the same --max-archive-size as ``_capped``."""
        cap = self.limits.archive.max_archive_size

        def copy(offset: int, data: bytes) -> None:
            if cap and writer.size + len(data) > cap:
                raise ArchiveTooLarge(f"the archive grew past {format_size(cap)} "
                                      "(--max-archive-size); nothing was kept")
            writer.copy_range(source, offset, data)

        return copy

    def _commit(self, target: Target, run_id: int, facts: ArchiveFacts, fingerprint: str,
                wire: _Payload, warnings: list[str], transfer: str,
                node_time: str) -> RunResult:
        text = "\n".join(warnings) or None
        try:
            archive_id = self.catalog.commit_archive(
                run_id, target.id, created_at=facts.created_at, size=facts.size,
                sha256=facts.sha256, file_name=facts.file_name, fingerprint=fingerprint,
                bytes_transferred=wire.total(), warnings=text, transfer=transfer,
                node_time=node_time)
        except StorageError:
            self.store.delete(facts.file_name)  # never leave an unlisted archive behind
            raise
        try:
            rotate(self.catalog, self.store, target.id, target.keep)
        except StorageError as exc:  # the new archive is safe; rotation retries next run
            log.warning("rotation of target %s failed: %s", target.id, exc.message)
        return RunResult(run_id, target.id, "success", wire.total(), archive_id=archive_id,
                         warnings=text, transfer=transfer)

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


def _since_line(since: str | None) -> bytes:
    """The scan's stdin: changes since one second before the previous node
    time (a ctime in the same second as the last scan is not lost)."""
    if not since:
        return b"\n"
    whole, _, frac = since.partition(".")
    return f"{max(int(whole) - 1, 0)}.{frac or '0'}\n".encode()


class _Node:
    """One run's commands on its node: stdin, byte counting, throttling and
    the exit-status checks in one place (transfer.delta.NodeIO)."""

    def __init__(self, engine: BackupEngine, conn: Connection, path: str,
                 wire: _Payload, deadline: Deadline | None = None) -> None:
        self.engine = engine
        self.deadline = deadline
        self.conn = conn
        self.path = path
        self.wire = wire
        self.address = str(conn.node)
        self.pigz = False
        self._python: bool | None = None

    @property
    def python(self) -> bool:
        if self._python is None:
            self._python = self.engine.use_node_python and self.conn.has_python()
        return self._python

    def exec(self, command: str, *, what: str, stdin: bytes | None = None,
             sink: Callable[[bytes], None] | None = None,
             ok: tuple[int, ...] = (0,)) -> ExecResult:
        throttle = self.engine.throttle
        if sink is not None and throttle is not None:
            inner = sink

            def sink(data: bytes) -> None:
                throttle(len(data))
                inner(data)

        if sink is not None:  # bytes so far, for progress while the transfer goes on
            # Counted as they arrive, before the --bwlimit pause: a window's
            # worth can arrive at once and then wait for the bucket.
            wire, counted = self.wire, sink

            def sink(data: bytes) -> None:
                wire.live += len(data)
                counted(data)

        res = self.wire.add(self.conn.exec(command, sink=sink, what=what, stdin=stdin,
                                           stderr_limit=self.engine.stderr_limit,
                                           deadline=self.deadline))
        _check_status(res.exit_status, res.stderr_text, self.address, self.path, what, ok=ok)
        return res


    def reply(self, command: str, *, what: str, stdin: bytes | None = None,
              head_lines: int = 0) -> tuple[ExecResult, bytes | InvalidArchive]:
        """A command that prints ``head_lines`` short lines, then an optional
        gzip section (a scan, a listing). The lines are capped like any
        one-line answer (--max-command-output); the section is inflated as it
        arrives, in bounded steps under the archive's size and ratio caps, and
        held raw up to LISTING_LIMIT. Returns the result with the lines as its
        stdout, and the raw section, or why it was unusable."""
        cap = self.engine.limits.command_output
        head = bytearray()
        lines: list[bytes] = []
        raw = bytearray()
        state: dict[str, object] = {"body": head_lines == 0, "fed": False, "bad": None}

        def take(data: bytes) -> None:
            raw.extend(data)
            if len(raw) > LISTING_LIMIT:
                raise InvalidArchive(f"the node's {what} inflates to more than "
                                     f"{format_size(LISTING_LIMIT)}")

        inflater = Inflater(take, self.engine.limits.archive)

        def sink(data: bytes) -> None:
            if not state["body"]:
                head.extend(data)
                while len(lines) < head_lines and b"\n" in head:
                    line, _, rest = bytes(head).partition(b"\n")
                    lines.append(line)
                    head[:] = rest
                if len(lines) < head_lines:
                    if cap and len(head) > cap:
                        raise OutputTooLarge(self.address, what, cap)
                    return
                state["body"] = True
                data = bytes(head)
                head.clear()
            if data and state["bad"] is None:
                state["fed"] = True
                try:
                    inflater.feed(data)
                except InvalidArchive as exc:  # drained, then reported
                    state["bad"] = exc

        res = self.exec(command, what=what, stdin=stdin, sink=sink)
        res.stdout = b"".join(x + b"\n" for x in lines) + bytes(head)
        if state["bad"] is None and state["fed"]:
            try:
                inflater.finish()
            except InvalidArchive as exc:
                state["bad"] = exc
        bad = state["bad"]
        return res, bad if isinstance(bad, InvalidArchive) else bytes(raw)


class _Payload:
    """Bytes this run received from the node (stdout and stderr of its
    commands), exact even when other runs share the connection."""

    def __init__(self) -> None:
        self._total = 0
        self.live = 0  # streamed stdout of the command still running

    def add(self, res: ExecResult) -> ExecResult:
        self._total += res.stdout_bytes + res.stderr_bytes
        self.live = 0
        return res

    def total(self) -> int:
        return self._total

    def so_far(self) -> int:
        """Bytes received until now, for progress (read from other threads)."""
        return self._total + self.live


def _with_duration(r: RunResult, seconds: float) -> RunResult:
    return RunResult(**{**r.__dict__, "duration": seconds})
