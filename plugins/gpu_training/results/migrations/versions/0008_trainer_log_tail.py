"""The trainer log's last lines on the job row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 19:00:00

- ``training_jobs.log_tail``: the last lines of the trainer's log (every node's, ``[node N]``
  prefixed on a multi-node job), at most ``LOG_TAIL_BYTES``, kept up to date by the follower while
  the job trains, so the job page shows a live log without reaching the instance. Once the job
  ended the uploaded ``logs/trainer.log`` artifact is the whole log.
- ``training_jobs.log_tail_at``: when it was last written.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("log_tail", sa.Text(), nullable=True))
        batch.add_column(sa.Column("log_tail_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("log_tail_at")
        batch.drop_column("log_tail")
