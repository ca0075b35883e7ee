"""A hostile trainer is contained (issue 21, item 3): whole jobs through the DAG's own operators
(:func:`tests.test_fault_matrix.run_job`), on the local provider and over SSH (the test sshd), with
``tests/fixtures/hostile_trainer.py`` attacking what follows it. Each job ends as stated, every good
row stored once, every good output uploaded.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training import follow
from gpu_training.job import following as job_following
from gpu_training.job import terminate as job_terminate
from gpu_training.results.models import Artifact, EpochTrain, IngestError
from gpu_training.results.store import ResultsStore

from .servers import single_results_backend
from .test_fault_matrix import load_dag_tasks, run_job

REPO = Path(__file__).resolve().parents[1]
HOSTILE = str(REPO / "tests" / "fixtures" / "hostile_trainer.py")
GOOD_OUTPUTS = {"model.npz", "checkpoints/epoch_1.npz", "global.json", "logs/trainer.log", "MANIFEST.sha256"}


@pytest.fixture(scope="module")
def dag_tasks() -> dict[str, Any]:
    return load_dag_tasks()


@pytest.fixture
def store(results_databases: Any) -> ResultsStore:
    """One backend for whole jobs (SQLite unless ``RESULTS_DB=postgresql``): what the store does
    with each line is tested on both in tests/test_ingest_containment.py."""
    return ResultsStore(results_databases.engine(single_results_backend()))


@pytest.fixture(params=["local", "ssh"])
def provider(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    """The params that put the job on the local provider or on the test sshd."""
    monkeypatch.setenv("GPU_TRAINING_LOCAL_ROOT", str(tmp_path / "local_instances"))
    if request.param == "local":
        return {"provider": "local"}
    sshd = request.getfixturevalue("sshd_server")
    conn = sshd.connection(work_root=str(tmp_path / "jobs"), python=sys.executable)
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_BOX", conn)
    return {"provider": "ssh", "ssh_conn_id": "hostile_box"}


@pytest.fixture
def hostile_job(
    dag_tasks: dict[str, Any],
    store: ResultsStore,
    provider: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> Callable[..., tuple[Any, list[str]]]:
    """Runs a job of the hostile trainer; returns how it went and what was logged (the operators'
    and the trigger's Airflow loggers print, the others are captured as records)."""
    monkeypatch.setenv("GPU_TRAINING_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setenv("HOSTILE_OUTSIDE", str(tmp_path / "outside.txt"))
    monkeypatch.setattr("gpu_training.hooks.results.ResultsDbHook.get_store", lambda self: store)
    monkeypatch.setattr(follow, "results_store", lambda conn_id: store)
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(job_following, "STOP_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)

    def run(modes: str, epochs: int = 3) -> tuple[Any, list[str]]:
        params = {
            "project_id": "hostile",
            **provider,
            "command": ["{python}", HOSTILE, modes, str(epochs)],
            "poll_interval_seconds": 0.5,
            "stall_timeout_minutes": 1,
        }
        started = time.monotonic()
        with caplog.at_level(logging.INFO):
            done = run_job(dag_tasks, f"manual__hostile_{uuid.uuid4().hex[:12]}", params, [])
        took = time.monotonic() - started
        assert took < 90, f"the job took {took:.0f} s"
        printed = capfd.readouterr()
        return done, [r.getMessage() for r in caplog.records] + (printed.out + printed.err).splitlines()

    run.provider = provider["provider"]  # type: ignore[attr-defined]
    return run


def stored(store: ResultsStore, model: type, column: str) -> list[Any]:
    with store.session() as s:
        return sorted(s.scalars(select(getattr(model, column))))


def test_a_hostile_trainer_that_ends_well_completes_with_every_good_row_and_output(
    hostile_job: Callable[..., tuple[Any, list[str]]], store: ResultsStore
) -> None:
    """40 MiB of log in one line, a line nested 500 deep, a line the DB refuses, odd output names
    and symlinks: the job completes, every good row and output is there once."""
    over_ssh = hostile_job.provider == "ssh"  # type: ignore[attr-defined]
    done, messages = hostile_job("longlog=40,deep,oddnames" + (",sshfollower" if over_ssh else ""), epochs=5)
    job = store.job(done.job_uuid)
    assert job.status == "completed", (job.failure_reason, done.states, done.errors)
    assert stored(store, EpochTrain, "epoch") == [1, 2, 3, 4, 5]
    errors = stored(store, IngestError, "error")
    assert len(errors) == 2 and any("nested deeper than 64" in e for e in errors)
    assert any(e.startswith("could not be stored: ") for e in errors)
    assert set(stored(store, Artifact, "name")) == GOOD_OUTPUTS
    # The 40 MiB line, streamed as it was written, is shown cut, saying how much more it had (or,
    # on a machine too busy to stream it before the job ended, the end said it was not shown).
    shown = [m.split("[trainer] ", 1)[1] for m in messages if "[trainer] " in m]
    cut = f"{'x' * follow.LOG_LINE_CHARS}... [{40 * 2**20 - follow.LOG_LINE_CHARS} more bytes]"
    assert any(m.startswith(cut) for m in shown) or any(m.startswith("... ") and "not shown" in m for m in shown)
    assert any(m.startswith("after the long line") for m in shown)
    assert all(len(m) < follow.LOG_LINE_CHARS + 200 for m in shown)
    skipped = {m for m in messages if m.startswith("output ") and "is not uploaded" in m}
    assert len(skipped) == 8, skipped  # 4 odd names, 3 symlinks, 1 FIFO
    # ... and each is kept on the job, where its page can show it (job_events OUTPUTS/skipped)
    assert {o.name for o in store.skipped_outputs(done.job_uuid)} == {
        "outputs/bad\\nname.txt",
        "outputs/bell\\x07.txt",
        "outputs/tab\\tname",
        "outputs/latin1-\\xe9.txt",
        "outputs/leak.txt",
        "outputs/leakdir",
        "outputs/inside-link.npz",
        "outputs/pipe",
    }


def test_symlinked_global_json_and_log_fail_the_job_saying_so(
    hostile_job: Callable[..., tuple[Any, list[str]]], store: ResultsStore
) -> None:
    done, messages = hostile_job("symjson-outside,symlog-zero")
    job = store.job(done.job_uuid)
    assert job.status == "failed"
    assert "outputs/global.json is not a regular file (a symbolic link to" in (job.failure_reason or "")
    assert not job.project_ended and stored(store, EpochTrain, "epoch") == []  # the outside file was never read
    refused = [m for m in messages if "logs/trainer.log is not a regular file" in m]
    assert len(refused) == 1, refused


def test_past_max_metric_rows_the_job_fails_with_exactly_the_limit_stored(
    hostile_job: Callable[..., tuple[Any, list[str]]], store: ResultsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__GPU_TRAINING__MAX_METRIC_ROWS_PER_JOB", "100")
    done, _ = hostile_job("rows=400")
    job = store.job(done.job_uuid)
    assert job.status == "failed"
    assert "the job stored 100 metric rows, the limit is 100 (max_metric_rows_per_job)" in (job.failure_reason or "")
    assert stored(store, EpochTrain, "epoch") == list(range(1, 100)) and job.metric_rows == 100
