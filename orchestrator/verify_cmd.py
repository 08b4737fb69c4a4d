"""Re-reading stored archives: ``backhaul verify`` and the background scrub.

Each check reads the archive file once and compares it with what the catalog
recorded when it was committed: the sha256 and size, then the gzip and tar
structure (the same streaming verifier a run uses while receiving), then the
index (storage/index_check.py; a damaged one of a good archive is rebuilt).
The outcome is stored on the archive row (``verify_status``, ``verified_at``,
``verify_error``), so a corrupt archive shows as such in ``backups`` and is
never again taken for a good one.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import posixpath
import threading
from dataclasses import asdict, dataclass
from typing import Any

from storage.archives import ArchiveStore
from storage.catalog import Catalog
from storage.errors import InvalidArchive, StorageError
from storage.index_check import index_problem
from storage.verify import TarGzVerifier

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class ArchiveCheck:
    archive_id: int
    target_id: int
    status: str  # ok | corrupt | rotated (gone by design: nothing to read)
    size: int
    sha256_ok: bool | None
    structure_ok: bool | None  # gzip framing and CRC, tar headers, names under the root
    index_ok: bool | None  # None: not checked (the archive was not read)
    error: str | None
    index_rebuilt: bool = False  # a missing or damaged index was rebuilt
    note: str | None = None  # what was repaired

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def check_archive(catalog: Catalog, store: ArchiveStore, archive: dict[str, Any],
                  root: str) -> ArchiveCheck:
    """Read one archive and record the outcome in the catalog (kept ones only)."""
    aid, tid = archive["id"], archive["target_id"]
    if archive["deleted_at"] is not None:
        return ArchiveCheck(aid, tid, "rotated", archive["size"], None, None, None,
                            "the archive was rotated out; there is nothing to verify")
    try:
        path = store.path_of(archive["file_name"])
    except StorageError as exc:
        return _record(catalog, ArchiveCheck(aid, tid, "corrupt", 0, False, False, None,
                                             exc.message))
    digest = hashlib.sha256()
    verifier = TarGzVerifier(root)
    structure_error: str | None = None
    size = 0
    try:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                size += len(chunk)
                digest.update(chunk)
                if structure_error is None:
                    try:
                        verifier.feed(chunk)
                    except InvalidArchive as exc:
                        structure_error = exc.message  # keep hashing: report both
        if structure_error is None:
            verifier.finish()
    except FileNotFoundError:
        return _record(catalog, ArchiveCheck(aid, tid, "corrupt", 0, False, False, None,
                                             "the archive file is missing from the store"))
    except InvalidArchive as exc:
        structure_error = exc.message
    except OSError as exc:
        return _record(catalog, ArchiveCheck(aid, tid, "corrupt", size, None, None, None,
                                             f"cannot read the archive file: {exc.strerror}"))
    errors = []
    sha_ok = digest.hexdigest() == archive["sha256"] and size == archive["size"]
    if not sha_ok:
        errors.append(f"sha256 {digest.hexdigest()[:12]} and size {size} do not match the "
                      f"catalog's {archive['sha256'][:12]} and {archive['size']}")
    if structure_error is not None:
        errors.append(structure_error)
    index = check_index(store, archive, digest.hexdigest(), size, not errors)
    note = None
    if index.rebuilt:  # the archive is good and its index whole again
        note = index.error
    elif index.error is not None:
        errors.append(index.error)
    check = ArchiveCheck(aid, tid, "corrupt" if errors else "ok", size, sha_ok,
                         structure_error is None, index.ok, "; ".join(errors) or None,
                         index.rebuilt, note)
    return _record(catalog, check)


@dataclass(frozen=True)
class IndexCheck:
    ok: bool
    error: str | None  # what was wrong with it
    rebuilt: bool  # and it was rebuilt from the (good) archive


def check_index(store: ArchiveStore, archive: dict[str, Any], sha256: str, size: int,
                archive_good: bool) -> IndexCheck:
    """Index consistency (storage/index_check.py). A missing or damaged index
    of a good archive is rebuilt from the archive and reported; that of a
    corrupt archive is only reported (rebuilding from bad bytes helps nobody)."""
    file_name = archive["file_name"]
    problem = index_problem(store, file_name, sha256, size)
    if problem is None:
        return IndexCheck(True, None, False)
    if not archive_good:
        return IndexCheck(False, f"index: {problem}", False)
    log.warning("archive %s: %s; rebuilding its index", archive["id"], problem)
    try:
        store.rebuild_index(file_name)
    except StorageError as exc:
        return IndexCheck(False, f"index: {problem}; it cannot be rebuilt: {exc.message}",
                          False)
    return IndexCheck(False, f"index: {problem}; rebuilt from the archive", True)


def _record(catalog: Catalog, check: ArchiveCheck) -> ArchiveCheck:
    catalog.record_verification(check.archive_id, check.status, check.error)
    if check.status == "corrupt":
        log.warning("archive %s of target %s is corrupt: %s", check.archive_id,
                    check.target_id, check.error)
    return check


def archive_root(catalog: Catalog, archive: dict[str, Any]) -> str:
    """The one top-level name the archive's members live under."""
    path = catalog.get_target(archive["target_id"]).path
    return posixpath.basename(path.rstrip("/")) or "."


# How long a claimed batch of archives stays out of other scrubbers' claims:
# past it (a crashed scrubber) they are due again.
SCRUB_LEASE = dt.timedelta(hours=6)


class Scrubber:
    """Verifies every kept archive once per ``every`` (oldest check first), one
    at a time, and writes each outcome to the run log (trigger ``scrub``)."""

    def __init__(self, catalog: Catalog, store: ArchiveStore, every: dt.timedelta,
                 stopping: threading.Event) -> None:
        self.catalog = catalog
        self.store = store
        self.every = every
        self.stopping = stopping
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="scrub", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pause = min(60.0, max(0.5, self.every.total_seconds() / 10))
        while not self.stopping.wait(pause):
            try:
                self.scrub_due()
            except Exception:  # noqa: BLE001 - the scrub must not die
                log.exception("scrub pass failed")

    def scrub_due(self) -> int:
        done = 0
        while not self.stopping.is_set():
            # claimed, not just read: another process may scrub this catalog too
            due = self.catalog.claim_scrub(self.catalog.clock() - self.every,
                                           lease=SCRUB_LEASE, limit=20)
            if not due:
                return done
            for archive in due:
                if self.stopping.is_set():
                    return done
                started = self.catalog.clock()
                check = check_archive(self.catalog, self.store, archive,
                                      archive_root(self.catalog, archive))
                message = (f"scrub of archive {check.archive_id}: "
                           + ("ok" if check.status == "ok" else f"CORRUPT: {check.error}")
                           + (f" ({check.note})" if check.note else ""))
                self.catalog.record_check_run(archive["target_id"], "scrub",
                                              archive_id=archive["id"], started_at=started,
                                              ok=check.status == "ok", message=message)
                done += 1
        return done
