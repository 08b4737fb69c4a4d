"""The one place that knows which database engine holds the catalog.

backhaul's SQL is SQLAlchemy Core and runs unchanged on SQLite (the embedded
default) and PostgreSQL (several processes, several machines). What differs
lives here: how engines are made and configured, how a write transaction
starts, how an insert that may race another writer is spelled, how schema
migrations are serialised, and how a failure to connect is told to a user.

Row locks are written in the queries themselves with ``with_for_update()``:
PostgreSQL takes them; SQLite has no row locks and compiles the clause away,
which is right there because every write transaction starts with
``BEGIN IMMEDIATE`` and so already holds the whole database's write lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from storage import group_commit

SUPPORTED = ("sqlite", "postgresql")

# An arbitrary constant: the key of the PostgreSQL advisory lock that lets one
# process at a time run schema migrations on a catalog.
_MIGRATION_LOCK_KEY = 0x6261636B  # "back"


class DatabaseUnavailable(Exception):
    """The database cannot be used: unreachable, refused the credentials, or
    the URL is wrong. ``message`` is one line without the password."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def normalise_url(url: str | Path) -> str:
    """A path (or a plain file name) means a SQLite file; a URL stays as given."""
    if isinstance(url, Path) or "://" not in str(url):
        return f"sqlite:///{Path(url)}"
    return str(url)


def redacted(url: str) -> str:
    """The URL as it may appear in logs and errors: never with its password."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable database URL>"


def create_engine(url: str, *, busy_timeout: float = 30.0, immediate: bool = True) -> Engine:
    """An engine for ``url`` set up for backhaul's use.

    SQLite: WAL, commits synced as under synchronous=FULL but concurrent ones
    sharing one fsync (``storage/group_commit.py``), foreign keys, and write transactions that
    start with ``BEGIN IMMEDIATE`` (no lock upgrade deadlock between two
    writers); with ``immediate=False`` (readers) a plain deferred ``BEGIN``.
    PostgreSQL: READ COMMITTED, ``busy_timeout`` becomes the lock timeout, a
    dead pooled connection is replaced rather than failing a run.
    """
    try:
        parsed = sa.engine.make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailable(f"not a database URL: {redacted(url)}") from exc
    name = parsed.get_backend_name()
    if name not in SUPPORTED:
        raise DatabaseUnavailable(f"unsupported catalog database {name!r} in {redacted(url)} "
                                  f"(use sqlite:///FILE or postgresql+psycopg://...)")
    try:
        if name == "sqlite":
            connect_args: dict[str, Any] = {"timeout": busy_timeout}
            database = parsed.database
            if database and database != ":memory:" and not database.startswith("file:"):
                # commits as durable as synchronous=FULL, concurrent ones sharing
                # one WAL fsync (storage/group_commit.py)
                connect_args["factory"] = group_commit.connection_factory(database)
            engine = sa.create_engine(url, connect_args=connect_args)
            event.listen(engine, "connect", _sqlite_pragmas
                         if "factory" in connect_args else _sqlite_pragmas_full)
            # pysqlite's own transaction handling defers BEGIN; take it over so
            # write transactions start with BEGIN IMMEDIATE (no upgrade deadlocks).
            begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"
            event.listen(engine, "begin", lambda conn: conn.exec_driver_sql(begin))
            return engine
        lock_ms = max(1, int(busy_timeout * 1000))
        return sa.create_engine(
            url, pool_pre_ping=True,
            connect_args={"connect_timeout": max(1, int(min(busy_timeout, 10))),
                          "options": f"-c lock_timeout={lock_ms}"})
    except (NoSuchModuleError, ImportError) as exc:
        raise DatabaseUnavailable(
            f"no driver for {redacted(url)}: install backhaul[scale] (psycopg)") from exc


def check_connection(engine: Engine) -> None:
    """Connect once, so a wrong URL, host or password fails at start in one line."""
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except SQLAlchemyError as exc:
        raise DatabaseUnavailable(
            f"cannot use the catalog database {redacted(str(engine.url))}: "
            f"{describe(exc)}") from exc


def describe(exc: BaseException) -> str:
    """One line for a database error: the driver's first line, not a traceback."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return text[:300] or orig.__class__.__name__


def insert_ignore(table: sa.Table, values: dict[str, Any], dialect_name: str) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING``: an insert that may lose a race to a
    concurrent writer of the same unique key without failing its transaction
    (on PostgreSQL a unique violation would abort everything done so far)."""
    if dialect_name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).values(**values).on_conflict_do_nothing()


def lock_for_migration(conn: Connection) -> None:
    """Let one process at a time migrate the schema, for the rest of the
    transaction. SQLite: the transaction's ``BEGIN IMMEDIATE`` already did."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK_KEY})


class OwnerLockHeld(DatabaseUnavailable):
    """Another process already holds the role this one asked for."""


def take_owner_lock(engine: Engine, role: str) -> Connection | None:
    """Hold, for as long as the returned connection stays open, the database's
    lock for ``role`` (e.g. the one scheduler a job store may have). Raises
    ``OwnerLockHeld`` when another process holds it. SQLite: None, the data
    directory's lock file already keeps a second server out."""
    if engine.dialect.name != "postgresql":
        return None
    key = owner_lock_key(role)
    conn = engine.connect().execution_options(isolation_level="AUTOCOMMIT")
    try:
        got = conn.execute(sa.text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar()
    except SQLAlchemyError as exc:
        conn.close()
        raise DatabaseUnavailable(f"cannot take the {role} lock: {describe(exc)}") from exc
    if not got:
        conn.close()
        raise OwnerLockHeld(f"another backhauld already runs the {role} on the catalog "
                            f"{redacted(str(engine.url))}")
    return conn


def owner_lock_key(role: str) -> int:
    """The advisory lock key of ``role`` (the scheduler's is also the leader's)."""
    return _MIGRATION_LOCK_KEY + sum(role.encode())


def prefix_range(column: str, dialect_name: str) -> str:
    """SQL for ``column`` lying in ``[:lo, :hi)``, compared byte-wise: a
    PostgreSQL database's collation (e.g. en_US) may order ``:`` and ``;``
    elsewhere than SQLite's binary order does."""
    if dialect_name == "postgresql":
        return f'({column} COLLATE "C" >= :lo AND {column} COLLATE "C" < :hi)'
    return f"({column} >= :lo AND {column} < :hi)"


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another engine or an in-memory DB)."""
    parsed = sa.engine.make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database \
            or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def database_size(engine: Engine) -> int:
    """Bytes the catalog takes: the SQLite file with its WAL, or the PostgreSQL
    database (``pg_database_size``)."""
    path = sqlite_file(str(engine.url))
    if path is not None:
        return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            return int(conn.execute(
                sa.text("SELECT pg_database_size(current_database())")).scalar_one())
    return 0


def _sqlite_pragmas(dbapi_conn: Any, _record: Any, synchronous: str = "NORMAL") -> None:
    # Let SQLAlchemy emit BEGIN (see the "begin" listener) instead of pysqlite.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    # NORMAL: the group-commit connection syncs the WAL after each commit itself
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_pragmas_full(dbapi_conn: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, record, "FULL")
