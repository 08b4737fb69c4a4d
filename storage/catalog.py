"""The catalog: nodes, targets, archives and the run log (SQLAlchemy Core).

The catalog is the source of truth for what is registered and what is held.
SQL stays in SQLAlchemy Core and runs on SQLite (the default) and PostgreSQL;
what differs between the two lives in ``storage/dialect.py`` alone. The
schema is created and upgraded by the Alembic revisions in
``storage/migrations/``: a change to the tables below needs a new revision.
Several processes may write one catalog: a read-modify-write locks the rows
it reads (``with_for_update``), an insert that may race uses ON CONFLICT.

Run rows are never deleted. Archive rows are never deleted either: rotation
sets ``deleted_at`` so ``backups`` can list every archive ever made.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from storage import dialect, migrations
from storage.errors import CatalogError, CatalogUnavailable, NotFound, TargetExists

TRANSFERS = ("full", "delta", "none")

RUN_STATUSES = ("running", "success", "unchanged", "failed", "interrupted")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class UTCDateTime(sa.types.TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, on every dialect."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the catalog")
        return value.astimezone(dt.UTC).replace(tzinfo=None)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        return None if value is None else value.replace(tzinfo=dt.UTC)


metadata = sa.MetaData()

# The hand-rolled version table of releases 1 and 2, kept only as a fence:
# the Alembic baseline sets it to a number those releases refuse to open.
schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, nullable=False),
)

nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("user", sa.String(64), nullable=False),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("port", sa.Integer, nullable=False),
    sa.Column("host_key_type", sa.String(64)),
    sa.Column("host_key_b64", sa.Text),
    sa.Column("host_key_fingerprint", sa.String(128)),
    # NULL: never contacted; True/False: outcome of the last contact.
    sa.Column("reachable", sa.Boolean),
    sa.Column("last_error", sa.Text),
    # The code of ``last_error`` (e.g. host_key_mismatch), so clients can name it.
    sa.Column("last_error_code", sa.String(64)),
    sa.Column("last_seen_at", UTCDateTime),
    sa.Column("unreachable_since", UTCDateTime),
    sa.Column("probe_attempts", sa.Integer, nullable=False, default=0),
    sa.Column("next_probe_at", UTCDateTime),
    sa.Column("created_at", UTCDateTime, nullable=False),
    # Set by `nodes --forget`: hidden from listings; its history stays.
    sa.Column("forgotten_at", UTCDateTime),
    sa.UniqueConstraint("user", "host", "port", name="uq_nodes_address"),
)

targets = sa.Table(
    "targets",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("node_id", sa.Integer, sa.ForeignKey("nodes.id"), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("every_minutes", sa.Integer, nullable=False),
    sa.Column("keep", sa.Integer, nullable=False, default=10),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("unregistered_at", UTCDateTime),
    # Fingerprint of the tree as of the newest committed archive.
    sa.Column("last_fingerprint", sa.String(64)),
    # Retry state: consecutive failed attempts since the last good run.
    sa.Column("failures", sa.Integer, nullable=False, default=0),
    sa.Column("next_retry_at", UTCDateTime),
    # The newest finished run, kept here so listing 10,000 targets does not
    # scan the (never pruned) run log.
    sa.Column("last_run_id", sa.Integer),
    # The node's clock when the newest archive's listing was taken: the next
    # scan asks for entries changed since then (orchestrator/transfer).
    sa.Column("last_node_time", sa.String(32)),
)
# One active registration per (node, path); unregistered rows stay for history.
sa.Index(
    "uq_targets_active",
    targets.c.node_id,
    targets.c.path,
    unique=True,
    sqlite_where=targets.c.unregistered_at.is_(None),
    postgresql_where=targets.c.unregistered_at.is_(None),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), nullable=False, index=True),
    # When the scheduler meant the run to start (NULL for manual runs); the
    # difference to started_at is the scheduler's start delay.
    sa.Column("scheduled_at", UTCDateTime),
    sa.Column("started_at", UTCDateTime, nullable=False),
    sa.Column("finished_at", UTCDateTime),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(16), nullable=False),
    sa.Column("bytes_transferred", sa.BigInteger, nullable=False, default=0),
    sa.Column("archive_id", sa.Integer),
    sa.Column("error_code", sa.String(64)),
    sa.Column("message", sa.Text),
    sa.Column("warnings", sa.Text),
    sa.Column("fingerprint", sa.String(64)),
    # How the run moved data: full | delta | none (unchanged); NULL when failed.
    sa.Column("transfer", sa.String(8)),
)
sa.Index("ix_runs_status", runs.c.status)

archives = sa.Table(
    "archives",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), nullable=False, index=True),
    sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("file_name", sa.Text, nullable=False),
    sa.Column("fingerprint", sa.String(64)),
    sa.Column("deleted_at", UTCDateTime),
    # Why the file went: 'rotated' (keep) or 'purged' (unregister --purge).
    sa.Column("deleted_reason", sa.String(16)),
    # The last re-read of the stored file (backhaul verify / scrub):
    # verify_status 'ok' or 'corrupt' (NULL: never verified).
    sa.Column("verified_at", UTCDateTime),
    sa.Column("verify_status", sa.String(16)),
    sa.Column("verify_error", sa.Text),
    # A scrubber's lease on this archive (claim_scrub): others pass it by
    # until the check is recorded or the lease runs out (a crashed scrubber).
    sa.Column("scrub_claimed_until", UTCDateTime),
)
sa.Index("ix_archives_retained", archives.c.target_id,
         sqlite_where=archives.c.deleted_at.is_(None),
         postgresql_where=archives.c.deleted_at.is_(None))

# Per-target hooks and monitoring, set at registration (later by edit). A table
# of its own rather than new target columns: an existing catalog gains it from
# create_all, without a migration. The commands are user text stored as bound
# parameters; remote.py alone quotes them for the node's shell.
target_options = sa.Table(
    "target_options",
    metadata,
    sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), primary_key=True),
    sa.Column("pre_command", sa.Text),
    sa.Column("post_command", sa.Text),
    sa.Column("pre_optional", sa.Boolean, nullable=False, default=False),
    sa.Column("ping_url", sa.Text),
)

# One row: how many writes changed the schedule (a target added, its interval
# edited, or unregistered); the leader re-reads the targets only when it moved
# (Catalog.schedule_changes; revision 0005).
target_changes = sa.Table(
    "target_changes",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("counter", sa.BigInteger, nullable=False),
)

# The metrics scrape counts runs per (target, status) and finds each target's
# newest good run: an index answers both without reading the run rows.
ix_runs_target_status = sa.Index("ix_runs_target_status", runs.c.target_id, runs.c.status,
                                 runs.c.id)


@dataclass(frozen=True)
class TargetOptions:
    pre_command: str | None = None
    post_command: str | None = None
    pre_optional: bool = False
    ping_url: str | None = None


@dataclass(frozen=True)
class Node:
    id: int
    user: str
    host: str
    port: int
    host_key_type: str | None
    host_key_b64: str | None
    host_key_fingerprint: str | None
    reachable: bool | None
    last_error: str | None
    last_seen_at: dt.datetime | None
    unreachable_since: dt.datetime | None
    probe_attempts: int
    next_probe_at: dt.datetime | None
    created_at: dt.datetime
    last_error_code: str | None = None
    forgotten_at: dt.datetime | None = None

    @property
    def address(self) -> str:
        return format_address(self.user, self.host, self.port)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.user, self.host, self.port)


@dataclass(frozen=True)
class Target:
    id: int
    node: Node
    path: str
    every_minutes: int
    keep: int
    created_at: dt.datetime
    unregistered_at: dt.datetime | None
    last_fingerprint: str | None
    failures: int
    next_retry_at: dt.datetime | None
    last_node_time: str | None = None

    @property
    def active(self) -> bool:
        return self.unregistered_at is None


def format_address(user: str, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{user}@{shown}:{port}"


def _row(r: Any) -> dict[str, Any]:
    return dict(r._mapping)


def _node(m: dict[str, Any], prefix: str = "") -> Node:
    return Node(**{f: m[prefix + f] for f in Node.__dataclass_fields__})


_NODE_COLS = [c.label(f"n_{c.name}") for c in nodes.c]


def _filter_targets(q: sa.Select, *, active_only: bool, node_id: int | None = None,
                    host: str | None = None, port: int | None = None, user: str | None = None,
                    path: str | None = None) -> sa.Select:
    """The filters of ``list_targets`` on a query that joins targets and nodes."""
    if active_only:
        q = q.where(targets.c.unregistered_at.is_(None))
    if node_id is not None:
        q = q.where(targets.c.node_id == node_id)
    if host is not None:
        q = q.where(nodes.c.host == host)
    if port is not None:
        q = q.where(nodes.c.port == port)
    if user is not None:
        q = q.where(nodes.c.user == user)
    if path is not None:
        q = q.where(targets.c.path == path)
    return q


# Built once: a registration runs it each time (building and hashing the
# statement anew cost more CPU than running it).
_NODE_AND_PATH = (
    sa.select(nodes, targets.c.id.label("t_id"))
    .outerjoin(targets, sa.and_(targets.c.node_id == nodes.c.id,
                                targets.c.path == sa.bindparam("path"),
                                targets.c.unregistered_at.is_(None)))
    .where(nodes.c.user == sa.bindparam("user"), nodes.c.host == sa.bindparam("host"),
           nodes.c.port == sa.bindparam("port"))
    .order_by(nodes.c.id, targets.c.id).limit(1))
_LOCK_NODE = sa.select(nodes.c.id).where(nodes.c.id == sa.bindparam("node_id")).with_for_update()
_ACTIVE_AT_PATH = sa.select(targets.c.id).where(targets.c.node_id == sa.bindparam("node_id"),
                                                targets.c.path == sa.bindparam("path"),
                                                targets.c.unregistered_at.is_(None))
_INSERT_TARGET = targets.insert()
_TARGET_BY_ID = (sa.select(targets, *_NODE_COLS).join(nodes, nodes.c.id == targets.c.node_id)
                 .where(targets.c.id == sa.bindparam("target_id")))


def _schedule_changed(conn: Connection) -> None:
    """Count a change of the schedule in the writer's transaction: the last
    statement of it, so the counter's row lock is held only until the commit
    and taken after any other lock (no lock-order cycle)."""
    conn.execute(_BUMP_SCHEDULE)


_BUMP_SCHEDULE = (target_changes.update().where(target_changes.c.id == 1)
                  .values(counter=target_changes.c.counter + 1))


class Catalog:
    """All reads and writes of the catalog database.

    Thread-safe: each call takes its own connection from the engine's pool.
    """

    def __init__(self, url: str | Path, *, busy_timeout: float = 30.0,
                 clock: Callable[[], dt.datetime] = utcnow, migrate: bool = True) -> None:
        """Open the catalog at ``url`` (a SQLite file path or a database URL)
        and, unless ``migrate`` is False, upgrade its schema to this code's.
        Raises ``CatalogUnavailable`` when the database cannot be used and
        ``CatalogTooNew`` when a newer backhaul upgraded it."""
        self.url = dialect.normalise_url(url)
        self.clock = clock
        try:
            self.engine: Engine = dialect.create_engine(self.url, busy_timeout=busy_timeout)
            # Reads take no write lock: WAL lets them run beside a writer.
            self.reader: Engine = (
                dialect.create_engine(self.url, busy_timeout=busy_timeout, immediate=False)
                if self.engine.dialect.name == "sqlite" else self.engine)
            dialect.check_connection(self.engine)
        except dialect.DatabaseUnavailable as exc:
            raise CatalogUnavailable(exc.message) from None
        if migrate:
            self.upgrade()

    # -- plumbing ----------------------------------------------------------

    @contextmanager
    def _tx(self, write: bool = True) -> Iterator[Connection]:
        try:
            with (self.engine if write else self.reader).begin() as conn:
                yield conn
        except (TargetExists, NotFound):
            raise
        except SQLAlchemyError as exc:
            raise CatalogError(f"catalog database error: {exc.__class__.__name__}: "
                               f"{getattr(exc, 'orig', exc)}") from exc

    def upgrade(self) -> tuple[str | None, str]:
        """Create or upgrade the schema (Alembic): (revision before, revision now)."""
        try:
            return migrations.upgrade(self.engine)
        except CatalogError:
            self.close()
            raise
        except SQLAlchemyError as exc:
            self.close()
            raise CatalogError(f"catalog migration failed: {dialect.describe(exc)}") from exc

    def size_bytes(self) -> int:
        """What the catalog database takes on disk (the metrics report it)."""
        try:
            return dialect.database_size(self.engine)
        except (OSError, SQLAlchemyError) as exc:
            raise CatalogError(f"cannot measure the catalog: {exc}") from exc

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    # -- nodes -------------------------------------------------------------

    def ensure_node(self, user: str, host: str, port: int) -> Node:
        this = sa.select(nodes).where(nodes.c.user == user, nodes.c.host == host,
                                      nodes.c.port == port).with_for_update()
        with self._tx() as conn:
            found = conn.execute(this).first()
            if found is None:
                # Another process may insert the same node meanwhile: then ours
                # does nothing and the select below finds theirs.
                conn.execute(dialect.insert_ignore(nodes, dict(
                    user=user, host=host, port=port, probe_attempts=0,
                    created_at=self.clock()), conn.dialect.name))
                found = conn.execute(this).one()
            elif found.forgotten_at is not None:  # registered again: it is back
                conn.execute(nodes.update().where(nodes.c.id == found.id)
                             .values(forgotten_at=None))
                found = conn.execute(sa.select(nodes).where(nodes.c.id == found.id)).one()
            return _node(_row(found))

    def get_node(self, node_id: int) -> Node:
        with self._tx(write=False) as conn:
            found = conn.execute(sa.select(nodes).where(nodes.c.id == node_id)).first()
        if found is None:
            raise NotFound("node", node_id)
        return _node(_row(found))

    def find_node(self, user: str | None, host: str, port: int) -> list[Node]:
        q = sa.select(nodes).where(nodes.c.host == host, nodes.c.port == port)
        if user is not None:
            q = q.where(nodes.c.user == user)
        with self._tx(write=False) as conn:
            return [_node(_row(r)) for r in conn.execute(q.order_by(nodes.c.id))]

    def find_node_for_path(self, user: str, host: str, port: int,
                           path: str) -> tuple[Node | None, int | None]:
        """Registration's one read: the node ``user@host:port`` (None when
        unknown) and the id of its active target at ``path`` (None: free)."""
        with self._tx(write=False) as conn:
            found = conn.execute(_NODE_AND_PATH, {"user": user, "host": host, "port": port,
                                                  "path": path}).first()
        if found is None:
            return None, None
        m = _row(found)
        return _node(m), m["t_id"]

    def list_nodes(self, *, include_forgotten: bool = False) -> list[Node]:
        q = sa.select(nodes)
        if not include_forgotten:
            q = q.where(nodes.c.forgotten_at.is_(None))
        with self._tx(write=False) as conn:
            return [_node(_row(r)) for r in conn.execute(q.order_by(nodes.c.id))]

    def forget_node(self, node_id: int) -> Node:
        """Hide a node from listings (``nodes --forget``). Its targets, runs and
        archives stay: history is never deleted. Registering it again brings it back."""
        with self._tx() as conn:
            conn.execute(nodes.update().where(nodes.c.id == node_id)
                         .values(forgotten_at=self.clock()))
        return self.get_node(node_id)

    def pin_host_key(self, node_id: int, key_type: str, key_b64: str, fingerprint: str) -> bool:
        """Pin the key if none is pinned yet. Returns True when this call pinned it."""
        with self._tx() as conn:
            res = conn.execute(
                nodes.update()
                .where(nodes.c.id == node_id, nodes.c.host_key_b64.is_(None))
                .values(host_key_type=key_type, host_key_b64=key_b64,
                        host_key_fingerprint=fingerprint)
            )
            return res.rowcount == 1

    def expect_host_key(self, node_id: int, fingerprint: str | None) -> None:
        """Forget the pinned key; with ``fingerprint``, only that key will be accepted."""
        with self._tx() as conn:
            conn.execute(nodes.update().where(nodes.c.id == node_id).values(
                host_key_type=None, host_key_b64=None, host_key_fingerprint=fingerprint))

    def set_host_key_expected(self, node_id: int, fingerprint: str) -> None:
        """Record an expected fingerprint given at registration (if none is pinned)."""
        with self._tx() as conn:
            conn.execute(nodes.update().where(nodes.c.id == node_id,
                                              nodes.c.host_key_fingerprint.is_(None))
                         .values(host_key_fingerprint=fingerprint))

    def node_reachable(self, node_id: int) -> None:
        with self._tx() as conn:
            conn.execute(nodes.update().where(nodes.c.id == node_id).values(
                reachable=True, last_error=None, last_error_code=None,
                last_seen_at=self.clock(),
                unreachable_since=None, probe_attempts=0, next_probe_at=None))

    def node_error(self, node_id: int, code: str, error: str) -> None:
        """The node answered but refused us (e.g. a changed host key): say so in
        ``nodes`` without calling it unreachable (that would start probes)."""
        with self._tx() as conn:
            conn.execute(nodes.update().where(nodes.c.id == node_id).values(
                last_error=error, last_error_code=code))

    def node_unreachable(self, node_id: int, error: str,
                         next_probe_at: dt.datetime | None = None,
                         probe_attempts: int | None = None, code: str | None = None) -> Node:
        now = self.clock()
        with self._tx() as conn:
            values: dict[str, Any] = {
                "reachable": False, "last_error": error, "last_error_code": code,
                "unreachable_since": sa.func.coalesce(nodes.c.unreachable_since, now),
            }
            if next_probe_at is not None:
                values["next_probe_at"] = next_probe_at
            if probe_attempts is not None:
                values["probe_attempts"] = probe_attempts
            conn.execute(nodes.update().where(nodes.c.id == node_id).values(**values))
            return _node(_row(conn.execute(sa.select(nodes).where(nodes.c.id == node_id)).one()))

    def delete_node_if_unused(self, node_id: int) -> bool:
        """Remove a node row no target ever used (a refused first registration)."""
        with self._tx() as conn:
            # add_target locks the node row too: no target can slip in between.
            conn.execute(sa.select(nodes.c.id).where(nodes.c.id == node_id).with_for_update())
            used = conn.execute(sa.select(targets.c.id).where(targets.c.node_id == node_id)
                                .limit(1)).first()
            if used is not None:
                return False
            conn.execute(nodes.delete().where(nodes.c.id == node_id))
            return True

    # -- targets -----------------------------------------------------------

    def add_target(self, node_id: int, path: str, every_minutes: int, keep: int, *,
                   failures: int = 0, options: dict[str, Any] | None = None) -> Target:
        """A new active target. ``failures`` (a node found down at registration)
        and ``options`` (see ``set_target_options``) go in the same transaction:
        one commit per registration, not three."""
        unknown = set(options or {}) - set(TargetOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown target options: {sorted(unknown)}")
        with self._tx() as conn:
            # Registrations on one node take turns (the node row's lock), so a
            # concurrent twin is seen by the check below, not by a constraint.
            if conn.execute(_LOCK_NODE, {"node_id": node_id}).first() is None:
                raise NotFound("node", node_id)
            existing = conn.execute(_ACTIVE_AT_PATH, {"node_id": node_id, "path": path}).scalar()
            if existing is not None:
                node = _node(_row(conn.execute(
                    sa.select(nodes).where(nodes.c.id == node_id)).one()))
                raise TargetExists(node.address, path, existing)
            try:
                tid = conn.execute(_INSERT_TARGET, {
                    "node_id": node_id, "path": path, "every_minutes": every_minutes,
                    "keep": keep, "created_at": self.clock(), "failures": failures,
                }).inserted_primary_key[0]
            except IntegrityError as exc:  # lost a race with a concurrent insert
                raise TargetExists(str(node_id), path, -1) from exc
            if options:
                conn.execute(target_options.insert().values(
                    target_id=tid, **{**TargetOptions().__dict__, **options}))
            _schedule_changed(conn)
            # read back in the same transaction (not a second one)
            found = conn.execute(_TARGET_BY_ID, {"target_id": tid}).one()
        return self._target(_row(found))

    def _target_query(self) -> sa.Select:
        return sa.select(targets, *_NODE_COLS).join(nodes, nodes.c.id == targets.c.node_id)

    @staticmethod
    def _target(m: dict[str, Any]) -> Target:
        return Target(
            id=m["id"], node=_node(m, "n_"), path=m["path"],
            every_minutes=m["every_minutes"], keep=m["keep"], created_at=m["created_at"],
            unregistered_at=m["unregistered_at"], last_fingerprint=m["last_fingerprint"],
            failures=m["failures"], next_retry_at=m["next_retry_at"],
            last_node_time=m.get("last_node_time"))

    def get_target(self, target_id: int) -> Target:
        with self._tx(write=False) as conn:
            found = conn.execute(self._target_query().where(targets.c.id == target_id)).first()
        if found is None:
            raise NotFound("target", target_id)
        return self._target(_row(found))

    def list_targets(self, *, active_only: bool = True, node_id: int | None = None,
                     host: str | None = None, port: int | None = None,
                     user: str | None = None, path: str | None = None,
                     limit: int | None = None, offset: int = 0) -> list[Target]:
        """Targets in id order; ``limit``/``offset`` give one page of them."""
        # Targets and their (few) nodes are read apart and joined here: one
        # Node per node rather than one per target row keeps 10,000 cheap.
        q = _filter_targets(sa.select(targets).join(nodes, nodes.c.id == targets.c.node_id),
                            active_only=active_only, node_id=node_id, host=host, port=port,
                            user=user, path=path).order_by(targets.c.id)
        if limit is not None:
            q = q.limit(limit).offset(offset)
        with self._tx(write=False) as conn:
            rows = conn.execute(q).all()
            wanted = {r.node_id for r in rows}
            node_of = {n["id"]: _node(n) for n in (
                _row(r) for r in conn.execute(sa.select(nodes).where(nodes.c.id.in_(wanted))))}
        return [Target(id=r.id, node=node_of[r.node_id], path=r.path,
                       every_minutes=r.every_minutes, keep=r.keep, created_at=r.created_at,
                       unregistered_at=r.unregistered_at, last_fingerprint=r.last_fingerprint,
                       failures=r.failures, next_retry_at=r.next_retry_at) for r in rows]

    def schedule_changes(self) -> int:
        """The count of writes that changed the schedule so far (a registration,
        an interval edit, an unregistration), one small read. Read it *before*
        ``scheduled_targets``: a change committed after this read moves the
        counter past the value kept, so the next check sees it, whatever the
        order in which concurrent writers committed (they take turns on the
        counter's row and commit in its order)."""
        with self._tx(write=False) as conn:
            return int(conn.execute(sa.select(target_changes.c.counter)
                                    .where(target_changes.c.id == 1)).scalar_one())

    def scheduled_targets(self) -> dict[int, int]:
        """``{id: every_minutes}`` of the active targets: what the schedule
        holds, without the nodes or the other columns ``list_targets`` reads."""
        with self._tx(write=False) as conn:
            return {tid: every for tid, every in conn.execute(
                sa.select(targets.c.id, targets.c.every_minutes)
                .where(targets.c.unregistered_at.is_(None)))}

    def target_summaries(self, target_ids: list[int] | None = None) -> dict[int, dict[str, Any]]:
        """Last run and kept archives of many targets in one query (not one per target)."""
        kept_q = (sa.select(archives.c.target_id,
                            sa.func.count().label("archives_kept"),
                            # PostgreSQL's sum of a bigint is a numeric: keep it an int
                            sa.cast(sa.func.coalesce(sa.func.sum(archives.c.size), 0),
                                    sa.BigInteger).label("bytes_kept"))
                  .where(archives.c.deleted_at.is_(None)))
        if target_ids is not None:
            kept_q = kept_q.where(archives.c.target_id.in_(target_ids))
        kept = kept_q.group_by(archives.c.target_id).subquery()
        q = (sa.select(targets.c.id, runs.c.started_at, runs.c.finished_at, runs.c.status,
                       runs.c.error_code, kept.c.archives_kept, kept.c.bytes_kept)
             .select_from(targets)
             .outerjoin(runs, runs.c.id == targets.c.last_run_id)
             .outerjoin(kept, kept.c.target_id == targets.c.id))
        if target_ids is not None:
            q = q.where(targets.c.id.in_(target_ids))
        out: dict[int, dict[str, Any]] = {}
        with self._tx(write=False) as conn:
            for r in conn.execute(q):
                out[r.id] = {
                    "last_run_at": r.started_at, "last_finished_at": r.finished_at,
                    "last_status": r.status, "last_error_code": r.error_code,
                    "archives_kept": r.archives_kept or 0, "bytes_kept": r.bytes_kept or 0,
                }
        return out

    def target_counts(self, *, active_only: bool = True, host: str | None = None,
                      port: int | None = None, user: str | None = None,
                      path: str | None = None) -> dict[str, Any]:
        """What a page of ``list_targets`` leaves out, in one aggregate query:
        ``total`` targets matching the filters, how many by last run status
        (``never`` for none yet) and how many sit on an unreachable node."""
        last = sa.func.coalesce(runs.c.status, "never")
        q = _filter_targets(
            sa.select(last.label("status"), nodes.c.reachable, sa.func.count().label("n"))
            .select_from(targets).join(nodes, nodes.c.id == targets.c.node_id)
            .outerjoin(runs, runs.c.id == targets.c.last_run_id),
            active_only=active_only, host=host, port=port, user=user, path=path,
        ).group_by(last, nodes.c.reachable)
        by_status: dict[str, int] = {}
        unreachable = 0
        with self._tx(write=False) as conn:
            for r in conn.execute(q):
                by_status[r.status] = by_status.get(r.status, 0) + r.n
                if r.reachable is False:
                    unreachable += r.n
        return {"total": sum(by_status.values()), "by_status": by_status,
                "node_unreachable": unreachable}

    def set_target_options(self, target_id: int, **changes: Any) -> TargetOptions:
        """Change some of a target's options (``pre_command``, ``post_command``,
        ``pre_optional``, ``ping_url``); the others keep their values."""
        unknown = set(changes) - set(TargetOptions.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown target options: {sorted(unknown)}")
        with self._tx() as conn:
            # The target row's lock makes concurrent edits of its options take turns.
            if conn.execute(sa.select(targets.c.id).where(targets.c.id == target_id)
                            .with_for_update()).first() is None:
                raise NotFound("target", target_id)
            row = conn.execute(sa.select(target_options)
                               .where(target_options.c.target_id == target_id)).first()
            if row is None:
                values = {**TargetOptions().__dict__, **changes}
                conn.execute(target_options.insert().values(target_id=target_id, **values))
            elif changes:
                conn.execute(target_options.update()
                             .where(target_options.c.target_id == target_id).values(**changes))
        return self.target_options([target_id]).get(target_id, TargetOptions())

    def target_options(self, target_ids: list[int] | None = None) -> dict[int, TargetOptions]:
        """Options of the given targets (all when None); a target without a row
        has the defaults and is left out."""
        q = sa.select(target_options)
        if target_ids is not None:
            q = q.where(target_options.c.target_id.in_(target_ids))
        with self._tx(write=False) as conn:
            return {r.target_id: TargetOptions(r.pre_command, r.post_command,
                                               bool(r.pre_optional), r.ping_url)
                    for r in conn.execute(q)}

    def unregister_target(self, target_id: int) -> Target:
        with self._tx() as conn:
            res = conn.execute(targets.update().where(targets.c.id == target_id,
                                                      targets.c.unregistered_at.is_(None))
                               .values(unregistered_at=self.clock(), next_retry_at=None))
            if res.rowcount == 1:
                _schedule_changed(conn)
        if res.rowcount != 1:
            self.get_target(target_id)  # raises NotFound when it does not exist
        return self.get_target(target_id)

    def record_failure(self, target_id: int, next_retry_at: dt.datetime | None) -> int:
        """Count one more failed attempt; returns the new count."""
        with self._tx() as conn:
            conn.execute(targets.update().where(targets.c.id == target_id).values(
                failures=targets.c.failures + 1, next_retry_at=next_retry_at))
            return conn.execute(sa.select(targets.c.failures)
                                .where(targets.c.id == target_id)).scalar_one()

    def set_next_retry(self, target_id: int, next_retry_at: dt.datetime | None) -> None:
        with self._tx() as conn:
            conn.execute(targets.update().where(targets.c.id == target_id)
                         .values(next_retry_at=next_retry_at))

    def overdue_targets(self, node_id: int) -> list[Target]:
        """Active targets of a node whose latest attempt failed (they wait for the node)."""
        with self._tx(write=False) as conn:
            rows = conn.execute(self._target_query().where(
                targets.c.node_id == node_id, targets.c.unregistered_at.is_(None),
                targets.c.failures > 0).order_by(targets.c.id))
            return [self._target(_row(r)) for r in rows]

    # -- runs --------------------------------------------------------------

    def start_run(self, target_id: int, trigger: str,
                  scheduled_at: dt.datetime | None = None) -> int:
        with self._tx() as conn:
            return conn.execute(runs.insert().values(
                target_id=target_id, started_at=self.clock(), scheduled_at=scheduled_at,
                status="running",
                trigger=trigger, bytes_transferred=0)).inserted_primary_key[0]

    def finish_unchanged(self, run_id: int, target_id: int, fingerprint: str,
                         bytes_transferred: int) -> None:
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(
                status="unchanged", finished_at=self.clock(), fingerprint=fingerprint,
                bytes_transferred=bytes_transferred, transfer="none"))
            conn.execute(targets.update().where(targets.c.id == target_id)
                         .values(failures=0, next_retry_at=None, last_run_id=run_id))

    def fail_run(self, run_id: int, code: str, message: str, *, bytes_transferred: int = 0,
                 warnings: str | None = None, status: str = "failed") -> None:
        assert status in ("failed", "interrupted")
        with self._tx() as conn:
            conn.execute(runs.update().where(runs.c.id == run_id).values(
                status=status, finished_at=self.clock(), error_code=code, message=message,
                bytes_transferred=bytes_transferred, warnings=warnings))
            conn.execute(targets.update().where(
                targets.c.id == sa.select(runs.c.target_id).where(runs.c.id == run_id)
                .scalar_subquery()).values(last_run_id=run_id))

    def commit_archive(self, run_id: int, target_id: int, *, created_at: dt.datetime,
                       size: int, sha256: str, file_name: str, fingerprint: str,
                       bytes_transferred: int, warnings: str | None,
                       transfer: str = "full", node_time: str | None = None) -> int:
        """Archive row + run row + target fingerprint in one transaction."""
        with self._tx() as conn:
            aid = conn.execute(archives.insert().values(
                target_id=target_id, run_id=run_id, created_at=created_at, size=size,
                sha256=sha256, file_name=file_name, fingerprint=fingerprint)
            ).inserted_primary_key[0]
            conn.execute(runs.update().where(runs.c.id == run_id).values(
                status="success", finished_at=self.clock(), archive_id=aid,
                fingerprint=fingerprint, bytes_transferred=bytes_transferred,
                warnings=warnings, transfer=transfer))
            conn.execute(targets.update().where(targets.c.id == target_id).values(
                last_fingerprint=fingerprint, failures=0, next_retry_at=None, last_run_id=run_id,
                last_node_time=node_time))
            return aid

    def interrupt_running(self, target_id: int | None = None) -> list[int]:
        """Runs left ``running`` by a server that died become ``interrupted``
        (with ``target_id``: that target's, a dead worker's run)."""
        with self._tx() as conn:
            query = sa.select(runs.c.id).where(runs.c.status == "running")
            if target_id is not None:
                query = query.where(runs.c.target_id == target_id)
            ids = list(conn.execute(query).scalars())
            if ids:
                conn.execute(runs.update().where(runs.c.id.in_(ids)).values(
                    status="interrupted", finished_at=self.clock(), error_code="interrupted",
                    message="the server stopped while this run was in flight"))
                newest = (sa.select(sa.func.max(runs.c.id)).where(runs.c.target_id == targets.c.id)
                          .where(runs.c.status != "running").scalar_subquery())
                conn.execute(targets.update().where(targets.c.id.in_(
                    sa.select(runs.c.target_id).where(runs.c.id.in_(ids))))
                    .values(last_run_id=newest))
            return ids

    def get_run(self, run_id: int) -> dict[str, Any]:
        with self._tx(write=False) as conn:
            found = conn.execute(self._runs_query().where(runs.c.id == run_id)).first()
        if found is None:
            raise NotFound("run", run_id)
        return _row(found)

    def _runs_query(self) -> sa.Select:
        # The archive's stored size beside the bytes on the wire: the two differ.
        return (sa.select(runs, targets.c.path, nodes.c.user, nodes.c.host, nodes.c.port,
                          archives.c.size.label("archive_size"))
                .join(targets, targets.c.id == runs.c.target_id)
                .join(nodes, nodes.c.id == targets.c.node_id)
                .outerjoin(archives, archives.c.id == runs.c.archive_id))

    def list_runs(self, *, target_ids: list[int] | None = None, node_ids: list[int] | None = None,
                  status: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        q = self._runs_query()
        if target_ids is not None:
            q = q.where(runs.c.target_id.in_(target_ids))
        if node_ids is not None:
            q = q.where(targets.c.node_id.in_(node_ids))
        if status is not None:
            q = q.where(runs.c.status == status)
        with self._tx(write=False) as conn:
            return [_row(r) for r in conn.execute(q.order_by(runs.c.id.desc()).limit(limit))]

    def deltas_since_full(self, target_id: int) -> int:
        """Successful delta runs of the target since its newest full one."""
        q = (sa.select(runs.c.transfer).where(runs.c.target_id == target_id)
             .where(runs.c.status == "success").order_by(runs.c.id.desc()).limit(10_000))
        n = 0
        with self._tx(write=False) as conn:
            for transfer in conn.execute(q).scalars():
                if transfer != "delta":
                    break
                n += 1
        return n

    def count_runs(self, target_id: int) -> int:
        with self._tx(write=False) as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(runs)
                                .where(runs.c.target_id == target_id)).scalar_one()

    # -- archives ----------------------------------------------------------

    def list_archives(self, target_id: int, *, retained_only: bool = False) -> list[dict[str, Any]]:
        q = sa.select(archives).where(archives.c.target_id == target_id)
        if retained_only:
            q = q.where(archives.c.deleted_at.is_(None))
        with self._tx(write=False) as conn:
            return [_row(r) for r in conn.execute(
                q.order_by(archives.c.created_at.desc(), archives.c.id.desc()))]

    def list_archives_of_path(self, node_id: int, path: str) -> list[dict[str, Any]]:
        """Every archive ever made of ``path`` on the node, across registrations."""
        q = (sa.select(archives).join(targets, targets.c.id == archives.c.target_id)
             .where(targets.c.node_id == node_id, targets.c.path == path))
        with self._tx(write=False) as conn:
            return [_row(r) for r in conn.execute(
                q.order_by(archives.c.created_at.desc(), archives.c.id.desc()))]

    def record_verification(self, archive_id: int, status: str, error: str | None) -> None:
        assert status in ("ok", "corrupt")
        with self._tx() as conn:
            conn.execute(archives.update().where(archives.c.id == archive_id).values(
                verified_at=self.clock(), verify_status=status, verify_error=error,
                scrub_claimed_until=None))

    def claim_scrub(self, older_than: dt.datetime, lease: dt.timedelta,
                    limit: int = 20) -> list[dict[str, Any]]:
        """Claim up to ``limit`` archives due for a scrub (as in
        ``archives_due_for_scrub``) that no other scrubber holds, for ``lease``.

        Several processes may scrub one catalog: the rows are read with
        ``FOR UPDATE SKIP LOCKED`` (PostgreSQL), so a concurrent claimer takes
        the next ones instead of waiting or taking the same; the lease keeps
        them out of later claims until ``record_verification`` clears it."""
        now = self.clock()
        last = sa.func.coalesce(archives.c.verified_at, archives.c.created_at)
        q = (sa.select(archives)
             .where(archives.c.deleted_at.is_(None), last < older_than,
                    sa.or_(archives.c.scrub_claimed_until.is_(None),
                           archives.c.scrub_claimed_until < now))
             .order_by(last, archives.c.id).limit(limit)
             .with_for_update(skip_locked=True))
        with self._tx() as conn:
            rows = [_row(r) for r in conn.execute(q)]
            if rows:
                conn.execute(archives.update()
                             .where(archives.c.id.in_([r["id"] for r in rows]))
                             .values(scrub_claimed_until=now + lease))
        return rows

    def archives_due_for_scrub(self, older_than: dt.datetime, limit: int = 100
                               ) -> list[dict[str, Any]]:
        """Kept archives not verified since ``older_than`` (never verified:
        by creation time), the longest unchecked first."""
        last = sa.func.coalesce(archives.c.verified_at, archives.c.created_at)
        q = (sa.select(archives).where(archives.c.deleted_at.is_(None), last < older_than)
             .order_by(last, archives.c.id).limit(limit))
        with self._tx(write=False) as conn:
            return [_row(r) for r in conn.execute(q)]

    def record_check_run(self, target_id: int, trigger: str, *, archive_id: int,
                         started_at: dt.datetime, ok: bool, message: str) -> int:
        """One run-log row for a check of a stored archive (scrub): the run log
        is where an operator looks for what happened to a target's backups."""
        with self._tx() as conn:
            return conn.execute(runs.insert().values(
                target_id=target_id, started_at=started_at, finished_at=self.clock(),
                status="success" if ok else "failed", trigger=trigger, bytes_transferred=0,
                archive_id=archive_id, error_code=None if ok else "archive_corrupt",
                message=message)).inserted_primary_key[0]

    def get_archive(self, archive_id: int) -> dict[str, Any]:
        with self._tx(write=False) as conn:
            found = conn.execute(sa.select(archives).where(archives.c.id == archive_id)).first()
        if found is None:
            raise NotFound("archive", archive_id)
        return _row(found)

    def retained_file_names(self) -> set[str]:
        with self._tx(write=False) as conn:
            return set(conn.execute(sa.select(archives.c.file_name)
                                    .where(archives.c.deleted_at.is_(None))).scalars())

    def mark_archives_deleted(self, archive_ids: list[int], reason: str = "rotated") -> None:
        assert reason in ("rotated", "purged")
        if not archive_ids:
            return
        with self._tx() as conn:
            conn.execute(archives.update().where(archives.c.id.in_(archive_ids),
                                                 archives.c.deleted_at.is_(None))
                         .values(deleted_at=self.clock(), deleted_reason=reason))

    def update_target(self, target_id: int, *, every_minutes: int | None = None,
                      keep: int | None = None) -> Target:
        values: dict[str, Any] = {}
        if every_minutes is not None:
            values["every_minutes"] = every_minutes
        if keep is not None:
            values["keep"] = keep
        if values:
            with self._tx() as conn:
                res = conn.execute(targets.update().where(targets.c.id == target_id)
                                   .values(**values))
                if res.rowcount and "every_minutes" in values:
                    _schedule_changed(conn)
        return self.get_target(target_id)
