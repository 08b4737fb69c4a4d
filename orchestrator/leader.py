"""Leader election for the scheduler role.

APScheduler 3 supports one scheduler per job store, so of the processes
started with ``--role scheduler`` exactly one schedules: the one holding the
scheduler's PostgreSQL advisory lock (the same lock ``--role all`` takes on a
PostgreSQL catalog, so the two exclude each other). The lock lives on a
dedicated connection with TCP keepalives; a standby tries to take it every
``leader_check`` seconds. The leader runs ``SELECT 1`` on that connection as
often: when the connection is gone, so may be the lock (the database let a
standby take it), and the leader stops scheduling at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from orchestrator.dispatch.procrastinate import conninfo
from storage import dialect

log = logging.getLogger(__name__)


class Leadership:
    def __init__(self, url: str, *, check_every: float, on_lost: Callable[[], None]) -> None:
        self.dsn = conninfo(url)
        self.check_every = check_every
        self.on_lost = on_lost
        self.key = dialect.owner_lock_key("scheduler")
        self._conn: psycopg.Connection | None = None
        self._watch: threading.Thread | None = None
        self._stopping = threading.Event()

    def wait(self, stopping: threading.Event) -> bool:
        """Block until this process leads (True) or ``stopping`` is set (False)."""
        said = False
        while not stopping.is_set():
            try:
                conn = psycopg.connect(self.dsn, autocommit=True,
                                       connect_timeout=max(2, int(self.check_every * 5)))
                row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.key,)).fetchone()
                if row and row[0]:
                    self._conn = conn
                    self._watch = threading.Thread(target=self._watch_loop, name="leader-watch",
                                                   daemon=True)
                    self._watch.start()
                    log.info("this process is the leader: it schedules")
                    return True
                conn.close()
                if not said:
                    log.info("standby: another scheduler leads; waiting for its lock")
                    said = True
            except psycopg.Error as exc:
                log.warning("standby: cannot reach the catalog to take the leader lock: %s",
                            exc)
            stopping.wait(self.check_every)
        return False

    def _watch_loop(self) -> None:
        while not self._stopping.wait(self.check_every):
            conn = self._conn
            if conn is None:
                return
            try:
                conn.execute("SELECT 1")
            except psycopg.Error as exc:
                if self._stopping.is_set():
                    return
                log.error("lost the leader lock's connection (%s): scheduling stops now", exc)
                self.on_lost()
                return

    @property
    def leading(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def close(self) -> None:
        self.release()

    def release(self) -> None:
        self._stopping.set()
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except psycopg.Error:
                pass
