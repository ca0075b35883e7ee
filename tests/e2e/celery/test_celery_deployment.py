"""Six concurrent ``gpu_training`` jobs on the CeleryExecutor deployment (``make cluster``).

The jobs are triggered through the REST API at once, run on the local provider with the scripted
trainer and upload their outputs to S3 (moto). Every task goes through Redis to one of the two
``airflow celery worker`` processes; ``sense_progress`` waits in the triggerer. Checked for every
job: the run succeeded, each epoch is stored exactly once in the PostgreSQL results DB, every
artifact is in S3 with the recorded size and SHA256, its instance is terminated and no trainer is
left running; and across the jobs, both workers ran tasks and the jobs really overlapped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import Artifact, EpochTrain, Instance, TrainingJob
from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster, CeleryDeployment

REPO = Path(__file__).resolve().parents[3]
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
DAG_ID = "gpu_training"
JOBS = 6  # 10 took 158 s of CI's 2 cores; 6 still overlap and spread over both workers
EPOCHS = 6
BUCKET = "celery-outputs"

pytestmark = pytest.mark.e2e


@dataclasses.dataclass
class Batch:
    run_ids: list[str]
    states: dict[str, str]


@pytest.fixture(scope="module")
def batch(deployment: CeleryDeployment, lambda_job: Any) -> Batch:
    # lambda_job (test_secrets_split.py) is triggered first: it runs beside the batch, not after it.
    cluster = deployment.airflow
    deployment.s3.client().create_bucket(Bucket=BUCKET)
    run_ids = [
        cluster.trigger(
            DAG_ID,
            {
                "project_id": f"celery-{i}",
                "provider": "local",
                "command": ["{python}", str(SCRIPTED), "ok", str(EPOCHS), "1.0"],
                "outputs_uri": f"s3://{BUCKET}/jobs",
                "poll_interval_seconds": 1,
            },
        )
        for i in range(JOBS)
    ]
    states = {run_id: cluster.wait_run(DAG_ID, run_id, timeout=600) for run_id in run_ids}
    return Batch(run_ids, states)


def job_of(store: ResultsStore, run_id: str) -> TrainingJob:
    with store.session() as s:
        job = s.scalars(select(TrainingJob).where(TrainingJob.dag_id == DAG_ID, TrainingJob.run_id == run_id)).one()
        s.expunge(job)
        return job


def rows(store: ResultsStore, model: Any, job_id: int) -> list[Any]:
    with store.session() as s:
        found = list(s.scalars(select(model).where(model.job_id == job_id).order_by(model.id)))
        for row in found:
            s.expunge(row)
        return found


def test_every_job_succeeds_with_each_epoch_stored_once(batch: Batch, store: ResultsStore) -> None:
    assert batch.states == dict.fromkeys(batch.run_ids, "success")
    for run_id in batch.run_ids:
        job = job_of(store, run_id)
        assert job.status == "completed", (run_id, job.status, job.failure_reason)
        epochs = [row.epoch for row in rows(store, EpochTrain, job.id)]
        assert sorted(epochs) == list(range(1, EPOCHS + 1)), (run_id, epochs)


def test_every_artifact_is_in_s3_with_its_checksum(
    batch: Batch, store: ResultsStore, deployment: CeleryDeployment
) -> None:
    s3 = deployment.s3.client()
    for run_id in batch.run_ids:
        job = job_of(store, run_id)
        artifacts = rows(store, Artifact, job.id)
        assert "global.json" in {a.name for a in artifacts}, (run_id, [a.name for a in artifacts])
        for artifact in artifacts:
            prefix = f"s3://{BUCKET}/jobs/{job.uuid}/"
            assert artifact.uri.startswith(prefix), artifact.uri
            body = s3.get_object(Bucket=BUCKET, Key=artifact.uri.removeprefix(f"s3://{BUCKET}/"))["Body"].read()
            assert (len(body), hashlib.sha256(body).hexdigest()) == (artifact.size_bytes, artifact.sha256), artifact.uri


def test_every_instance_is_terminated_and_no_trainer_is_left(
    batch: Batch, store: ResultsStore, cluster: AirflowCluster
) -> None:
    for run_id in batch.run_ids:
        instances = rows(store, Instance, job_of(store, run_id).id)
        assert [(i.state, i.terminated_at is not None) for i in instances] == [("terminated", True)], run_id
    instances_root = str(cluster.home / "local_instances")
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if SCRIPTED.name.encode() in cmdline and cwd.startswith(instances_root):
            left.append(pid)
    assert left == [], f"trainers still running: {left}"


def test_tasks_ran_on_both_workers_and_jobs_overlapped(batch: Batch, cluster: AirflowCluster) -> None:
    hosts: dict[str, int] = {}
    training: list[tuple[datetime, datetime]] = []
    for run_id in batch.run_ids:
        for ti in cluster.task_instances(DAG_ID, run_id):
            hosts[ti["hostname"]] = hosts.get(ti["hostname"], 0) + 1
            if ti["task_id"] == "sense_progress":
                # The deferral: from its first start to its end the trainer was running.
                training.append((datetime.fromisoformat(ti["start_date"]), datetime.fromisoformat(ti["end_date"])))
    assert set(hosts) == set(cluster.workers), hosts
    # The most jobs training at one instant (a sweep over the start and end times).
    points = sorted([(start, 1) for start, _ in training] + [(end, -1) for _, end in training])
    running = peak = 0
    for _, step in points:
        running += step
        peak = max(peak, running)
    assert peak >= 2, f"the jobs never trained at the same time: {training}"
    print(f"\ntasks per worker: {hosts}; at most {peak} of {JOBS} jobs training at once")
