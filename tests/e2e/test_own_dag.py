"""End to end: the your-own-DAG example (``include/examples/weekly_training.py``) run through
``airflow dags test`` on the local provider, as a team would run its own DAG file.

``-f`` takes a file inside the DAGs folder (the bundle's path) only, so these runs make the example's
folder the DAGs folder.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gpu_training.results.models import Artifact, Eval, TrainingJob
from tests.e2e.test_gpu_training_dag import DIGITS, assert_torn_down, processes_mentioning, session

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "include" / "examples" / "weekly_training.py"
DAG_ID = "weekly_training"

pytestmark = pytest.mark.e2e


def run_example(env: dict[str, str], conf: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "-f", str(EXAMPLE), "--conf", json.dumps(conf)],
        env={**env, "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE.parent)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def xcom(env: dict[str, str], task_id: str) -> Any:
    """The return value of a task of the example's latest run, from the metadata DB of ``env``'s Airflow."""
    with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as db:
        row = db.execute(
            "SELECT value FROM xcom WHERE dag_id = ? AND task_id = ? AND key = 'return_value' "
            "ORDER BY timestamp DESC LIMIT 1",
            (DAG_ID, task_id),
        ).fetchone()
    assert row is not None, f"{task_id} pushed no return value"
    return json.loads(row[0])


def jobs_of_example(env: dict[str, str]) -> list[TrainingJob]:
    with session(env) as s:
        return list(s.scalars(select(TrainingJob).where(TrainingJob.dag_id == DAG_ID)))


def test_the_example_trains_with_its_own_params_and_reports_the_model(
    airflow_env: dict[str, str], tmp_path: Path
) -> None:
    dataset = tmp_path / "digits.csv"
    dataset.write_bytes(gzip.decompress(DIGITS.read_bytes()))
    conf = {"learning_rate": 0.05, "epochs": 2, "dataset_uri": dataset.as_uri(), "poll_interval_seconds": 1}
    # The deployment lets jobs read file:// under this folder ([gpu_training] allowed_file_roots).
    result = run_example({**airflow_env, "AIRFLOW__GPU_TRAINING__ALLOWED_FILE_ROOTS": str(tmp_path)}, conf)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    [job] = jobs_of_example(airflow_env)
    assert job.status == "completed" and job.failure_reason is None
    # The DAG's own params, mapped into the job's config; what the DAG file fixes; check_dataset's output.
    assert job.params["config"] == {"learning_rate": 0.05, "epochs": 2}
    assert type(job.params["config"]["epochs"]) is int, "templates render as native objects"
    assert (job.project_id, job.provider, job.stage) == ("digits-weekly", "local", "train")
    assert job.params["max_cost_usd"] == 20 and job.params["dataset_uri"] == dataset.as_uri()
    assert job.training_config and job.training_config["epochs"] == 2 and job.training_config["learning_rate"] == 0.05
    with session(airflow_env) as s:
        last_eval = s.scalars(select(Eval).where(Eval.job_id == job.id).order_by(Eval.id.desc())).first()
        model = s.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == "model_final.npz")).one()
    assert last_eval is not None and last_eval.accuracy is not None

    # The task after the group saw the finished job.
    report = xcom(airflow_env, "report_model")
    assert report["job_uuid"] == job.uuid
    assert report["accuracy"] == pytest.approx(last_eval.accuracy) and report["f1"] == pytest.approx(last_eval.f1)
    assert (report["model_uri"], report["model_sha256"]) == (model.uri, model.sha256)
    assert Path(model.uri.removeprefix("file://")).is_file()
    assert xcom(airflow_env, "check_dataset") == dataset.as_uri()

    assert_torn_down(airflow_env, job)
    assert processes_mentioning(str(Path(airflow_env["AIRFLOW_HOME"]) / "local_instances")) == []


def test_a_missing_dataset_fails_before_any_job_is_registered(airflow_env: dict[str, str], tmp_path: Path) -> None:
    with session(airflow_env) as s:
        before = s.scalar(select(func.count()).select_from(TrainingJob))
    missing = (tmp_path / "no-such-data.csv").as_uri()
    result = run_example(airflow_env, {"dataset_uri": missing})
    assert result.returncode != 0
    assert f"dataset {missing} is missing or empty: nothing to train on" in result.stdout + result.stderr
    with session(airflow_env) as s:
        assert s.scalar(select(func.count()).select_from(TrainingJob)) == before, "a job was registered"
