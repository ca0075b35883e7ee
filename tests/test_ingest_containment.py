"""No line of ``global.json`` can stop ingestion or grow a job without bound (issue 21, item 3).

Store-level, on SQLite and PostgreSQL (``RESULTS_DB``): a line nested too deeply is an ingestion
error before anything recurses; a line the database refuses is an ingestion error while the rest of
its batch is stored; ``max_metric_rows_per_job`` is exact, kept with the offset, across restarts.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest
from sqlalchemy import func, select, text

from gpu_training.events import MAX_JSON_DEPTH, nested_deeper_than, parse_chunk, parse_event
from gpu_training.results.models import EpochTrain, Eval, IngestError, JobEvent, TrainingIteration, TrainingStep
from gpu_training.results.store import IngestResult, ResultsStore

from .conftest import event_line

COUNTED = (TrainingIteration, TrainingStep, EpochTrain, Eval, JobEvent, IngestError)


def rows_in_tables(store: ResultsStore) -> int:
    with store.session() as s:
        return sum(int(s.scalar(select(func.count()).select_from(model)) or 0) for model in COUNTED)


def epochs(store: ResultsStore) -> list[int]:
    with store.session() as s:
        return sorted(s.scalars(select(EpochTrain.epoch)))


def ingest_errors(store: ResultsStore) -> list[IngestError]:
    with store.session() as s:
        return list(s.scalars(select(IngestError).order_by(IngestError.byte_offset)))


def ingest(store: ResultsStore, job_uuid: str, chunk: bytes, *, max_rows: int | None = None) -> IngestResult:
    """Parse and store ``chunk`` from the job's stored offset, as the follower does."""
    offset = store.job(job_uuid).ingest_offset
    events, errors, consumed = parse_chunk(chunk, offset, final=True)
    return store.ingest(
        job_uuid, expected_offset=offset, new_offset=offset + consumed, events=events, errors=errors, max_rows=max_rows
    )


def epoch(n: int, **data: object) -> bytes:
    return event_line("TRAINING", "epoch_complete", iteration=1, epoch=n, data={"avg_loss": 1 / n, **data})


def deep(depth: int) -> bytes:
    return event_line("TRAINING", "epoch_complete", iteration=1, epoch=99, data={"x": 0}).replace(
        b'"x": 0', b'"x": ' + b"[" * depth + b"]" * depth
    )


# --- nesting -----------------------------------------------------------------------------------------


def test_nesting_is_measured_outside_strings_without_recursion() -> None:
    assert not nested_deeper_than(b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH)
    assert nested_deeper_than(b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1))
    assert nested_deeper_than(b'{"a":' * (MAX_JSON_DEPTH + 1) + b"1" + b"}" * (MAX_JSON_DEPTH + 1))
    assert not nested_deeper_than(b"[]" * 100_000)  # many brackets, none deep
    assert not nested_deeper_than(json.dumps({"a": "[" * 500, "b": '\\"[[' * 100, "c": [[1]]}).encode())
    assert nested_deeper_than(b"[" * 1_000_000 + b"]" * 1_000_000)  # no RecursionError, no stack


def test_a_line_nested_500_deep_is_a_malformed_line_and_the_chunk_goes_on() -> None:
    chunk = epoch(1) + deep(500) + epoch(2)
    events, errors, consumed = parse_chunk(chunk, 0)
    assert [e.epoch for e in events] == [1, 2] and consumed == len(chunk)
    reason = "nested deeper than 64 levels of arrays and objects"
    assert [(e.offset, e.reason) for e in errors] == [(len(epoch(1)), reason)]
    assert not parse_chunk(deep(MAX_JSON_DEPTH - 3), 0)[1]  # 64 levels in all still parse
    with pytest.raises(ValueError, match="nested deeper than 64"):
        parse_event(deep(100_000).rstrip(), 0)


def test_a_line_deeper_than_the_recursion_limit_is_its_own_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever parsing a line raises is that line's error (here the interpreter's own limit is
    lower than the depth allowed)."""
    monkeypatch.setattr("gpu_training.events.MAX_JSON_DEPTH", 10**6)
    chunk = epoch(1) + deep(sys.getrecursionlimit() + 10) + epoch(2)
    events, errors, _ = parse_chunk(chunk, 0)
    assert [e.epoch for e in events] == [1, 2]
    assert len(errors) == 1 and "nested too deeply" in errors[0].reason


def test_a_deep_line_is_stored_as_an_ingestion_error_and_ingestion_goes_past_it(
    store: ResultsStore, job_uuid: str
) -> None:
    chunk = epoch(1) + deep(500) + epoch(2)
    result = ingest(store, job_uuid, chunk)
    assert (result.events, result.errors, result.offset) == (2, 1, len(chunk))
    assert epochs(store) == [1, 2]
    [error] = ingest_errors(store)
    assert error.byte_offset == len(epoch(1)) and "nested deeper than 64" in error.error


# --- a line the database refuses -----------------------------------------------------------------------

#: A lone surrogate: valid JSON (``\ud800``), a Python string, but not UTF-8: neither SQLite's nor
#: PostgreSQL's driver can send it in a text column.
UNSTORABLE = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1000, data={"model_path": "\ud800.npz"})


def test_a_line_the_database_refuses_is_an_ingestion_error_and_the_rest_is_stored(
    store: ResultsStore, job_uuid: str
) -> None:
    good = [epoch(n) for n in range(1, 101)]
    chunk = b"".join(good[:40]) + UNSTORABLE + b"".join(good[40:])
    result = ingest(store, job_uuid, chunk)
    assert not result.conflict and result.offset == len(chunk)
    assert (result.events, result.errors) == (100, 1)
    assert epochs(store) == list(range(1, 101))
    [error] = ingest_errors(store)
    assert error.byte_offset == len(b"".join(good[:40]))
    assert error.error.startswith("could not be stored: ")
    assert '"epoch": 1000' in (error.line_excerpt or "") and "\\ud800" in (error.line_excerpt or "")
    assert store.job(job_uuid).metric_rows == rows_in_tables(store)


def test_many_refused_lines_each_become_an_error(store: ResultsStore, job_uuid: str) -> None:
    bad = [
        event_line("TRAINING", "epoch_complete", iteration=1, epoch=n, data={"model_path": "\udc80"})
        for n in range(200, 300)
    ]
    chunk = b"".join(line for pair in zip(bad, (epoch(n) for n in range(1, 101)), strict=True) for line in pair)
    result = ingest(store, job_uuid, chunk)
    assert (result.events, result.errors, result.offset) == (100, 100, len(chunk))
    assert epochs(store) == list(range(1, 101))
    assert len(ingest_errors(store)) == 100


def test_a_refused_line_is_recorded_once_when_its_batch_is_stored_again(store: ResultsStore, job_uuid: str) -> None:
    chunk = epoch(1) + UNSTORABLE
    events, errors, consumed = parse_chunk(chunk, 0)
    first = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
    again = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
    assert not first.conflict and again.conflict
    assert len(ingest_errors(store)) == 1 and epochs(store) == [1]


# --- max_metric_rows_per_job ----------------------------------------------------------------------------


def test_metric_rows_count_what_was_added_not_what_was_sent(store: ResultsStore, job_uuid: str) -> None:
    chunk = (
        event_line("ITERATION", "start", iteration=1)
        + epoch(1)
        + epoch(1)  # the same natural key: one row
        + event_line("TRAINING", "start", iteration=1)
        + event_line("EVAL_MODEL", "metrics", iteration=1, epoch=1, data={"accuracy": 0.9})
        + event_line("CUSTOM", "note")
        + b"not json\n"
        + event_line("PROJECT", "start")
    )
    ingest(store, job_uuid, chunk)
    assert store.job(job_uuid).metric_rows == rows_in_tables(store) == 6
    ingest(store, job_uuid, epoch(1) + epoch(2))  # a re-run epoch (a recovery) adds no row
    assert store.job(job_uuid).metric_rows == rows_in_tables(store) == 7


@pytest.mark.parametrize("limit", [0, 1, 2, 3, 57, 200])
def test_the_row_limit_is_exact_and_stops_at_the_first_line_that_does_not_fit(
    store: ResultsStore, job_uuid: str, limit: int
) -> None:
    lines = [event_line("ITERATION", "start", iteration=1)] + [epoch(n) for n in range(1, 151)]
    chunk = b"".join(lines)
    result = ingest(store, job_uuid, chunk, max_rows=limit)
    stored = min(limit, 151)
    assert result.row_limit_reached == (limit < 151)
    assert store.job(job_uuid).metric_rows == rows_in_tables(store) == result.metric_rows == stored
    assert epochs(store) == list(range(1, stored))
    assert result.offset == store.job(job_uuid).ingest_offset == len(b"".join(lines[:stored]))


def test_the_row_limit_holds_across_restarts_and_batches(store: ResultsStore, job_uuid: str) -> None:
    """Each batch stores from where the last one left, as a new follower after a restart does: the
    count comes from the results DB, so the total never passes the limit."""
    n = 1
    for _restart in range(5):
        chunk = b"".join(epoch(i) for i in range(n, n + 30))
        result = ingest(store, job_uuid, chunk, max_rows=100)
        n = 1 + len(epochs(store))
        if result.row_limit_reached:
            break
    assert result.row_limit_reached
    assert store.job(job_uuid).metric_rows == rows_in_tables(store) == 100
    again = ingest(store, job_uuid, epoch(500), max_rows=100)  # a new follower, the same answer
    assert again.row_limit_reached and again.events == 0 and rows_in_tables(store) == 100


def test_lines_that_add_no_row_go_on_at_the_limit(store: ResultsStore, job_uuid: str) -> None:
    """The limit counts rows, not lines: PROJECT end after exactly the limit still ends the job."""
    chunk = b"".join(epoch(n) for n in range(1, 50)) + event_line("PROJECT", "end")
    result = ingest(store, job_uuid, chunk, max_rows=50)  # the iteration row and 49 epochs
    assert not result.row_limit_reached and store.job(job_uuid).project_ended


def test_a_lowered_limit_stores_nothing_more(store: ResultsStore, job_uuid: str) -> None:
    ingest(store, job_uuid, b"".join(epoch(n) for n in range(1, 20)))
    result = ingest(store, job_uuid, epoch(20), max_rows=5)
    assert result.row_limit_reached and result.metric_rows == 20 and epochs(store) == list(range(1, 20))


def test_the_migration_counts_the_rows_of_jobs_stored_before_it(results_backend: str, results_databases: Any) -> None:
    from gpu_training.results.migrate import upgrade

    engine = results_databases.engine(results_backend, migrated=False)
    upgrade(engine, "0008")
    with engine.begin() as conn:  # rows as a 0008 deployment stored them (no metric_rows yet)
        job_id = conn.execute(
            text(
                "INSERT INTO training_jobs (uuid, project_id, dag_id, run_id, map_index, stage, provider, runtime, "
                "status, params, created_at, updated_at, ingest_offset, project_ended) VALUES ('u', 'p', 'd', 'r', "
                "-1, '', 'local', 'process', 'running', '{}', '2026-12-01', '2026-12-01', 0, false) RETURNING id"
            )
        ).scalar_one()
        conn.execute(text("INSERT INTO training_iterations (job_id, iteration) VALUES (:j, 1)"), {"j": job_id})
        for n in range(1, 6):
            conn.execute(
                text(
                    "INSERT INTO epoch_train (job_id, iteration, epoch, completed_at) VALUES (:j, 1, :n, '2026-12-01')"
                ),
                {"j": job_id, "n": n},
            )
        conn.execute(
            text(
                "INSERT INTO ingest_errors (job_id, byte_offset, error, created_at) VALUES (:j, 9, 'x', '2026-12-01')"
            ),
            {"j": job_id},
        )
    upgrade(engine)
    assert ResultsStore(engine).job("u").metric_rows == 7  # the iteration, 5 epochs, 1 ingestion error
