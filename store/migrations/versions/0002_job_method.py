"""repair jobs name their method (hcnr, rait, dpo, auto) and auto's validation file

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
    with op.batch_alter_table("repair_jobs") as batch_op:  # SQLite adds the key by copying
        batch_op.add_column(sa.Column("validation_file_id", sa.String(length=40), nullable=True))
        batch_op.create_foreign_key(
            "fk_repair_jobs_validation_file_id_files", "files", ["validation_file_id"], ["id"]
        )


def downgrade() -> None:
    with op.batch_alter_table("repair_jobs") as batch_op:
        batch_op.drop_constraint("fk_repair_jobs_validation_file_id_files", type_="foreignkey")
        batch_op.drop_column("validation_file_id")
    op.drop_column("repair_jobs", "method")
