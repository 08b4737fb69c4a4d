"""The scale-out deployment as separate processes on one real PostgreSQL:
an elected scheduler and its standby, two workers, an api process, targets on
two sshd nodes. Workers and the leader are killed with SIGKILL."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest
from conftest import LiveServer

from fixtures.postgres import PostgresCluster
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.dialect import owner_lock_key

pytest.importorskip("procrastinate")


def tree(root: Path, files: int = 3, size: int = 1000) -> Path:
    root.mkdir(parents=True)
    for i in range(files):
        (root / f"f{i}").write_bytes(os.urandom(size))
    return root


class Role(LiveServer):
    """One process of the deployment; all share a data dir (key, token,
    archives), each logs to a file of its own."""

    def __init__(self, name: str, shared: Path, key: ServerKey, url: str, role: str,
                 **settings: object) -> None:
        super().__init__(shared, key, role=role, catalog_url=url, minute_seconds=1,
                         heartbeat=0.5, stall_timeout=3, leader_check=0.5, sync_every=0.5,
                         per_node=1, workers=2, **settings)
        self.name = name
        self.log_path = shared.parent / f"{name}.log"


def parse(ts: str | None) -> dt.datetime | None:
    return dt.datetime.fromisoformat(ts) if ts else None


def test_role_other_than_all_needs_postgresql(tmp_path: Path, server_key: ServerKey) -> None:
    srv = LiveServer(tmp_path / "d", server_key, role="worker")
    with pytest.raises(RuntimeError, match="needs a PostgreSQL catalog"):
        srv.start()


def test_scale_out_recovers_a_killed_worker_and_a_killed_leader(
        tmp_path: Path, server_key: ServerKey, node: SSHD, own_node: SSHD,
        pg: PostgresCluster) -> None:
    url = pg.create_database()
    shared = tmp_path / "shared"
    api = Role("api", shared, server_key, url, "api")
    leader = Role("sched-1", shared, server_key, url, "scheduler")
    standby = Role("sched-2", shared, server_key, url, "scheduler")
    # bwlimit: the big target's transfer takes seconds, long enough to kill its worker
    workers = [Role(f"worker-{i}", shared, server_key, url, "worker", bwlimit="3MiB")
               for i in (1, 2)]
    procs = [api, leader, standby, *workers]
    try:
        for p in procs:
            p.start(timeout=30)
        leader.wait_for(lambda: "this process is the leader" in leader.log(), 10,
                        "the first scheduler to lead")
        assert "standby" in standby.log() and "is the leader" not in standby.log()

        # Registered through the api process: the leader follows the catalog.
        big = api.register(own_node, tree(tmp_path / "big", files=8, size=3 * 2**20),
                           every=600)
        small = [api.register(n, tree(tmp_path / f"s{i}"), every=4)
                 for i, n in enumerate([node, node, own_node, own_node])]

        # kill -9 the worker that transfers the big target, mid-transfer
        started = f"target {big['id']}: full backup"
        pid = api.wait_for(lambda: next((w.pid for w in workers if started in w.log()), None),
                           20, "a worker running the big target")
        api.wait_for(lambda: any(p.stat().st_size > 2**20
                                 for p in (shared / "archives").rglob("*.partial-*")),
                     20, "a partial archive being written")
        victim = next(w for w in workers if w.proc is not None and w.pid == pid)
        survivor = next(w for w in workers if w is not victim)
        victim.kill()
        killed = api.wait_for(lambda: [r for r in api.runs(big["id"])
                                       if r["status"] == "interrupted"], 15,
                              "the killed worker's run recorded interrupted")[0]
        done = api.wait_for(lambda: [r for r in api.runs(big["id"])
                                     if r["status"] == "success"], 40,
                            "the redelivered run completed by the other worker")[0]
        partial = f".*-{killed['id']}.tar.gz.partial-*"
        assert not list((shared / "archives").rglob(partial)), "the dead run's temp file"
        assert done["id"] > killed["id"]
        assert done["scheduled_at"] == killed["scheduled_at"]  # the same due run
        assert f"target {big['id']}: the worker running job" in "".join(
            p.log() for p in (leader, standby))
        backups = api.api("GET", f"/targets/{big['id']}/backups").json()["backups"]
        assert [b["run_id"] for b in backups] == [done["id"]]
        assert survivor.proc is not None and survivor.proc.poll() is None
        for t in small:
            api.wait_for(lambda t=t: any(r["status"] == "success" for r in api.runs(t["id"])),
                         20, f"a run of target {t['id']}")

        # backhaul run --wait through the api process: queued, run by a worker
        r = api.api("POST", f"/targets/{small[2]['id']}/run", params={"wait": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["run"]["trigger"] == "manual"
        assert r.json()["run"]["status"] in ("success", "unchanged"), r.text

        # kill -9 the leader: the standby takes over within 10 s
        leader.kill()
        killed_at = time.monotonic()
        standby.wait_for(lambda: "this process is the leader" in standby.log(), 10,
                         "the standby to take over")
        assert time.monotonic() - killed_at <= 10
        t0 = small[0]
        before = len(api.runs(t0["id"]))
        api.wait_for(lambda: len(api.runs(t0["id"])) >= before + 2, 20,
                     "scheduled runs under the new leader")

        # Over the whole test, from the run log: no doubled due run, no overlap
        # per target, the per-node limit (1) never exceeded.
        by_node: dict[int, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
        node_of = {t["id"]: t["node_id"] for t in [*small, big]}
        for t in [*small, big]:
            runs = [r for r in api.runs(t["id"]) if r["status"] != "running"]
            due = [r["scheduled_at"] for r in runs
                   if r["trigger"] == "schedule" and r["status"] != "interrupted"]
            assert len(due) == len(set(due)), f"a due run of target {t['id']} ran twice"
            spans = sorted((parse(r["started_at"]), parse(r["finished_at"])) for r in runs)
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert end <= start, f"two runs of target {t['id']} overlapped"
            # A killed worker's node slot is free at once, its run recorded
            # interrupted only later: those spans say nothing about the limit.
            by_node[node_of[t["id"]]] += [(parse(r["started_at"]), parse(r["finished_at"]))
                                          for r in runs if r["status"] != "interrupted"]
        for spans in by_node.values():
            spans.sort()
            for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
                assert end <= start, "the per-node limit was exceeded"

        # A leader whose lock connection is cut stops scheduling and exits.
        key = owner_lock_key("scheduler")
        database = url.rsplit("/", 1)[1]
        pg.sql(database, "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE "
               f"locktype = 'advisory' AND objid = {key} AND objsubid = 1 AND granted")
        standby.wait_for(lambda: standby.proc.poll() is not None, 10,
                         "the leader that lost its lock to exit")
        assert "scheduling stops now" in standby.log()
    finally:
        for p in procs:
            if p.proc is not None:
                p.stop(timeout=20)
    for p in (api, standby, survivor):
        assert "Traceback" not in p.log(), p.log()[-3000:]


def test_a_node_down_at_registration_is_probed_by_workers_and_backed_up_when_up(
        tmp_path: Path, server_key: ServerKey, own_node: SSHD, pg: PostgresCluster) -> None:
    """Node probes and the catch-up after them are queued jobs: registered
    through the api process while its node is down, the target is backed up
    by a worker once the node answers, with no process restarted."""
    url = pg.create_database()
    shared = tmp_path / "shared"
    procs = [Role(name, shared, server_key, url, role, retry_max=2)
             for name, role in (("api", "api"), ("sched", "scheduler"), ("worker", "worker"))]
    api, _, worker = procs
    try:
        for p in procs:
            p.start(timeout=30)
        own_node.stop()
        r = api.api("POST", "/targets", json={
            "host": own_node.host, "port": own_node.port, "user": own_node.user,
            "path": str(tree(tmp_path / "app")), "every_minutes": 600})
        assert r.status_code == 201, r.text
        assert "probes the node" in " ".join(r.json()["warnings"])
        tid = r.json()["target"]["id"]
        worker.wait_for(lambda: " failed (unreachable); next in" in worker.log(), 20,
                        "a worker probing the node again and again")
        assert not [x for x in api.runs(tid) if x["status"] == "success"]
        own_node.start()
        api.wait_for(lambda: [x for x in api.runs(tid) if x["status"] == "success"], 30,
                     "the target backed up once its node answers")
    finally:
        for p in procs:
            if p.proc is not None:
                p.stop(timeout=20)
