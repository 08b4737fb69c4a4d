"""Several processes write one catalog (the workers to come): no update is
lost and no race turns into an error. Each test runs writers in threads of
this process and in a second process at once, on SQLite and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.catalog import Catalog
from storage.errors import TargetExists

ROOT = Path(__file__).resolve().parent.parent
THREADS = 6


def other_process(url: str, go: Path, body: str) -> subprocess.Popen[str]:
    """A second process that opens the catalog, waits for ``go`` to appear,
    runs ``body`` (with ``cat`` bound) and prints its ``result`` as JSON."""
    script = textwrap.dedent("""
        import json, os, sys, time
        from storage.catalog import Catalog
        from storage.errors import TargetExists
        url, go = sys.argv[1], sys.argv[2]
        cat = Catalog(url)
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.001)
        result = None
    """) + textwrap.dedent(body) + "\nprint(json.dumps(result))\ncat.close()\n"
    proc = subprocess.Popen([sys.executable, "-c", script, url, str(go)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read() if proc.stderr else ""
    return proc


def race(cat: Catalog, go: Path, proc: subprocess.Popen[str],
         work: Callable[[int], object]) -> tuple[list[object], object]:
    """Start THREADS threads running ``work(i)`` and release the other process
    at the same moment; returns (thread results, the process's result)."""
    results: list[object] = [None] * THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS + 1)

    def run(i: int) -> None:
        start.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    go.touch()
    start.wait()
    for t in threads:
        t.join(120)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert not errors, errors
    return results, json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def cat(catalog_url: str) -> Catalog:
    c = Catalog(catalog_url)
    yield c
    c.close()


def test_no_increment_is_lost(cat: Catalog, tmp_path: Path) -> None:
    t = cat.add_target(cat.ensure_node("u", "127.0.0.1", 22).id, "/a", 5, 10)
    per = 15
    proc = other_process(cat.url, tmp_path / "go", f"""
        for _ in range({per}):
            cat.record_failure({t.id}, None)
        result = cat.get_target({t.id}).failures
    """)

    def work(_i: int) -> list[int]:
        return [cat.record_failure(t.id, None) for _ in range(per)]

    results, _ = race(cat, tmp_path / "go", proc, work)
    total = per * (THREADS + 1)
    assert cat.get_target(t.id).failures == total
    # each increment returned its own new count: no two saw the same value
    seen = [n for r in results for n in r]  # type: ignore[union-attr]
    assert len(set(seen)) == len(seen)


def test_one_node_however_many_register_it_at_once(cat: Catalog, tmp_path: Path) -> None:
    proc = other_process(cat.url, tmp_path / "go", """
        result = cat.ensure_node("backup", "127.0.0.9", 2222).id
    """)
    results, theirs = race(cat, tmp_path / "go", proc,
                           lambda _i: cat.ensure_node("backup", "127.0.0.9", 2222).id)
    assert set(results) | {theirs} == {cat.find_node("backup", "127.0.0.9", 2222)[0].id}
    assert len(cat.list_nodes()) == 1


def test_one_target_however_many_register_it_at_once(cat: Catalog, tmp_path: Path) -> None:
    n = cat.ensure_node("u", "127.0.0.1", 22)
    proc = other_process(cat.url, tmp_path / "go", f"""
        try:
            result = cat.add_target({n.id}, "/srv/app", 5, 10).id
        except TargetExists as exc:
            result = "exists"
    """)

    def work(_i: int) -> object:
        try:
            return cat.add_target(n.id, "/srv/app", 5, 10).id
        except TargetExists:
            return "exists"

    results, theirs = race(cat, tmp_path / "go", proc, work)
    outcomes = [*results, theirs]
    (winner,) = [o for o in outcomes if o != "exists"]
    assert outcomes.count("exists") == THREADS
    assert [t.id for t in cat.list_targets()] == [winner]


def test_concurrent_option_edits_keep_every_field(cat: Catalog, tmp_path: Path) -> None:
    """Each writer sets a different option of the same fresh targets: the
    first write of each inserts the row, the others must update it."""
    n = cat.ensure_node("u", "127.0.0.1", 22)
    ids = [cat.add_target(n.id, f"/t{i}", 5, 10).id for i in range(10)]
    proc = other_process(cat.url, tmp_path / "go", f"""
        for tid in {ids}:
            cat.set_target_options(tid, ping_url=f"http://127.0.0.1:9/{{tid}}")
    """)
    fields = ["pre_command", "post_command"]

    def work(i: int) -> None:
        if i < len(fields):
            for tid in ids:
                cat.set_target_options(tid, **{fields[i]: f"{fields[i]} {tid}"})
        else:
            for tid in ids:
                cat.set_target_options(tid, pre_optional=True)

    race(cat, tmp_path / "go", proc, work)
    opts = cat.target_options(ids)
    for tid in ids:
        o = opts[tid]
        assert (o.pre_command, o.post_command, o.ping_url, o.pre_optional) == \
            (f"pre_command {tid}", f"post_command {tid}", f"http://127.0.0.1:9/{tid}", True)


def test_two_processes_open_a_new_catalog_at_once(catalog_url: str, tmp_path: Path) -> None:
    """Both run the migrations at start: one creates the schema, the other waits
    and finds it done (no 'table already exists')."""
    go = tmp_path / "go"
    script = ("import os, sys, time\n"
              "while not os.path.exists(sys.argv[2]): time.sleep(0.001)\n"
              "from storage.catalog import Catalog\n"
              "c = Catalog(sys.argv[1]); c.ensure_node('u', '127.0.0.1', 22); c.close()\n")
    procs = [subprocess.Popen([sys.executable, "-c", script, catalog_url, str(go)], cwd=ROOT,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    time.sleep(1.0)  # let them all import and wait on the same start
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    cat = Catalog(catalog_url)
    try:
        assert len(cat.list_nodes()) == 1
    finally:
        cat.close()


def test_scrub_claims_hand_each_archive_to_one_claimer(cat: Catalog, tmp_path: Path) -> None:
    n = cat.ensure_node("u", "127.0.0.1", 22)
    t = cat.add_target(n.id, "/a", 5, 10)
    made = []
    for i in range(60):
        run = cat.start_run(t.id, "manual")
        made.append(cat.commit_archive(
            run, t.id, created_at=cat.clock(), size=1, sha256="a" * 64,
            file_name=f"1/{i}.tar.gz", fingerprint="f" * 64, bytes_transferred=1,
            warnings=None))
    proc = other_process(cat.url, tmp_path / "go", """
        import datetime as dt
        result = []
        while True:
            got = cat.claim_scrub(cat.clock() + dt.timedelta(days=1),
                                  lease=dt.timedelta(hours=1), limit=3)
            if not got:
                break
            result += [a["id"] for a in got]
    """)

    def work(_i: int) -> list[int]:
        mine: list[int] = []
        while got := cat.claim_scrub(cat.clock() + dt.timedelta(days=1),
                                     lease=dt.timedelta(hours=1), limit=3):
            mine += [a["id"] for a in got]
        return mine

    results, theirs = race(cat, tmp_path / "go", proc, work)
    claimed = [i for r in results for i in r] + theirs  # type: ignore[union-attr]
    assert sorted(claimed) == sorted(made)  # every archive, each exactly once


def test_a_claim_skips_rows_another_transaction_holds(pg, tmp_path: Path) -> None:
    """PostgreSQL: rows locked by a claim still in flight are passed over at
    once (SKIP LOCKED), neither waited for nor claimed twice."""
    import sqlalchemy as sa

    cat = Catalog(pg.create_database())
    try:
        t = cat.add_target(cat.ensure_node("u", "127.0.0.1", 22).id, "/a", 5, 10)
        ids = [cat.commit_archive(cat.start_run(t.id, "manual"), t.id,
                                  created_at=cat.clock(), size=1, sha256="a" * 64,
                                  file_name=f"1/{i}.tar.gz", fingerprint="f" * 64,
                                  bytes_transferred=1, warnings=None) for i in range(4)]
        with cat.engine.connect() as holder:
            holder.begin()
            holder.execute(sa.text("SELECT id FROM archives WHERE id IN (:a, :b) FOR UPDATE"),
                           {"a": ids[0], "b": ids[1]})
            started = time.monotonic()
            got = cat.claim_scrub(cat.clock() + dt.timedelta(days=1),
                                  lease=dt.timedelta(hours=1), limit=10)
            assert time.monotonic() - started < 5  # far below the 30 s lock timeout
            assert [a["id"] for a in got] == ids[2:]
            holder.rollback()
        rest = cat.claim_scrub(cat.clock() + dt.timedelta(days=1), lease=dt.timedelta(hours=1))
        assert [a["id"] for a in rest] == ids[:2]
    finally:
        cat.close()
