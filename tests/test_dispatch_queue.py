"""The run queue's guarantees, on a real PostgreSQL: a due run is queued once,
per-node slots hold across connections (as across worker processes); its
tables come with the catalog's schema (migration 0004)."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

procrastinate = pytest.importorskip("procrastinate")

import psycopg  # noqa: E402
from alembic import command  # noqa: E402

from fixtures.postgres import PostgresCluster  # noqa: E402
from orchestrator.dispatch.procrastinate import (  # noqa: E402
    NodeBusy,
    NodeSlots,
    RunQueue,
    check_schema,
    conninfo,
)
from storage import migrations  # noqa: E402
from storage.catalog import Catalog  # noqa: E402
from storage.errors import CatalogError  # noqa: E402

QUEUE_TABLES = {"procrastinate_jobs", "procrastinate_workers", "procrastinate_events",
                "procrastinate_periodic_defers"}


@pytest.fixture
def url(pg: PostgresCluster) -> str:
    url = pg.create_database()
    Catalog(url).close()  # the catalog's migrations create the queue's tables
    check_schema(url)
    return url


def tables(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def upgrade_to(url: str, revision: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            command.upgrade(migrations._config(conn), revision)
    finally:
        engine.dispose()


def test_the_queue_tables_come_with_a_postgresql_catalog_only(catalog_url: str) -> None:
    Catalog(catalog_url).close()
    if catalog_url.startswith("sqlite"):
        assert not tables(catalog_url) & QUEUE_TABLES
    else:
        assert QUEUE_TABLES <= tables(catalog_url)
        Catalog(catalog_url).close()  # opened again: nothing to do, nothing fails


def test_the_queue_revision_keeps_the_tables_a_first_start_made(pg: PostgresCluster) -> None:
    """Catalogs of the first scale-out builds got the tables from the first
    process that started, before revision 0004: the revision leaves them, and
    the jobs waiting in them, as they are."""
    url = pg.create_database()
    upgrade_to(url, "0003")
    assert not tables(url) & QUEUE_TABLES
    with pytest.raises(CatalogError, match="no run queue tables"):
        check_schema(url)
    # What that first start ran: Procrastinate's script, outside Alembic.
    schema = procrastinate.App(connector=procrastinate.SyncPsycopgConnector()) \
        .schema_manager.get_schema()
    with psycopg.connect(conninfo(url), autocommit=True) as conn:
        conn.execute(schema)
    queue = RunQueue(url)
    try:
        job = queue.enqueue(7, "schedule")
        assert job is not None
        cat = Catalog(url)  # upgrades to head: 0004 finds the tables there
        try:
            with cat.engine.connect() as conn:
                assert migrations.current(conn) == migrations.head()
        finally:
            cat.close()
        assert queue.job_status(job) == "todo"
        check_schema(url)
    finally:
        queue.close()


def test_the_queue_revision_downgrades_and_upgrades_again(url: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(migrations._config(conn), "0003")
    finally:
        engine.dispose()
    assert not tables(url) & QUEUE_TABLES
    with psycopg.connect(conninfo(url)) as conn:  # its functions and types went too
        left = conn.execute("SELECT count(*) FROM pg_proc WHERE proname LIKE 'procrastinate%'"
                            " UNION ALL SELECT count(*) FROM pg_type "
                            "WHERE typname LIKE 'procrastinate%'").fetchall()
    assert left == [(0,), (0,)]
    upgrade_to(url, "head")
    assert QUEUE_TABLES <= tables(url)
    queue = RunQueue(url)
    try:
        assert queue.enqueue(7, "schedule") is not None
    finally:
        queue.close()


def test_a_due_run_is_queued_once_per_kind(url: str) -> None:
    queue = RunQueue(url)
    try:
        first = queue.enqueue(7, "schedule")
        assert first is not None
        assert queue.enqueue(7, "schedule") is None      # the waiting one covers it
        assert queue.enqueue(7, "recovery") is None      # catch-up: the same lane
        retry = queue.enqueue(7, "retry")
        manual = queue.enqueue(7, "manual")
        assert retry is not None and manual is not None
        assert queue.enqueue(8, "schedule") is not None  # another target
        jobs = queue.app.job_manager.list_jobs(status="todo")
        assert sorted(j.lock for j in jobs if j.task_kwargs["target_id"] == 7) == \
            ["target-7"] * 3
        queue.cancel_waiting("retry-7")
        assert queue.job_status(retry) == "cancelled"
        assert queue.enqueue(7, "retry") is not None     # the lane is free again
    finally:
        queue.close()


def test_node_slots_hold_k_runs_per_node_across_connections(url: str) -> None:
    a, b = NodeSlots(url, 2), NodeSlots(url, 2)  # two workers
    with a.slot(1) as s1, b.slot(1) as s2:
        assert {s1, s2} == {0, 1}
        with pytest.raises(NodeBusy), a.slot(1):
            pass
        with b.slot(2):  # another node is not limited by node 1's runs
            pass
    with b.slot(1):  # freed when the holders ended
        pass


@pytest.mark.parametrize("recorded", [True, False])
def test_a_dead_workers_job_runs_again_unless_its_run_was_recorded(url: str,
                                                                     recorded: bool) -> None:
    """A worker that dies between recording its run's end in the catalog and
    telling the queue leaves its job ``doing``: the leader's Reaper must not
    queue that due run again (it would run twice). A job whose run never
    finished is queued again, for another worker."""
    import asyncio
    import datetime as dt
    import threading

    from orchestrator.dispatch.procrastinate import Reaper, make_app

    catalog = Catalog(url)
    queue = RunQueue(url)
    try:
        node = catalog.ensure_node("root", "127.0.0.1", 22)
        tid = catalog.add_target(node.id, "/srv", 5, 10).id
        due = dt.datetime(2026, 12, 1, 12, 0, 0, 123456, tzinfo=dt.UTC)
        job_id = queue.enqueue(tid, "schedule", due=due)
        run_id = catalog.start_run(tid, "schedule", scheduled_at=due)
        if recorded:
            catalog.finish_unchanged(run_id, tid, "f" * 64, 0)

        async def worker_dies_then_leader_reaps() -> None:
            app = make_app(url, sync=False)
            async with app.open_async():
                manager = app.job_manager
                worker = await manager.register_worker()
                job = await manager.fetch_job(None, worker)
                assert job is not None and job.id == job_id
                # The worker's heartbeat stops: it was killed.
                await app.connector.execute_query_async(
                    "UPDATE procrastinate_workers SET last_heartbeat = now() - interval "
                    "'1 hour' WHERE id = %(id)s", id=worker)
                reaper = Reaper(url, catalog, stall_timeout=5, every=1,
                                stopping=threading.Event())
                await reaper.reap(app)

        asyncio.run(worker_dies_then_leader_reaps())
        run = catalog.get_run(run_id)
        if recorded:
            assert queue.job_status(job_id) == "succeeded"
            assert run["status"] == "unchanged"
        else:
            assert queue.job_status(job_id) == "todo"  # for another worker
            assert run["status"] == "interrupted"
    finally:
        queue.close()
        catalog.close()


def _first_job_a_worker_takes(url: str) -> Any:
    """The job Procrastinate's own fetch hands the next free worker now."""
    import asyncio

    from orchestrator.dispatch.procrastinate import make_app

    async def fetch() -> Any:
        app = make_app(url, sync=False)
        async with app.open_async():
            worker = await app.job_manager.register_worker()
            return await app.job_manager.fetch_job(None, worker)

    return asyncio.run(fetch())


def test_a_retry_queued_for_later_holds_back_no_run_of_its_target(url: str) -> None:
    """A worker's retry waits in the queue until its time (up to
    ``retry_max`` ahead); Procrastinate starts no job while an older waiting
    job with the same lock exists, due or not. So the waiting retry must not
    carry the target's lock: a manual run starts at once, and succeeding, it
    makes the retry moot, as on ``--role all``."""
    import datetime as dt

    from orchestrator.dispatch.procrastinate import QueuedSchedule

    queue = RunQueue(url)
    schedule = QueuedSchedule(queue, reader=None)  # type: ignore[arg-type]
    try:
        later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=60)
        schedule.schedule_retry(7, later)
        assert schedule.has_retry(7)
        schedule.schedule_probe(3, later)  # its node's probe: locked by node, not target
        assert schedule.has_probe(3) and not schedule.has_probe(4)
        manual = queue.enqueue(7, "manual")
        job = _first_job_a_worker_takes(url)
        assert job is not None and job.id == manual and job.lock == "target-7"
        schedule.cancel_retry(7)  # what the manual run's success does (RunPolicy.after_run)
        assert not schedule.has_retry(7)
        schedule.remove_probe(3)
        assert not schedule.has_probe(3)
        assert queue.app.job_manager.list_jobs(status="todo") == []
    finally:
        queue.close()


def test_a_run_for_later_is_queued_with_the_targets_lock_at_its_time(url: str) -> None:
    """The timer a run for later waits as fires on a worker and queues the
    run itself, under the target's lock and the run's queueing lock; a run
    of the same kind already waiting covers it."""
    import asyncio
    import datetime as dt
    import time

    from orchestrator import jobs
    from orchestrator.dispatch.procrastinate import RUN_TASK, make_app

    ran: list[tuple[int, str, str | None]] = []

    class Worker:  # what the run task reaches on a worker: records, runs nothing
        def run_job(self, target_id: int, trigger: str) -> None: ...

        def probe_node(self, node_id: int) -> None: ...

        def execute(self, target_id: int, trigger: str, due: dt.datetime | None, *,
                    full: bool = False) -> None:
            ran.append((target_id, trigger, due.isoformat() if due else None))

    queue = RunQueue(url)
    jobs.install(Worker())
    try:
        soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
        due = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
        assert queue.enqueue(7, "retry", at=soon) is not None
        assert queue.enqueue(7, "retry", at=soon) is None  # one retry waits per target
        assert queue.enqueue(8, "schedule", due=due, at=soon) is not None  # node was full
        assert queue.enqueue(9, "schedule") is not None
        assert queue.enqueue(9, "schedule", at=soon) is None  # the waiting one covers it
        time.sleep(max(0.0, (soon - dt.datetime.now(dt.UTC)).total_seconds()) + 0.2)

        async def work() -> None:
            app = make_app(url, sync=False)
            async with app.open_async():
                await app.run_worker_async(wait=False, install_signal_handlers=False,
                                           listen_notify=False)

        asyncio.run(work())
        assert sorted(ran) == [(7, "retry", None), (8, "schedule", due.isoformat()),
                               (9, "schedule", None)]
        runs = queue.app.job_manager.list_jobs(task=RUN_TASK)
        assert sorted((j.task_kwargs["target_id"], j.lock, j.queueing_lock, j.status)
                      for j in runs) == [(7, "target-7", "retry-7", "succeeded"),
                                         (8, "target-8", "run-8", "succeeded"),
                                         (9, "target-9", "run-9", "succeeded")]
    finally:
        jobs.install(None)
        queue.close()
