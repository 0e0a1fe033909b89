"""tenants have their own webhook signing secret (Standard Webhooks)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 22:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("webhook_secret", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants") as batch_op:
        batch_op.drop_column("webhook_secret")
