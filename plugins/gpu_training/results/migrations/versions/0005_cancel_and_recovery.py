"""Cancel, teardown and spot recovery bookkeeping.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-23 15:00:00

- ``training_jobs.cancel_requested_at`` / ``cancelled_by``: when and by whom (an Airflow user, or
  "airflow" when the dag run was marked failed) the job was cancelled; every step checks it.
- ``training_jobs.teardown_started_at``: set by teardown before it reads the instances, so a launch
  that is still in flight sees it and terminates what it created instead of leaving it running.
- ``training_jobs.recovery_count``: how many times the job was relaunched after an interruption.
- ``training_jobs.ingest_base``: where the current instance's ``global.json`` starts in the job's
  byte offsets (``ingest_offset`` and every stored event's offset are job-wide): 0, until a
  recovery starts a new file on a new instance at the offset ingested so far.
- ``instances.interrupted_at`` / ``interruption``: the cloud interrupted this (spot) instance, in
  the cloud's own words.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("cancel_requested_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("cancelled_by", sa.String(length=250), nullable=True))
        batch.add_column(sa.Column("teardown_started_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("recovery_count", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("ingest_base", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("interrupted_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("interruption", sa.String(length=500), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("interruption")
        batch.drop_column("interrupted_at")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("ingest_base")
        batch.drop_column("recovery_count")
        batch.drop_column("teardown_started_at")
        batch.drop_column("cancelled_by")
        batch.drop_column("cancel_requested_at")
