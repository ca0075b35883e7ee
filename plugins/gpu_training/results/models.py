"""The results schema: SQLAlchemy 2 models of training jobs, their metrics, artifacts and instances.

This schema is a public interface: users query it with SQL, so columns are added, never renamed.
It lives in its own database (connection ``training_results``) and is migrated by Alembic
(``gpu_training/results/migrations``). Natural keys are unique so that ingestion is idempotent: an
event read twice can never become a second row. Timestamps are stored in UTC.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from gpu_training.results.states import InstanceState, JobStatus

JOB_STATUSES = tuple(str(s) for s in JobStatus)
TERMINAL_STATUSES = frozenset(str(s) for s in JobStatus if s.is_terminal)
STEP_TYPES = ("traj_gen", "training", "evaluation")
INSTANCE_STATES = tuple(str(s) for s in InstanceState)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

JsonType = JSON().with_variant(JSONB(), "postgresql")


class UtcDateTime(TypeDecorator[datetime]):
    """Stores naive UTC, returns aware UTC, whatever the backend does with time zones."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the results DB; pass an aware datetime")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)

    def bind_processor(self, dialect: Any) -> Any:
        """On SQLite, one step from the aware datetime to the stored text (bulk ingestion binds a lot
        of them): the same string as :meth:`process_bind_param` then SQLite's ``DATETIME`` would make."""
        impl = self.impl_instance.dialect_impl(dialect)
        if dialect.name != "sqlite" or getattr(impl, "_storage_format", None) != _SQLITE_DATETIME_FORMAT:
            return super().bind_processor(dialect)
        utc = UTC

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError("naive datetime given to the results DB; pass an aware datetime")
            if value.tzinfo is not utc:
                value = value.astimezone(utc)
            return value.replace(tzinfo=None).isoformat(" ", "microseconds")

        return process


#: SQLAlchemy's default storage format of SQLite ``DATETIME``: what ``isoformat(" ", "microseconds")``
#: writes for a naive datetime.
_SQLITE_DATETIME_FORMAT = "%(year)04d-%(month)02d-%(day)02d %(hour)02d:%(minute)02d:%(second)02d.%(microsecond)06d"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = metadata


class TrainingJob(Base):
    """One training job: one run of the ``gpu_training`` DAG (or one mapped job of a sweep)."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        UniqueConstraint("dag_id", "run_id", "stage", "map_index"),
        Index(None, "project_id", "created_at"),
        Index(None, "status", "created_at"),
        Index(None, "provider", "created_at"),
        Index(None, "created_at"),
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in JOB_STATUSES) + ")", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    uuid: Mapped[str] = mapped_column(String(36), unique=True)
    project_id: Mapped[str] = mapped_column(String(64))
    dag_id: Mapped[str] = mapped_column(String(250))
    run_id: Mapped[str] = mapped_column(String(250))
    map_index: Mapped[int] = mapped_column(Integer, default=-1)
    #: The pipeline stage (its task group, e.g. "sft") of a multi-stage run; "" for a single job.
    stage: Mapped[str] = mapped_column(String(64), default="", server_default="")
    provider: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.PENDING.value)
    failure_reason: Mapped[str | None] = mapped_column(Text)
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    training_config: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    config_yaml: Mapped[str | None] = mapped_column(Text)
    outputs_uri: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    time_taken: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    # Progress bookkeeping: byte offset of global.json already ingested, when bytes last arrived.
    ingest_offset: Mapped[int] = mapped_column(BigInteger, default=0)
    last_progress_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    project_ended: Mapped[bool] = mapped_column(Boolean, default=False)
    trainer_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    trainer_exit_code: Mapped[int | None] = mapped_column(Integer)
    # The first loss that was NaN or infinite (e.g. "iteration 1 epoch 2 TRAINING/epoch_complete:
    # avg_loss=NaN") and its event's ts; set once by ingestion, NULL while every loss is finite.
    non_finite_loss: Mapped[str | None] = mapped_column(String(300))
    non_finite_loss_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    # Cancel and teardown: when (and by whom) a cancel was asked for; when teardown began (a launch
    # still in flight then terminates what it created).
    cancel_requested_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    cancelled_by: Mapped[str | None] = mapped_column(String(250))
    teardown_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    #: Relaunches after a spot / interruptible instance was interrupted.
    recovery_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Job-wide byte offset where the current instance's global.json starts (0 until a recovery).
    ingest_base: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: The trainer log's last lines (every node's, ``[node N] `` prefixed on a multi-node job), at
    #: most ``LOG_TAIL_BYTES``, written by the follower while the job trains; and when.
    log_tail: Mapped[str | None] = mapped_column(Text)
    log_tail_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    #: Rows ingestion added for the job (iterations, steps, epochs, evaluations, events, ingestion
    #: errors), moved with ``ingest_offset``: what ``max_metric_rows_per_job`` is checked against.
    metric_rows: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    iterations: Mapped[list[TrainingIteration]] = relationship(
        back_populates="job", cascade="all, delete-orphan", order_by="TrainingIteration.iteration"
    )


class TrainingIteration(Base):
    """An ``ITERATION`` of a job; epochs, steps and evals hang off it by iteration number."""

    __tablename__ = "training_iterations"
    __table_args__ = (UniqueConstraint("job_id", "iteration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    config: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    time_taken: Mapped[float | None] = mapped_column(Float)

    job: Mapped[TrainingJob] = relationship(back_populates="iterations")


class TrainingStep(Base):
    """A step of an iteration: ``traj_gen`` (TRAJECTORY), ``training``, ``evaluation``."""

    __tablename__ = "training_steps"
    __table_args__ = (
        UniqueConstraint("job_id", "iteration", "step_type"),
        CheckConstraint("step_type IN (" + ", ".join(f"'{s}'" for s in STEP_TYPES) + ")", name="step_type"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    step_type: Mapped[str] = mapped_column(String(16))
    config: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    duration: Mapped[float | None] = mapped_column(Float)


class EpochTrain(Base):
    """A ``TRAINING epoch_complete`` event. ``metrics`` holds every other number it carried."""

    __tablename__ = "epoch_train"
    __table_args__ = (UniqueConstraint("job_id", "iteration", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    avg_loss: Mapped[float | None] = mapped_column(Float)
    model_path: Mapped[str | None] = mapped_column(Text)
    optimizer_path: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    completed_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Eval(Base):
    """An ``EVAL_MODEL metrics`` event. ``epoch`` 0 means the event named no epoch."""

    __tablename__ = "evals"
    __table_args__ = (UniqueConstraint("job_id", "iteration", "epoch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    accuracy: Mapped[float | None] = mapped_column(Float)
    precision: Mapped[float | None] = mapped_column(Float)
    recall: Mapped[float | None] = mapped_column(Float)
    f1: Mapped[float | None] = mapped_column(Float)
    auc: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    confusion_matrix: Mapped[list[list[int]] | None] = mapped_column(JsonType)
    model_path: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    evaluated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Artifact(Base):
    """An uploaded output file with its size and SHA256."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))  # path relative to the job's output dir
    uri: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class Instance(Base):
    """A compute instance launched for a job. The row exists before the launch call is made."""

    __tablename__ = "instances"
    __table_args__ = (
        Index(None, "provider", "instance_id"),
        Index(None, "state"),
        Index(None, "job_id"),
        CheckConstraint("state IN (" + ", ".join(f"'{s}'" for s in INSTANCE_STATES) + ")", name="state"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    provider: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128), unique=True)
    instance_id: Mapped[str | None] = mapped_column(String(128))
    instance_type: Mapped[str | None] = mapped_column(String(128))
    region: Mapped[str | None] = mapped_column(String(64))
    price_per_hour: Mapped[float | None] = mapped_column(Float)
    spot: Mapped[bool] = mapped_column(Boolean, default=False)
    state: Mapped[str] = mapped_column(String(16), default=InstanceState.REQUESTED.value)
    state_reason: Mapped[str | None] = mapped_column(Text)
    #: Why the attempt was given up (:class:`~gpu_training.results.states.AbandonReason`), None: it was not.
    abandon_reason: Mapped[str | None] = mapped_column(String(16))
    address: Mapped[str | None] = mapped_column(String(255))
    details: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    launched_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    ready_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    terminated_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    #: Seconds billed, launch to verified termination; cost_usd = billable_seconds/3600 * price_per_hour.
    billable_seconds: Mapped[float | None] = mapped_column(Float)
    cost_usd: Mapped[float | None] = mapped_column(Float)
    #: The cloud interrupted this (spot / interruptible) instance; ``interruption`` in its words.
    interrupted_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
    interruption: Mapped[str | None] = mapped_column(String(500))
    #: The node's rank in a multi-node job (0: the node of rank 0, which writes global.json; 0 for
    #: every single-node instance).
    node_rank: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: The launch attempt the node belongs to (its rank-0 instance's name); the nodes of one
    #: attempt are launched, replaced and terminated together. None: a single-node instance.
    node_group: Mapped[str | None] = mapped_column(String(128))
    #: The GPU model and count of the offer launched (None / 0: the offer has none, e.g. local).
    gpu_name: Mapped[str | None] = mapped_column(String(64))
    gpu_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


NOTIFICATION_STATUSES = ("sending", "sent", "failed")


class Notification(Base):
    """One notification of a job to one target, claimed (``sending``) before it is sent, so a
    retried task or a restarted trigger never sends it twice; ``failed`` keeps the notifier's error."""

    __tablename__ = "notifications"
    __table_args__ = (
        UniqueConstraint("job_id", "event", "event_key", "target"),
        Index(None, "job_id"),
        CheckConstraint("status IN (" + ", ".join(f"'{s}'" for s in NOTIFICATION_STATUSES) + ")", name="status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    #: completed, failed, cancelled or progress
    event: Mapped[str] = mapped_column(String(16))
    #: Tells progress notifications apart (e.g. "epoch 10"); "" for the final ones.
    event_key: Mapped[str] = mapped_column(String(64), default="", server_default="")
    #: The target as the job's ``notify`` param names it (a kind and a connection id: no secret).
    target: Mapped[str] = mapped_column(String(512))
    status: Mapped[str] = mapped_column(String(16), default="sending")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UtcDateTime)


class IngestError(Base):
    """A ``global.json`` line that could not be parsed, kept with its byte offset."""

    __tablename__ = "ingest_errors"
    __table_args__ = (UniqueConstraint("job_id", "byte_offset"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    byte_offset: Mapped[int] = mapped_column(BigInteger)
    error: Mapped[str] = mapped_column(Text)
    line_excerpt: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)


class JobEvent(Base):
    """An event with a phase or name this schema has no table for; kept as it came."""

    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "byte_offset"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    byte_offset: Mapped[int] = mapped_column(BigInteger)
    ts: Mapped[datetime] = mapped_column(UtcDateTime)
    phase: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(64))
    iteration: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int | None] = mapped_column(Integer)
    data: Mapped[dict[str, Any] | None] = mapped_column(JsonType)


class Model(Base):
    """A promotion decision: a retrained model compared with the champion of its name.

    One row per (name, job): a retried promotion finds its row instead of deciding twice. At most
    one row per name has ``is_champion`` (a partial unique index); promoting moves the flag in the
    same transaction. ``reason`` says why in words, e.g. "f1 0.9312 >= champion 0.9101 + 0.005".
    """

    __tablename__ = "models"
    __table_args__ = (
        UniqueConstraint("name", "job_id"),
        Index(None, "name", "decided_at"),
        Index(
            "ux_models_champion",
            "name",
            unique=True,
            sqlite_where=text("is_champion"),
            postgresql_where=text("is_champion"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: The model's name: the retraining spec's name.
    name: Mapped[str] = mapped_column(String(128))
    job_id: Mapped[int] = mapped_column(ForeignKey("training_jobs.id", ondelete="CASCADE"))
    metric: Mapped[str] = mapped_column(String(64))
    #: The candidate's metric (from its last evaluation); NULL when it reported none.
    value: Mapped[float | None] = mapped_column(Float)
    #: The champion it was compared with (NULL: there was none).
    previous_champion_job_id: Mapped[int | None] = mapped_column(ForeignKey("training_jobs.id", ondelete="SET NULL"))
    previous_value: Mapped[float | None] = mapped_column(Float)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    is_champion: Mapped[bool] = mapped_column(Boolean, default=False)
    reason: Mapped[str] = mapped_column(Text)
    #: The rule as written in the spec, e.g. {"metric": "f1", "mode": "max", "min_delta": 0.005}.
    rule: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    dag_id: Mapped[str] = mapped_column(String(250))
    run_id: Mapped[str] = mapped_column(String(250))
    decided_at: Mapped[datetime] = mapped_column(UtcDateTime, default=utcnow)
    #: When another model took its place (NULL while champion, or never promoted).
    retired_at: Mapped[datetime | None] = mapped_column(UtcDateTime)
