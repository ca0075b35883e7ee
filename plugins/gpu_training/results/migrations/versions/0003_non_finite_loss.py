"""Non-finite loss: the first NaN/infinite loss a job reported, and when.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 12:00:00

``non_finite_loss_at`` is stored like every other timestamp of this schema (``UtcDateTime``):
naive UTC in a ``DateTime`` column, returned as an aware UTC datetime by the model.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("non_finite_loss", sa.String(length=300), nullable=True))
        batch.add_column(sa.Column("non_finite_loss_at", sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_column("non_finite_loss_at")
        batch.drop_column("non_finite_loss")
