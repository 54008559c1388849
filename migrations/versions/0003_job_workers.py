"""Let several workers run trials of one job: ``jobs.workers``, helper leases, trial workers.

``jobs.workers`` is the most workers that may run the job's search at once (1 keeps the job on
its claiming worker). ``job_leases`` holds one row per helper that joined a running job; the
claiming worker's lease stays on the job row. ``job_trials.worker_id`` names the worker that
ran each trial. Adding and dropping columns keeps every row; on SQLite the batch operations
recreate the tables with foreign keys off (see migrations/env.py).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.add_column(sa.Column("workers", sa.Integer(), nullable=False, server_default="1"))
    with op.batch_alter_table("job_trials", recreate="auto") as batch:
        batch.add_column(sa.Column("worker_id", sa.String(200), nullable=True))
    op.create_table(
        "job_leases",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "job_id", sa.Integer(), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("worker_id", sa.String(200), nullable=False),
        sa.Column("token", sa.String(64), nullable=False, unique=True),
        sa.Column("expires_at", sa.Double(), nullable=False),
        sa.Column("joined_at", sa.Double(), nullable=False),
    )
    op.create_index("ix_job_leases_job_id", "job_leases", ["job_id"])


def downgrade() -> None:
    op.drop_index("ix_job_leases_job_id", table_name="job_leases")
    op.drop_table("job_leases")
    with op.batch_alter_table("job_trials", recreate="auto") as batch:
        batch.drop_column("worker_id")
    with op.batch_alter_table("jobs", recreate="auto") as batch:
        batch.drop_column("workers")
