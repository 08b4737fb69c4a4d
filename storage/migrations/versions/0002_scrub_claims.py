"""archives.scrub_claimed_until: a scrubber's lease on an archive it checks.

Several processes may scrub one catalog; each claims the archives it will
re-read (``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL) and leaves this
lease so the others pass them by until it expires or the check is recorded.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("archives", sa.Column("scrub_claimed_until", sa.DateTime, nullable=True))


def downgrade() -> None:
    op.drop_column("archives", "scrub_claimed_until")
