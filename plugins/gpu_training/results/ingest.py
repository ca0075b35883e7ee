"""The metrics writer: turns parsed ``global.json`` events into result rows, idempotently.

Every row has a natural key (job, iteration, epoch...) that is unique in the schema and is written
with ``INSERT ... ON CONFLICT DO NOTHING``; starts and ends update with ``COALESCE`` so an event
applied twice changes nothing. The caller runs :meth:`MetricsWriter.apply` in the same transaction
that advances the job's byte offset, which makes ingestion exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, func, select, update

from gpu_training.events import MalformedLine, TrainingEvent
from gpu_training.results.models import (
    TERMINAL_STATUSES,
    EpochTrain,
    Eval,
    IngestError,
    Instance,
    JobEvent,
    TrainingIteration,
    TrainingJob,
    TrainingStep,
    utcnow,
)

JOBS: Table = TrainingJob.__table__  # type: ignore[assignment]
ITERATIONS: Table = TrainingIteration.__table__  # type: ignore[assignment]
STEPS: Table = TrainingStep.__table__  # type: ignore[assignment]
EPOCHS: Table = EpochTrain.__table__  # type: ignore[assignment]
EVALS: Table = Eval.__table__  # type: ignore[assignment]
ERRORS: Table = IngestError.__table__  # type: ignore[assignment]
EVENTS: Table = JobEvent.__table__  # type: ignore[assignment]
INSTANCES: Table = Instance.__table__  # type: ignore[assignment]

STEP_PHASES = {"TRAJECTORY": "traj_gen", "TRAINING": "training", "EVAL_TRAINING": "evaluation"}
EVAL_COLUMNS = ("accuracy", "precision", "recall", "f1", "auc", "loss")
DURATION_KEYS = ("duration_seconds", "duration", "time_taken", "step_time")


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert rows, silently skipping any whose unique key already exists."""
    if not rows:
        return
    dialect = conn.dialect.name
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        conn.execute(sqlite_insert(table).on_conflict_do_nothing(), list(rows))
    elif dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        conn.execute(pg_insert(table).on_conflict_do_nothing(), list(rows))
    else:  # pragma: no cover - other backends: row by row inside savepoints
        from sqlalchemy.exc import IntegrityError

        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(table.insert(), row)
            except IntegrityError:
                pass


def finite_or_none(value: Any) -> float | None:
    """A float for a typed metric column; NaN, infinities and non-numbers become NULL."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by their names, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def duration_from(data: dict[str, Any]) -> float | None:
    for key in DURATION_KEYS:
        number = finite_or_none(data.get(key))
        if number is not None:
            return number
    return None


class MetricsWriter:
    """Applies a batch of events of one job to the results tables on an open connection."""

    def __init__(self, conn: Connection, job_id: int) -> None:
        self.conn = conn
        self.job_id = job_id
        self._current_iteration: int | None = None

    def apply(self, events: Iterable[TrainingEvent], errors: Iterable[MalformedLine] = ()) -> None:
        iterations: dict[int, dict[str, Any]] = {}
        steps: dict[tuple[int, str], dict[str, Any]] = {}
        epochs: dict[tuple[int, int], dict[str, Any]] = {}
        evals: dict[tuple[int, int], dict[str, Any]] = {}
        unknown: list[dict[str, Any]] = []
        job_events: list[TrainingEvent] = []

        for ev in events:
            phase, name = ev.phase, ev.event
            if phase == "ITERATION" and ev.iteration is not None:
                self._current_iteration = max(self._current_iteration or 0, ev.iteration)
            if phase in ("PROJECT", "GROUP_ITERATION") and name in ("start", "end"):
                job_events.append(ev)
            elif phase == "ITERATION" and name in ("start", "end"):
                it = self._iteration_of(ev)
                entry = iterations.setdefault(it, {})
                entry[name] = ev
            elif phase in STEP_PHASES and name in ("start", "end"):
                it = self._iteration_of(ev)
                iterations.setdefault(it, {})
                steps.setdefault((it, STEP_PHASES[phase]), {})[name] = ev
            elif phase == "TRAINING" and name == "epoch_complete" and ev.epoch is not None:
                it = self._iteration_of(ev)
                iterations.setdefault(it, {})
                epochs.setdefault((it, ev.epoch), self._epoch_row(it, ev))
            elif phase == "EVAL_MODEL" and name == "metrics":
                it = self._iteration_of(ev)
                iterations.setdefault(it, {})
                evals.setdefault((it, ev.epoch or 0), self._eval_row(it, ev))
            else:
                unknown.append(
                    {
                        "job_id": self.job_id,
                        "byte_offset": ev.offset,
                        "ts": ev.ts,
                        "phase": phase[:64],
                        "event": name[:64],
                        "iteration": ev.iteration,
                        "epoch": ev.epoch,
                        "data": json_safe(ev.data),
                    }
                )

        insert_ignore(self.conn, ITERATIONS, [{"job_id": self.job_id, "iteration": it} for it in iterations])
        for it, marks in iterations.items():
            self._update_span(ITERATIONS, (ITERATIONS.c.iteration == it), marks, "time_taken", "config")
        insert_ignore(
            self.conn,
            STEPS,
            [{"job_id": self.job_id, "iteration": it, "step_type": st} for (it, st) in steps],
        )
        for (it, st), marks in steps.items():
            where = (STEPS.c.iteration == it) & (STEPS.c.step_type == st)
            self._update_span(STEPS, where, marks, "duration", "config")
        insert_ignore(self.conn, EPOCHS, list(epochs.values()))
        insert_ignore(self.conn, EVALS, list(evals.values()))
        insert_ignore(self.conn, EVENTS, unknown)
        insert_ignore(
            self.conn,
            ERRORS,
            [
                {"job_id": self.job_id, "byte_offset": e.offset, "error": e.reason, "line_excerpt": e.excerpt}
                for e in errors
            ],
        )
        for ev in job_events:
            self._apply_job_event(ev)

    def _iteration_of(self, ev: TrainingEvent) -> int:
        """The event's own iteration; else the latest one started; else 0 (no iteration)."""
        if ev.iteration is not None:
            return ev.iteration
        if self._current_iteration is None:
            latest = self.conn.execute(
                select(func.max(ITERATIONS.c.iteration)).where(ITERATIONS.c.job_id == self.job_id)
            ).scalar()
            self._current_iteration = int(latest) if latest is not None else 0
        return self._current_iteration

    def _epoch_row(self, iteration: int, ev: TrainingEvent) -> dict[str, Any]:
        data = ev.data
        other = {k: v for k, v in data.items() if k not in ("avg_loss", "model_path", "optimizer_path")}
        return {
            "job_id": self.job_id,
            "iteration": iteration,
            "epoch": ev.epoch,
            "avg_loss": finite_or_none(data.get("avg_loss", data.get("loss"))),
            "model_path": _str_or_none(data.get("model_path")),
            "optimizer_path": _str_or_none(data.get("optimizer_path")),
            "metrics": json_safe(other),
            "completed_at": ev.ts,
        }

    def _eval_row(self, iteration: int, ev: TrainingEvent) -> dict[str, Any]:
        data = ev.data
        row: dict[str, Any] = {
            "job_id": self.job_id,
            "iteration": iteration,
            "epoch": ev.epoch or 0,
            "confusion_matrix": json_safe(data.get("confusion_matrix")),
            "model_path": _str_or_none(data.get("model_path")),
            "metrics": json_safe(
                {k: v for k, v in data.items() if k not in (*EVAL_COLUMNS, "confusion_matrix", "model_path")}
            ),
            "evaluated_at": ev.ts,
        }
        for col in EVAL_COLUMNS:
            row[col] = finite_or_none(data.get(col))
        return row

    def _update_span(
        self, table: Table, where: Any, marks: dict[str, TrainingEvent], duration_col: str, config_col: str
    ) -> None:
        """Record a start/end pair on an iteration or step row without overwriting earlier values."""
        base = (table.c.job_id == self.job_id) & where
        start, end = marks.get("start"), marks.get("end")
        if start is not None:
            values: dict[str, Any] = {"started_at": func.coalesce(table.c.started_at, start.ts)}
            if start.data:
                values[config_col] = func.coalesce(table.c[config_col], _json_param(table, config_col, start.data))
            self.conn.execute(update(table).where(base).values(**values))
        if end is not None:
            duration = duration_from(end.data)
            if duration is None:
                started = (
                    start.ts
                    if start is not None
                    else self.conn.execute(select(table.c.started_at).where(base)).scalar()
                )
                duration = (end.ts - started).total_seconds() if isinstance(started, datetime) else None
            self.conn.execute(
                update(table)
                .where(base)
                .values(completed_at=func.coalesce(table.c.completed_at, end.ts), **{duration_col: duration})
            )

    def _apply_job_event(self, ev: TrainingEvent) -> None:
        job = JOBS.c
        if ev.kind == ("PROJECT", "start"):
            self.conn.execute(
                update(JOBS).where(job.id == self.job_id).values(started_at=func.coalesce(job.started_at, ev.ts))
            )
            self.conn.execute(
                update(JOBS)
                .where((job.id == self.job_id) & job.status.in_(("pending", "provisioning")))
                .values(status="running")
            )
        elif ev.kind == ("PROJECT", "end"):
            started = self.conn.execute(select(job.started_at).where(job.id == self.job_id)).scalar()
            taken = duration_from(ev.data)
            if taken is None and started is not None:
                taken = (ev.ts - started).total_seconds()
            self.conn.execute(
                update(JOBS)
                .where(job.id == self.job_id)
                .values(project_ended=True, completed_at=ev.ts, time_taken=taken, updated_at=utcnow())
            )
            self.conn.execute(
                update(JOBS)
                .where((job.id == self.job_id) & job.status.not_in(tuple(TERMINAL_STATUSES)))
                .values(status="completed")
            )
        elif ev.kind == ("GROUP_ITERATION", "start"):
            config = ev.data.get("training_config")
            if isinstance(config, dict):
                self.conn.execute(update(JOBS).where(job.id == self.job_id).values(training_config=json_safe(config)))


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)


def _json_param(table: Table, column: str, value: dict[str, Any]) -> Any:
    from sqlalchemy import literal

    return literal(json_safe(value), type_=table.c[column].type)
