"""What the job page shows: the trainer log's last lines, each instance's GPUs.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 19:00:00

- ``training_jobs.log_tail``: the last lines of the trainer's log (every node's, ``[node N]``
  prefixed on a multi-node job), at most ``LOG_TAIL_BYTES``, kept up to date by the follower while
  the job trains, so the job page shows a live log without reaching the instance. Once the job
  ended the uploaded ``logs/trainer.log`` artifact is the whole log.
- ``training_jobs.log_tail_at``: when it was last written.
- ``instances.gpu_name`` / ``gpu_count``: the GPU model and count of the offer the instance was
  launched from (NULL / 0 where the offer has none, e.g. the local provider).
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
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("gpu_name", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("gpu_count", sa.Integer(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("gpu_count")
        batch.drop_column("gpu_name")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("log_tail_at")
        batch.drop_column("log_tail")
