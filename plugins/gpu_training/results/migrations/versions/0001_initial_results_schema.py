"""Initial results schema: jobs, iterations, steps, epochs, evals, artifacts, instances, errors.

Revision ID: 0001
Revises: 
Create Date: 2026-11-23 03:52:43.122989
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_jobs',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('uuid', sa.String(length=36), nullable=False),
    sa.Column('project_id', sa.String(length=64), nullable=False),
    sa.Column('dag_id', sa.String(length=250), nullable=False),
    sa.Column('run_id', sa.String(length=250), nullable=False),
    sa.Column('map_index', sa.Integer(), nullable=False),
    sa.Column('provider', sa.String(length=32), nullable=False),
    sa.Column('runtime', sa.String(length=16), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('failure_reason', sa.Text(), nullable=True),
    sa.Column('params', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=False),
    sa.Column('training_config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('config_yaml', sa.Text(), nullable=True),
    sa.Column('outputs_uri', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.Column('time_taken', sa.Float(), nullable=True),
    sa.Column('cost_usd', sa.Float(), nullable=True),
    sa.Column('ingest_offset', sa.BigInteger(), nullable=False),
    sa.Column('last_progress_at', sa.DateTime(), nullable=True),
    sa.Column('project_ended', sa.Boolean(), nullable=False),
    sa.Column('trainer_started_at', sa.DateTime(), nullable=True),
    sa.Column('trainer_exit_code', sa.Integer(), nullable=True),
    sa.CheckConstraint("status IN ('pending', 'provisioning', 'running', 'completed', 'failed', 'cancelled')", name=op.f('ck_training_jobs_status')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_jobs')),
    sa.UniqueConstraint('dag_id', 'run_id', 'map_index', name=op.f('uq_training_jobs_dag_id_run_id_map_index')),
    sa.UniqueConstraint('uuid', name=op.f('uq_training_jobs_uuid'))
    )
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_jobs_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_jobs_project_id_created_at'), ['project_id', 'created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_jobs_status_created_at'), ['status', 'created_at'], unique=False)

    op.create_table('artifacts',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=1024), nullable=False),
    sa.Column('uri', sa.Text(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_artifacts_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_artifacts')),
    sa.UniqueConstraint('job_id', 'name', name=op.f('uq_artifacts_job_id_name'))
    )
    op.create_table('epoch_train',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('iteration', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('avg_loss', sa.Float(), nullable=True),
    sa.Column('model_path', sa.Text(), nullable=True),
    sa.Column('optimizer_path', sa.Text(), nullable=True),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_epoch_train_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_epoch_train')),
    sa.UniqueConstraint('job_id', 'iteration', 'epoch', name=op.f('uq_epoch_train_job_id_iteration_epoch'))
    )
    op.create_table('evals',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('iteration', sa.Integer(), nullable=False),
    sa.Column('epoch', sa.Integer(), nullable=False),
    sa.Column('accuracy', sa.Float(), nullable=True),
    sa.Column('precision', sa.Float(), nullable=True),
    sa.Column('recall', sa.Float(), nullable=True),
    sa.Column('f1', sa.Float(), nullable=True),
    sa.Column('auc', sa.Float(), nullable=True),
    sa.Column('loss', sa.Float(), nullable=True),
    sa.Column('confusion_matrix', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('model_path', sa.Text(), nullable=True),
    sa.Column('metrics', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('evaluated_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_evals_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_evals')),
    sa.UniqueConstraint('job_id', 'iteration', 'epoch', name=op.f('uq_evals_job_id_iteration_epoch'))
    )
    op.create_table('ingest_errors',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('byte_offset', sa.BigInteger(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('line_excerpt', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_ingest_errors_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_ingest_errors')),
    sa.UniqueConstraint('job_id', 'byte_offset', name=op.f('uq_ingest_errors_job_id_byte_offset'))
    )
    op.create_table('instances',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('provider', sa.String(length=32), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('instance_id', sa.String(length=128), nullable=True),
    sa.Column('instance_type', sa.String(length=128), nullable=True),
    sa.Column('region', sa.String(length=64), nullable=True),
    sa.Column('price_per_hour', sa.Float(), nullable=True),
    sa.Column('spot', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=True),
    sa.Column('address', sa.String(length=255), nullable=True),
    sa.Column('details', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('launched_at', sa.DateTime(), nullable=True),
    sa.Column('ready_at', sa.DateTime(), nullable=True),
    sa.Column('terminated_at', sa.DateTime(), nullable=True),
    sa.CheckConstraint("state IN ('requested', 'pending', 'booting', 'running', 'stopping', 'terminated', 'failed', 'unknown')", name=op.f('ck_instances_state')),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_instances_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_instances')),
    sa.UniqueConstraint('name', name=op.f('uq_instances_name'))
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_job_id'), ['job_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_provider_instance_id'), ['provider', 'instance_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_instances_state'), ['state'], unique=False)

    op.create_table('job_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('byte_offset', sa.BigInteger(), nullable=False),
    sa.Column('ts', sa.DateTime(), nullable=False),
    sa.Column('phase', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('iteration', sa.Integer(), nullable=True),
    sa.Column('epoch', sa.Integer(), nullable=True),
    sa.Column('data', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_job_events_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_job_events')),
    sa.UniqueConstraint('job_id', 'byte_offset', name=op.f('uq_job_events_job_id_byte_offset'))
    )
    op.create_table('training_iterations',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('iteration', sa.Integer(), nullable=False),
    sa.Column('config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.Column('time_taken', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_training_iterations_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_iterations')),
    sa.UniqueConstraint('job_id', 'iteration', name=op.f('uq_training_iterations_job_id_iteration'))
    )
    op.create_table('training_steps',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('job_id', sa.Integer(), nullable=False),
    sa.Column('iteration', sa.Integer(), nullable=False),
    sa.Column('step_type', sa.String(length=16), nullable=False),
    sa.Column('config', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), 'postgresql'), nullable=True),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.Column('duration', sa.Float(), nullable=True),
    sa.CheckConstraint("step_type IN ('traj_gen', 'training', 'evaluation')", name=op.f('ck_training_steps_step_type')),
    sa.ForeignKeyConstraint(['job_id'], ['training_jobs.id'], name=op.f('fk_training_steps_job_id_training_jobs'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_training_steps')),
    sa.UniqueConstraint('job_id', 'iteration', 'step_type', name=op.f('uq_training_steps_job_id_iteration_step_type'))
    )


def downgrade() -> None:
    op.drop_table('training_steps')
    op.drop_table('training_iterations')
    op.drop_table('job_events')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_state'))
        batch_op.drop_index(batch_op.f('ix_instances_provider_instance_id'))
        batch_op.drop_index(batch_op.f('ix_instances_job_id'))

    op.drop_table('instances')
    op.drop_table('ingest_errors')
    op.drop_table('evals')
    op.drop_table('epoch_train')
    op.drop_table('artifacts')
    with op.batch_alter_table('training_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_jobs_status_created_at'))
        batch_op.drop_index(batch_op.f('ix_training_jobs_project_id_created_at'))
        batch_op.drop_index(batch_op.f('ix_training_jobs_created_at'))

    op.drop_table('training_jobs')
