"""Reads of the results DB for the API, each one short and index-backed.

Jobs are listed newest first (``created_at DESC, id DESC``) by the indexes ``(project_id,
created_at)``, ``(status, created_at)``, ``(provider, created_at)`` and ``(created_at)``; everything
of one job is read by ``job_id`` (the unique natural keys start with it).

**Bounded answers.** A job's epochs and evaluations (a trainer may report hundreds of thousands)
are only ever read a page at a time: ``LIMIT``/``OFFSET`` in ``(iteration, epoch)`` order, the order
of the unique indexes ``(job_id, iteration, epoch)``, at most :data:`MAX_PAGE` rows; a chart gets
them downsampled in the database (:func:`metric_series`). The details list at most
:data:`MAX_ITERATIONS` iterations and :data:`MAX_ARTIFACTS` artifacts, with their totals. The DAG ids of all jobs
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
import json
import re
import uuid as uuidlib
from collections.abc import Collection, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Integer,
    Numeric,
    Select,
    and_,
    case,
    cast,
    func,
    literal,
    select,
    text,
    tuple_,
)
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.functions import FunctionElement
from sqlalchemy.sql.selectable import NamedFromClause

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

#: The most epochs or evaluations one answer holds (``limit``'s maximum).
MAX_PAGE = 5000
#: The page of epochs and of evaluations of ``/details`` when none is asked for.
DETAILS_PAGE = 500
#: ``/details`` holds at most this many iterations (the first by number; each has at most 3 steps)
#: and artifacts (the first by name).
MAX_ITERATIONS = 1000
MAX_ARTIFACTS = 2000
#: A value larger than this (bytes of its text or JSON) is left out of an answer (null): one event of
#: a trainer may be 4 MiB (the follower's longest line), and a page of such rows gigabytes. A real
#: trainer's metrics, paths and configs are far smaller.
CELL_BYTES: dict[str, dict[str, int]] = {
    "epoch_train": {"metrics": 16 << 10, "model_path": 4 << 10, "optimizer_path": 4 << 10},
    "evals": {"metrics": 16 << 10, "confusion_matrix": 256 << 10, "model_path": 4 << 10},
    "training_iterations": {"config": 16 << 10},
    "training_steps": {"config": 16 << 10},
}
#: The training config a trainer reported is left out of ``/details`` (null) past this many bytes.
CONFIG_BYTES = 64 << 10
#: A list of rows in an answer holds fewer than its ``limit`` when they would pass this many bytes:
#: a page of 5000 ordinary epochs (~300 bytes each) fits; one of 4 MiB rows is cut short.
PAGE_BYTES = 4 << 20
#: What a row takes in JSON besides its capped columns, about (keys, numbers, dates).
ROW_BYTES = 320
#: A metric series holds the last this many iterations (by number) that have epochs.
MAX_SERIES_ITERATIONS = 50
#: The most buckets a metric series has in all (``points``' maximum).
MAX_SERIES_POINTS = 5000
#: What a metric's name may be in a series: no quote, backslash or control character (it is a JSON
#: path in SQLite). Every name a trainer reports as a JSON key and a chart offers fits.
METRIC_PATTERN = r'^[^"\\\x00-\x1f]{1,200}$'

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
class Page:
    """``limit`` rows after ``offset`` of them."""

    limit: int
    offset: int = 0


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


def _has_nul(*values: Any) -> bool:
    """Whether a string has a NUL character: stored text never has one (PostgreSQL's cannot, and
    psycopg2 refuses to send it), so such a filter matches nothing."""
    return any(isinstance(value, str) and "\x00" in value for value in values)


class text_bytes(FunctionElement[int]):
    """The size in bytes of a value's text (a JSON column's serialization)."""

    type = Integer()
    name = "text_bytes"
    inherit_cache = True


@compiles(text_bytes)
def _text_bytes_sqlite(element: text_bytes, compiler: Any, **kw: Any) -> str:
    return f"length(CAST({compiler.process(element.clauses, **kw)} AS BLOB))"


@compiles(text_bytes, "postgresql")
def _text_bytes_postgresql(element: text_bytes, compiler: Any, **kw: Any) -> str:
    return f"octet_length(CAST({compiler.process(element.clauses, **kw)} AS TEXT))"


@functools.cache
def _columns(model: type[BaseModel], table: type[Base]) -> tuple[ColumnElement[Any], ...]:
    """The columns of ``table`` named as fields of the response ``model``, in the model's order (its
    other fields are derived from them or from other rows); one over its :data:`CELL_BYTES` is NULL."""
    columns = table.__table__.c
    caps = CELL_BYTES.get(table.__tablename__, {})
    return tuple(
        case((text_bytes(columns[name]) <= caps[name], columns[name])).label(name) if name in caps else columns[name]
        for name in model.model_fields
        if name in columns
    )


def _json_bytes(value: Any) -> int:
    return len(json.dumps(value, default=str).encode())


def _row_bytes(table: type[Base], selected: Sequence[ColumnElement[Any]]) -> ColumnElement[int]:
    """About the JSON size of a row of ``selected`` columns: :data:`ROW_BYTES` and its capped ones."""
    caps = CELL_BYTES.get(table.__tablename__, {})
    total: ColumnElement[int] = literal(ROW_BYTES, Integer)
    for column in selected:
        if column.key in caps:
            total = total + func.coalesce(text_bytes(column), 0)
    return total


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
    conn: Connection,
    job_id: int,
    model: type[BaseModel],
    table: type[Base],
    *order_by: Any,
    extra: Any = (),
    limit: int | None = None,
    offset: int = 0,
    where: Any = (),
) -> list[dict[str, Any]]:
    """The rows of one job in ``table`` as ``model`` dicts (see :func:`_dicts`), ``extra`` columns too."""
    stmt = select(*_columns(model, table), *extra).where(table.__table__.c.job_id == job_id, *where)
    stmt = stmt.order_by(*order_by)
    if limit is not None:
        stmt = stmt.limit(limit).offset(offset)
    return _dicts(conn, model, stmt)


def _sized_rows(
    conn: Connection,
    job_id: int,
    model: type[BaseModel],
    table: type[Base],
    order: Sequence[str],
    *,
    limit: int | None = None,
    offset: int = 0,
    where: Any = (),
    extra: Sequence[ColumnElement[Any]] = (),
    budget: int | None = None,
) -> tuple[list[dict[str, Any]], bool]:
    """Rows of one job in ``table`` (``model`` dicts, ``extra`` columns too) in ``order`` (column
    names), ``limit`` of them after ``offset``, fewer when their bytes would pass ``budget``
    (default :data:`PAGE_BYTES`); and whether they were cut so (:func:`_within_budget`)."""
    columns = table.__table__.c
    selected = (*_columns(model, table), *extra)
    keys = [f"_order_{i}" for i in range(len(order))]  # the order's columns, whether selected or not
    inner = (
        select(*selected, *(columns[name].label(key) for name, key in zip(order, keys, strict=True)))
        .add_columns(_row_bytes(table, selected).label("_bytes"))
        .where(columns.job_id == job_id, *where)
        .order_by(*(columns[name] for name in order))
        .offset(offset)
    )
    page = inner if limit is None else inner.limit(limit)
    names = [str(c.key) for c in selected]
    return _within_budget(conn, model, page, names, [(key, False) for key in keys], budget or PAGE_BYTES)


def _within_budget(
    conn: Connection,
    model: type[BaseModel],
    page: Select,
    names: Sequence[str],
    order: Sequence[tuple[str, bool]],
    budget: int,
) -> tuple[list[dict[str, Any]], bool]:
    """The rows of ``page`` (columns ``names``, then the ``order`` keys (name, descending) it is
    ordered and limited by, and ``_bytes``) from its first on while their bytes stay under ``budget``
    (the first row always), as ``model`` dicts; and whether rows were left out so. The sizes are
    added up in SQL, a running sum over the page only: no row past the budget leaves the database."""
    sub = page.subquery("page")
    window = [sub.c[key].desc() if descending else sub.c[key] for key, descending in order]
    running = func.sum(sub.c._bytes).over(order_by=window).label("_running")
    ranked = select(*(sub.c[name] for name in names), *(sub.c[key] for key, _ in order), sub.c._bytes, running)
    ranked_rows = ranked.subquery("ranked")
    stmt = (
        select(*(ranked_rows.c[name] for name in names), ranked_rows.c._running)
        .where(ranked_rows.c._running - ranked_rows.c._bytes < budget)
        .order_by(*(ranked_rows.c[key].desc() if d else ranked_rows.c[key] for key, d in order))
    )
    rows = _dicts(conn, model, stmt)
    # Cut short: the next row would have started at the last one's running total, past the budget.
    cut = bool(rows) and rows[-1]["_running"] >= budget
    for row in rows:
        del row["_running"]
    return rows, cut


#: Epochs and evaluations in training order: the unique index (job_id, iteration, epoch).
_TRAINING_ORDER = ("iteration", "epoch")


def _count_of_job(conn: Connection, job_id: int, table: type[Base], where: Any = ()) -> int:
    column = table.__table__.c.job_id
    return int(conn.scalar(select(func.count()).select_from(table).where(column == job_id, *where)) or 0)


def _page_of_job(
    conn: Connection, job_id: int, model: type[BaseModel], table: type[Base], page: Page, iteration: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One page of a job's epochs or evaluations (``model`` dicts) in (iteration, epoch) order (fewer
    rows than ``page.limit`` when they would pass :data:`PAGE_BYTES`), and how many there are: two
    index range scans of ``(job_id, iteration, epoch)``."""
    columns = table.__table__.c
    where = () if iteration is None else (columns.iteration == iteration,)
    rows, cut = (
        _sized_rows(
            conn, job_id, model, table, ("iteration", "epoch"), limit=page.limit, offset=page.offset, where=where
        )
        if page.limit
        else ([], False)
    )
    if page.limit and not cut and len(rows) < page.limit and (rows or not page.offset):
        return rows, page.offset + len(rows)  # the last page: no need to count
    return rows, _count_of_job(conn, job_id, table, where)


def _evaluation_rows(rows: list[dict[str, Any]], job_uuid: str) -> list[dict[str, Any]]:
    for row in rows:
        row.update(model_id=model_id(job_uuid, row["iteration"], row["epoch"]), job_uuid=job_uuid)
    return rows


def list_jobs(
    store: ResultsStore, filters: JobFilters, *, readable: Collection[str] | None, limit: int, offset: int
) -> tuple[list[dict[str, Any]], int]:
    """Jobs matching ``filters`` (plain :class:`Job` dicts), newest first, and how many match;
    ``readable``: only these DAGs (None: every DAG)."""
    if (readable is not None and not readable) or _has_nul(*dataclasses.astuple(filters)):
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


def job_details(
    store: ResultsStore, job: TrainingJob, *, epochs: Page = Page(DETAILS_PAGE), evals: Page = Page(DETAILS_PAGE)
) -> dict[str, Any]:
    """The job with its iterations (steps, one page of its epochs and one of its evaluations),
    artifacts and instances, and the totals: a plain :class:`JobDetails` dict, read without ORM
    objects. Every read is bounded, whatever the job's size."""
    with store.engine.connect() as conn:
        of_job = functools.partial(_rows_of_job, conn, job.id)
        iterations, cut = _sized_rows(conn, job.id, Iteration, TrainingIteration, ("iteration",), limit=MAX_ITERATIONS)
        iterations_total = len(iterations)
        if cut or iterations_total == MAX_ITERATIONS:
            iterations_total = _count_of_job(conn, job.id, TrainingIteration)
        epoch_rows, epochs_total = _page_of_job(conn, job.id, Epoch, EpochTrain, epochs)
        eval_rows, evals_total = _page_of_job(conn, job.id, Evaluation, Eval, evals)
        numbers = {it["iteration"] for it in iterations} | {row["iteration"] for row in (*epoch_rows, *eval_rows)}
        # At most 3 steps an iteration (unique step_type): as bounded as the iterations.
        steps, _ = _sized_rows(
            conn,
            job.id,
            Step,
            TrainingStep,
            ("iteration", "id"),
            extra=[TrainingStep.__table__.c.iteration],
            where=[TrainingStep.iteration.in_(sorted(numbers))],
        )
        artifacts = of_job(ArtifactInfo, Artifact, Artifact.name, limit=MAX_ARTIFACTS)
        artifacts_total = len(artifacts)
        if artifacts_total == MAX_ARTIFACTS:
            artifacts_total = _count_of_job(conn, job.id, Artifact)
        instances = of_job(InstanceInfo, Instance, Instance.id)
        latest = of_job(Evaluation, Eval, Eval.iteration.desc(), Eval.epoch.desc(), limit=1)
    by_number = {it["iteration"]: it for it in iterations}
    by_number |= {n: dict.fromkeys(Iteration.model_fields) | {"iteration": n} for n in numbers - by_number.keys()}
    for it in by_number.values():
        it.update(steps=[], epochs=[], evals=[])
    for row in epoch_rows:
        by_number[row["iteration"]]["epochs"].append(row)
    for row in _evaluation_rows(eval_rows, job.uuid):
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
        "training_config": job.training_config if _json_bytes(job.training_config) <= CONFIG_BYTES else None,
        "outputs_uri": job.outputs_uri,
        "epochs_total": epochs_total,
        "epochs_limit": epochs.limit,
        "epochs_offset": epochs.offset,
        "evals_total": evals_total,
        "evals_limit": evals.limit,
        "evals_offset": evals.offset,
        "iterations_total": iterations_total,
        "artifacts_total": artifacts_total,
        "latest_evaluation": _evaluation_rows(latest, job.uuid)[0] if latest else None,
    }


def epochs_page(
    store: ResultsStore, job: TrainingJob, page: Page, iteration: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One page of the job's epochs (of one iteration) as plain :class:`Epoch` dicts, and the total."""
    with store.engine.connect() as conn:
        return _page_of_job(conn, job.id, Epoch, EpochTrain, page, iteration)


def evaluations_page(
    store: ResultsStore, job: TrainingJob, page: Page, iteration: int | None = None
) -> tuple[list[dict[str, Any]], int]:
    """One page of the job's evaluations (of one iteration) as plain :class:`Evaluation` dicts, and
    the total."""
    with store.engine.connect() as conn:
        rows, total = _page_of_job(conn, job.id, Evaluation, Eval, page, iteration)
    return _evaluation_rows(rows, job.uuid), total


def iteration_epochs(
    store: ResultsStore, job: TrainingJob, iteration: int, page: Page
) -> tuple[list[dict[str, Any]], int] | None:
    """One page of the epochs of one iteration and their total, or None when the job has no such
    iteration."""
    with store.engine.connect() as conn:
        exists = conn.scalar(
            select(TrainingIteration.id).where(
                TrainingIteration.job_id == job.id, TrainingIteration.iteration == iteration
            )
        )
        if exists is None:
            return None
        return _page_of_job(conn, job.id, Epoch, EpochTrain, page, iteration)


def evaluations_of(
    store: ResultsStore, job: TrainingJob, model: ModelId, page: Page
) -> tuple[list[dict[str, Any]], int]:
    """One page of the evaluations of one checkpoint, iteration or job (``model``), in checkpoint
    order, as plain :class:`Evaluation` dicts, and how many there are."""
    where = []
    if model.iteration is not None:
        where.append(Eval.iteration == model.iteration)
    if model.epoch is not None:
        where.append(Eval.epoch == model.epoch)
    with store.engine.connect() as conn:
        rows, _ = _sized_rows(
            conn, job.id, Evaluation, Eval, _TRAINING_ORDER, limit=page.limit, offset=page.offset, where=where
        )
        total = _count_of_job(conn, job.id, Eval, where)
    return _evaluation_rows(rows, job.uuid), total


def latest_evaluations(
    store: ResultsStore, *, readable: Collection[str] | None, limit: int, offset: int
) -> list[dict[str, Any]]:
    """The most recently stored evaluations of every job (of ``readable`` DAGs), newest first, as
    plain :class:`Evaluation` dicts (fewer than ``limit`` past :data:`PAGE_BYTES`)."""
    if readable is not None and not readable:
        return []
    selected = (*_columns(Evaluation, Eval), TrainingJob.uuid.label("job_uuid"))
    page = select(*selected, Eval.id.label("_order_0"), _row_bytes(Eval, selected).label("_bytes"))
    page = page.join(TrainingJob, TrainingJob.id == Eval.job_id)
    if readable is not None:
        page = page.where(TrainingJob.dag_id.in_(sorted(readable)))
    page = page.order_by(Eval.id.desc()).limit(limit).offset(offset)
    with store.engine.connect() as conn:
        rows, _ = _within_budget(
            conn, Evaluation, page, [str(c.key) for c in selected], [("_order_0", True)], PAGE_BYTES
        )
    for row in rows:
        row["model_id"] = model_id(row["job_uuid"], row["iteration"], row["epoch"])
    return rows


def stream_cursor(conn: Connection, job_id: int) -> str:
    """The job's stream cursor now (``"{last epoch row id}-{last eval row id}"``, :mod:`.stream`):
    the rows of one job are stored by one ingestion at a time, so none with a lower id comes later."""
    last = [
        int(conn.scalar(select(func.coalesce(func.max(table.id), 0)).where(table.job_id == job_id)) or 0)
        for table in (EpochTrain, Eval)
    ]
    return f"{last[0]}-{last[1]}"


def _metric_value(table: NamedFromClause, metric: str, dialect: str) -> ColumnElement[Any]:
    """The number ``metric`` of an epoch row, NULL where it is not a (finite, float-sized) number:
    ``avg_loss`` is a column, other metrics are keys of the ``metrics`` JSON."""
    if metric == "avg_loss":
        return table.c.avg_loss
    if dialect == "postgresql":
        node = table.c.metrics[metric]
        text = node.as_string()
        # Nested CASEs, evaluated in order (AND is not): only a JSON number is cast, and only one
        # that fits a float8 (a JSON number may be any size: CAST would fail on 1e400).
        fits = case((func.abs(cast(text, Numeric)) < 1e300, cast(text, Float)))
        return case((func.jsonb_typeof(node) == "number", fits))
    path = f'$."{metric}"'  # METRIC_PATTERN: no quote nor backslash in it
    number = func.json_type(table.c.metrics, path).in_(["integer", "real"])
    return case((number, func.json_extract(table.c.metrics, path)))


def _number(value: Any) -> float | None:
    return None if value is None else float(value)


#: A series names at most this many metrics (the first by name).
MAX_METRIC_NAMES = 200


def _metric_names(conn: Connection, dialect: str, job_id: int, epochs: Sequence[tuple[int, int]]) -> list[str]:
    """The numeric per-epoch metrics of these epochs of the job ((iteration, epoch) pairs): avg_loss
    first, then by name. Listed in SQL, keys only: the rows' metrics never leave the database, and
    one larger than its :data:`CELL_BYTES` is not even looked into."""
    if not epochs:
        return []
    table = EpochTrain.__table__
    sampled = select(table.c.avg_loss, table.c.metrics).where(
        table.c.job_id == job_id, tuple_(table.c.iteration, table.c.epoch).in_(list(epochs))
    )
    rows = sampled.subquery("sampled")
    cap = CELL_BYTES["epoch_train"]["metrics"]
    small = text_bytes(rows.c.metrics) <= cap
    if dialect == "postgresql":
        obj = case(
            (and_(func.jsonb_typeof(rows.c.metrics) == "object", small), rows.c.metrics), else_=text("'{}'::jsonb")
        )
        each = func.jsonb_each(obj).table_valued("key", "value").render_derived()
        number = func.jsonb_typeof(each.c.value) == "number"
    else:
        obj = case((and_(func.json_type(rows.c.metrics) == "object", small), rows.c.metrics), else_="{}")
        each = func.json_each(obj).table_valued("key", "type")
        number = each.c.type.in_(["integer", "real"])
    names = (
        select(each.c.key)
        .select_from(rows.join(each, literal(True)))
        .where(number, func.length(each.c.key) <= 200, each.c.key != "avg_loss")
        .distinct()
        .order_by(each.c.key)
        .limit(MAX_METRIC_NAMES)
    )
    found = [str(name) for name in conn.scalars(names)]
    loss = conn.scalar(select(func.count()).select_from(rows).where(rows.c.avg_loss.is_not(None)))
    return (["avg_loss"] if loss else []) + found


def metric_series(store: ResultsStore, job: TrainingJob, metric: str, points: int) -> dict[str, Any]:
    """A per-epoch metric of the job for a chart (a plain :class:`MetricSeries` dict), computed in
    the database: the last :data:`MAX_SERIES_ITERATIONS` iterations that have epochs, each cut in at
    most ``points / iterations`` buckets of consecutive epochs with the value at the bucket's last
    epoch and the bucket's lowest and highest (an iteration with fewer epochs: every epoch). Two
    scans of the job's epochs (bounds, buckets), whatever their number; the answer holds at most
    about ``points`` buckets."""
    epochs = EpochTrain.__table__
    dialect = store.engine.dialect.name
    with store.engine.connect() as conn:
        cursor = stream_cursor(conn, job.id)  # first: what is stored later comes by the stream
        per_iteration = (
            select(
                epochs.c.iteration,
                func.min(epochs.c.epoch).label("lo"),
                func.max(epochs.c.epoch).label("hi"),
                func.count().label("n"),
            )
            .where(epochs.c.job_id == job.id)
            .group_by(epochs.c.iteration)
            .order_by(epochs.c.iteration.desc())
            .limit(MAX_SERIES_ITERATIONS)
        )
        bounds = conn.execute(per_iteration).all()[::-1]
        iterations_total = len(bounds)
        if iterations_total == MAX_SERIES_ITERATIONS:
            iterations_total = int(
                conn.scalar(select(func.count(epochs.c.iteration.distinct())).where(epochs.c.job_id == job.id)) or 0
            )
        shown = sum(row.n for row in bounds)
        epochs_total = shown if iterations_total == len(bounds) else _count_of_job(conn, job.id, EpochTrain)
        buckets = max(1, points // max(1, len(bounds)))
        rows = conn.execute(_series_stmt(job.id, metric, dialect, buckets, bounds[0].iteration)).all() if bounds else []
        # The metrics of the epochs sampled (each bucket's last), listed by the database.
        names = _metric_names(conn, dialect, job.id, [(row.iteration, row.last) for row in rows])
    by_iteration: dict[int, dict[str, Any]] = {
        b.iteration: {
            "iteration": b.iteration,
            "epochs_total": b.n,
            "epochs": [],
            "values": [],
            "low": [],
            "high": [],
            "counts": [],
        }
        for b in bounds
    }
    for row in rows:
        series = by_iteration[row.iteration]
        series["epochs"].append(row.last)
        series["values"].append(_number(row.value))
        series["low"].append(_number(row.low))
        series["high"].append(_number(row.high))
        series["counts"].append(row.n)
    return {
        "job_uuid": job.uuid,
        "metric": metric,
        "metrics": names,
        "points": buckets,
        "epochs_total": epochs_total,
        "iterations_total": iterations_total,
        "iterations": list(by_iteration.values()),
        "cursor": cursor,
    }


def _series_stmt(job_id: int, metric: str, dialect: str, buckets: int, first_iteration: int) -> Select:
    """Per (iteration, bucket) of the job's epochs from ``first_iteration`` on: the bucket's last
    epoch, lowest and highest value and size, then that last epoch's value."""
    epochs = EpochTrain.__table__
    e, r = epochs.alias("e"), epochs.alias("r")
    bounds = (
        select(
            e.c.iteration,
            func.min(e.c.epoch).label("lo"),
            func.max(e.c.epoch).label("hi"),
            func.count().label("n"),
        )
        .where(e.c.job_id == job_id, e.c.iteration >= first_iteration)
        .group_by(e.c.iteration)
        .subquery("bounds")
    )
    # Floats: epoch numbers are INTEGER, their differences and products may not fit one.
    span = cast(bounds.c.hi, Float) - cast(bounds.c.lo, Float) + 1
    position = (cast(e.c.epoch, Float) - cast(bounds.c.lo, Float)) * buckets / span
    # Every epoch its own bucket when they fit (sparse epoch numbers are not merged).
    whole = func.floor(position) if dialect == "postgresql" else cast(position, Integer)  # >= 0: truncation floors
    bucket = case((bounds.c.n <= buckets, cast(e.c.epoch, Float)), else_=cast(whole, Float))
    values = (
        select(
            e.c.iteration,
            e.c.epoch,
            bucket.label("bucket"),
            _metric_value(e, metric, dialect).label("value"),
        )
        .select_from(e.join(bounds, bounds.c.iteration == e.c.iteration))
        .where(e.c.job_id == job_id)
        .subquery("v")
    )
    grouped = (
        select(
            values.c.iteration,
            func.max(values.c.epoch).label("last"),
            func.min(values.c.value).label("low"),
            func.max(values.c.value).label("high"),
            func.count().label("n"),
        )
        .group_by(values.c.iteration, values.c.bucket)
        .subquery("g")
    )
    return (
        select(
            grouped.c.iteration,
            grouped.c.last,
            grouped.c.low,
            grouped.c.high,
            grouped.c.n,
            _metric_value(r, metric, dialect).label("value"),
        )
        .select_from(
            grouped.join(
                r, and_(r.c.job_id == job_id, r.c.iteration == grouped.c.iteration, r.c.epoch == grouped.c.last)
            )
        )
        .order_by(grouped.c.iteration, grouped.c.last)
    )


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
    if (readable is not None and not readable) or _has_nul(name):
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
    """What a stream poll found: the job as it is now, and rows stored after the cursor (plain
    :class:`Epoch` and :class:`Evaluation` dicts); ``more``: rows were left for the next poll."""

    job: TrainingJob
    epochs: Sequence[dict[str, Any]]
    evals: Sequence[dict[str, Any]]
    more: bool


def rows_after(store: ResultsStore, job_id: int, *, epoch_id: int, eval_id: int, limit: int) -> NewRows | None:
    """The job, then its epochs and evals with ids above the cursor (ids grow in commit order:
    one job's rows are written by one ingestion transaction at a time), ``limit`` of each at most,
    fewer past :data:`PAGE_BYTES`. The job is read first, so a terminal status seen here comes with
    every row stored before it."""
    with store.session() as s:
        job_row = s.get(TrainingJob, job_id)
        if job_row is None:
            return None
        conn = s.connection()
        epochs, epochs_cut = _sized_rows(
            conn, job_id, Epoch, EpochTrain, ("id",), limit=limit, where=[EpochTrain.id > epoch_id]
        )
        evals, evals_cut = _sized_rows(conn, job_id, Evaluation, Eval, ("id",), limit=limit, where=[Eval.id > eval_id])
    more = epochs_cut or evals_cut or len(epochs) == limit or len(evals) == limit
    return NewRows(job_row, epochs, _evaluation_rows(evals, job_row.uuid), more)
