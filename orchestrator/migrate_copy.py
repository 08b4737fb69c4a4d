"""``backhauld migrate --from-data-dir DIR``: copy an embedded install (the
SQLite catalog and the ``archives`` directory of a data dir) into another
catalog (PostgreSQL) and archive store (S3), for users who started small.

What it does, in this order:

1. Checks the source: a data dir holding a catalog at this code's schema
   revision, with no backhauld running on it. It then holds the data dir's
   lock (shared) until it is done, so none can start meanwhile, and reads the
   catalog read-only (SQLite ``mode=ro``): the source is never modified.
2. Opens the destination store (a missing bucket or refused credentials stop
   it here) and the destination catalog, whose schema the Alembic migrations
   create or upgrade, and takes the scheduler's lock there (a backhauld
   running on the destination stops it too).
3. Copies every kept archive and its index through the store interface,
   streamed chunk by chunk, checking size and sha256 against the catalog as
   the bytes pass. The upload is committed only when both match; an archive
   that does not match is not copied (see ``MISMATCH``).
4. Copies every catalog table, ids kept, in one transaction; PostgreSQL's id
   sequences are set past the largest id. The APScheduler jobs of the source
   are copied when the destination keeps its jobs beside the catalog
   (PostgreSQL), so every schedule keeps its next run; backhauld's start-up
   reconciliation adds a job for any active target still without one.

The catalog comes last: a destination catalog with rows means every archive
it lists was copied (or was reported). ``--resume`` finishes an interrupted
copy of the same install: archives already in the store with the right size
and index are skipped, the catalog is copied afresh. Without it a destination
that holds anything is refused; with it, one that holds what this install
does not (another install's targets or archives, runs made since) is too.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import io
import logging
import os
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from storage import catalog as cat
from storage import dialect, migrations
from storage.errors import StorageError
from storage.stores import Store, open_store

log = logging.getLogger(__name__)

JOBS_TABLE = "apscheduler_jobs"  # orchestrator.scheduler.TABLE
BATCH = 2000  # rows per INSERT while copying the catalog
PROGRESS_STEP = 256 * 2**20  # a progress line at least every this many bytes
# An archive whose bytes do not match the catalog (or whose file is missing)
# is not copied. Its row is kept in the destination as history, as deleted
# with this reason and flagged corrupt, and its target's last fingerprint is
# cleared so the next backup there is a full one. The original stays in the
# source data dir; the command exits 1.
MISMATCH = "corrupt"


class MigrateError(Exception):
    """A reason to stop, in one line for the operator."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass
class CopyPlan:
    from_data_dir: Path
    catalog_url: str
    store_url: str
    from_catalog_url: str = ""
    store_endpoint: str = ""
    store_region: str = ""
    resume: bool = False


@dataclass
class CopyReport:
    archives: int = 0  # kept archives in the source
    copied: int = 0
    skipped: int = 0  # already in the destination (--resume)
    bytes_copied: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (archive id, why)
    rows: dict[str, int] = field(default_factory=dict)
    jobs: int | None = None  # None: the destination keeps no job store


def _copied_tables() -> list[sa.Table]:
    # schema_version is the pre-Alembic fence, written by the baseline revision.
    return [t for t in cat.metadata.sorted_tables if t.name != "schema_version"]


# -- the source ----------------------------------------------------------------

def _lock_source(data_dir: Path) -> int | None:
    """Hold the data dir's lock (shared) while we read it: refused when a
    backhauld holds it, and none can start until we are done. A data dir
    without a lock file has never run a server: nothing to hold."""
    path = data_dir / "backhauld.lock"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MigrateError(f"a backhauld is running on {data_dir}: stop it first (the copy "
                           "must see an install nobody writes)") from None
    return fd


def _read_only_engine(path: Path) -> Engine:
    """SQLite opened read-only: not a byte of the source changes. A database
    without a ``-wal`` file (a server that stopped cleanly) is all in its
    main file and, with the data dir's lock held, nobody writes it: opened
    ``immutable``, so SQLite creates no ``-wal``/``-shm`` beside it either.
    One a crash left with its WAL is read with it (``mode=ro``)."""
    quoted = urllib.parse.quote(str(path.resolve()))
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.exists() else "immutable=1"
    return sa.create_engine(f"sqlite:///file:{quoted}?{mode}&uri=true")


def _open_source(plan: CopyPlan) -> tuple[Engine, Path]:
    data_dir = plan.from_data_dir
    if not data_dir.is_dir():
        raise MigrateError(f"{data_dir} is not a directory (give the data dir of the "
                           "install to copy)")
    url = plan.from_catalog_url or f"sqlite:///{data_dir / 'catalog.db'}"
    try:
        path = dialect.sqlite_file(url)
    except sa.exc.ArgumentError:
        path = None
    if path is None:
        raise MigrateError("--from-catalog-url must be a SQLite catalog file "
                           "(sqlite:///FILE): the copy is from an embedded install")
    if not path.is_file():
        raise MigrateError(f"{data_dir} is not a backhaul install: no catalog at {path}")
    engine = _read_only_engine(path)
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            rev = migrations.current(conn) if "alembic_version" in tables else None
    except sa.exc.SQLAlchemyError as exc:
        engine.dispose()
        raise MigrateError(f"cannot read the catalog {path}: {dialect.describe(exc)}") from None
    if "targets" not in tables:
        engine.dispose()
        raise MigrateError(f"{path} is not a backhaul catalog")
    if rev != migrations.head():
        engine.dispose()
        if rev is not None and rev not in migrations.known_revisions():
            raise MigrateError(f"the catalog {path} was upgraded by a newer backhaul "
                               f"(schema revision {rev}): use that release to copy it")
        raise MigrateError(f"the catalog {path} is at an older schema "
                           f"({rev or 'before Alembic'}): upgrade it first with "
                           f"`backhauld migrate --data-dir {data_dir}`")
    return engine, path


def _source_archives(engine: Engine) -> list[dict[str, Any]]:
    a = cat.archives
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(
            sa.select(a.c.id, a.c.target_id, a.c.file_name, a.c.size, a.c.sha256,
                      a.c.created_at).where(a.c.deleted_at.is_(None)).order_by(a.c.id))]


# -- the destination -----------------------------------------------------------

def _same_sqlite(a: str, b: str) -> bool:
    try:
        fa, fb = dialect.sqlite_file(a), dialect.sqlite_file(b)
    except sa.exc.ArgumentError:
        return False
    return fa is not None and fb is not None and fa.resolve() == fb.resolve()


# Rows the migrations themselves write (a fresh catalog has them): not data.
_SEEDED = {"target_changes"}


def _counts(conn: Connection) -> dict[str, int]:
    return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
            for t in _copied_tables() if t.name not in _SEEDED}


def _check_destination_catalog(dest: Engine, src: Engine, resume: bool) -> None:
    with dest.connect() as conn:
        counts = _counts(conn)
        if not any(counts.values()):
            return
        held = ", ".join(f"{n} {name}" for name, n in counts.items() if n)
        if not resume:
            raise MigrateError(f"the destination catalog already holds rows ({held}): give an "
                               "empty database, or --resume to finish an interrupted "
                               "migration of this same install")
        t, r, a = cat.targets, cat.runs, cat.archives
        theirs = {(row.id, row.node_id, row.path, row.created_at)
                  for row in conn.execute(sa.select(t.c.id, t.c.node_id, t.c.path,
                                                    t.c.created_at))}
        dest_max = (conn.execute(sa.select(sa.func.max(r.c.id))).scalar() or 0,
                    conn.execute(sa.select(sa.func.max(a.c.id))).scalar() or 0)
    with src.connect() as conn:
        ours = {(row.id, row.node_id, row.path, row.created_at)
                for row in conn.execute(sa.select(t.c.id, t.c.node_id, t.c.path,
                                                  t.c.created_at))}
        src_max = (conn.execute(sa.select(sa.func.max(r.c.id))).scalar() or 0,
                   conn.execute(sa.select(sa.func.max(a.c.id))).scalar() or 0)
    if not theirs <= ours:
        raise MigrateError("the destination catalog holds targets this install does not: "
                           "it is not a copy of it; refusing to overwrite it")
    if dest_max[0] > src_max[0] or dest_max[1] > src_max[1]:
        raise MigrateError("the destination catalog has runs or archives the source does "
                           "not: a backhauld has used it since the copy; refusing to "
                           "overwrite it")


def _check_destination_store(store: Store, expected: set[str], resume: bool) -> set[str]:
    """The archives already in the destination store (all of them expected)."""
    present = store.files()
    indexes = store.index_files()
    if (present or indexes) and not resume:
        raise MigrateError(f"the destination store {store.url} already holds "
                           f"{len(present)} archives and {len(indexes)} indexes: give an "
                           "empty bucket or prefix, or --resume to finish an interrupted "
                           "migration of this same install")
    stray = sorted(present - expected)
    if stray:
        # backhauld deletes unlisted archives at start: never let that happen
        # to another install's files.
        raise MigrateError(f"the destination store {store.url} holds {len(stray)} archives "
                           f"this install does not list (e.g. {stray[0]}): it is not a copy "
                           "of it; refusing")
    return present


# -- archives ------------------------------------------------------------------

def _named_writer(store: Store, file_name: str, created_at: dt.datetime) -> Any:
    """A writer that commits under ``file_name`` itself: archive names (and so
    the destination's keys) stay those of the source."""
    from storage.archives import ArchiveStore, ArchiveWriter
    from storage.stores.s3 import S3ArchiveStore, S3ArchiveWriter

    if isinstance(store, S3ArchiveStore):
        return S3ArchiveWriter(store, file_name, created_at)
    if isinstance(store, ArchiveStore):
        rel_dir, _, base = file_name.rpartition("/")
        store.path_of(file_name)  # refuses a name that leaves the store
        return ArchiveWriter(store, rel_dir, base[:-len(".tar.gz")], created_at)
    raise MigrateError(f"cannot copy archives into {store.url}")


def _source_index(src: Store, name: str, sha256: str, size: int) -> Any:
    """The source's index of ``name`` if it describes these bytes, else None
    (the destination then rebuilds its own)."""
    from storage.tgz.index import ArchiveIndex, InvalidIndex

    raw = src.read_index_bytes(name)
    if raw is None:
        return None
    try:
        index = ArchiveIndex.load(io.BytesIO(raw))
    except InvalidIndex:
        return None
    if index.archive_sha256 not in (None, sha256) or index.archive_size not in (0, size):
        return None
    return index


def _already_there(dest: Store, arch: dict[str, Any]) -> bool:
    """An earlier, interrupted run copied it: same size, and an index that
    names its sha256 (both are written only after the sha256 matched)."""
    from storage.tgz.index import ArchiveIndex, InvalidIndex

    if dest.size_of(arch["file_name"]) != arch["size"]:
        return False
    raw = dest.read_index_bytes(arch["file_name"])
    if raw is None:
        return False
    try:
        return ArchiveIndex.load(io.BytesIO(raw)).archive_sha256 == arch["sha256"]
    except InvalidIndex:
        return False


def _copy_archive(src: Store, dest: Store, arch: dict[str, Any],
                  progress: _Progress) -> str | None:
    """Stream one archive across; None when done, else why it was not copied."""
    name = arch["file_name"]
    digest = hashlib.sha256()
    size = 0
    with _named_writer(dest, name, arch["created_at"]) as writer:
        for chunk in src.iter_bytes(name):
            digest.update(chunk)
            size += len(chunk)
            writer.write(chunk)
            progress.bytes(len(chunk))
        sha = digest.hexdigest()
        if size != arch["size"] or sha != arch["sha256"]:
            # leaving the block aborts the upload: nothing becomes visible
            return (f"sha256 mismatch: the catalog says {arch['size']} bytes with sha256 "
                    f"{arch['sha256'][:16]}..., the file has {size} bytes with sha256 "
                    f"{sha[:16]}...")
        index = _source_index(src, name, sha, size)
        writer.commit(index)
    if index is None:
        try:
            dest.rebuild_index(name)
        except StorageError as exc:
            # The bytes are the catalog's own (the sha256 matched): copied as
            # they are. The server rebuilds the index when it needs it, and
            # `backhaul verify` says what is wrong with the archive.
            log.warning("archive %s copied, but its index could not be rebuilt: %s",
                        arch["id"], exc.message)
    return None


class _Progress:
    """One line per archive on stderr, with the running byte count."""

    def __init__(self, out: IO[str], total_archives: int, total_bytes: int) -> None:
        self.out = out
        self.total_archives = total_archives
        self.total_bytes = total_bytes
        self.done_bytes = 0
        self._next_line = PROGRESS_STEP
        self.n = 0

    def bytes(self, n: int) -> None:
        self.done_bytes += n
        # A line within a large archive too, so a long copy shows it moves.
        if self.done_bytes >= self._next_line:
            self._next_line = self.done_bytes + PROGRESS_STEP
            print(f"migrate: {human(self.done_bytes)} of {human(self.total_bytes)}",
                  file=self.out, flush=True)

    def archive(self, arch: dict[str, Any], what: str) -> None:
        self.n += 1
        if what == "skipped":
            self.done_bytes += arch["size"]
        print(f"migrate: archive {self.n}/{self.total_archives} (id {arch['id']}, "
              f"{human(arch['size'])}) {what}; {human(self.done_bytes)} of "
              f"{human(self.total_bytes)}", file=self.out, flush=True)


def human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


# -- the catalog ---------------------------------------------------------------

def _rows(conn: Connection, table: sa.Table) -> Iterator[list[dict[str, Any]]]:
    key = list(table.primary_key.columns)
    result = conn.execution_options(stream_results=True).execute(
        sa.select(table).order_by(*key))
    while True:
        batch = result.fetchmany(BATCH)
        if not batch:
            return
        yield [dict(r._mapping) for r in batch]


def _set_sequences(conn: Connection) -> None:
    """PostgreSQL's id sequences past the largest copied id: the next row
    the new install inserts must not collide with a copied one."""
    if conn.dialect.name != "postgresql":
        return  # SQLite's INTEGER PRIMARY KEY takes max(id) + 1 by itself
    for table in _copied_tables():
        cols = list(table.primary_key.columns)
        if len(cols) != 1 or cols[0].foreign_keys or not isinstance(cols[0].type, sa.Integer):
            continue
        name = cols[0].name
        conn.execute(sa.text(
            f"SELECT setval(pg_get_serial_sequence(:t, :c), "
            f"COALESCE((SELECT max({name}) FROM {table.name}), 0) + 1, false)"),
            {"t": table.name, "c": name})


def _copy_catalog(src: Engine, dest: Engine, jobs_src: Path,
                  failed: dict[int, str], source_dir: Path, report: CopyReport) -> None:
    """Every table, ids kept, in one destination transaction."""
    now = cat.utcnow()
    tables = _copied_tables()
    with dest.begin() as out, src.connect() as inp:
        for table in reversed(tables):  # --resume: what an earlier run wrote goes
            out.execute(table.delete())
        for table in tables:
            n = 0
            for batch in _rows(inp, table):
                if table is cat.archives:
                    for row in batch:
                        if row["id"] in failed:
                            row.update(deleted_at=now, deleted_reason=MISMATCH,
                                       verify_status="corrupt", verified_at=now,
                                       verify_error=f"not migrated: {failed[row['id']]} "
                                       f"(the original stays in {source_dir})")
                out.execute(table.insert(), batch)
                n += len(batch)
            report.rows[table.name] = n
        if failed:
            # Their targets' next backup must not build on (or call unchanged
            # against) an archive the new install does not have.
            gone = sa.select(cat.archives.c.target_id).where(
                cat.archives.c.id.in_(list(failed)))
            out.execute(cat.targets.update().where(cat.targets.c.id.in_(gone))
                        .values(last_fingerprint=None, last_node_time=None))
        _set_sequences(out)
        if dest.dialect.name == "postgresql":
            report.jobs = _copy_jobs(jobs_src, out)


def _copy_jobs(jobs_db: Path, out: Connection) -> int:
    """The source's APScheduler jobs (pickled by reference, primitive args:
    they load in any process) into the job table beside the catalog."""
    from apscheduler.jobstores.sqlalchemy import SQLAlchemyJobStore

    table = SQLAlchemyJobStore(engine=out.engine, tablename=JOBS_TABLE).jobs_t
    table.create(out, checkfirst=True)
    out.execute(table.delete())
    if not jobs_db.is_file():
        return 0
    engine = _read_only_engine(jobs_db)
    try:
        with engine.connect() as inp:
            if not sa.inspect(inp).has_table(JOBS_TABLE):
                return 0
            rows = [dict(r._mapping) for r in inp.execute(sa.text(
                f"SELECT id, next_run_time, job_state FROM {JOBS_TABLE}"))]
    finally:
        engine.dispose()
    if rows:
        out.execute(table.insert(), rows)
    return len(rows)


# -- the whole copy ------------------------------------------------------------

def copy_install(plan: CopyPlan, progress_out: IO[str]) -> CopyReport:
    """Copy the install; raises ``MigrateError``, ``StorageError`` or
    ``DatabaseUnavailable`` (one line each) when it cannot start or go on."""
    from storage.archives import ArchiveStore
    from storage.catalog import Catalog

    data_dir = plan.from_data_dir.resolve()
    plan.from_data_dir = data_dir
    if not plan.catalog_url:
        raise MigrateError("give the destination catalog: --catalog-url "
                           "postgresql+psycopg://USER@HOST:PORT/DB")
    if not plan.store_url:
        raise MigrateError("give the destination archive store: --store-url "
                           "s3://BUCKET/PREFIX")
    src_archives_dir = data_dir / "archives"
    dest_url = dialect.normalise_url(plan.catalog_url)
    lock = _lock_source(data_dir) if data_dir.is_dir() else None
    src_engine: Engine | None = None
    dest_catalog: Catalog | None = None
    owner: Connection | None = None
    try:
        src_engine, src_path = _open_source(plan)
        if _same_sqlite(dest_url, f"sqlite:///{src_path}"):
            raise MigrateError("the destination catalog is the source's: give another "
                               "--catalog-url")
        if not plan.store_url.startswith("s3://"):
            where = Path(plan.store_url.removeprefix("file://")).resolve()
            if where == src_archives_dir.resolve():
                raise MigrateError("the destination store is the source's archive "
                                   "directory: give another --store-url")
        archives = _source_archives(src_engine)
        try:
            dest_store = open_store(plan.store_url, default_dir=src_archives_dir,
                                    endpoint_url=plan.store_endpoint, region=plan.store_region)
        except ValueError as exc:
            raise MigrateError(str(exc)) from None
        dest_catalog = Catalog(dest_url)  # creates or upgrades its schema (Alembic)
        owner = dialect.take_owner_lock(dest_catalog.engine, "scheduler")
        _check_destination_catalog(dest_catalog.engine, src_engine, plan.resume)
        present = _check_destination_store(dest_store, {a["file_name"] for a in archives},
                                           plan.resume)
        # An interrupted copy may have left an upload (or temp file) behind;
        # no backhauld writes here (the scheduler lock above), so it goes.
        for left in dest_store.sweep_temp_files():
            print(f"migrate: removed the unfinished upload {left}", file=progress_out)
        src_store = ArchiveStore(src_archives_dir) if src_archives_dir.is_dir() else None

        report = CopyReport(archives=len(archives))
        progress = _Progress(progress_out, len(archives), sum(a["size"] for a in archives))
        failed: dict[int, str] = {}
        for arch in archives:
            name = arch["file_name"]
            if name in present and _already_there(dest_store, arch):
                report.skipped += 1
                progress.archive(arch, "skipped")
                continue
            if src_store is None or not src_store.exists(name):
                why = f"its file {name} is missing from {src_archives_dir}"
            else:
                before = progress.done_bytes
                why = _copy_archive(src_store, dest_store, arch, progress)
                if why is None:
                    report.copied += 1
                    report.bytes_copied += progress.done_bytes - before
            if why is not None:
                failed[arch["id"]] = why
                report.failed.append((arch["id"], why))
                progress.archive(arch, f"NOT COPIED: {why}")
            else:
                progress.archive(arch, "copied")
        print("migrate: copying the catalog", file=progress_out, flush=True)
        _copy_catalog(src_engine, dest_catalog.engine, data_dir / "jobs.db", failed,
                      data_dir, report)
        return report
    finally:
        if owner is not None:
            owner.close()
        if dest_catalog is not None:
            dest_catalog.close()
        if src_engine is not None:
            src_engine.dispose()
        if lock is not None:
            os.close(lock)
