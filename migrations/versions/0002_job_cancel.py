"""Add cooperative cancellation of running jobs and a check on job states.

On SQLite both directions recreate ``jobs`` (copy, drop, rename), which would delete every
job trial through ``ON DELETE CASCADE`` if foreign keys were on; migrations/env.py turns them
off while migrating.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

STATES = "('queued', 'running', 'succeeded', 'failed', 'cancelled')"


def upgrade() -> None:
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.add_column(
            sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.create_check_constraint("ck_jobs_state", f"state IN {STATES}")


def downgrade() -> None:
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.drop_constraint("ck_jobs_state", type_="check")
        batch.drop_column("cancel_requested")
