"""Jobs by provider, newest first: the results API's ``GET /training/v1/jobs?provider=`` filter.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 10:00:00

Every other filter of that list already has its index (``project_id``, ``status``, ``created_at``).
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch_op:
        batch_op.create_index(
            batch_op.f("ix_training_jobs_provider_created_at"), ["provider", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch_op:
        batch_op.drop_index(batch_op.f("ix_training_jobs_provider_created_at"))
