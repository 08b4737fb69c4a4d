"""Baseline: the catalog as releases 1 and 2 left it (schema_version 2).

A new catalog gets these tables. A catalog made by an earlier release (hand
versioned in ``schema_version``: 1 at the first release, 2 since) is brought
to the same schema in place: its missing tables, columns and indexes are
added (every change of those releases only added nullable columns, a table
and an index), its rows stay.

Revision ID: 0001
Revises:
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Written into the old version table: releases 1 and 2 refuse a catalog
# whose version is newer than theirs, so they never open one Alembic manages.
LEGACY_FENCE = 100


def _tables(md: sa.MetaData) -> list[sa.Table]:
    """The schema at this revision, frozen here (never imported from the live
    code: later revisions change that)."""
    dtm = sa.DateTime
    nodes = sa.Table(
        "nodes", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("port", sa.Integer, nullable=False),
        sa.Column("host_key_type", sa.String(64)),
        sa.Column("host_key_b64", sa.Text),
        sa.Column("host_key_fingerprint", sa.String(128)),
        sa.Column("reachable", sa.Boolean),
        sa.Column("last_error", sa.Text),
        sa.Column("last_error_code", sa.String(64)),
        sa.Column("last_seen_at", dtm),
        sa.Column("unreachable_since", dtm),
        sa.Column("probe_attempts", sa.Integer, nullable=False),
        sa.Column("next_probe_at", dtm),
        sa.Column("created_at", dtm, nullable=False),
        sa.Column("forgotten_at", dtm),
        sa.UniqueConstraint("user", "host", "port", name="uq_nodes_address"),
    )
    targets = sa.Table(
        "targets", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("node_id", sa.Integer, sa.ForeignKey("nodes.id"), nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("every_minutes", sa.Integer, nullable=False),
        sa.Column("keep", sa.Integer, nullable=False),
        sa.Column("created_at", dtm, nullable=False),
        sa.Column("unregistered_at", dtm),
        sa.Column("last_fingerprint", sa.String(64)),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("next_retry_at", dtm),
        sa.Column("last_run_id", sa.Integer),
    )
    sa.Index("uq_targets_active", targets.c.node_id, targets.c.path, unique=True,
             sqlite_where=targets.c.unregistered_at.is_(None),
             postgresql_where=targets.c.unregistered_at.is_(None))
    runs = sa.Table(
        "runs", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), nullable=False,
                  index=True),
        sa.Column("scheduled_at", dtm),
        sa.Column("started_at", dtm, nullable=False),
        sa.Column("finished_at", dtm),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("bytes_transferred", sa.BigInteger, nullable=False),
        sa.Column("archive_id", sa.Integer),
        sa.Column("error_code", sa.String(64)),
        sa.Column("message", sa.Text),
        sa.Column("warnings", sa.Text),
        sa.Column("fingerprint", sa.String(64)),
    )
    sa.Index("ix_runs_status", runs.c.status)
    sa.Index("ix_runs_target_status", runs.c.target_id, runs.c.status, runs.c.id)
    archives = sa.Table(
        "archives", md,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), nullable=False,
                  index=True),
        sa.Column("run_id", sa.Integer, sa.ForeignKey("runs.id"), nullable=False),
        sa.Column("created_at", dtm, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("file_name", sa.Text, nullable=False),
        sa.Column("fingerprint", sa.String(64)),
        sa.Column("deleted_at", dtm),
        sa.Column("deleted_reason", sa.String(16)),
        sa.Column("verified_at", dtm),
        sa.Column("verify_status", sa.String(16)),
        sa.Column("verify_error", sa.Text),
    )
    sa.Index("ix_archives_retained", archives.c.target_id,
             sqlite_where=archives.c.deleted_at.is_(None),
             postgresql_where=archives.c.deleted_at.is_(None))
    target_options = sa.Table(
        "target_options", md,
        sa.Column("target_id", sa.Integer, sa.ForeignKey("targets.id"), primary_key=True),
        sa.Column("pre_command", sa.Text),
        sa.Column("post_command", sa.Text),
        sa.Column("pre_optional", sa.Boolean, nullable=False),
        sa.Column("ping_url", sa.Text),
    )
    schema_version = sa.Table(
        "schema_version", md,
        sa.Column("version", sa.Integer, nullable=False),
    )
    return [nodes, targets, runs, archives, target_options, schema_version]


def upgrade() -> None:
    bind = op.get_bind()
    present = set(sa.inspect(bind).get_table_names())
    for table in _tables(sa.MetaData()):
        if table.name not in present:
            table.create(bind)
            continue
        # A catalog of an earlier release: complete it.
        have = sa.inspect(bind)
        columns = {c["name"] for c in have.get_columns(table.name)}
        for col in table.columns:
            if col.name not in columns:
                assert col.nullable, f"{table.name}.{col.name} cannot be added in place"
                op.add_column(table.name, sa.Column(col.name, col.type, nullable=True))
        indexes = {ix["name"] for ix in have.get_indexes(table.name)}
        for ix in table.indexes:
            if ix.name not in indexes:
                ix.create(bind)
    schema_version = sa.table("schema_version", sa.column("version", sa.Integer))
    bind.execute(schema_version.delete())
    bind.execute(schema_version.insert().values(version=LEGACY_FENCE))


def downgrade() -> None:
    raise NotImplementedError("the baseline cannot be downgraded")
