"""Why a launch attempt was given up, as a column instead of a prefix of its reason.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 03:00:00

- ``instances.abandon_reason``: ``no_capacity``, ``not_open``, ``refused``, ``replaced``,
  ``interrupted`` or ``cancelled`` (``gpu_training.results.states.AbandonReason``), None for an
  instance that was not given up. Rows stored before this revision get it from the prefix of their
  ``state_reason``, which is what was read before.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

#: ``state_reason`` prefixes written before this revision, and the reason each meant.
PREFIXES = (
    ("no capacity:", "no_capacity"),
    ("not open:", "not_open"),
    ("refused:", "refused"),
    ("replaced:", "replaced"),
    ("interrupted:", "interrupted"),
    ("not launched: the job was cancelled", "cancelled"),
    ("launched: the job was cancelled", "cancelled"),
)


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("abandon_reason", sa.String(length=16), nullable=True))
    instances = sa.table("instances", sa.column("state_reason", sa.Text), sa.column("abandon_reason", sa.String))
    for prefix, reason in PREFIXES:
        op.execute(
            instances.update()
            .where(instances.c.abandon_reason.is_(None) & instances.c.state_reason.like(prefix + "%"))
            .values(abandon_reason=reason)
        )


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("abandon_reason")
