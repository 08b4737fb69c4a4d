"""The run queue's tables (Procrastinate) on a PostgreSQL catalog.

The scale-out roles meet in Procrastinate's tables (``orchestrator/dispatch/
procrastinate.py``). They are part of the catalog's schema like any other:
created here, in the migration's transaction (one process at a time), not by
whichever process starts first. The SQL is Procrastinate's own schema script,
of the version installed (pinned ``<4`` in pyproject.toml; a new major with
schema changes needs a revision applying its migration scripts).

Idempotent: a catalog whose tables the first start created before this
revision keeps them as they are. SQLite: nothing (the roles need PostgreSQL).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from storage.errors import CatalogError

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# What Procrastinate's schema script creates besides functions (dropped by name
# pattern in ``downgrade``).
TABLES = ("procrastinate_events", "procrastinate_periodic_defers", "procrastinate_jobs",
          "procrastinate_workers")
TYPES = ("procrastinate_job_to_defer_v1", "procrastinate_job_event_type",
         "procrastinate_job_status")


def _schema_sql() -> str:
    try:
        import procrastinate
    except ImportError:
        raise CatalogError(
            "a PostgreSQL catalog needs the run queue's package: install backhaul[scale] "
            "(procrastinate)") from None
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector())
    return app.schema_manager.get_schema()


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    if bind.execute(sa.text("SELECT to_regclass('procrastinate_jobs')")).scalar() is not None:
        return
    # One script of many statements, no parameters: straight to the driver
    # (SQLAlchemy's text() would read its ``:`` and ``%`` as placeholders),
    # on the migration's connection and transaction.
    with bind.connection.dbapi_connection.cursor() as cur:  # type: ignore[union-attr]
        cur.execute(_schema_sql())


def downgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return
    for table in TABLES:
        op.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    functions = bind.execute(sa.text(
        "SELECT p.oid::regprocedure::text FROM pg_proc p "
        "JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE n.nspname = current_schema() AND p.proname LIKE 'procrastinate\\_%'"
    )).scalars().all()
    for fn in functions:
        op.execute(f"DROP FUNCTION IF EXISTS {fn} CASCADE")
    for type_ in TYPES:
        op.execute(f"DROP TYPE IF EXISTS {type_} CASCADE")
