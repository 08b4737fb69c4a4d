"""Catalog schema migrations (Alembic), run at every start and by
``backhauld migrate``.

Revisions live in ``versions/``; ``0001`` is the baseline (the schema of
releases 1 and 2, which it also completes in place). A new schema change is a
new revision file whose ``down_revision`` is the current head.

Catalogs made before Alembic carry a ``schema_version`` table (1 or 2); the
baseline adopts them and sets that number to a fence those releases refuse.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from storage.dialect import lock_for_migration, redacted
from storage.errors import CatalogTooNew

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
# Versions written by the hand-rolled scheme before Alembic; a larger one is
# the fence the baseline leaves (or a catalog of an unknown future release).
LEGACY_VERSIONS = (1, 2)


def _config(conn: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = conn
    return cfg


def head() -> str:
    """The newest revision this code knows."""
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def known_revisions() -> set[str]:
    return {s.revision for s in ScriptDirectory.from_config(_config()).walk_revisions()}


def current(conn: Connection) -> str | None:
    """The catalog's revision (None: new, or made before Alembic)."""
    return MigrationContext.configure(conn).get_current_revision()


def _check(conn: Connection) -> str | None:
    rev = current(conn)
    where = redacted(str(conn.engine.url))
    if rev is not None and rev not in known_revisions():
        raise CatalogTooNew(where, rev, head())
    if rev is None and sa.inspect(conn).has_table("schema_version"):
        found = conn.execute(sa.text("SELECT max(version) FROM schema_version")).scalar()
        if found is not None and found not in LEGACY_VERSIONS:
            raise CatalogTooNew(where, f"schema_version {found}", head())
    return rev


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Bring the catalog to the head revision, in one transaction that one
    process at a time runs. Returns (revision before, revision now). Raises
    ``CatalogTooNew`` when a newer backhaul already upgraded it."""
    target = head()
    with engine.begin() as conn:
        lock_for_migration(conn)
        before = _check(conn)
        if before != target:
            command.upgrade(_config(conn), "head")
            log.info("catalog %s upgraded from %s to schema revision %s",
                     redacted(str(engine.url)), before or "(none)", target)
    return before, target
