"""Read-only catalog queries for the operators' views: the metrics scrape and
the status page. A handful of grouped queries for all targets at once, never
one query per target, so a scrape of 10,000 targets stays cheap.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from storage.catalog import Catalog, archives, nodes, runs, targets

GOOD = ("success", "unchanged")  # an unchanged tree is a good backup too


@dataclass
class TargetStatus:
    id: int
    node_id: int
    user: str
    host: str
    port: int
    path: str
    every_minutes: int
    created_at: dt.datetime
    failures: int
    last_attempt_at: dt.datetime | None = None
    last_finished_at: dt.datetime | None = None
    last_status: str | None = None
    last_error_code: str | None = None
    last_message: str | None = None
    last_success_at: dt.datetime | None = None
    last_change_at: dt.datetime | None = None
    last_archive_size: int | None = None
    archives_kept: int = 0
    bytes_kept: int = 0
    runs: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> str:
        shown = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{shown}:{self.port}"

    @property
    def last_duration(self) -> float | None:
        if self.last_attempt_at is None or self.last_finished_at is None:
            return None
        return (self.last_finished_at - self.last_attempt_at).total_seconds()


def target_statuses(catalog: Catalog) -> list[TargetStatus]:
    """Every active target with its last attempt, last good run, newest
    archive, kept archives and run counts."""
    last_good = (sa.select(runs.c.target_id, sa.func.max(runs.c.id).label("run_id"))
                 .where(runs.c.status.in_(GOOD), runs.c.trigger != "scrub")
                 .group_by(runs.c.target_id).subquery())
    good_run = runs.alias("good_run")
    newest = (sa.select(archives.c.target_id, sa.func.max(archives.c.id).label("archive_id"))
              .group_by(archives.c.target_id).subquery())
    newest_archive = archives.alias("newest_archive")
    kept = (sa.select(archives.c.target_id, sa.func.count().label("n"),
                      sa.cast(sa.func.coalesce(sa.func.sum(archives.c.size), 0),
                              sa.BigInteger).label("bytes"))
            .where(archives.c.deleted_at.is_(None)).group_by(archives.c.target_id).subquery())
    last_run = runs.alias("last_run")
    q = (sa.select(targets.c.id, targets.c.node_id, nodes.c.user, nodes.c.host, nodes.c.port,
                   targets.c.path, targets.c.every_minutes, targets.c.created_at,
                   targets.c.failures,
                   last_run.c.started_at, last_run.c.finished_at, last_run.c.status,
                   last_run.c.error_code, last_run.c.message,
                   good_run.c.finished_at.label("good_at"),
                   newest_archive.c.created_at.label("change_at"),
                   newest_archive.c.size.label("archive_size"),
                   kept.c.n, kept.c.bytes)
         .select_from(targets)
         .join(nodes, nodes.c.id == targets.c.node_id)
         .outerjoin(last_run, last_run.c.id == targets.c.last_run_id)
         .outerjoin(last_good, last_good.c.target_id == targets.c.id)
         .outerjoin(good_run, good_run.c.id == last_good.c.run_id)
         .outerjoin(newest, newest.c.target_id == targets.c.id)
         .outerjoin(newest_archive, newest_archive.c.id == newest.c.archive_id)
         .outerjoin(kept, kept.c.target_id == targets.c.id)
         .where(targets.c.unregistered_at.is_(None))
         .order_by(targets.c.id))
    # A scrub's row in the run log re-reads an old archive: it is no backup.
    counts = (sa.select(runs.c.target_id, runs.c.status, sa.func.count().label("n"))
              .where(runs.c.trigger != "scrub")
              .group_by(runs.c.target_id, runs.c.status))
    with catalog._tx(write=False) as conn:
        rows = conn.execute(q).all()
        per_target: dict[int, dict[str, int]] = {}
        for r in conn.execute(counts):
            per_target.setdefault(r.target_id, {})[r.status] = r.n
    return [TargetStatus(
        id=r.id, node_id=r.node_id, user=r.user, host=r.host, port=r.port, path=r.path,
        every_minutes=r.every_minutes, created_at=r.created_at, failures=r.failures,
        last_attempt_at=r.started_at, last_finished_at=r.finished_at, last_status=r.status,
        last_error_code=r.error_code, last_message=r.message, last_success_at=r.good_at,
        last_change_at=r.change_at, last_archive_size=r.archive_size,
        archives_kept=r.n or 0, bytes_kept=r.bytes or 0,
        runs=per_target.get(r.id, {})) for r in rows]


def recent_failures(catalog: Catalog, limit: int = 20) -> list[dict[str, Any]]:
    """The newest failed or interrupted runs, newest first."""
    return catalog.list_runs(status="failed", limit=limit)
