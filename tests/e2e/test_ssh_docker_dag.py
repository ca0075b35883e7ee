"""End to end on a remote box: ``gpu_training`` with ``provider=ssh, runtime=docker`` through a real
sshd into dockerd, the image pulled from a password-protected registry, the dataset in S3 (moto)
pulled by the instance itself, outputs pushed from the instance to S3."""

from __future__ import annotations

import gzip
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import Artifact, EpochTrain, Eval, Instance

from .test_gpu_training_dag import DIGITS, job_of, run_dag, session

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def remote_env(
    airflow_env: dict[str, str],
    sshd_server: Any,
    moto_server: Any,
    registry: Any,
    docker_engine: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    work_root = tmp_path_factory.mktemp("box-jobs")
    env = dict(airflow_env)
    env["AIRFLOW_CONN_GPU_BOX"] = sshd_server.connection(work_root=str(work_root))
    env["AIRFLOW_CONN_AWS_DEFAULT"] = moto_server.aws_connection()
    env["AIRFLOW_CONN_TRAINER_REGISTRY"] = registry.connection()
    s3 = moto_server.client()
    s3.create_bucket(Bucket="datasets")
    s3.create_bucket(Bucket="runs")
    s3.put_object(Bucket="datasets", Key="digits/digits.csv", Body=gzip.decompress(DIGITS.read_bytes()))
    image = registry.push(docker_engine, "team/trainer:e2e")
    return {"env": env, "s3": s3, "work_root": work_root, "image": image, "registry": registry}


def assert_nothing_left(remote: dict[str, Any], job: Any) -> None:
    with session(remote["env"]) as s:
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id)).all()
    assert instances and all(i.state == "terminated" for i in instances)
    assert not [p.name for p in Path(remote["work_root"]).iterdir() if p.name.startswith("gpujob-")]
    for inst in instances:
        labelled = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label=gpu-training.instance={inst.name}"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        assert labelled == [], f"container of {inst.name} left behind"


def test_ssh_docker_job_with_s3_dataset_end_to_end(remote_env: dict[str, Any]) -> None:
    conf = {
        "project_id": "e2e-ssh-docker",
        "provider": "ssh",
        "ssh_conn_id": "gpu_box",
        "runtime": "docker",
        "image": remote_env["image"],
        "image_pull": "always",
        "registry_conn_id": "trainer_registry",
        "container_memory": "1g",
        "dataset_uri": "s3://datasets/digits/digits.csv",
        "outputs_uri": "s3://runs/jobs",
        "config": {"iterations": 1, "epochs": 3, "seed": 2},
        "poll_interval_seconds": 1,
    }
    result = run_dag(remote_env["env"], conf)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    job = job_of(remote_env["env"], "e2e-ssh-docker")
    assert job.status == "completed" and job.failure_reason is None
    with session(remote_env["env"]) as s:
        epochs = s.scalars(select(EpochTrain).where(EpochTrain.job_id == job.id)).all()
        evals = s.scalars(select(Eval).where(Eval.job_id == job.id)).all()
        artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job.id)).all()
    assert sorted(e.epoch for e in epochs) == [1, 2, 3]
    assert evals and evals[-1].accuracy is not None and evals[-1].accuracy > 0.8

    # Outputs went from the instance to S3; each object matches its recorded size and SHA256.
    s3 = remote_env["s3"]
    names = {a.name for a in artifacts}
    assert {"global.json", "logs/trainer.log", "MANIFEST.sha256"} <= names
    assert any(n.startswith("checkpoints/") for n in names)
    for art in artifacts:
        assert art.uri == f"s3://runs/jobs/{job.uuid}/{art.name}"
        body = s3.get_object(Bucket="runs", Key=f"jobs/{job.uuid}/{art.name}")["Body"].read()
        assert len(body) == art.size_bytes and hashlib.sha256(body).hexdigest() == art.sha256, art.name

    # The trainer's output reached the task log while it ran; the registry password never did.
    assert "[trainer] iteration 1 epoch" in output
    assert remote_env["registry"].password not in output
    logs = Path(remote_env["env"]["AIRFLOW_HOME"]) / "logs"
    for path in logs.rglob("*") if logs.exists() else []:
        if path.is_file():
            assert remote_env["registry"].password.encode() not in path.read_bytes(), path
    assert_nothing_left(remote_env, job)


def test_missing_image_fails_the_job_and_still_tears_down(remote_env: dict[str, Any]) -> None:
    conf = {
        "project_id": "e2e-ssh-noimage",
        "provider": "ssh",
        "ssh_conn_id": "gpu_box",
        "runtime": "docker",
        "image": f"{remote_env['registry'].address}/team/does-not-exist:1",
        "registry_conn_id": "trainer_registry",
        "poll_interval_seconds": 1,
    }
    result = run_dag(remote_env["env"], conf)
    assert result.returncode != 0
    job = job_of(remote_env["env"], "e2e-ssh-noimage")
    assert job.status == "failed"
    assert "start_trainer: image not available" in (job.failure_reason or "")
    assert "team/does-not-exist:1" in (job.failure_reason or "")
    assert_nothing_left(remote_env, job)
