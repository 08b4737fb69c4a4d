"""The scale-out deployment as separate processes on one real PostgreSQL:
an elected scheduler and its standby, two workers, an api process, 50 targets
on five sshd nodes. Workers and the leader are killed with SIGKILL."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
from conftest import LiveServer

from fixtures.postgres import PostgresCluster
from fixtures.sshd.launcher import SSHD
from orchestrator.ssh import ServerKey
from storage.catalog import Catalog
from storage.dialect import owner_lock_key

pytest.importorskip("procrastinate")

import psycopg  # noqa: E402

from orchestrator.dispatch.procrastinate import conninfo  # noqa: E402

PER_NODE = 2  # --per-node: 10 targets a node, 4 worker threads
SMALL_EVERY = 20  # seconds between due runs (--minute-seconds 1)


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
                         per_node=PER_NODE, workers=2, **settings)
        self.name = name
        self.log_path = shared.parent / f"{name}.log"


def test_role_other_than_all_needs_postgresql(tmp_path: Path, server_key: ServerKey) -> None:
    srv = LiveServer(tmp_path / "d", server_key, role="worker")
    with pytest.raises(RuntimeError, match="needs a PostgreSQL catalog"):
        srv.start()


def test_scale_out_recovers_a_killed_worker_and_a_killed_leader(
        tmp_path: Path, server_key: ServerKey, node: SSHD, own_node: SSHD,
        pg: PostgresCluster) -> None:
    """50 targets on 5 nodes, several schedule rounds; a worker is killed
    mid-transfer and the leader once. Then, from the run log: no due run lost,
    none doubled, no overlap per target, the per-node limit held at every instant."""
    url = pg.create_database()
    shared = tmp_path / "shared"
    api = Role("api", shared, server_key, url, "api")
    schedulers = [Role(f"sched-{i}", shared, server_key, url, "scheduler") for i in (1, 2)]
    # bwlimit: the big target's transfer takes seconds, long enough to kill its worker
    workers = [Role(f"worker-{i}", shared, server_key, url, "worker", bwlimit="3MiB")
               for i in (1, 2)]
    procs = [api, *schedulers, *workers]
    with ExitStack() as stack:
        nodes = [node, own_node, *(
            stack.enter_context(SSHD(tmp_path / f"node{i}", server_key.public_line,
                                        host=f"127.0.0.{i}")) for i in (3, 4, 5))]
        try:
            # Started together, as deployed; five Pythons importing at once
            # on a busy 2-core machine may take a while to answer.
            with ThreadPoolExecutor(len(procs)) as pool:
                list(pool.map(lambda p: p.start(timeout=120), procs))
            leader = api.wait_for(lambda: next((s for s in schedulers if
                                                "this process is the leader" in s.log()), None),
                                  10, "one scheduler to lead")
            standby = next(s for s in schedulers if s is not leader)
            standby.wait_for(lambda: "standby" in standby.log(), 10, "the other to wait")
            assert "is the leader" not in standby.log()
            catalog = Catalog(url, migrate=False)  # the test's reader of the run log
            stack.callback(catalog.close)

            # Registered through the api process: the leader follows the catalog.
            # The big one last, so that its worker is killed mid-transfer
            # however long registering the others took.
            with ThreadPoolExecutor(4) as pool:
                small = list(pool.map(
                    lambda i: api.register(nodes[i % len(nodes)], tree(tmp_path / f"s{i}"),
                                           every=SMALL_EVERY), range(49)))
            big = api.register(own_node, tree(tmp_path / "big", files=8, size=3 * 2**20),
                               every=600)

            # kill -9 the worker that transfers the big target, mid-transfer
            started = f"target {big['id']}: full backup"
            pid = api.wait_for(lambda: next((w.pid for w in workers if started in w.log()),
                                            None), 30, "a worker running the big target")
            api.wait_for(lambda: any(p.stat().st_size > 2**20
                                     for p in (shared / "archives").rglob("*.partial-*")),
                         30, "a partial archive being written")
            victim = next(w for w in workers if w.proc is not None and w.pid == pid)
            survivor = next(w for w in workers if w is not victim)
            # Taken before the kill: a run another worker starts on the node
            # once the victim's slot is free must not seem to overlap its runs.
            worker_killed_at = now()
            victim.kill()
            killed = api.wait_for(lambda: [r for r in api.runs(big["id"])
                                           if r["status"] == "interrupted"], 15,
                                  "the killed worker's run recorded interrupted")[0]
            done = api.wait_for(lambda: [r for r in api.runs(big["id"])
                                         if r["status"] == "success"], 60,
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
            took_over = now()

            # Schedule rounds under the new leader: every target runs a due
            # time that came after the takeover (a target whose runs stopped,
            # e.g. its lock held by a job that never ends, fails here).
            def due_after_takeover() -> bool:
                runs = all_runs(catalog)
                return all(any(r["trigger"] == "schedule" and r["status"] != "running"
                               and r["scheduled_at"] > took_over
                               for r in runs.get(t["id"], [])) for t in small)
            api.wait_for(due_after_takeover, 3 * SMALL_EVERY,
                         "a scheduled run of every target under the new leader", interval=1)

            check_run_log(api, catalog, [big, *small], worker_killed_at)

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


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def all_runs(catalog: Catalog) -> dict[int, list[dict]]:
    """The run log, read from the catalog itself: the API shows times to the
    second, too coarse for runs a fraction of a second long."""
    by_target: dict[int, list[dict]] = defaultdict(list)
    for r in catalog.list_runs(limit=1_000_000):
        by_target[r["target_id"]].append(r)
    return by_target


def check_run_log(api: Role, catalog: Catalog, targets: list[dict],
                  worker_killed_at: dt.datetime) -> None:
    """The run log over the whole test. A due time D (the schedule's grid,
    first due + k * every) is served by a finished run that started at or
    after D and was itself due no later than D + every: its own run, an
    earlier one still waiting when D came (the waiting job covers it), or
    the next one (a job that found its node full or its worker dead while
    the next due one already waited). None served: a due run lost."""
    runs_of = all_runs(catalog)
    interrupted = {r["id"] for rs in runs_of.values() for r in rs
                   if r["status"] == "interrupted"}
    assert interrupted, "the killed worker's run"
    spans_of_node: dict[int, list[tuple[dt.datetime, dt.datetime]]] = defaultdict(list)
    lost = []
    for t in targets:
        runs = [r for r in runs_of[t["id"]] if r["status"] != "running"]
        # A killed worker's runs ended when it died; the leader records them
        # interrupted only a stall timeout later.
        spans = sorted((r["started_at"], min(r["finished_at"], worker_killed_at)
                        if r["id"] in interrupted else r["finished_at"]) for r in runs)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            assert end <= start, f"two runs of target {t['id']} overlapped"
        spans_of_node[t["node_id"]] += spans

        done = [r for r in runs if r["status"] != "interrupted"]
        scheduled = [r for r in done if r["trigger"] == "schedule"]
        due = [r["scheduled_at"] for r in scheduled]
        assert len(due) == len(set(due)), f"a due run of target {t['id']} ran twice"
        assert due, f"target {t['id']} never ran on schedule"
        every = dt.timedelta(seconds=t["every_minutes"])
        first = min(due)
        for d in due:  # each one a due time of the schedule, none invented
            off = (d - first) / every
            assert abs(off - round(off)) < 0.01, f"target {t['id']}: due {d} off its grid"
        serving = [(r["started_at"], r["scheduled_at"]) for r in done
                   if r["trigger"] in ("schedule", "recovery")]
        last_start = max(s for s, _ in serving)
        d, checked = first, 0
        while d <= last_start:
            by = [(s, at) for s, at in serving if s >= d and at <= d + every]
            if not by:
                lost.append((t["id"], d.isoformat()))
            d += every
            checked += 1
        # A small target's first due time and one under the new leader, at least.
        assert checked >= (2 if t["every_minutes"] == SMALL_EVERY else 1), t["id"]
    assert lost == [], f"due runs lost (target, due): {lost}"
    for t in targets:  # no interrupted run's (partial) archive is listed
        listed = api.api("GET", f"/targets/{t['id']}/backups").json()["backups"]
        assert not {b["run_id"] for b in listed} & interrupted, f"target {t['id']}"
    for node_id, spans in spans_of_node.items():
        events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
        at_once = high = 0
        for _, step in events:  # at an equal instant an end sorts before a start
            at_once += step
            high = max(high, at_once)
        assert 1 <= high <= PER_NODE, f"node {node_id}: {high} runs at once"


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


def test_a_queued_retry_holds_back_no_manual_run(
        tmp_path: Path, server_key: ServerKey, node: SSHD, pg: PostgresCluster) -> None:
    """A worker queues a failed run's retry for a minute later; ``backhaul
    run`` meanwhile starts at once and, succeeding, makes the retry moot (as
    on ``--role all``)."""
    url = pg.create_database()
    shared = tmp_path / "shared"
    procs = [Role(name, shared, server_key, url, role, retry_min=60, retry_max=60)
             for name, role in (("api", "api"), ("sched", "scheduler"), ("worker", "worker"))]
    api, _, worker = procs
    try:
        for p in procs:
            p.start(timeout=60)
        path = tree(tmp_path / "app")
        tid = api.register(node, path, every=600)["id"]

        def run() -> dict:
            r = api.api("POST", f"/targets/{tid}/run", params={"wait": "true", "timeout": "60"})
            assert r.status_code == 200, r.text
            return r.json()["run"]

        assert run()["status"] in ("success", "unchanged")
        shutil.rmtree(path)  # the next run fails: the worker queues its retry
        assert run()["status"] == "failed"
        worker.wait_for(lambda: f"target {tid}: retry 1 in" in worker.log(), 10,
                        "the worker to queue the retry")
        tree(path)
        started = time.monotonic()
        assert run()["status"] in ("success", "unchanged")
        assert time.monotonic() - started < 20  # not after the retry's minute
        with psycopg.connect(conninfo(url)) as conn:
            waiting = conn.execute("SELECT count(*) FROM procrastinate_jobs WHERE "
                                   "queueing_lock = %s AND status = 'todo'",
                                   (f"retry-{tid}",)).fetchone()
        assert waiting == (0,)
        assert [x["trigger"] for x in api.runs(tid)].count("retry") == 0
    finally:
        for p in procs:
            if p.proc is not None:
                p.stop(timeout=20)
