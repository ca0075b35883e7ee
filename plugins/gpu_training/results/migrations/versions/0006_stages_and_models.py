"""Pipeline stages and champion models.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-23 18:00:00

- ``training_jobs.stage``: the stage (task group) of a multi-stage pipeline run, "" for a single
  job; a dag run now has one job per (stage, map index), so the natural key becomes
  (dag_id, run_id, stage, map_index).
- ``models``: every promotion decision of a retraining spec (promoted or not, and why), with at
  most one champion per name.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(sa.Column("stage", sa.String(length=64), nullable=False, server_default=""))
        batch.drop_constraint("uq_training_jobs_dag_id_run_id_map_index", type_="unique")
        batch.create_unique_constraint(
            "uq_training_jobs_dag_id_run_id_stage_map_index", ["dag_id", "run_id", "stage", "map_index"]
        )
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("previous_champion_job_id", sa.Integer(), nullable=True),
        sa.Column("previous_value", sa.Float(), nullable=True),
        sa.Column("promoted", sa.Boolean(), nullable=False),
        sa.Column("is_champion", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("rule", JSON, nullable=False),
        sa.Column("dag_id", sa.String(length=250), nullable=False),
        sa.Column("run_id", sa.String(length=250), nullable=False),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
        sa.Column("retired_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["training_jobs.id"], name=op.f("fk_models_job_id_training_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["previous_champion_job_id"],
            ["training_jobs.id"],
            name=op.f("fk_models_previous_champion_job_id_training_jobs"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_models")),
        sa.UniqueConstraint("name", "job_id", name=op.f("uq_models_name_job_id")),
    )
    op.create_index(op.f("ix_models_name_decided_at"), "models", ["name", "decided_at"], unique=False)
    op.create_index(
        "ux_models_champion",
        "models",
        ["name"],
        unique=True,
        sqlite_where=sa.text("is_champion"),
        postgresql_where=sa.text("is_champion"),
    )


def downgrade() -> None:
    op.drop_index("ux_models_champion", table_name="models")
    op.drop_index(op.f("ix_models_name_decided_at"), table_name="models")
    op.drop_table("models")
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_constraint("uq_training_jobs_dag_id_run_id_stage_map_index", type_="unique")
        batch.create_unique_constraint("uq_training_jobs_dag_id_run_id_map_index", ["dag_id", "run_id", "map_index"])
        batch.drop_column("stage")
