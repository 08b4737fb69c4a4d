"""SQLite group commit (storage/group_commit.py) on a real database file:
every committed row is there, every commit waited for a WAL flush that began
after it, and concurrent writers share flushes."""

from __future__ import annotations

import threading
from pathlib import Path

from storage import dialect, group_commit


def test_concurrent_commits_share_wal_flushes_and_none_is_lost(tmp_path: Path) -> None:
    db = tmp_path / "gc.db"
    engine = dialect.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (thread INTEGER, n INTEGER)")
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    sync = group_commit.wal_sync(str(db))
    assert sync is not None
    before = (sync.flushes, sync._written)
    threads, each = 16, 15

    def write(i: int) -> None:
        for n in range(each):
            with engine.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (?, ?)", (i, n))

    workers = [threading.Thread(target=write, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    commits = sync._written - before[1]
    flushes = sync.flushes - before[0]
    assert commits == threads * each
    assert sync._synced == sync._written  # no commit left unflushed
    assert 1 <= flushes < commits  # shared: fewer flushes than commits
    with engine.begin() as conn:
        got = conn.exec_driver_sql("SELECT thread, n FROM t ORDER BY thread, n").all()
    assert got == [(i, n) for i in range(threads) for n in range(each)]
    engine.dispose()


def test_reads_wait_for_no_flush(tmp_path: Path) -> None:
    db = tmp_path / "r.db"
    engine = dialect.create_engine(f"sqlite:///{db}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    sync = group_commit.wal_sync(str(db))
    assert sync is not None
    written = sync._written
    for _ in range(20):
        with engine.begin() as conn:
            assert conn.exec_driver_sql("SELECT x FROM t").scalar() == 1
    assert sync._written == written
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE t SET x = 2")
    assert sync._written == written + 1 and sync._synced == sync._written
    engine.dispose()
