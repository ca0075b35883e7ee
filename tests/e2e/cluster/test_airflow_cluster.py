"""End to end on a real deployment: api-server, scheduler, dag-processor and triggerer as separate
processes (``tests/airflow_cluster.py``), jobs triggered through the REST API on the local provider
with the scripted trainer.

Unlike ``airflow dags test`` (one process, triggers inline), this shows what a deployment does:
the trainer is followed while ``sense_progress`` is deferred (no worker slot held), a killed
triggerer or scheduler (with its LocalExecutor workers) costs neither an epoch nor a duplicate, and
the trainer's output reaches the task log served by the API. One cluster serves the module.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import EpochTrain, IngestError, TrainingJob
from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster

from . import DAG_ID

REPO = Path(__file__).resolve().parents[3]
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"

pytestmark = pytest.mark.e2e


def job_conf(project_id: str, epochs: int, interval: float) -> dict[str, Any]:
    return {
        "project_id": project_id,
        "provider": "local",
        "command": ["{python}", str(SCRIPTED), "ok", str(epochs), str(interval)],
        "poll_interval_seconds": 1,
    }


def job_row(store: ResultsStore, run_id: str) -> TrainingJob | None:
    with store.session() as s:
        return s.scalars(select(TrainingJob).where(TrainingJob.dag_id == DAG_ID, TrainingJob.run_id == run_id)).first()


def stored_epochs(store: ResultsStore, run_id: str) -> list[int]:
    """Every epoch row of the run's job, duplicates included (there must be none)."""
    with store.session() as s:
        query = (
            select(EpochTrain.epoch)
            .join(TrainingJob, TrainingJob.id == EpochTrain.job_id)
            .where(TrainingJob.dag_id == DAG_ID, TrainingJob.run_id == run_id)
            .order_by(EpochTrain.iteration, EpochTrain.epoch)
        )
        return list(s.scalars(query))


def ingest_errors(store: ResultsStore, run_id: str) -> list[str]:
    with store.session() as s:
        query = (
            select(IngestError.error)
            .join(TrainingJob, TrainingJob.id == IngestError.job_id)
            .where(TrainingJob.run_id == run_id)
        )
        return list(s.scalars(query))


def wait_training(cluster: AirflowCluster, store: ResultsStore, run_id: str, *, min_epochs: int) -> list[int]:
    """Wait until ``sense_progress`` is deferred and at least ``min_epochs`` epochs are stored."""
    cluster.wait_task_state(DAG_ID, run_id, "sense_progress", ["deferred"], timeout=150)
    return list(
        cluster.wait_until(
            f"{min_epochs} epochs of {run_id} in the results DB",
            lambda: (e := stored_epochs(store, run_id)) and len(e) >= min_epochs and e,
            timeout=90,
            components=("scheduler", "triggerer"),
        )
    )


def assert_completed_exactly_once(store: ResultsStore, run_id: str, epochs: int) -> None:
    stored = stored_epochs(store, run_id)
    assert len(stored) == epochs, f"{len(stored)} epoch rows for {epochs} epochs: {stored}"
    assert stored == list(range(1, epochs + 1))
    job = job_row(store, run_id)
    assert job is not None and job.status == "completed", job and (job.status, job.failure_reason)
    assert ingest_errors(store, run_id) == []


@dataclasses.dataclass
class HappyRun:
    run_id: str
    epochs: int
    samples: list[str]  # sense_progress's state, sampled while the trainer trained
    state: str


@pytest.fixture(scope="module")
def happy_run(cluster: AirflowCluster, store: ResultsStore) -> HappyRun:
    """One job run on the real scheduler and triggerer, sampled while it trains."""
    epochs = 10
    run_id = cluster.trigger(DAG_ID, job_conf("cluster-happy", epochs, 1.0))
    # Sampled from the deferral until the last epoch is stored: the trainer runs all that time.
    cluster.wait_task_state(DAG_ID, run_id, "sense_progress", ["deferred"], timeout=150)
    samples: list[str] = []
    deadline = time.monotonic() + 120
    while len(stored_epochs(store, run_id)) < epochs and time.monotonic() < deadline:
        samples.append(str(cluster.task_instance(DAG_ID, run_id, "sense_progress")["state"]))
        time.sleep(0.5)
    return HappyRun(run_id, epochs, samples, cluster.wait_run(DAG_ID, run_id, timeout=180))


def test_job_runs_end_to_end_deferred_while_training(happy_run: HappyRun, store: ResultsStore) -> None:
    assert len(happy_run.samples) >= 3, happy_run.samples
    assert set(happy_run.samples) == {"deferred"}, f"sense_progress held a worker slot: {happy_run.samples}"
    assert happy_run.state == "success"
    assert_completed_exactly_once(store, happy_run.run_id, happy_run.epochs)


def test_triggerer_killed_mid_job_loses_and_duplicates_nothing(cluster: AirflowCluster, store: ResultsStore) -> None:
    epochs = 20
    run_id = cluster.trigger(DAG_ID, job_conf("cluster-triggerer-kill", epochs, 1.0))
    before = wait_training(cluster, store, run_id, min_epochs=3)
    assert len(before) < epochs, "the trainer finished before the triggerer could be killed"

    cluster.kill("triggerer")  # SIGKILL, the whole process group (its trigger runner too)
    time.sleep(3)
    at_restart = stored_epochs(store, run_id)
    assert cluster.task_instance(DAG_ID, run_id, "sense_progress")["state"] == "deferred"
    cluster.start_component("triggerer")

    assert cluster.wait_run(DAG_ID, run_id, timeout=180) == "success"
    assert len(at_restart) < epochs, "nothing was left to ingest after the restart"
    assert_completed_exactly_once(store, run_id, epochs)
    # A trigger re-assigned to the new triggerer is not a task retry.
    assert cluster.task_instance(DAG_ID, run_id, "sense_progress")["try_number"] == 1


def test_scheduler_and_workers_killed_after_deferral(cluster: AirflowCluster, store: ResultsStore) -> None:
    epochs = 20
    run_id = cluster.trigger(DAG_ID, job_conf("cluster-scheduler-kill", epochs, 1.0))
    before = wait_training(cluster, store, run_id, min_epochs=3)
    assert len(before) < epochs, "the trainer finished before the scheduler could be killed"

    cluster.kill("scheduler")  # SIGKILL the scheduler's group: its LocalExecutor workers die with it
    time.sleep(2)
    cluster.start_component("scheduler")

    assert cluster.wait_run(DAG_ID, run_id, timeout=180) == "success"
    assert_completed_exactly_once(store, run_id, epochs)
    assert cluster.task_instance(DAG_ID, run_id, "sense_progress")["state"] == "success"


def test_trainer_output_reaches_the_task_log_served_by_the_api(cluster: AirflowCluster, happy_run: HappyRun) -> None:
    ti = cluster.task_instance(DAG_ID, happy_run.run_id, "sense_progress")
    # Whichever process logged them (a resumed worker, or the trigger in the triggerer), every try's
    # log is what the UI shows.
    text = "\n".join(
        cluster.task_log(DAG_ID, happy_run.run_id, "sense_progress", n) for n in range(1, int(ti["try_number"]) + 1)
    )
    missing = [k for k in range(1, happy_run.epochs + 1) if f"[trainer] epoch {k} done" not in text]
    assert not missing, f"epochs {missing} not in the task log:\n{text[-4000:]}"
