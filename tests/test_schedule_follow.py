"""The leader follows the catalog by its change counter (roles.CatalogFollower,
Catalog.schedule_changes): every registration, interval edit and
unregistration, from any process, reaches the schedule; nothing else makes it
re-read the targets."""

from __future__ import annotations

import pickle
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from fixtures.postgres import PostgresCluster
from fixtures.sshd.launcher import SSHD
from orchestrator.roles import CatalogFollower
from orchestrator.scheduler import TABLE, target_job
from orchestrator.ssh import ServerKey
from storage.catalog import Catalog, targets
from storage.errors import NotFound


class Schedule:
    """The scheduler's side of the follower: what it was told, by target."""

    def __init__(self, jobs: dict[int, int]) -> None:
        self.jobs = dict(jobs)

    def reconcile(self, active: dict[int, int]) -> tuple[list[int], list[str]]:
        added = [t for t in active if t not in self.jobs]
        removed = [f"target:{t}" for t in self.jobs if t not in active]
        for t in added:
            self.jobs[t] = active[t]
        for t in [t for t in self.jobs if t not in active]:
            del self.jobs[t]
        return added, removed

    def set_interval(self, target_id: int, every_minutes: int) -> None:
        self.jobs[target_id] = every_minutes


def follower(cat: Catalog) -> tuple[CatalogFollower, Schedule]:
    seen = cat.schedule_changes()  # before the read, as the leader does
    known = cat.scheduled_targets()
    schedule = Schedule(known)
    return CatalogFollower(cat, schedule, dict(known), seen), schedule


def test_each_schedule_change_moves_the_counter(catalog_url: str) -> None:
    leader, api = Catalog(catalog_url), Catalog(catalog_url)  # two connections' pools
    try:
        node = api.ensure_node("u", "127.0.0.1", 22)
        follow, schedule = follower(leader)
        assert not follow.check()  # nothing changed: the targets are not read

        a = api.add_target(node.id, "/a", 5, 3).id
        b = api.add_target(node.id, "/b", 7, 3).id
        assert follow.check() and schedule.jobs == {a: 5, b: 7}
        assert not follow.check()

        api.update_target(a, every_minutes=30)
        assert follow.check() and schedule.jobs == {a: 30, b: 7}

        api.update_target(b, keep=9)  # not the schedule's business
        api.record_failure(b, None)
        assert not follow.check()

        api.unregister_target(a)
        assert follow.check() and schedule.jobs == {b: 7}
        with pytest.raises(NotFound):  # and the counter does not move
            api.unregister_target(10_000)
        assert not follow.check()
        assert schedule.jobs == leader.scheduled_targets() == {
            t.id: t.every_minutes for t in leader.list_targets()}
    finally:
        leader.close()
        api.close()


def test_the_safety_net_reads_the_targets_even_without_a_counted_change(
        catalog_url: str) -> None:
    cat = Catalog(catalog_url)
    try:
        node = cat.ensure_node("u", "127.0.0.1", 22)
        now = [0.0]
        follow = CatalogFollower(cat, Schedule({}), {}, cat.schedule_changes(),
                                 clock=lambda: now[0])
        with cat.engine.begin() as conn:  # a write outside catalog.py, not counted
            conn.execute(targets.insert().values(
                node_id=node.id, path="/by-hand", every_minutes=4, keep=1, failures=0,
                created_at=cat.clock()))
        assert not follow.check()
        now[0] += CatalogFollower.FULL_EVERY
        assert follow.check()
        assert list(follow.known.values()) == [4]
    finally:
        cat.close()


def test_concurrent_writers_miss_nothing(catalog_url: str) -> None:
    """Writers in several connections while the follower checks in a loop:
    once they are done and a check finds the counter still, the schedule is
    the catalog's (a change counted but not read would stay missed)."""
    leader = Catalog(catalog_url)
    writers = [Catalog(catalog_url) for _ in range(3)]
    try:
        nodes = [w.ensure_node("u", f"127.0.0.{i + 1}", 22) for i, w in enumerate(writers)]
        follow, schedule = follower(leader)
        errors: list[BaseException] = []

        def write(w: Catalog, node_id: int) -> None:
            try:
                for i in range(25):
                    t = w.add_target(node_id, f"/p{i}", 5, 1).id
                    if i % 3 == 0:
                        w.update_target(t, every_minutes=10 + i)
                    if i % 4 == 0:
                        w.unregister_target(t)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=write, args=(w, n.id))
                   for w, n in zip(writers, nodes, strict=True)]
        for t in threads:
            t.start()
        rereads = 0
        while any(t.is_alive() for t in threads):
            rereads += follow.check()
        for t in threads:
            t.join()
        assert not errors, errors
        follow.check()
        assert not follow.check()
        truth = leader.scheduled_targets()
        assert len(truth) == 3 * (25 - 7)
        assert schedule.jobs == follow.known == truth
        assert rereads >= 1
    finally:
        leader.close()
        for w in writers:
            w.close()


# -- real processes -------------------------------------------------------------------

def leader_jobs(url: str) -> dict[int, float]:
    """The leader's target jobs as stored: {target id: interval seconds}."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f"SELECT id, job_state FROM {TABLE} "
                                        "WHERE id LIKE 'target:%'")).all()
    finally:
        engine.dispose()
    return {int(job_id.split(":")[1]): pickle.loads(state)["trigger"].interval.total_seconds()
            for job_id, state in rows}


def test_an_api_process_changes_reach_the_leaders_schedule(
        tmp_path: Path, server_key: ServerKey, node: SSHD, pg: PostgresCluster) -> None:
    pytest.importorskip("procrastinate")
    from test_scale_out import Role
    url = pg.create_database()
    shared = tmp_path / "shared"
    api = Role("api", shared, server_key, url, "api")
    leader = Role("sched", shared, server_key, url, "scheduler")
    try:
        api.start(timeout=120)
        leader.start(timeout=120)
        leader.wait_for(lambda: "this process is the leader" in leader.log(), 30, "a leader")
        (tmp_path / "d").mkdir()
        # minute_seconds=1: 600 "minutes" are 600 s, nothing fires during the test
        target = api.register(node, tmp_path / "d", every=600)
        tid = target["id"]
        assert target_job(tid) == f"target:{tid}"
        api.wait_for(lambda: leader_jobs(url).get(tid) == 600, 20, "the registration scheduled")

        r = api.api("PATCH", f"/targets/{tid}", json={"every_minutes": 300})
        assert r.status_code == 200, r.text
        api.wait_for(lambda: leader_jobs(url).get(tid) == 300, 20, "the new interval")

        r = api.api("DELETE", f"/targets/{tid}")
        assert r.status_code == 200, r.text
        api.wait_for(lambda: tid not in leader_jobs(url), 20, "the unregistration")
        assert "reading the catalog for changed targets failed" not in leader.log()
    finally:
        leader.stop()
        api.stop()
