"""when the broker accepted a finished job's follow-up tasks (webhook, Hub push), so the
reconciler can send a lost one again

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01 11:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "repair_jobs",
        sa.Column("notified_at", store.models.UTCDateTime(timezone=True), nullable=True),
    )
    # Jobs that finished before this column existed were notified then (or never will be):
    # the reconciler must not send their webhooks again.
    op.execute(
        "UPDATE repair_jobs SET notified_at = finished_at "
        "WHERE status IN ('succeeded', 'failed', 'cancelled')"
    )


def downgrade() -> None:
    with op.batch_alter_table("repair_jobs") as batch_op:
        batch_op.drop_column("notified_at")
