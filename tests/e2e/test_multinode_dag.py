"""End to end: multi-node runs of the gpu_training DAG through ``airflow dags test``.

The local provider launches each node as its own instance (work directory and process group);
the reference trainer runs under torchrun on every node and averages gradients over gloo. A 2-node
job must reach the loss a 1-node job reaches on the same global batch; one node killed mid-training
fails the job naming that node, and every node is terminated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import Artifact, EpochTrain, Instance
from tests.e2e.test_gpu_training_dag import (
    assert_torn_down,
    dag_test_command,
    job_of,
    processes_mentioning,
    run_dag,
    session,
)

pytestmark = pytest.mark.e2e

SMALL = {"iterations": 1, "epochs": 3, "hidden_size": 16, "seed": 5}


def losses(env: dict[str, str], project_id: str) -> list[float]:
    job = job_of(env, project_id)
    with session(env) as s:
        rows = s.scalars(select(EpochTrain).where(EpochTrain.job_id == job.id)).all()
        return [r.avg_loss for r in sorted(rows, key=lambda r: (r.iteration, r.epoch))]


def nodes_of(env: dict[str, str], project_id: str) -> list[Instance]:
    job = job_of(env, project_id)
    with session(env) as s:
        return list(s.scalars(select(Instance).where(Instance.job_id == job.id).order_by(Instance.node_rank)).all())


def test_a_two_node_job_reaches_the_loss_of_one_node_on_the_same_global_batch(airflow_env: dict[str, str]) -> None:
    one = run_dag(airflow_env, {"project_id": "mn-one", "config": SMALL, "poll_interval_seconds": 1})
    assert one.returncode == 0, one.stdout[-4000:] + one.stderr[-4000:]
    two = run_dag(airflow_env, {"project_id": "mn-two", "num_nodes": 2, "config": SMALL, "poll_interval_seconds": 1})
    output = two.stdout + two.stderr
    assert two.returncode == 0, output[-6000:]

    single, double = losses(airflow_env, "mn-one"), losses(airflow_env, "mn-two")
    assert len(single) == len(double) == 3
    # The gradients really are averaged: the same model, step for step, to float precision.
    assert double == pytest.approx(single, rel=1e-9)
    nodes = nodes_of(airflow_env, "mn-two")
    assert [n.node_rank for n in nodes] == [0, 1] and nodes[0].node_group == nodes[1].node_group == nodes[0].name
    assert "[node 0]" in output and "[node 1]" in output  # every node's log reaches the task log
    job = job_of(airflow_env, "mn-two")
    assert job.status == "completed"
    with session(airflow_env) as s:
        names = {a.name for a in s.scalars(select(Artifact).where(Artifact.job_id == job.id))}
    assert "global.json" in names  # node 0's outputs
    assert_torn_down(airflow_env, job)


def test_a_node_killed_mid_training_fails_the_job_and_every_node_is_terminated(airflow_env: dict[str, str]) -> None:
    conf: dict[str, Any] = {
        "project_id": "mn-kill",
        "num_nodes": 2,
        "config": {**SMALL, "epochs": 500},
        "poll_interval_seconds": 1,
    }
    run = subprocess.Popen(
        dag_test_command(conf),
        env=airflow_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        root = Path(airflow_env["AIRFLOW_HOME"]) / "local_instances"
        deadline = time.monotonic() + 300
        victim = None
        while time.monotonic() < deadline and run.poll() is None:
            try:
                trained = len(losses(airflow_env, "mn-kill"))
                nodes = nodes_of(airflow_env, "mn-kill")
            except Exception:  # not registered yet
                trained, nodes = 0, []
            if trained >= 1 and len(nodes) == 2:
                pgid = root / nodes[1].name / "run" / "pgid"
                if pgid.exists():
                    victim = nodes[1].name
                    os.killpg(int(pgid.read_text()), signal.SIGKILL)  # node 1 dies with its wrapper
                    break
            time.sleep(0.5)
        assert victim, "node 1 never trained"
        output, _ = run.communicate(timeout=300)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode != 0, output[-4000:]
    job = job_of(airflow_env, "mn-kill")
    assert job.status == "failed"
    assert f"node 1 ({victim})" in (job.failure_reason or ""), job.failure_reason
    assert_torn_down(airflow_env, job)
    assert all(not processes_mentioning(n.name) for n in nodes_of(airflow_env, "mn-kill"))
