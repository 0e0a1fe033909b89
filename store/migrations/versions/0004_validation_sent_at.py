"""jobs are validated by a task of their own: when its message was last sent, and the
details of a refusal (line-numbered problems, the limit exceeded)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 06:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "repair_jobs",
        sa.Column("validation_sent_at", store.models.UTCDateTime(timezone=True), nullable=True),
    )
    op.add_column("repair_jobs", sa.Column("error_details", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("repair_jobs") as batch_op:
        batch_op.drop_column("error_details")
        batch_op.drop_column("validation_sent_at")
