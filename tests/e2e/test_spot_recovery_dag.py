"""Spot recovery end to end (``airflow dags test``) on the clouds with interruptible instances:
the fake cloud interrupts the job's instance mid-training (and the machine's processes die with
it), the job relaunches on a new offer within ``sense_progress``, the trainer starts again there,
and every epoch is stored exactly once; both instances end terminated, the interruption recorded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import EpochTrain, Instance, TrainingJob
from tests.fakeclouds.boxes import kill_box
from tests.fakeclouds.rigs import STARTERS, Rig

from .test_gpu_training_dag import run_dag, session

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
# The clouds with interruptible instances: EC2 (spot) and Vast.ai (bids). Lambda has none; RunPod's
# API no longer offers interruptible pods. The recovery itself is the same for both: it runs on EC2,
# the other cases on Vast.ai (each cloud's interruption is read in tests/test_cloud_*.py).


@pytest.fixture(scope="module")
def ec2(
    airflow_env: dict[str, str], sshd_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Rig, dict[str, str], Path]]:
    boxes = tmp_path_factory.mktemp("ec2-spot-boxes")
    rig = STARTERS["ec2"](sshd_server, boxes)
    yield rig, {**airflow_env, **rig.env}, boxes
    rig.stop()


@pytest.fixture(scope="module")
def vast(
    airflow_env: dict[str, str], sshd_server: Any, moto_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Rig, dict[str, str], Path]]:
    """Vast.ai alone, with S3 (moto) for outputs: the cloud-independent cases run once."""
    boxes = tmp_path_factory.mktemp("vast-spot-boxes")
    rig = STARTERS["vast"](sshd_server, boxes)
    yield rig, {**airflow_env, **rig.env, "AIRFLOW_CONN_AWS_DEFAULT": moto_server.aws_connection()}, boxes
    rig.stop()


def stored_epochs(env: dict[str, str], project: str) -> list[int]:
    with session(env) as s:
        return list(
            s.scalars(
                select(EpochTrain.epoch)
                .join(TrainingJob, TrainingJob.id == EpochTrain.job_id)
                .where(TrainingJob.project_id == project)
                .order_by(EpochTrain.epoch)
            )
        )


class Interrupter(threading.Thread):
    """Interrupts the job's first instance once ``after_epochs`` epochs are stored."""

    def __init__(self, rig: Rig, env: dict[str, str], boxes: Path, project: str, after_epochs: int) -> None:
        super().__init__(daemon=True)
        self.rig, self.env, self.boxes, self.project, self.after = rig, env, boxes, project, after_epochs
        self.interrupted: str | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if len(stored_epochs(self.env, self.project)) >= self.after:
                    live = self.rig.fake.live()
                    assert len(live) == 1, live
                    self.rig.fake.interrupt(live[0].id)
                    # The interrupted machine's processes die with it. Once the instance shows as
                    # interrupted the job may already have terminated it, and the fake killed them.
                    kill_box(self.boxes / live[0].name)
                    self.interrupted = live[0].name
                    return
                time.sleep(0.2)
        except BaseException as err:  # reported by the test
            self.error = err


def test_an_interrupted_spot_instance_is_replaced_and_training_goes_on(
    ec2: tuple[Rig, dict[str, str], Path],
) -> None:
    rig, env, boxes = ec2
    rig.fake.reset()
    project = f"spot-{rig.name}-{time.time_ns()}"
    epochs = 12
    conf = {
        "project_id": project,
        "provider": rig.name,
        "gpu": rig.gpu,
        "spot": True,
        "command": ["{python}", str(SCRIPTED), "ok", str(epochs), "0.5"],
        "poll_interval_seconds": 1,
        "max_recoveries": 1,
    }
    interrupter = Interrupter(rig, env, boxes, project, after_epochs=3)
    interrupter.start()
    result = run_dag(env, conf)
    interrupter.join(5)
    output = result.stdout + result.stderr
    assert interrupter.error is None, interrupter.error
    assert interrupter.interrupted, "the instance was never interrupted"
    assert result.returncode == 0, output[-6000:]

    with session(env) as s:
        job = s.scalars(select(TrainingJob).where(TrainingJob.project_id == project)).one()
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id).order_by(Instance.id)).all()
    assert job.status == "completed" and job.recovery_count == 1, (job.status, job.failure_reason)
    assert stored_epochs(env, project) == list(range(1, epochs + 1))  # each once, none lost
    first, second = instances
    assert first.name == interrupter.interrupted and first.spot
    assert first.interrupted_at is not None and first.interruption
    assert first.state == "terminated" and (first.state_reason or "").startswith("interrupted:")
    assert second.state == "terminated" and second.interrupted_at is None
    assert job.cost_usd == pytest.approx((first.cost_usd or 0) + (second.cost_usd or 0), rel=1e-3)
    rig.fake.assert_all_terminated()


def test_no_recovery_left_fails_the_job_and_tears_down(vast: tuple[Rig, dict[str, str], Path]) -> None:
    rig, env, boxes = vast
    rig.fake.reset()
    project = f"spot-norecovery-{rig.name}-{time.time_ns()}"
    conf = {
        "project_id": project,
        "provider": rig.name,
        "gpu": rig.gpu,
        "spot": True,
        "command": ["{python}", str(SCRIPTED), "ok", "30", "0.5"],
        "poll_interval_seconds": 1,
        "max_recoveries": 0,
    }
    interrupter = Interrupter(rig, env, boxes, project, after_epochs=2)
    interrupter.start()
    result = run_dag(env, conf)
    interrupter.join(5)
    assert interrupter.interrupted and result.returncode != 0
    with session(env) as s:
        job = s.scalars(select(TrainingJob).where(TrainingJob.project_id == project)).one()
    assert job.status == "failed" and "max_recoveries=0" in (job.failure_reason or ""), job.failure_reason
    rig.fake.assert_all_terminated()


def test_the_reference_trainer_resumes_from_the_checkpoint_synced_to_s3(
    vast: tuple[Rig, dict[str, str], Path], moto_server: Any
) -> None:
    """With an s3:// outputs_uri the checkpoint reaches S3 while the trainer runs on the spot
    instance; the replacement gets it back and the trainer resumes after it, not from epoch 1."""
    from gpu_training.results.models import JobEvent

    rig, env, boxes = vast
    rig.fake.reset()
    moto_server.client().create_bucket(Bucket="spot-runs")
    project = f"spot-resume-{time.time_ns()}"
    epochs = 14
    conf = {
        "project_id": project,
        "provider": "vast",
        "gpu": rig.gpu,
        "spot": True,
        "outputs_uri": "s3://spot-runs/jobs",
        "config": {"iterations": 1, "epochs": epochs, "epoch_sleep_seconds": 1.5},
        "poll_interval_seconds": 1,
    }
    # Checkpoints are synced every 10 s: by epoch 12 (~18 s in) the one of ~10 s has reached S3.
    interrupter = Interrupter(rig, env, boxes, project, after_epochs=12)
    interrupter.start()
    result = run_dag(env, conf)
    interrupter.join(5)
    assert interrupter.error is None and interrupter.interrupted
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    with session(env) as s:
        job = s.scalars(select(TrainingJob).where(TrainingJob.project_id == project)).one()
        resumed = s.scalars(select(JobEvent).where(JobEvent.job_id == job.id, JobEvent.event == "resumed")).all()
    assert job.status == "completed" and job.recovery_count == 1
    assert stored_epochs(env, project) == list(range(1, epochs + 1))
    assert len(resumed) == 1, resumed
    next_epoch = (resumed[0].data or {}).get("next_epoch")
    assert isinstance(next_epoch, int) and 1 < next_epoch <= 13, resumed[0].data
    archive = moto_server.client().head_object(Bucket="spot-runs", Key=f"jobs/{job.uuid}/checkpoints/latest.tar")
    assert archive["ContentLength"] > 0
    rig.fake.assert_all_terminated()
