"""The results schema: Alembic migrations match the models; natural keys are unique."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Engine, inspect
from sqlalchemy.exc import IntegrityError

from gpu_training.errors import ResultsDbError
from gpu_training.hooks.results import create_results_engine, url_from_connection
from gpu_training.results.migrate import VERSION_TABLE, check_at_head, head_revision
from gpu_training.results.models import EpochTrain, metadata
from gpu_training.results.store import ResultsStore
from tests.servers import ResultsDatabases


def test_migrations_match_the_models(results_engine: Engine) -> None:
    with results_engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE, "compare_type": True})
        diff = [
            d
            for d in compare_metadata(ctx, metadata)
            if not (isinstance(d, tuple) and d[0] == "remove_table" and d[1].name == VERSION_TABLE)
        ]
    assert diff == []


def test_tables_of_the_contract_exist(results_engine: Engine) -> None:
    tables = set(inspect(results_engine).get_table_names())
    assert {
        "training_jobs",
        "training_iterations",
        "training_steps",
        "epoch_train",
        "evals",
        "artifacts",
        "instances",
        "ingest_errors",
    } <= tables


def test_unmigrated_db_is_refused_with_what_to_run(results_backend: str, results_databases: ResultsDatabases) -> None:
    engine = results_databases.engine(results_backend, migrated=False)
    with pytest.raises(ResultsDbError, match=f"expected {head_revision()}: run `make migrate`"):
        check_at_head(engine)


def test_natural_keys_are_unique(store: ResultsStore, job_uuid: str) -> None:
    job = store.job(job_uuid)
    now = datetime.now(UTC)
    with store.session() as s, s.begin():
        s.add(EpochTrain(job_id=job.id, iteration=1, epoch=1, completed_at=now))
    with pytest.raises(IntegrityError), store.session() as s, s.begin():
        s.add(EpochTrain(job_id=job.id, iteration=1, epoch=1, completed_at=now))


def test_create_job_is_idempotent_per_dag_run(store: ResultsStore, job_uuid: str) -> None:
    again = store.create_job(
        project_id="unit", provider="local", runtime="process", params={}, dag_id="gpu_training", run_id="manual__unit"
    )
    assert again == job_uuid


def test_first_failure_reason_wins(store: ResultsStore, job_uuid: str) -> None:
    store.record_failure(job_uuid, "sense_progress: trainer exited with code 3")
    store.record_failure(job_uuid, "upload_outputs: nothing to upload")
    job = store.job(job_uuid)
    assert (job.status, job.failure_reason) == ("failed", "sense_progress: trainer exited with code 3")


def test_a_failure_reason_quoting_a_nul_from_the_log_is_stored(store: ResultsStore, job_uuid: str) -> None:
    """A reason with the trainer log's tail can hold U+0000, which PostgreSQL's text refuses."""
    store.record_failure(job_uuid, "sense_progress: trainer exited with code 3\n[trainer] \x00\x00 core dumped")
    job = store.job(job_uuid)
    assert job.status == "failed"
    assert job.failure_reason == "sense_progress: trainer exited with code 3\n[trainer] \ufffd\ufffd core dumped"


def test_connection_urls() -> None:
    class Conn:
        def __init__(self, conn_type, host=None, extra=None, uri=None):
            self.conn_type, self.host, self.extra_dejson, self._uri = conn_type, host, extra or {}, uri

        def get_uri(self):
            return self._uri

    assert url_from_connection(Conn("sqlite", host="/data/results.db")) == "sqlite:////data/results.db"
    assert (
        url_from_connection(Conn("generic", extra={"sqlalchemy_url": "postgresql://u:p@h/db"}))
        == "postgresql://u:p@h/db"
    )
    assert (
        url_from_connection(Conn("postgres", uri="postgres://u:p@h:5432/results")) == "postgresql://u:p@h:5432/results"
    )


def test_postgres_urls_without_a_driver_get_psycopg2() -> None:
    """SQLAlchemy 2.1 picks psycopg 3 for ``postgresql://``; only psycopg2 is installed."""
    for url in ("postgresql://u:p@h:5432/results", "postgres://u:p@h:5432/results"):
        engine = create_results_engine(url)
        assert engine.url.drivername == "postgresql+psycopg2"
        assert engine.url.render_as_string(hide_password=False) == "postgresql+psycopg2://u:p@h:5432/results"
        engine.dispose()
    assert create_results_engine("postgresql+asyncpg://u@h/db").url.drivername == "postgresql+asyncpg"


def test_non_finite_loss_columns(results_engine: Engine) -> None:
    columns = {c["name"]: c for c in inspect(results_engine).get_columns("training_jobs")}
    assert columns["non_finite_loss"]["nullable"] and columns["non_finite_loss_at"]["nullable"]
    assert columns["non_finite_loss"]["type"].length == 300


def test_sqlite_datetimes_are_stored_as_sqlalchemy_stores_them(results_databases: ResultsDatabases) -> None:
    """UtcDateTime binds on SQLite in one step; the text must be what DateTime's processor writes.

    SQLite only, whatever ``RESULTS_DB``: the one-step bind processor exists on SQLite alone
    (elsewhere UtcDateTime binds through ``process_bind_param``, which every backend's tests use)."""
    results_engine = results_databases.engine("sqlite")
    from datetime import timedelta, timezone
    from zoneinfo import ZoneInfo

    from sqlalchemy import DateTime

    from gpu_training.results.models import UtcDateTime

    dialect = results_engine.dialect
    fast = UtcDateTime().dialect_impl(dialect).bind_processor(dialect)
    standard = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert fast is not None and standard is not None
    for value in (
        datetime(2026, 11, 22, 9, 34, 5, tzinfo=UTC),
        datetime(2026, 11, 22, 9, 34, 5, 120, tzinfo=UTC),
        datetime(999, 1, 2, 3, 4, 5, 6, tzinfo=UTC),
        datetime(2026, 11, 22, 15, 4, 5, 500000, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 3, 8, 2, 30, tzinfo=ZoneInfo("America/New_York")),
    ):
        assert fast(value) == standard(value.astimezone(UTC).replace(tzinfo=None))
    assert fast(None) is None
    with pytest.raises(ValueError, match="naive datetime"):
        fast(datetime(2026, 11, 22))


def test_abandon_reason_is_filled_from_the_reason_prefix_of_older_rows(
    results_backend: str, results_databases: ResultsDatabases
) -> None:
    """Revision 0010: instances given up before it get ``abandon_reason`` from their ``state_reason``."""
    from sqlalchemy import text

    from gpu_training.results.migrate import upgrade

    engine = results_databases.engine(results_backend, migrated=False)
    upgrade(engine, "0009")
    job = ResultsStore(engine).create_job(
        project_id="p", provider="local", runtime="process", params={}, dag_id="d", run_id="r"
    )
    reasons = {
        "a": "no capacity: node 1 of 2: lambda: out of capacity",
        "b": "not open: runpod: pool closed",
        "c": "refused: vast: offer gone",
        "d": "replaced: instance i-1 turned failed while booting",
        "e": "interrupted: spot reclaimed",
        "f": "not launched: the job was cancelled or is being torn down",
        "g": "never launched",
    }
    with engine.begin() as conn:
        job_id = conn.execute(text("SELECT id FROM training_jobs WHERE uuid = :u"), {"u": job}).scalar_one()
        for name, reason in reasons.items():
            conn.execute(
                text(
                    "INSERT INTO instances (job_id, provider, name, state, state_reason, spot, created_at)"
                    " VALUES (:job, 'local', :name, 'failed', :reason, :spot, :now)"
                ),
                {"job": job_id, "name": name, "reason": reason, "spot": False, "now": datetime(2026, 12, 8)},
            )
    upgrade(engine)
    with engine.connect() as conn:
        got = dict(conn.execute(text("SELECT name, abandon_reason FROM instances")).all())
    assert got == {
        "a": "no_capacity",
        "b": "not_open",
        "c": "refused",
        "d": "replaced",
        "e": "interrupted",
        "f": "cancelled",
        "g": None,
    }
