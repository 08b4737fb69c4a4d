"""Group commit for SQLite in WAL mode: one fsync of the WAL for many commits.

With ``synchronous=FULL`` SQLite fsyncs the WAL inside every commit, while it
holds the database's one write lock: concurrent writers (16 clients
registering targets, runs recording their rows) queue behind each other's
fsync, one flush per transaction, so commits/s is capped by the disk's flush
latency (2-13 ms here, depending on the load).

Here the connection runs with ``synchronous=NORMAL`` (the commit writes the
WAL frames without an fsync, then releases the lock) and ``commit()``
returns only after the WAL file was fsynced by this thread or by another
one whose fsync started after this commit's frames were written. A commit is
as durable when it returns as under FULL (which is exactly "the WAL is
synced after each commit"); writers that commit at the same time share one
fsync. Checkpoints under NORMAL sync the WAL before they copy it, so frames
never reach the database file unsynced. Transactions that changed no row
(reads) skip the wait.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any


class WalSync:
    """Flushes one database's WAL for every commit waiting on it."""

    def __init__(self, database: str) -> None:
        self.wal = database + "-wal"
        self._cond = threading.Condition()
        self._written = 0  # commits that wrote WAL frames
        self._synced = 0  # of those, how many are known flushed
        self._syncing = False
        self.flushes = 0  # fsyncs done (fewer than commits when they overlap)

    def committed(self) -> None:
        """Return once the commit that just finished is on disk."""
        with self._cond:
            self._written += 1
            ticket = self._written
            while self._synced < ticket:
                if self._syncing:
                    self._cond.wait()
                    continue
                self._syncing = True
                covers = self._written  # every commit so far wrote its frames already
                self._cond.release()
                try:
                    _fsync(self.wal)
                    self.flushes += 1
                finally:
                    self._cond.acquire()
                    self._syncing = False
                    self._cond.notify_all()
                self._synced = max(self._synced, covers)


def _fsync(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # checkpointed and removed by the last connection: already in the db, synced
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


_syncs: dict[str, WalSync] = {}
_lock = threading.Lock()


def wal_sync(database: str) -> WalSync | None:
    """The WalSync of a database file, once an engine was created for it."""
    return _syncs.get(os.path.abspath(database))


def connection_factory(database: str) -> type[sqlite3.Connection]:
    """A ``sqlite3.Connection`` class (``sqlite3.connect(factory=...)``) whose
    commits wait for the shared WAL flush of ``database``."""
    path = os.path.abspath(database)
    with _lock:  # one WalSync per file: every engine on it shares the flushes
        sync = _syncs.setdefault(path, WalSync(path))

    class GroupCommitConnection(sqlite3.Connection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._seen_changes = 0

        def commit(self) -> None:
            super().commit()
            changes = self.total_changes
            if changes != self._seen_changes:
                self._seen_changes = changes
                sync.committed()

    return GroupCommitConnection
