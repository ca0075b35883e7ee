"""End to end: retraining DAGs built from specs, run through ``airflow dags test`` on the local provider.

A cron spec run at chosen logical dates (time travel) with champion promotion, and a multi-stage
pipeline (sft -> [ppo, dpo] -> eval) whose stages start from the previous stage's uploaded model.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from typing import Any

import pytest
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from gpu_training.results.models import Artifact, JobEvent, Model, TrainingJob
from tests.servers import results_url_of

pytestmark = pytest.mark.e2e

NIGHTLY = """
name: nightly
schedule: "0 3 * * *"
params:
  project_id: nightly
  provider: local
  config: {iterations: 1, hidden_size: 32, epochs: 2}
promotion: {metric: f1, mode: max, min_delta: 0.005, min_value: 0.8}
"""

PIPELINE = """
name: rlhf
schedule: "@weekly"
params:
  project_id: rlhf
  provider: local
  config: {iterations: 1, hidden_size: 32, epochs: 2}
stages:
  - name: sft
  - name: ppo
    depends_on: [sft]
    params: {config: {learning_rate: 0.003}}
  - name: dpo
    depends_on: [sft]
    params: {config: {learning_rate: 0.001}}
  - name: eval
    depends_on: [ppo, dpo]
    init_from: ppo
    params: {config: {epochs: 1, learning_rate: 0.0001}}
promotion: {metric: f1}
"""


@pytest.fixture(scope="module")
def env(airflow_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    specs = tmp_path_factory.mktemp("retraining_specs")
    (specs / "nightly.yaml").write_text(NIGHTLY)
    (specs / "rlhf.yaml").write_text(PIPELINE)
    return {**airflow_env, "GPU_TRAINING_RETRAINING_DIR": str(specs)}


def dags_test(env: dict[str, str], dag_id: str, logical_date: str | None = None, conf: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "airflow", "dags", "test", dag_id]
    if logical_date:
        cmd.append(logical_date)
    if conf is not None:
        cmd += ["--conf", json.dumps(conf)]
    cmd += ["-f", env["AIRFLOW__CORE__DAGS_FOLDER"] + "/retraining.py"]  # that file parsed, not all of dags/
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "state=success" in done.stdout + done.stderr, (done.stdout + done.stderr)[-4000:]


def session(env: dict[str, str]) -> Session:
    """A session on the results DB of the Airflow in ``env`` (its connection closed with the session)."""
    return Session(create_engine(results_url_of(env), poolclass=NullPool))


def dag_runs(env: dict[str, str], dag_id: str) -> list[tuple[str, str, str]]:
    with sqlite3.connect(f"{env['AIRFLOW_HOME']}/airflow.db") as db:
        return db.execute(
            "SELECT run_id, logical_date, state FROM dag_run WHERE dag_id = ? ORDER BY logical_date", (dag_id,)
        ).fetchall()


def test_cron_spec_runs_at_its_logical_dates_and_promotes_only_when_the_rule_holds(env: dict[str, str]) -> None:
    base = {"iterations": 1, "hidden_size": 32}
    # 1: f1 ~0.91 >= min_value 0.8 with no champion -> the first champion
    dags_test(env, "retrain_nightly", "2026-03-01T03:00:00+00:00")
    # 2: the same model again: f1 < champion + 0.005 -> not promoted
    dags_test(env, "retrain_nightly", "2026-03-02T03:00:00+00:00")
    # 3: trained longer: f1 ~0.95 >= champion + 0.005 -> promoted, the first one retired
    dags_test(env, "retrain_nightly", "2026-03-03T03:00:00+00:00", {"config": {**base, "epochs": 6}})

    runs = dag_runs(env, "retrain_nightly")
    assert [r[1][:19] for r in runs] == ["2026-03-01 03:00:00", "2026-03-02 03:00:00", "2026-03-03 03:00:00"]
    assert {r[2] for r in runs} == {"success"}
    with session(env) as s:
        jobs = {j.run_id: j for j in s.scalars(select(TrainingJob).where(TrainingJob.dag_id == "retrain_nightly"))}
        assert sorted(jobs) == sorted(r[0] for r in runs)
        assert {j.status for j in jobs.values()} == {"completed"}
        decisions = s.scalars(select(Model).where(Model.name == "nightly").order_by(Model.decided_at)).all()
        by_job = {j.id: j.run_id for j in jobs.values()}
    assert [by_job[d.job_id] for d in decisions] == [r[0] for r in runs]
    first, same, better = decisions
    assert first.promoted and first.reason.startswith("promoted: first champion")
    assert not same.promoted and same.value == pytest.approx(first.value)
    assert same.reason == f"not promoted: f1 {same.value:.4f} < champion {first.value:.4f} + 0.005"
    assert better.promoted and better.value >= first.value + 0.005
    assert better.previous_champion_job_id == first.job_id
    assert [d.is_champion for d in decisions] == [False, False, True]
    assert first.retired_at is not None


def test_pipeline_stages_fan_out_and_in_and_pass_checkpoints(env: dict[str, str]) -> None:
    dags_test(env, "retrain_rlhf")
    with session(env) as s:
        jobs = {j.stage: j for j in s.scalars(select(TrainingJob).where(TrainingJob.dag_id == "retrain_rlhf"))}
        assert sorted(jobs) == ["dpo", "eval", "ppo", "sft"]
        assert {j.status for j in jobs.values()} == {"completed"}
        assert len({j.run_id for j in jobs.values()}) == 1
        models: dict[str, Any] = {
            stage: s.scalars(select(Artifact).where(Artifact.job_id == j.id, Artifact.name == "model_final.npz")).one()
            for stage, j in jobs.items()
        }
        initialized = {
            stage: s.scalars(
                select(JobEvent).where(
                    JobEvent.job_id == j.id, JobEvent.phase == "PROJECT", JobEvent.event == "initialized"
                )
            ).one_or_none()
            for stage, j in jobs.items()
        }
        promoted = s.scalars(select(Model).where(Model.name == "rlhf")).one()
    # Each stage got its upstream stage's uploaded model, and its trainer started from it.
    assert not jobs["sft"].params["init_checkpoint_uri"] and initialized["sft"] is None
    for stage, upstream in (("ppo", "sft"), ("dpo", "sft"), ("eval", "ppo")):
        assert jobs[stage].params["init_checkpoint_uri"] == models[upstream].uri
        assert initialized[stage] is not None and initialized[stage].data["checkpoint"] == models[upstream].uri
        assert "init_checkpoint_path: init/model_final.npz" in (jobs[stage].config_yaml or "")
    # Stage params over the spec's: config merged key by key.
    assert jobs["ppo"].params["config"] == {"iterations": 1, "hidden_size": 32, "epochs": 2, "learning_rate": 0.003}
    # Fan-in: eval started after both ppo and dpo had finished.
    assert jobs["eval"].created_at >= max(jobs["ppo"].completed_at, jobs["dpo"].completed_at)
    # The last stage's model is the one compared with the champion.
    assert promoted.job_id == jobs["eval"].id and promoted.promoted
