"""Multi-node jobs and notifications.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-23 23:50:00

- ``instances.node_rank``: the node's rank in a multi-node job (0 for the node that runs rank 0
  and writes ``global.json``, and for every single-node instance).
- ``instances.node_group``: the launch attempt the node belongs to (its rank-0 instance's name);
  the nodes of one attempt are launched, replaced and terminated together. NULL for a
  single-node instance (its own group).
- ``notifications``: every notification of a job (completed, failed, cancelled, progress) per
  target, claimed before it is sent: a retried task or a restarted trigger does not send it twice.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("node_rank", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("node_group", sa.String(length=128), nullable=True))
    op.create_table(
        "notifications",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("event_key", sa.String(length=64), nullable=False, server_default=""),
        sa.Column("target", sa.String(length=512), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("sent_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["training_jobs.id"], name=op.f("fk_notifications_job_id_training_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_notifications")),
        sa.UniqueConstraint(
            "job_id", "event", "event_key", "target", name=op.f("uq_notifications_job_id_event_event_key_target")
        ),
        sa.CheckConstraint("status IN ('sending', 'sent', 'failed')", name=op.f("ck_notifications_status")),
    )
    op.create_index(op.f("ix_notifications_job_id"), "notifications", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_notifications_job_id"), table_name="notifications")
    op.drop_table("notifications")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("node_group")
        batch.drop_column("node_rank")
