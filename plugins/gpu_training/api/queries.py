"""Reads of the results DB for the API, each one short and index-backed.

Jobs are listed newest first (``created_at DESC, id DESC``) by the indexes ``(project_id,
created_at)``, ``(status, created_at)``, ``(provider, created_at)`` and ``(created_at)``; everything
of one job is read by ``job_id`` (the unique natural keys start with it). The DAG ids of all jobs
come from a loose index scan of ``(dag_id, run_id, stage, map_index)``: one index probe per DAG.
Promotion decisions (``models``: one row per retraining run, not per epoch) are read by name
(``(name, decided_at)``, the champion by the partial unique index on ``name``); the list of models
reads the whole table.

**Model id.** An evaluation evaluated a checkpoint, named ``"{job_uuid}/{iteration}/{epoch}"``
(epoch 0: the ``EVAL_MODEL`` event named no epoch). ``"{job_uuid}"`` or
``"{job_uuid}/{iteration}"`` select every evaluation of the job or of one iteration.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import uuid as uuidlib
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import ColumnElement, Connection, Select, func, select

from gpu_training.api.schemas import (
    ArtifactInfo,
    Champion,
    Epoch,
    Evaluation,
    InstanceInfo,
    Iteration,
    Job,
    LatestDecision,
    ModelDecision,
    Step,
    job_gpu,
    model_id,
)
from gpu_training.results.models import (
    Artifact,
    Base,
    EpochTrain,
    Eval,
    Instance,
    Model,
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
    dag_id: str | None = None
    run_id: str | None = None
    stage: str | None = None
    map_index: int | None = None


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


def model_dag_ids(store: ResultsStore) -> set[str]:
    """The distinct ``dag_id`` of every promotion decision (one row per decision: a small table)."""
    with store.engine.connect() as conn:
        return set(conn.scalars(select(Model.dag_id).distinct()))


def _filtered(stmt: Select, filters: JobFilters, readable: Collection[str] | None) -> Select:
    if filters.status is not None:
        stmt = stmt.where(TrainingJob.status == filters.status)
    if filters.project_id is not None:
        stmt = stmt.where(TrainingJob.project_id == filters.project_id)
    if filters.provider is not None:
        stmt = stmt.where(TrainingJob.provider == filters.provider)
    if filters.since is not None:
        stmt = stmt.where(TrainingJob.created_at >= filters.since)
    # The jobs of one dag run: the unique index (dag_id, run_id, stage, map_index).
    if filters.dag_id is not None:
        stmt = stmt.where(TrainingJob.dag_id == filters.dag_id)
    if filters.run_id is not None:
        stmt = stmt.where(TrainingJob.run_id == filters.run_id)
    if filters.stage is not None:
        stmt = stmt.where(TrainingJob.stage == filters.stage)
    if filters.map_index is not None:
        stmt = stmt.where(TrainingJob.map_index == filters.map_index)
    if readable is not None:
        stmt = stmt.where(TrainingJob.dag_id.in_(sorted(readable)))
    return stmt


@functools.cache
def _columns(model: type[BaseModel], table: type[Base]) -> tuple[ColumnElement[Any], ...]:
    """The columns of ``table`` named as fields of the response ``model``, in the model's order (its
    other fields are derived from them or from other rows)."""
    columns = table.__table__.c
    return tuple(columns[name] for name in model.model_fields if name in columns)


def _dicts(conn: Connection, model: type[BaseModel], stmt: Select) -> list[dict[str, Any]]:
    """The rows of ``stmt`` as plain dicts, no ORM object: every field of ``model`` in its order (None
    where no column of ``stmt`` has the field's name: filled in by the caller), then the other
    columns of ``stmt`` (popped by the caller)."""
    result = conn.execute(stmt)
    keys, blank = tuple(result.keys()), dict.fromkeys(model.model_fields)
    rows = []
    for values in result.all():
        row = blank.copy()
        row.update(zip(keys, values, strict=True))
        rows.append(row)
    return rows


def _rows_of_job(
    conn: Connection, job_id: int, model: type[BaseModel], table: type[Base], *order_by: Any, extra: Any = ()
) -> list[dict[str, Any]]:
    """The rows of one job in ``table`` as ``model`` dicts (see :func:`_dicts`), ``extra`` columns too."""
    stmt = select(*_columns(model, table), *extra).where(table.__table__.c.job_id == job_id)
    return _dicts(conn, model, stmt.order_by(*order_by))


def list_jobs(
    store: ResultsStore, filters: JobFilters, *, readable: Collection[str] | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Jobs matching ``filters`` (plain :class:`Job` dicts), newest first, and how many match;
    ``readable``: only these DAGs (None: every DAG)."""
    if readable is not None and not readable:
        return [], 0
    page = _filtered(select(*_columns(Job, TrainingJob), TrainingJob.params), filters, readable)
    page = page.order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc()).limit(limit).offset(offset)
    count = _filtered(select(func.count()).select_from(TrainingJob), filters, readable)
    with store.engine.connect() as conn:
        jobs = _dicts(conn, Job, page)
        total = int(conn.scalar(count) or 0)
    for row in jobs:
        row["gpu"] = job_gpu(row.pop("params"))
    return jobs, total


def job_details(store: ResultsStore, job: TrainingJob) -> dict[str, Any]:
    """The job with its iterations (steps, epochs, evals), artifacts and instances: a plain
    :class:`JobDetails` dict, read without ORM objects (a job has thousands of epochs)."""
    with store.engine.connect() as conn:
        of_job = functools.partial(_rows_of_job, conn, job.id)
        iterations = of_job(Iteration, TrainingIteration, TrainingIteration.iteration)
        steps = of_job(Step, TrainingStep, TrainingStep.iteration, TrainingStep.id, extra=[TrainingStep.iteration])
        epochs = of_job(Epoch, EpochTrain, EpochTrain.iteration, EpochTrain.epoch)
        evals = of_job(Evaluation, Eval, Eval.iteration, Eval.epoch)
        artifacts = of_job(ArtifactInfo, Artifact, Artifact.name)
        instances = of_job(InstanceInfo, Instance, Instance.id)
    numbers = {row["iteration"] for rows in (epochs, evals) for row in rows}
    by_number = {it["iteration"]: it for it in iterations}
    by_number |= {n: dict.fromkeys(Iteration.model_fields) | {"iteration": n} for n in numbers - by_number.keys()}
    for it in by_number.values():
        it.update(steps=[], epochs=[], evals=[])
    for row in epochs:
        by_number[row["iteration"]]["epochs"].append(row)
    for row in evals:
        row.update(model_id=model_id(job.uuid, row["iteration"], row["epoch"]), job_uuid=job.uuid)
        by_number[row["iteration"]]["evals"].append(row)
    for row in steps:  # the steps of an iteration with no row, epoch nor evaluation are not shown
        of_step = by_number.get(row.pop("iteration"))
        if of_step is not None:
            of_step["steps"].append(row)
    return Job.of(job).model_dump() | {
        "iterations": [by_number[n] for n in sorted(by_number)],
        "artifacts": artifacts,
        "instances": instances,
        "params": job.params or {},
        "training_config": job.training_config,
        "outputs_uri": job.outputs_uri,
    }


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


def artifact_named(store: ResultsStore, job: TrainingJob, name: str) -> Artifact | None:
    """The job's artifact of this name (unique per job), or None."""
    with store.session() as s:
        return s.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))


def _of_readable_dags(stmt: Select, readable: Collection[str] | None) -> Select:
    return stmt if readable is None else stmt.where(Model.dag_id.in_(sorted(readable)))


#: Newest first; decisions of one instant in the order recorded.
_NEWEST_DECISION_FIRST = (Model.decided_at.desc(), Model.id.desc())


def _champions(readable: Collection[str] | None) -> Select:
    """The champion of each name (:class:`Champion` columns, then ``name``), of ``readable`` DAGs."""
    stmt = select(*_columns(Champion, Model), TrainingJob.uuid.label("job_uuid"), Model.name)
    stmt = stmt.join(TrainingJob, TrainingJob.id == Model.job_id).where(Model.is_champion.is_(True))
    return _of_readable_dags(stmt, readable)


def list_models(store: ResultsStore, *, readable: Collection[str] | None) -> list[dict[str, Any]]:
    """One plain :class:`ModelSummary` dict per model name with a decision of ``readable`` DAGs
    (None: every DAG), by name: its champion, latest decision and how many decisions it has."""
    if readable is not None and not readable:
        return []
    ranked = select(
        *_columns(LatestDecision, Model),
        TrainingJob.uuid.label("job_uuid"),
        Model.name,
        func.row_number().over(partition_by=Model.name, order_by=_NEWEST_DECISION_FIRST).label("rank"),
        func.count().over(partition_by=Model.name).label("decision_count"),
    ).join(TrainingJob, TrainingJob.id == Model.job_id)
    ranked_rows = _of_readable_dags(ranked, readable).subquery()
    latest = select(ranked_rows).where(ranked_rows.c.rank == 1).order_by(ranked_rows.c.name)
    with store.engine.connect() as conn:
        latest_rows = _dicts(conn, LatestDecision, latest)
        champions = {row.pop("name"): row for row in _dicts(conn, Champion, _champions(readable))}
    models = []
    for row in latest_rows:
        name, count = row.pop("name"), row.pop("decision_count")
        del row["rank"]
        models.append({"name": name, "champion": champions.get(name), "latest": row, "decision_count": count})
    return models


def model_details(
    store: ResultsStore, name: str, *, readable: Collection[str] | None, limit: int, offset: int
) -> dict[str, Any] | None:
    """The champion and the decisions (newest first) of a model name, of ``readable`` DAGs (None:
    every DAG), as a plain :class:`ModelDetails` dict; None when it has no such decision. The
    previous champion's job uuid is left out (null) when that job's DAG is not readable."""
    if readable is not None and not readable:
        return None
    previous = TrainingJob.__table__.alias("previous")
    page = (
        select(
            *_columns(ModelDecision, Model),
            TrainingJob.uuid.label("job_uuid"),
            previous.c.uuid.label("previous_champion_job_uuid"),
            previous.c.dag_id.label("previous_dag_id"),
        )
        .join(TrainingJob, TrainingJob.id == Model.job_id)
        .outerjoin(previous, previous.c.id == Model.previous_champion_job_id)
        .where(Model.name == name)
    )
    page = _of_readable_dags(page, readable).order_by(*_NEWEST_DECISION_FIRST).limit(limit).offset(offset)
    count = _of_readable_dags(select(func.count()).select_from(Model).where(Model.name == name), readable)
    with store.engine.connect() as conn:
        total = int(conn.scalar(count) or 0)
        if not total:
            return None
        decisions = _dicts(conn, ModelDecision, page)
        champion = _dicts(conn, Champion, _champions(readable).where(Model.name == name))
    for row in decisions:
        previous_dag = row.pop("previous_dag_id")
        if readable is not None and previous_dag is not None and previous_dag not in readable:
            row["previous_champion_job_uuid"] = None
    for row in champion:
        del row["name"]
    return {
        "name": name,
        "champion": champion[0] if champion else None,
        "decisions": decisions,
        "total": total,
        "limit": limit,
        "offset": offset,
    }


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
