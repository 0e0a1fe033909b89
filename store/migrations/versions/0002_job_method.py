"""repair jobs name their method (hcnr, rait, dpo)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 15:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Jobs created before methods existed were all HCNR repairs.
    op.add_column(
        "repair_jobs",
        sa.Column("method", sa.String(length=16), nullable=False, server_default="hcnr"),
    )


def downgrade() -> None:
    op.drop_column("repair_jobs", "method")
