"""A whole ``gpu_training`` job on each fake cloud: offers, launch, a slow boot waited out in the
triggerer, SSH to the launched instance (the test sshd), the reference trainer, metrics, outputs,
teardown verified by the cloud's own record, and the cost on the job."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import EpochTrain, Instance
from tests.fakeclouds.rigs import STARTERS, Rig

from .test_gpu_training_dag import job_of, run_dag, session

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module", params=sorted(STARTERS))
def cloud(
    request: pytest.FixtureRequest,
    airflow_env: dict[str, str],
    sshd_server: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Rig, dict[str, str]]]:
    rig = STARTERS[request.param](sshd_server, tmp_path_factory.mktemp(f"{request.param}-e2e"))
    env = {**airflow_env, **rig.env}
    yield rig, env
    rig.stop()


def logs_of(env: dict[str, str]) -> bytes:
    root = Path(env["AIRFLOW_HOME"]) / "logs"
    return b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file()) if root.exists() else b""


def test_a_whole_job_runs_on_the_cloud_and_its_instance_is_terminated(cloud: tuple[Rig, dict[str, str]]) -> None:
    rig, env = cloud
    rig.fake.reset()
    rig.fake.faults.boot_seconds = 2  # the boot wait defers at least once
    project = f"e2e-{rig.name}"
    conf = {
        "project_id": project,
        "provider": rig.name,
        "gpu": rig.gpu,
        "config": {"iterations": 1, "epochs": 2, "seed": 3},
        "poll_interval_seconds": 1,
    }
    result = run_dag(env, conf)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    job = job_of(env, project)
    assert job.status == "completed" and job.failure_reason is None
    with session(env) as s:
        epochs = s.scalars(select(EpochTrain).where(EpochTrain.job_id == job.id)).all()
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id)).all()
    assert sorted(e.epoch for e in epochs) == [1, 2]
    assert [i.provider for i in instances] == [rig.name] and instances[0].state == "terminated"
    assert instances[0].billable_seconds and instances[0].cost_usd and instances[0].cost_usd > 0
    assert job.cost_usd == pytest.approx(instances[0].cost_usd, rel=1e-3)
    rig.fake.assert_all_terminated()
    assert rig.fake.api_key not in output and rig.fake.api_key.encode() not in logs_of(env)


# Two clouds of different kinds (a REST cloud with an SSH key connection, EC2 through boto3): a
# failed job's teardown is the same steps on every cloud, and each cloud's refused launch and
# termination are tested in-process in tests/test_cloud_jobs.py.
@pytest.mark.parametrize("cloud", ["ec2", "lambda"], indirect=True)
def test_a_failing_trainer_on_the_cloud_still_terminates(cloud: tuple[Rig, dict[str, str]]) -> None:
    rig, env = cloud
    rig.fake.reset()
    rig.fake.faults.refuse_launch = 1  # and the first offer is refused at launch
    project = f"e2e-{rig.name}-fails"
    conf = {
        "project_id": project,
        "provider": rig.name,
        "gpu": rig.gpu,
        "command": ["{python}", "-c", "import sys; sys.exit(3)"],
        "poll_interval_seconds": 1,
    }
    result = run_dag(env, conf)
    assert result.returncode != 0
    job = job_of(env, project)
    assert job.status == "failed" and "exit" in (job.failure_reason or "")
    with session(env) as s:
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id)).all()
    assert [i.state for i in instances] == ["failed", "terminated"]
    assert "no capacity" in (instances[0].state_reason or "")
    rig.fake.assert_all_terminated()
