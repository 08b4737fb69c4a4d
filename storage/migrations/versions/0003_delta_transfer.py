"""runs.transfer and targets.last_node_time: delta transfer.

``runs.transfer`` says how a run moved data (``full``, ``delta``, or ``none``
when unchanged; NULL for a failed run). ``targets.last_node_time`` is the
node's clock when the newest archive's listing was taken: the next scan asks
for entries changed since then.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("transfer", sa.String(8), nullable=True))
    op.add_column("targets", sa.Column("last_node_time", sa.String(32), nullable=True))


def downgrade() -> None:
    op.drop_column("targets", "last_node_time")
    op.drop_column("runs", "transfer")
