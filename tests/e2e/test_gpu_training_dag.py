"""End to end: real runs of the gpu_training DAG through ``airflow dags test`` on the local provider.

Each test runs the whole DAG in a private Airflow home with its own results DB, then checks the
rows, the uploaded files against their checksums, and that nothing is left running.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from gpu_training.results.models import (
    Artifact,
    EpochTrain,
    Eval,
    Instance,
    TrainingIteration,
    TrainingJob,
    TrainingStep,
)
from tests.servers import results_url_of

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "dags" / "gpu_training.py"
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
DIGITS = REPO / "include" / "trainer" / "data" / "digits.csv.gz"

pytestmark = pytest.mark.e2e


def dag_test_command(conf: dict[str, Any]) -> list[str]:
    """``airflow dags test gpu_training`` with ``conf``; ``-f``: that file parsed and serialized, not
    every DAG of dags/ (the retraining DAGs cost 7x more)."""
    return [
        sys.executable,
        "-m",
        "airflow",
        "dags",
        "test",
        "gpu_training",
        "-f",
        str(DAG_FILE),
        "--conf",
        json.dumps(conf),
    ]


def run_dag(env: dict[str, str], conf: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(dag_test_command(conf), env=env, capture_output=True, text=True, timeout=600)


def session(env: dict[str, str]) -> Session:
    """A session on the results DB of the Airflow in ``env`` (its connection closed with the session)."""
    return Session(create_engine(results_url_of(env), poolclass=NullPool))


def job_of(env: dict[str, str], project_id: str) -> TrainingJob:
    with session(env) as s:
        return s.scalars(select(TrainingJob).where(TrainingJob.project_id == project_id)).one()


def local_instances(env: dict[str, str]) -> list[str]:
    root = Path(env["AIRFLOW_HOME"]) / "local_instances"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def processes_mentioning(marker: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            pids.append(int(entry))
    return pids


def assert_torn_down(env: dict[str, str], job: TrainingJob) -> None:
    with session(env) as s:
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id)).all()
    assert instances, "the instance was never recorded"
    assert all(i.state == "terminated" and i.terminated_at is not None for i in instances)
    assert all(i.name not in local_instances(env) for i in instances), "the work directory was left behind"


def test_reference_trainer_end_to_end(airflow_env: dict[str, str], tmp_path: Path) -> None:
    data_dir = tmp_path / "datasets"
    data_dir.mkdir()
    dataset = data_dir / "digits.csv"
    dataset.write_bytes(gzip.decompress(DIGITS.read_bytes()))
    outputs = tmp_path / "outputs"
    conf = {
        "project_id": "e2e-happy",
        "dataset_uri": dataset.as_uri(),
        "outputs_uri": outputs.as_uri(),
        "config": {"iterations": 2, "epochs": 3, "seed": 1},
        "poll_interval_seconds": 1,
    }
    # The deployment lets jobs read and write file:// under this folder ([gpu_training] allowed_file_roots).
    result = run_dag({**airflow_env, "AIRFLOW__GPU_TRAINING__ALLOWED_FILE_ROOTS": str(tmp_path)}, conf)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    job = job_of(airflow_env, "e2e-happy")
    assert job.status == "completed" and job.failure_reason is None
    assert job.project_ended and job.time_taken and job.time_taken > 0
    assert job.cost_usd == 0.0
    assert job.training_config and job.training_config["epochs"] == 3
    with session(airflow_env) as s:
        epochs = s.scalars(select(EpochTrain).where(EpochTrain.job_id == job.id)).all()
        evals = s.scalars(select(Eval).where(Eval.job_id == job.id)).all()
        iterations = s.scalars(select(TrainingIteration).where(TrainingIteration.job_id == job.id)).all()
        steps = s.scalars(select(TrainingStep).where(TrainingStep.job_id == job.id)).all()
        artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job.id)).all()
    assert sorted((e.iteration, e.epoch) for e in epochs) == [(i, e) for i in (1, 2) for e in (1, 2, 3)]
    assert all(e.avg_loss is not None and e.model_path for e in epochs)
    assert len(evals) == 2 and evals[-1].accuracy is not None and evals[-1].accuracy > 0.8
    assert len(evals[-1].confusion_matrix or []) == 10
    assert sorted(i.iteration for i in iterations) == [1, 2] and all(i.time_taken is not None for i in iterations)
    assert {st.step_type for st in steps} == {"traj_gen", "training", "evaluation"}

    # Every uploaded file matches its recorded checksum, and the manifest lists them all.
    job_dir = outputs / job.uuid
    by_name = {a.name: a for a in artifacts}
    assert {"global.json", "logs/trainer.log", "MANIFEST.sha256"} <= set(by_name)
    assert any(name.startswith("checkpoints/") for name in by_name)
    for art in artifacts:
        data = (job_dir / art.name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == art.sha256 and len(data) == art.size_bytes, art.name
        assert art.uri == (job_dir / art.name).as_uri()
    manifest = dict(reversed(line.split("  ", 1)) for line in (job_dir / "MANIFEST.sha256").read_text().splitlines())
    assert manifest == {a.name: a.sha256 for a in artifacts if a.name != "MANIFEST.sha256"}
    assert_torn_down(airflow_env, job)


def test_trainer_crash_fails_the_job_and_tears_down(airflow_env: dict[str, str]) -> None:
    conf = {
        "project_id": "e2e-crash",
        "command": ["{python}", str(SCRIPTED), "crash", "2"],
        "poll_interval_seconds": 1,
    }
    result = run_dag(airflow_env, conf)
    assert result.returncode != 0
    job = job_of(airflow_env, "e2e-crash")
    assert job.status == "failed"
    assert "exited with code 3 without PROJECT end" in (job.failure_reason or "")
    assert "CUDA error: an illegal memory access" in (job.failure_reason or "")
    assert job.trainer_exit_code == 3
    with session(airflow_env) as s:
        assert len(s.scalars(select(EpochTrain).where(EpochTrain.job_id == job.id)).all()) == 2
        names = {a.name for a in s.scalars(select(Artifact).where(Artifact.job_id == job.id))}
    assert "logs/trainer.log" in names, "the log of a failed job is still uploaded"
    assert_torn_down(airflow_env, job)


def test_stalled_trainer_is_stopped_and_the_job_fails(airflow_env: dict[str, str]) -> None:
    conf = {
        "project_id": "e2e-stall",
        "command": ["{python}", str(SCRIPTED), "stall", "1"],
        "stall_timeout_minutes": 0.05,
        "poll_interval_seconds": 1,
    }
    result = run_dag(airflow_env, conf)
    assert result.returncode != 0
    job = job_of(airflow_env, "e2e-stall")
    assert job.status == "failed"
    assert (job.failure_reason or "").startswith("sense_progress: stalled: no new bytes in global.json")
    assert_torn_down(airflow_env, job)
    assert processes_mentioning(f"{SCRIPTED}\x00stall") == [], "the stalled trainer is still running"


def test_stop_on_nan_stops_the_trainer_and_fails_the_job(airflow_env: dict[str, str]) -> None:
    conf = {
        "project_id": "e2e-nan",
        "command": ["{python}", str(SCRIPTED), "nan", "600", "0.2"],
        "stop_on_nan": True,
        "poll_interval_seconds": 1,
    }
    result = run_dag(airflow_env, conf)
    assert result.returncode != 0
    job = job_of(airflow_env, "e2e-nan")
    assert job.status == "failed"
    assert job.non_finite_loss == "iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN"
    assert (job.failure_reason or "").startswith("sense_progress: non-finite loss: iteration 1 epoch 2")
    assert_torn_down(airflow_env, job)
    assert processes_mentioning(f"{SCRIPTED}\x00nan") == [], "the trainer still runs after a NaN loss"
    # the trigger streamed the trainer's own output into the task log
    assert "[trainer] epoch 1 done" in result.stdout + result.stderr


# Each param's refusal is tests/test_params.py's (in process, every param); here, through `dags
# test`, one refused by Airflow's own check of the params' schema and one by register_job.
@pytest.mark.parametrize(
    ("conf", "param"),
    [
        ({"project_id": "bad id!"}, "project_id"),
        ({"project_id": "e2e-bad", "command": []}, "command"),
    ],
)
def test_bad_params_are_rejected_before_provisioning(airflow_env: dict[str, str], conf: dict, param: str) -> None:
    before = local_instances(airflow_env)
    result = run_dag(airflow_env, conf)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert f"Invalid input for param {param}:" in output or f"invalid param {param!r}" in output, output[-3000:]
    assert local_instances(airflow_env) == before
    with session(airflow_env) as s:
        assert s.scalars(select(Instance).join(TrainingJob).where(TrainingJob.project_id == "e2e-bad")).all() == []
