"""Reads of the results DB for the API, each one short and index-backed.

Jobs are listed newest first (``created_at DESC, id DESC``) by the indexes ``(project_id,
created_at)``, ``(status, created_at)``, ``(provider, created_at)`` and ``(created_at)``; everything
of one job is read by ``job_id`` (the unique natural keys start with it). The DAG ids of all jobs
come from a loose index scan of ``(dag_id, run_id, map_index)``: one index probe per DAG.

**Model id.** An evaluation evaluated a checkpoint, named ``"{job_uuid}/{iteration}/{epoch}"``
(epoch 0: the ``EVAL_MODEL`` event named no epoch). ``"{job_uuid}"`` or
``"{job_uuid}/{iteration}"`` select every evaluation of the job or of one iteration.
"""

from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib
from collections.abc import Collection, Sequence
from datetime import datetime

from sqlalchemy import Select, func, select

from gpu_training.api.schemas import (
    ArtifactInfo,
    Epoch,
    Evaluation,
    InstanceInfo,
    Iteration,
    Job,
    JobDetails,
    Step,
)
from gpu_training.results.models import (
    Artifact,
    EpochTrain,
    Eval,
    Instance,
    TrainingIteration,
    TrainingJob,
    TrainingStep,
)
from gpu_training.results.store import ResultsStore

_UUID = "[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{12}"
#: What the API accepts as a model id (documented as the ``model_id`` parameter's pattern): a job
#: uuid (hyphenated or 32 hex digits), optionally ``/iteration`` and ``/epoch`` (ASCII digits).
MODEL_ID_PATTERN = f"^{_UUID}(/[0-9]{{1,9}}(/[0-9]{{1,9}})?)?$"
_MODEL_ID = re.compile(f"(?P<job>{_UUID})(?:/(?P<iteration>[0-9]{{1,9}})(?:/(?P<epoch>[0-9]{{1,9}}))?)?")


def canonical_uuid(text: str) -> str | None:
    """The stored form of a job uuid, or None when ``text`` is not a uuid (so no job has it)."""
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class ModelId:
    """``job_uuid[/iteration[/epoch]]``: one checkpoint, or every one of an iteration or a job."""

    job_uuid: str
    iteration: int | None = None
    epoch: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelId:
        match = _MODEL_ID.fullmatch(text)
        job = canonical_uuid(match["job"]) if match else None
        if match is None or job is None:
            raise ValueError(
                f"invalid model_id {text!r}: expected '{{job_uuid}}/{{iteration}}/{{epoch}}', "
                "'{job_uuid}/{iteration}' or '{job_uuid}'"
            )
        iteration, epoch = match["iteration"], match["epoch"]
        return cls(job, int(iteration) if iteration else None, int(epoch) if epoch else None)


@dataclasses.dataclass(frozen=True)
class JobFilters:
    status: str | None = None
    project_id: str | None = None
    provider: str | None = None
    since: datetime | None = None  # created_at >= since


def job(store: ResultsStore, job_uuid: str) -> TrainingJob | None:
    """The job of this uuid (any spelling of it), or None."""
    canonical = canonical_uuid(job_uuid)
    if canonical is None:
        return None
    with store.session() as s:
        return s.scalar(select(TrainingJob).where(TrainingJob.uuid == canonical))


def dag_ids(store: ResultsStore) -> set[str]:
    """The distinct ``dag_id`` of every job: a loose index scan, one probe per DAG, not per job."""
    jobs = TrainingJob.__table__.c
    seed = select(func.min(jobs.dag_id).label("dag_id")).cte("dags", recursive=True)
    following = select(func.min(jobs.dag_id)).where(jobs.dag_id > seed.c.dag_id).scalar_subquery()
    walk = seed.union_all(select(following).where(seed.c.dag_id.is_not(None)))
    with store.engine.connect() as conn:
        return {d for d in conn.scalars(select(walk.c.dag_id).where(walk.c.dag_id.is_not(None)))}


def _filtered(stmt: Select, filters: JobFilters, readable: Collection[str] | None) -> Select:
    if filters.status is not None:
        stmt = stmt.where(TrainingJob.status == filters.status)
    if filters.project_id is not None:
        stmt = stmt.where(TrainingJob.project_id == filters.project_id)
    if filters.provider is not None:
        stmt = stmt.where(TrainingJob.provider == filters.provider)
    if filters.since is not None:
        stmt = stmt.where(TrainingJob.created_at >= filters.since)
    if readable is not None:
        stmt = stmt.where(TrainingJob.dag_id.in_(sorted(readable)))
    return stmt


def list_jobs(
    store: ResultsStore, filters: JobFilters, *, readable: Collection[str] | None, limit: int, offset: int
) -> tuple[list[TrainingJob], int]:
    """Jobs matching ``filters``, newest first, and how many match; ``readable``: only these DAGs
    (None: every DAG)."""
    if readable is not None and not readable:
        return [], 0
    page = _filtered(select(TrainingJob), filters, readable)
    page = page.order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc()).limit(limit).offset(offset)
    count = _filtered(select(func.count()).select_from(TrainingJob), filters, readable)
    with store.session() as s:
        return list(s.scalars(page)), int(s.scalar(count) or 0)


def job_details(store: ResultsStore, job: TrainingJob) -> JobDetails:
    """The job with its iterations (steps, epochs, evals), artifacts and instances."""
    with store.session() as s:
        iterations = s.scalars(
            select(TrainingIteration).where(TrainingIteration.job_id == job.id).order_by(TrainingIteration.iteration)
        ).all()
        steps = s.scalars(
            select(TrainingStep).where(TrainingStep.job_id == job.id).order_by(TrainingStep.iteration, TrainingStep.id)
        ).all()
        epochs = s.scalars(
            select(EpochTrain).where(EpochTrain.job_id == job.id).order_by(EpochTrain.iteration, EpochTrain.epoch)
        ).all()
        evals = s.scalars(select(Eval).where(Eval.job_id == job.id).order_by(Eval.iteration, Eval.epoch)).all()
        artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)).all()
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id).order_by(Instance.id)).all()
    numbers = sorted({it.iteration for it in iterations} | {e.iteration for e in epochs} | {e.iteration for e in evals})
    by_number = {it.iteration: it for it in iterations}
    out = []
    for n in numbers:
        it = by_number.get(n)
        out.append(
            Iteration(
                iteration=n,
                config=it.config if it else None,
                started_at=it.started_at if it else None,
                completed_at=it.completed_at if it else None,
                time_taken=it.time_taken if it else None,
                steps=[Step.of(r) for r in steps if r.iteration == n],
                epochs=[Epoch.of(r) for r in epochs if r.iteration == n],
                evals=[Evaluation.of(r, job.uuid) for r in evals if r.iteration == n],
            )
        )
    return JobDetails(
        **Job.of(job).model_dump(),
        iterations=out,
        artifacts=[ArtifactInfo.of(a) for a in artifacts],
        instances=[InstanceInfo.of(i) for i in instances],
    )


def iteration_epochs(store: ResultsStore, job: TrainingJob, iteration: int) -> list[EpochTrain] | None:
    """The epochs of one iteration, or None when the job has no such iteration."""
    with store.session() as s:
        exists = s.scalar(
            select(TrainingIteration.id).where(
                TrainingIteration.job_id == job.id, TrainingIteration.iteration == iteration
            )
        )
        if exists is None:
            return None
        return list(
            s.scalars(
                select(EpochTrain)
                .where(EpochTrain.job_id == job.id, EpochTrain.iteration == iteration)
                .order_by(EpochTrain.epoch)
            )
        )


def evaluations_of(store: ResultsStore, job: TrainingJob, model: ModelId) -> list[Evaluation]:
    """The evaluations of one checkpoint, iteration or job (``model``), in checkpoint order."""
    stmt = select(Eval).where(Eval.job_id == job.id)
    if model.iteration is not None:
        stmt = stmt.where(Eval.iteration == model.iteration)
    if model.epoch is not None:
        stmt = stmt.where(Eval.epoch == model.epoch)
    with store.session() as s:
        return [Evaluation.of(r, job.uuid) for r in s.scalars(stmt.order_by(Eval.iteration, Eval.epoch))]


def latest_evaluations(
    store: ResultsStore, *, readable: Collection[str] | None, limit: int, offset: int
) -> list[Evaluation]:
    """The most recently stored evaluations of every job (of ``readable`` DAGs), newest first."""
    if readable is not None and not readable:
        return []
    stmt = select(Eval, TrainingJob.uuid).join(TrainingJob, TrainingJob.id == Eval.job_id)
    if readable is not None:
        stmt = stmt.where(TrainingJob.dag_id.in_(sorted(readable)))
    stmt = stmt.order_by(Eval.id.desc()).limit(limit).offset(offset)
    with store.session() as s:
        return [Evaluation.of(row, job_uuid) for row, job_uuid in s.execute(stmt).tuples()]


def artifact(store: ResultsStore, job: TrainingJob, artifact_id: int) -> Artifact | None:
    with store.session() as s:
        return s.scalar(select(Artifact).where(Artifact.id == artifact_id, Artifact.job_id == job.id))


@dataclasses.dataclass(frozen=True)
class NewRows:
    """What a stream poll found: the job as it is now, and rows stored after the cursor."""

    job: TrainingJob
    epochs: Sequence[EpochTrain]
    evals: Sequence[Eval]


def rows_after(store: ResultsStore, job_id: int, *, epoch_id: int, eval_id: int, limit: int) -> NewRows | None:
    """The job, then its epochs and evals with ids above the cursor (ids grow in commit order:
    one job's rows are written by one ingestion transaction at a time). The job is read first, so a
    terminal status seen here comes with every row stored before it."""
    with store.session() as s:
        job_row = s.get(TrainingJob, job_id)
        if job_row is None:
            return None
        epochs = s.scalars(
            select(EpochTrain)
            .where(EpochTrain.job_id == job_id, EpochTrain.id > epoch_id)
            .order_by(EpochTrain.id)
            .limit(limit)
        ).all()
        evals = s.scalars(
            select(Eval).where(Eval.job_id == job_id, Eval.id > eval_id).order_by(Eval.id).limit(limit)
        ).all()
    return NewRows(job_row, epochs, evals)
