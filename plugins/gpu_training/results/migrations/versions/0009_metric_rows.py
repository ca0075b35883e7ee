"""How many metric rows each job stored: the count ``max_metric_rows_per_job`` is checked against.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-08 12:00:00

- ``training_jobs.metric_rows``: the rows ingestion added for the job (iterations, steps, epochs,
  evaluations, events, ingestion errors), kept in the transaction that moves ``ingest_offset``, so
  the limit holds exactly across triggerer restarts and retries without counting rows per batch.
  Jobs stored before this revision get their count now.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

#: Every table whose rows ingestion adds for a job (``job_id``).
COUNTED = ("training_iterations", "training_steps", "epoch_train", "evals", "job_events", "ingest_errors")


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("metric_rows", sa.BigInteger(), nullable=False, server_default="0"))
    counts = " + ".join(f"(SELECT COUNT(*) FROM {table} t WHERE t.job_id = training_jobs.id)" for table in COUNTED)
    op.execute(f"UPDATE training_jobs SET metric_rows = {counts}")


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("metric_rows")
