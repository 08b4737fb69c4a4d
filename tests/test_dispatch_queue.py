"""The run queue's guarantees, on a real PostgreSQL: a due run is queued once,
per-node slots hold across connections (as across worker processes)."""

from __future__ import annotations

import pytest

pytest.importorskip("procrastinate")

from fixtures.postgres import PostgresCluster  # noqa: E402
from orchestrator.dispatch.procrastinate import (  # noqa: E402
    NodeBusy,
    NodeSlots,
    RunQueue,
    ensure_schema,
)


@pytest.fixture
def url(pg: PostgresCluster) -> str:
    url = pg.create_database()
    ensure_schema(url)
    ensure_schema(url)  # a second process starting finds the tables there
    return url


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
