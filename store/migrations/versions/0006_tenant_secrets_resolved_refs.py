"""tenants keep named secrets (hf_token, ...) encrypted; a job records the exact model
versions its validation pinned (hub commit, S3 listing digest)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01 10:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "tenant_secrets",
        sa.Column(
            "tenant_id",
            sa.String(40),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("created_at", store.models.UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", store.models.UTCDateTime(timezone=True), nullable=False),
    )
    op.add_column("repair_jobs", sa.Column("base_resolved", sa.String(1100), nullable=True))
    op.add_column("repair_jobs", sa.Column("finetuned_resolved", sa.String(1100), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("repair_jobs") as batch_op:
        batch_op.drop_column("finetuned_resolved")
        batch_op.drop_column("base_resolved")
    op.drop_table("tenant_secrets")
