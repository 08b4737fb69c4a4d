"""Errors raised by the storage layer.

Every error has a stable machine ``code`` (shown to users and stored in run
rows) and a message built inside the class. Third-party exceptions (sqlite3,
SQLAlchemy, OSError) are translated here, at the boundary, so none escapes
``storage/``.
"""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error the storage layer raises."""

    code = "storage_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class CatalogError(StorageError):
    """The catalog database failed (locked past its busy timeout, disk error...)."""

    code = "storage_error"


class TargetExists(StorageError):
    code = "target_exists"

    def __init__(self, address: str, path: str, target_id: int) -> None:
        super().__init__(f"{address} {path} is already registered (target {target_id})")
        self.target_id = target_id


class NotFound(StorageError):
    code = "not_found"

    def __init__(self, what: str, ident: object) -> None:
        super().__init__(f"no {what} {ident}")
        self.code = f"{what}_not_found"


class ArchiveWriteError(StorageError):
    """Writing an archive into the store failed (disk full, permissions...)."""

    code = "storage_error"


class InvalidArchive(StorageError):
    """The stream a node sent is not a complete, safe tar.gz of the target."""

    code = "invalid_archive"


class ArchiveTooLarge(InvalidArchive):
    """The stream crossed a size or compression-ratio limit (a gzip bomb, a
    runaway tree): refused while it was received, nothing kept."""

    code = "archive_too_large"


class CatalogUnavailable(CatalogError):
    """The catalog database cannot be reached or refused us (wrong URL, host,
    credentials); the message names the database without its password."""

    code = "catalog_unavailable"


class CatalogTooNew(CatalogError):
    """The catalog was upgraded by a newer backhaul than this one."""

    code = "catalog_too_new"

    def __init__(self, where: str, found: str, known: str) -> None:
        super().__init__(f"the catalog {where} has schema revision {found}, newer than this "
                         f"backhaul knows (up to {known}): upgrade backhaul")

