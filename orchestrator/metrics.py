"""``GET /metrics``: the catalog as Prometheus metrics, read at scrape time.

A custom ``prometheus_client`` Collector builds every family from the catalog
when Prometheus scrapes, so the numbers are never stale and nothing has to be
kept in step in memory. Two rules from other tools' bugs:

- every value is a number: a missing time is 0 (never), never ``None`` or text;
- one bad row (or one failing section) cannot break the scrape: it is skipped,
  logged and counted in ``backhaul_scrape_errors``, and the rest is served.

Names follow Prometheus conventions: base units (seconds, bytes), ``_total``
for counters, ``_timestamp_seconds`` for Unix times.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import secrets
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from storage.catalog import RUN_STATUSES
from storage.monitoring import TargetStatus, target_statuses

if TYPE_CHECKING:
    from orchestrator.server import Server

log = logging.getLogger(__name__)

TARGET_LABELS = ["target_id", "node", "path"]
RESULTS = [s for s in RUN_STATUSES if s != "running"]


def number(value: Any) -> float:
    """A finite float for the exposition: datetimes as Unix seconds, None as 0,
    bools as 0/1. Raises ValueError for anything else (the row is skipped)."""
    if value is None:
        return 0.0
    if isinstance(value, dt.datetime):
        value = value.timestamp()
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"not a finite number: {value!r}")
    return out


class BackhaulCollector(Collector):
    def __init__(self, server: Server) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []  # collected at scrape time only; nothing to run at registration

    def collect(self) -> Iterator[Metric]:
        errors = 0
        for section in (self._targets, self._nodes, self._scheduler, self._server):
            try:
                families, bad = section()
            except Exception:  # noqa: BLE001 - one failing section must not end the scrape
                log.exception("metrics: %s failed", section.__name__.strip("_"))
                errors += 1
                continue
            errors += bad
            yield from families
        scrape = GaugeMetricFamily("backhaul_scrape_errors",
                                   "rows or sections left out of this scrape (see the log)")
        scrape.add_metric([], errors)
        yield scrape

    # -- sections: each returns (families, rows skipped) ------------------------

    def _targets(self) -> tuple[list[Metric], int]:
        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=TARGET_LABELS)

        per_target: list[tuple[GaugeMetricFamily, Callable[[TargetStatus], Any]]] = [
            (gauge("backhaul_last_success_timestamp_seconds",
                   "end of the newest good run, success or unchanged (0: never)"),
             lambda t: t.last_success_at),
            (gauge("backhaul_last_attempt_timestamp_seconds",
                   "start of the newest finished run, whatever its result (0: never)"),
             lambda t: t.last_attempt_at),
            (gauge("backhaul_last_change_timestamp_seconds",
                   "creation of the newest archive, i.e. the tree last changed (0: never)"),
             lambda t: t.last_change_at),
            (gauge("backhaul_last_duration_seconds", "duration of the newest finished run"),
             lambda t: t.last_duration),
            (gauge("backhaul_last_archive_size_bytes", "size of the newest archive"),
             lambda t: t.last_archive_size),
            (gauge("backhaul_archives_kept", "archives kept (not rotated out)"),
             lambda t: t.archives_kept),
            (gauge("backhaul_archives_kept_bytes", "bytes of the archives kept"),
             lambda t: t.bytes_kept),
            (gauge("backhaul_last_run_failed", "1 when the newest finished run failed"),
             lambda t: t.last_status in ("failed", "interrupted")),
            (gauge("backhaul_consecutive_failures", "failed attempts since the last good run"),
             lambda t: t.failures),
            (gauge("backhaul_target_interval_seconds", "how often the target is due"),
             lambda t: t.every_minutes * self.server.settings.minute_seconds),
            (gauge("backhaul_target_registered_timestamp_seconds", "when it was registered"),
             lambda t: t.created_at),
            (gauge("backhaul_target_running", "1 while a run of the target is in flight"),
             lambda t: self.server.engine.is_running(t.id)),
        ]
        runs = CounterMetricFamily("backhaul_runs", "finished runs by result",
                                   labels=[*TARGET_LABELS, "result"])
        bad = 0
        for t in target_statuses(self.server.catalog):
            try:
                labels = [str(t.id), t.address, t.path]
                values = [number(get(t)) for _, get in per_target]
                counts = [number(t.runs.get(r, 0)) for r in RESULTS]
            except Exception:  # noqa: BLE001 - skip the row, keep the scrape
                log.exception("metrics: target %s left out of the scrape", t.id)
                bad += 1
                continue
            for (family, _), value in zip(per_target, values, strict=True):
                family.add_metric(labels, value)
            for result, n in zip(RESULTS, counts, strict=True):
                runs.add_metric([*labels, result], n)
        return [f for f, _ in per_target] + [runs], bad

    def _nodes(self) -> tuple[list[Metric], int]:
        reachable = GaugeMetricFamily(
            "backhaul_node_reachable",
            "1 when the last contact with the node worked, else 0 (also never contacted)",
            labels=["node"])
        seen = GaugeMetricFamily("backhaul_node_last_seen_timestamp_seconds",
                                 "last successful contact (0: never)", labels=["node"])
        bad = 0
        for n in self.server.catalog.list_nodes():
            try:
                values = (number(n.reachable is True), number(n.last_seen_at))
            except Exception:  # noqa: BLE001
                log.exception("metrics: node %s left out of the scrape", n.id)
                bad += 1
                continue
            reachable.add_metric([n.address], values[0])
            seen.add_metric([n.address], values[1])
        return [reachable, seen], bad

    def _scheduler(self) -> tuple[list[Metric], int]:
        now = self.server.clock()
        overdue = self.server.scheduler.overdue(now)
        due = GaugeMetricFamily("backhaul_scheduler_due_runs",
                                "runs whose time has come that have not started yet")
        due.add_metric([], len(overdue))
        oldest = GaugeMetricFamily("backhaul_scheduler_oldest_overdue_seconds",
                                   "how late the most overdue of them is (0: none)")
        oldest.add_metric([], max(((now - d).total_seconds() for d in overdue), default=0.0))
        running = GaugeMetricFamily("backhaul_runs_in_flight", "runs in flight now")
        running.add_metric([], self.server.engine.in_flight())
        return [due, oldest, running], 0

    def _server(self) -> tuple[list[Metric], int]:
        free = GaugeMetricFamily("backhaul_store_free_bytes",
                                 "free bytes on the archive store's file system "
                                 "(absent with an S3 store: object storage reports none)")
        free_now = self.server.store.free_bytes()
        if free_now is not None:
            free.add_metric([], free_now)
        size = GaugeMetricFamily("backhaul_catalog_size_bytes",
                                 "size of the catalog database (with its WAL)")
        size.add_metric([], self.server.catalog.size_bytes())
        up = GaugeMetricFamily("backhaul_up", "1: backhauld answers", labels=["version"])
        from orchestrator.server import __version__
        up.add_metric([__version__], 1)
        return [free, size, up], 0


def render(server: Server) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BackhaulCollector(server))
    return generate_latest(registry)


def router(server: Server) -> APIRouter:
    """``/metrics``, behind the API's bearer token (Prometheus:
    ``authorization: {credentials_file: <data-dir>/api-token}``)."""
    r = APIRouter()
    token = server.token.encode()

    @r.get("/metrics", summary="Prometheus metrics (bearer token)",
           response_class=Response)
    def metrics(request: Request) -> Response:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(value.strip().encode(),
                                                                    token):
            return JSONResponse(
                {"error": {"code": "unauthorized", "message": "missing or wrong API token"}},
                status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return Response(render(server), media_type=CONTENT_TYPE_LATEST)

    return r
