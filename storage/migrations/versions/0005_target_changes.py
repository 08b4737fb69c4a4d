"""target_changes: a counter of the writes that change the schedule.

The elected scheduler follows registrations, interval edits and
unregistrations made by other processes. Reading every active target each
``--sync-every`` seconds costs seconds of CPU at 100,000 targets; instead it
reads this one row and re-reads the targets only when the counter moved.

Every write of ``targets`` that can change the schedule (``add_target``,
``update_target``, ``unregister_target`` in ``storage/catalog.py``) adds one
to ``counter`` in its own transaction. The row's lock makes those writes
commit in counter order, so a reader that saw ``counter = n`` and then read
the targets has seen every change counted up to ``n`` (see
``Catalog.schedule_changes``).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "target_changes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("counter", sa.BigInteger, nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "counter": 0}])


def downgrade() -> None:
    op.drop_table("target_changes")
