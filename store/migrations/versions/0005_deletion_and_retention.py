"""files can be deleted (their stored object goes, the row stays as a tombstone: finished
jobs still reference it); a job's artifacts expire after the retention period

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 06:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column(
        "files", sa.Column("deleted_at", store.models.UTCDateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "repair_jobs",
        sa.Column("artifacts_expired_at", store.models.UTCDateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    with op.batch_alter_table("repair_jobs") as batch_op:
        batch_op.drop_column("artifacts_expired_at")
    with op.batch_alter_table("files") as batch_op:
        batch_op.drop_column("deleted_at")
