"""The metrics writer: turns parsed ``global.json`` events into result rows, idempotently.

Every row has a natural key (job, iteration, epoch...) that is unique in the schema and is written
with ``INSERT ... ON CONFLICT DO NOTHING``; starts and ends update with ``COALESCE`` so an event
applied twice changes nothing. The caller runs :meth:`MetricsWriter.apply` in the same transaction
that advances the job's byte offset, which makes ingestion exactly once.

A loss that is not finite (NaN, +-Infinity under a key ``loss`` or ``*loss``) is kept on the job
(``non_finite_loss``, ``non_finite_loss_at``): the first one wins, re-applying changes nothing.

Rows are built per batch and written with one ``executemany`` per table and statement shape, so
the cost per event is a few dict operations, not a statement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import operator
import weakref
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Dialect, Table, bindparam, func, select, update
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.dml import Insert, Update, UpdateBase

from gpu_training.events import MalformedLine, TrainingEvent, gc_paused
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
from gpu_training.results.states import JobStatus

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
#: Length of ``training_jobs.non_finite_loss``; a longer description is cut.
NON_FINITE_LOSS_MAX = 300

_EPOCH_NOT_METRICS = frozenset({"avg_loss", "model_path", "optimizer_path"})
_EVAL_NOT_METRICS = frozenset({*EVAL_COLUMNS, "confusion_matrix", "model_path"})
_isfinite = math.isfinite

# Statements are immutable: built once per table (and dialect), reused by every batch.
_INSERT_IGNORE: dict[tuple[str, Table], Insert] = {}
_SPAN_UPDATES: dict[tuple[Table, str], Update] = {}
_SqlitePlan = tuple[str, Callable[[dict[str, Any]], tuple[Any, ...]], tuple[tuple[int, Callable[[Any], Any]], ...]]
_SQLITE_PLANS: weakref.WeakKeyDictionary[Dialect, dict[tuple[UpdateBase, tuple[str, ...]], _SqlitePlan | None]] = (
    weakref.WeakKeyDictionary()
)


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> int:
    """Insert rows, silently skipping any whose unique key already exists; returns how many were new.

    Every row must have the same keys: they are sent as one ``executemany``.
    """
    if not rows:
        return 0
    dialect = conn.dialect.name
    if dialect in ("sqlite", "postgresql"):
        return _executemany(conn, _insert_ignore_statement(dialect, table), rows)
    from sqlalchemy.exc import IntegrityError  # pragma: no cover - other backends: row by row

    inserted = 0
    for row in rows:
        try:
            with conn.begin_nested():
                conn.execute(table.insert(), row)
            inserted += 1
        except IntegrityError:
            pass
    return inserted


def _insert_ignore_statement(dialect: str, table: Table) -> Insert:
    stmt = _INSERT_IGNORE.get((dialect, table))
    if stmt is None:
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert  # type: ignore[assignment]
        stmt = _INSERT_IGNORE[(dialect, table)] = dialect_insert(table).on_conflict_do_nothing()
    return stmt


def _executemany(conn: Connection, stmt: UpdateBase, rows: Sequence[dict[str, Any]]) -> int:
    """``conn.execute(stmt, rows)`` for a long-lived statement and rows that all have the same keys.

    On SQLite the statement is compiled once per dialect and set of keys, and each row becomes a
    tuple in the compiled order with the parameters' own bind processors applied (JSON,
    datetimes): what Core's ``executemany`` sends, without its generic per-row bookkeeping, which
    is about a third of the cost of a row. Anything else, or a statement that needs more than the
    rows' values (column defaults to fill in), goes through Core. Returns the rows the statement
    changed (an insert that ``ON CONFLICT DO NOTHING`` skipped changed none).
    """
    if not rows:
        return 0
    if conn.dialect.name != "sqlite":
        return _rowcount(conn.execute(stmt, list(rows)), len(rows))
    plans = _SQLITE_PLANS.get(conn.dialect)
    if plans is None:
        plans = _SQLITE_PLANS[conn.dialect] = {}
    keys = tuple(rows[0])
    try:
        plan = plans[(stmt, keys)]
    except KeyError:
        plan = plans[(stmt, keys)] = _sqlite_plan(conn.dialect, stmt, keys)
    if plan is None:
        return _rowcount(conn.execute(stmt, list(rows)), len(rows))
    sql, values_of, processors = plan
    if processors:
        params = []
        for row in rows:
            values = list(values_of(row))
            for i, process in processors:
                values[i] = process(values[i])
            params.append(tuple(values))
    else:
        params = [values_of(row) for row in rows]
    return _rowcount(conn.exec_driver_sql(sql, params), len(rows))


def _rowcount(result: Any, sent: int) -> int:
    """Rows an ``executemany`` changed, as its driver counts them (summed over the rows by sqlite3
    and psycopg2); a driver that does not know (-1) is taken at its word that all were."""
    count = result.rowcount
    return sent if count is None or count < 0 else int(count)


def _sqlite_plan(dialect: Dialect, stmt: UpdateBase, keys: tuple[str, ...]) -> _SqlitePlan | None:
    compiled = cast(SQLCompiler, stmt.compile(dialect=dialect, column_keys=list(keys)))
    order = compiled.positiontup
    if not compiled.positional or not order or sorted(order) != sorted(keys):
        return None
    getter = operator.itemgetter(*order)
    values_of = getter if len(order) > 1 else lambda row: (getter(row),)
    processors = []
    for i, name in enumerate(order):
        process = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
        if process is not None:
            processors.append((i, process))
    return compiled.string, values_of, tuple(processors)


def finite_or_none(value: Any) -> float | None:
    """A float for a typed metric column; NaN, infinities and non-numbers become NULL."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by their names, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return _float_name(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _float_name(value: float) -> str:
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


def _is_plain(data: dict[str, Any]) -> bool:
    """Whether ``data`` is flat JSON without non-finite floats: ``json_safe`` would copy it unchanged.

    The common case, checked with cheap type tests; anything else takes the general path.
    """
    for key, value in data.items():
        kind = type(value)
        if kind is float:
            if not _isfinite(value):
                return False
        elif not (kind is str or kind is int or kind is bool or value is None):
            return False
        if type(key) is not str:
            return False
    return True


def _split_plain(data: dict[str, Any], excluded: frozenset[str]) -> tuple[bool, dict[str, Any]]:
    """``_is_plain(data)`` and ``data`` less the ``excluded`` keys, in one pass."""
    rest = {}
    plain = True
    for key, value in data.items():
        kind = type(value)
        if kind is float:
            if not _isfinite(value):
                plain = False
        elif not (kind is str or kind is int or kind is bool or value is None):
            plain = False
        if type(key) is not str:
            plain = False
        if key not in excluded:
            rest[key] = value
    return plain, rest


def is_loss_key(key: object) -> bool:
    """``loss``, ``avg_loss``, ``val_loss``, ``train_loss``...: a key that is or ends in ``loss``."""
    return str(key).lower().endswith("loss")


def non_finite_losses(data: dict[str, Any], prefix: str = "") -> list[str]:
    """``key=NaN`` (``Infinity``, ``-Infinity``) for each non-finite loss in ``data``, nested objects too."""
    found: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            found.extend(non_finite_losses(value, f"{prefix}{key}."))
        elif isinstance(value, float) and not math.isfinite(value) and is_loss_key(key):
            found.append(f"{prefix}{key}={_float_name(value)}")
    return found


def describe_non_finite_loss(ev: TrainingEvent, losses: Sequence[str]) -> str:
    """E.g. ``iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN`` (at most 300 characters)."""
    where = []
    if ev.iteration is not None:
        where.append(f"iteration {ev.iteration}")
    if ev.epoch is not None:
        where.append(f"epoch {ev.epoch}")
    where.append(f"{ev.phase}/{ev.event}:")
    text = " ".join(where) + " " + ", ".join(losses)
    return text if len(text) <= NON_FINITE_LOSS_MAX else text[: NON_FINITE_LOSS_MAX - 3] + "..."


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
        #: Description of the first non-finite loss of the last :meth:`apply`, if it had one.
        self.non_finite_loss: str | None = None
        #: Rows the last :meth:`apply` added (iterations, steps, epochs, evaluations, events, errors):
        #: what counts against ``max_metric_rows_per_job``. A row already there adds none.
        self.rows = 0

    def state(self) -> tuple[int | None, str | None, int]:
        """What :meth:`apply` changes in memory, to be put back when its savepoint is rolled back."""
        return self._current_iteration, self.non_finite_loss, self.rows

    def restore(self, state: tuple[int | None, str | None, int]) -> None:
        self._current_iteration, self.non_finite_loss, self.rows = state

    def apply(self, events: Iterable[TrainingEvent], errors: Iterable[MalformedLine] = ()) -> str | None:
        """Write the events' rows; returns the description of the batch's first non-finite loss, if any."""
        with gc_paused():
            return self._apply(events, errors)

    def _apply(self, events: Iterable[TrainingEvent], errors: Iterable[MalformedLine]) -> str | None:
        job_id = self.job_id
        iterations: dict[int, dict[str, TrainingEvent]] = {}
        steps: dict[tuple[int, str], dict[str, TrainingEvent]] = {}
        epochs: dict[tuple[int, int], dict[str, Any]] = {}
        evals: dict[tuple[int, int], dict[str, Any]] = {}
        unknown: list[dict[str, Any]] = []
        job_events: list[TrainingEvent] = []
        first_loss: tuple[TrainingEvent, list[str]] | None = None
        is_plain, split_plain = _is_plain, _split_plain

        for ev in events:
            phase, name, data = ev.phase, ev.event, ev.data
            if name == "epoch_complete" and phase == "TRAINING" and ev.epoch is not None:  # most events
                plain, metrics = split_plain(data, _EPOCH_NOT_METRICS)
                if not plain:
                    losses = non_finite_losses(data)
                    if losses and (first_loss is None or ev.offset < first_loss[0].offset):
                        first_loss = (ev, losses)
                it = ev.iteration if ev.iteration is not None else self._iteration_of(ev)
                if it not in iterations:
                    iterations[it] = {}
                if (it, ev.epoch) not in epochs:
                    epochs[(it, ev.epoch)] = self._epoch_row(it, ev, metrics if plain else json_safe(metrics))
                continue
            plain = is_plain(data)
            if not plain:
                losses = non_finite_losses(data)
                if losses and (first_loss is None or ev.offset < first_loss[0].offset):
                    first_loss = (ev, losses)
            if phase == "ITERATION" and ev.iteration is not None:
                self._current_iteration = max(self._current_iteration or 0, ev.iteration)
            if phase in ("PROJECT", "GROUP_ITERATION") and name in ("start", "end"):
                job_events.append(ev)
            elif phase == "ITERATION" and name in ("start", "end"):
                iterations.setdefault(self._iteration_of(ev), {})[name] = ev
            elif phase in STEP_PHASES and name in ("start", "end"):
                it = self._iteration_of(ev)
                iterations.setdefault(it, {})
                steps.setdefault((it, STEP_PHASES[phase]), {})[name] = ev
            elif phase == "EVAL_MODEL" and name == "metrics":
                it = self._iteration_of(ev)
                iterations.setdefault(it, {})
                evals.setdefault((it, ev.epoch or 0), self._eval_row(it, ev))
            else:
                unknown.append(
                    {
                        "job_id": job_id,
                        "byte_offset": ev.offset,
                        "ts": ev.ts,
                        "phase": phase[:64],
                        "event": name[:64],
                        "iteration": ev.iteration,
                        "epoch": ev.epoch,
                        "data": data if plain else json_safe(data),
                    }
                )

        rows = insert_ignore(self.conn, ITERATIONS, [{"job_id": job_id, "iteration": it} for it in iterations])
        self._write_spans(ITERATIONS, [((it,), marks) for it, marks in iterations.items()], "time_taken", "config")
        rows += insert_ignore(
            self.conn,
            STEPS,
            [{"job_id": job_id, "iteration": it, "step_type": st} for (it, st) in steps],
        )
        self._write_spans(STEPS, list(steps.items()), "duration", "config")
        rows += insert_ignore(self.conn, EPOCHS, list(epochs.values()))
        rows += insert_ignore(self.conn, EVALS, list(evals.values()))
        rows += insert_ignore(self.conn, EVENTS, unknown)
        rows += insert_ignore(
            self.conn,
            ERRORS,
            [{"job_id": job_id, "byte_offset": e.offset, "error": e.reason, "line_excerpt": e.excerpt} for e in errors],
        )
        self.rows = rows
        for ev in job_events:
            self._apply_job_event(ev)
        self.non_finite_loss = None
        if first_loss is not None:
            ev, losses = first_loss
            self.non_finite_loss = describe_non_finite_loss(ev, losses)
            job = JOBS.c
            self.conn.execute(
                update(JOBS)
                .where((job.id == job_id) & job.non_finite_loss.is_(None))
                .values(non_finite_loss=self.non_finite_loss, non_finite_loss_at=ev.ts)
            )
        return self.non_finite_loss

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

    def _epoch_row(self, iteration: int, ev: TrainingEvent, metrics: dict[str, Any]) -> dict[str, Any]:
        """The ``epoch_train`` row; ``metrics``: the JSON-safe data less the columns' keys."""
        data = ev.data
        loss = data["avg_loss"] if "avg_loss" in data else data.get("loss")
        model_path, optimizer_path = data.get("model_path"), data.get("optimizer_path")
        return {
            "job_id": self.job_id,
            "iteration": iteration,
            "epoch": ev.epoch,
            "avg_loss": loss if type(loss) is float and loss - loss == 0.0 else finite_or_none(loss),
            "model_path": model_path if model_path is None or type(model_path) is str else str(model_path),
            "optimizer_path": (
                optimizer_path if optimizer_path is None or type(optimizer_path) is str else str(optimizer_path)
            ),
            "metrics": metrics,
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
            "metrics": json_safe({k: v for k, v in data.items() if k not in _EVAL_NOT_METRICS}),
            "evaluated_at": ev.ts,
        }
        for col in EVAL_COLUMNS:
            row[col] = finite_or_none(data.get(col))
        return row

    def _write_spans(
        self,
        table: Table,
        spans: Sequence[tuple[tuple[Any, ...], dict[str, TrainingEvent]]],
        duration_col: str,
        config_col: str,
    ) -> None:
        """Record start/end pairs on iteration or step rows without overwriting earlier values.

        ``spans`` holds (natural key after ``job_id``, {"start": event, "end": event}). A start sets
        ``started_at`` (and the config, from its data) only where still NULL; an end sets
        ``completed_at`` likewise and the duration: the event's own, else end minus the start of
        this batch, else minus the ``started_at`` already stored. One ``executemany`` per shape.
        """
        if not spans:
            return
        key_cols = _span_key_columns(table)
        job_id = self.job_id

        def key_params(key: tuple[Any, ...]) -> dict[str, Any]:
            params = {"b_job_id": job_id}
            for col, value in zip(key_cols, key, strict=True):
                params[f"b_{col}"] = value
            return params

        plain_starts, config_starts, ends = [], [], []
        stored_start_needed: list[tuple[Any, ...]] = []
        for key, marks in spans:
            start, end = marks.get("start"), marks.get("end")
            if start is not None:
                params = key_params(key)
                params["b_started_at"] = start.ts
                if start.data:
                    params["b_config"] = json_safe(start.data)
                    config_starts.append(params)
                else:
                    plain_starts.append(params)
            if end is not None and start is None and duration_from(end.data) is None:
                stored_start_needed.append(key)
        conn = self.conn
        if plain_starts:
            _executemany(conn, _span_update(table, "start", config_col), plain_starts)
        if config_starts:
            _executemany(conn, _span_update(table, "start_config", config_col), config_starts)
        stored = self._stored_starts(table, key_cols, stored_start_needed)
        for key, marks in spans:
            start, end = marks.get("start"), marks.get("end")
            if end is None:
                continue
            duration = duration_from(end.data)
            if duration is None:
                started = start.ts if start is not None else stored.get(key)
                duration = (end.ts - started).total_seconds() if isinstance(started, datetime) else None
            params = key_params(key)
            params["b_completed_at"] = end.ts
            params["b_duration"] = duration
            ends.append(params)
        if ends:
            _executemany(conn, _span_update(table, "end", duration_col), ends)

    def _stored_starts(
        self, table: Table, key_cols: Sequence[str], keys: Sequence[tuple[Any, ...]]
    ) -> dict[tuple[Any, ...], datetime | None]:
        """``started_at`` as stored for these natural keys (one query)."""
        if not keys:
            return {}
        wanted = set(keys)
        rows = self.conn.execute(
            select(*(table.c[c] for c in key_cols), table.c.started_at).where(
                (table.c.job_id == self.job_id) & table.c.iteration.in_(sorted({k[0] for k in keys}))
            )
        )
        return {tuple(row[:-1]): row[-1] for row in rows if tuple(row[:-1]) in wanted}

    def _apply_job_event(self, ev: TrainingEvent) -> None:
        job = JOBS.c
        if ev.kind == ("PROJECT", "start"):
            self.conn.execute(
                update(JOBS).where(job.id == self.job_id).values(started_at=func.coalesce(job.started_at, ev.ts))
            )
            self.conn.execute(
                update(JOBS)
                .where((job.id == self.job_id) & job.status.in_((JobStatus.PENDING, JobStatus.PROVISIONING)))
                .values(status=JobStatus.RUNNING)
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
                .values(status=JobStatus.COMPLETED)
            )
        elif ev.kind == ("GROUP_ITERATION", "start"):
            config = ev.data.get("training_config")
            if isinstance(config, dict):
                self.conn.execute(update(JOBS).where(job.id == self.job_id).values(training_config=json_safe(config)))


#: The most rows one line of ``global.json`` adds: an epoch, step or evaluation and its iteration.
MAX_ROWS_PER_LINE = 2
#: A chunk that raised is halved until it is this short, then tried line by line.
_LINE_BY_LINE = 32
#: How much of a line that could not be stored is kept with its ingestion error.
_UNSTORABLE_EXCERPT_CHARS = 500

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StoredLines:
    """What :func:`store_lines` stored: rows added, events and errors stored (a line that could not
    be stored is an error), and where it stopped when the row limit was reached (else ``None``)."""

    rows: int = 0
    events: int = 0
    errors: int = 0
    stopped_at: int | None = None
    non_finite_loss: str | None = None


def store_lines(
    writer: MetricsWriter, events: Sequence[TrainingEvent], errors: Sequence[MalformedLine], *, room: int | None
) -> StoredLines:
    """Apply a batch's lines in order so that no line can stop ingestion and at most ``room`` rows
    are added (``None``: no limit).

    The batch goes in whole inside a savepoint (one extra statement pair: the common case). If
    applying it raises, it is split in halves until the line that raises is alone: that line is
    recorded as an ingestion error (its offset, the error, an excerpt of what was parsed) and the
    others are stored. Near the limit lines go in chunks that cannot exceed it (each line adds at
    most :data:`MAX_ROWS_PER_LINE` rows), down to single lines; the first line that does not fit
    stops the batch there: ``stopped_at`` is its offset and nothing after it is stored.
    """
    lines: list[TrainingEvent | MalformedLine] = sorted([*events, *errors], key=lambda line: line.offset)
    stored = StoredLines()
    _store_run(writer, lines, room, stored)
    return stored


def _store_run(
    writer: MetricsWriter, lines: Sequence[TrainingEvent | MalformedLine], room: int | None, stored: StoredLines
) -> None:
    start = 0
    while start < len(lines) and stored.stopped_at is None:
        left = len(lines) - start
        if room is not None and room - stored.rows < MAX_ROWS_PER_LINE * left:
            left = max(1, (room - stored.rows) // MAX_ROWS_PER_LINE)
        _store_chunk(writer, lines[start : start + left], room, stored)
        start += left


def _store_chunk(
    writer: MetricsWriter, chunk: Sequence[TrainingEvent | MalformedLine], room: int | None, stored: StoredLines
) -> None:
    conn = writer.conn
    events = [line for line in chunk if isinstance(line, TrainingEvent)]
    errors = [line for line in chunk if isinstance(line, MalformedLine)]
    state = writer.state()
    savepoint = conn.begin_nested()
    try:
        non_finite_loss = writer.apply(events, errors)
    except Exception as err:
        savepoint.rollback()
        writer.restore(state)
        if len(chunk) == 1:
            _store_unstorable(writer, chunk[0], err, room, stored)
        elif len(chunk) <= _LINE_BY_LINE:  # halving on: many bad lines would cost n log n tries
            for line in chunk:
                _store_run(writer, [line], room, stored)
        else:
            half = len(chunk) // 2
            _store_run(writer, chunk[:half], room, stored)
            _store_run(writer, chunk[half:], room, stored)
        return
    if room is not None and stored.rows + writer.rows > room:  # only a single line near the limit
        savepoint.rollback()
        writer.restore(state)
        stored.stopped_at = chunk[0].offset
        return
    savepoint.commit()
    stored.rows += writer.rows
    stored.events += len(events)
    stored.errors += len(errors)
    stored.non_finite_loss = stored.non_finite_loss or non_finite_loss


def _store_unstorable(
    writer: MetricsWriter, line: TrainingEvent | MalformedLine, err: Exception, room: int | None, stored: StoredLines
) -> None:
    """Record the line that raised as an ingestion error; one that cannot even be recorded (its
    own error row raised) is recorded in plain ASCII without its excerpt, or else skipped."""
    if room is not None and stored.rows + 1 > room:
        stored.stopped_at = line.offset
        return
    why = _describe(err)
    if isinstance(line, TrainingEvent):
        record = MalformedLine(line.offset, f"could not be stored: {why}", _excerpt_of(line))
    else:
        record = MalformedLine(line.offset, _ascii(f"{line.reason} (its excerpt could not be stored: {why})"), "")
    for attempt in (record, MalformedLine(line.offset, _ascii(record.reason), "")):
        try:
            with writer.conn.begin_nested():
                writer.apply([], [attempt])
        except Exception as again:
            err = again
            continue
        stored.rows += writer.rows
        stored.errors += 1
        return
    log.warning("line at byte %d could not be stored, nor its error (%s): skipped", line.offset, _describe(err))


def _describe(err: BaseException) -> str:
    """The error in one short line: the driver's own message, not the statement and its parameters."""
    orig = getattr(err, "orig", None)
    text = str(orig if orig is not None else err).strip().splitlines()
    message = f"{type(orig or err).__name__}: {text[0] if text else ''}"
    return _ascii(message[:300])


def _ascii(text: str) -> str:
    """Text any backend stores: no NUL, no lone surrogate (escaped as ``\\udXXX``)."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\x00", "\\x00")


def _excerpt_of(ev: TrainingEvent) -> str:
    """The event as parsed, in ASCII JSON (the line's own bytes are not kept past parsing)."""
    payload = {"phase": ev.phase, "event": ev.event, "iteration": ev.iteration, "epoch": ev.epoch, "data": ev.data}
    try:
        text = json.dumps(payload, ensure_ascii=True, default=repr)
    except Exception as err:  # e.g. an integer too long to print
        text = f"{ev.phase}/{ev.event} (not printable: {type(err).__name__})"
    return text[:_UNSTORABLE_EXCERPT_CHARS]


def _span_key_columns(table: Table) -> tuple[str, ...]:
    return ("iteration", "step_type") if table is STEPS else ("iteration",)


def _span_update(table: Table, shape: str, column: str) -> Update:
    """``UPDATE`` of one start or end of iteration/step rows, parameters named ``b_<column>``."""
    stmt = _SPAN_UPDATES.get((table, shape))
    if stmt is not None:
        return stmt
    c = table.c
    where = c.job_id == bindparam("b_job_id")
    for col in _span_key_columns(table):
        where = where & (c[col] == bindparam(f"b_{col}"))
    values: dict[str, Any]
    if shape == "end":
        values = {
            "completed_at": func.coalesce(c.completed_at, bindparam("b_completed_at", type_=c.completed_at.type)),
            column: bindparam("b_duration", type_=c[column].type),
        }
    else:
        values = {"started_at": func.coalesce(c.started_at, bindparam("b_started_at", type_=c.started_at.type))}
        if shape == "start_config":
            values[column] = func.coalesce(c[column], bindparam("b_config", type_=c[column].type))
    stmt = _SPAN_UPDATES[(table, shape)] = update(table).where(where).values(**values)
    return stmt


def _str_or_none(value: Any) -> str | None:
    return None if value is None else str(value)
