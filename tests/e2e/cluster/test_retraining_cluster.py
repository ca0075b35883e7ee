"""Retraining on a real deployment: an Asset event starts a run, and sweeps run as mapped jobs in the
``gpu_instances`` pool (2 slots) under a run budget. Concurrency and scheduling need the real
scheduler and triggerer, so these run here rather than through ``airflow dags test``.
"""

from __future__ import annotations

import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from gpu_training.results.models import Instance, TrainingJob
from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster
from tests.fakeclouds.rigs import Rig

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[3]
DIGITS = REPO / "include" / "trainer" / "data" / "digits.csv.gz"
POOL_SLOTS = 2
# Four trials, each ~5 s of training on the local provider.
GRID = "{learning_rate: [0.003, 0.02], hidden_size: [16, 32]}"
TRIAL_CONFIG = "{iterations: 1, epochs: 3, epoch_sleep_seconds: 1.5}"


def write_specs(directory: Path, cloud: Rig) -> None:
    """Written by the package's conftest before the deployment starts."""
    incoming = directory / "incoming"
    incoming.mkdir()
    shutil.copy(DIGITS, incoming / "digits.csv.gz")
    (directory / "fresh.yaml").write_text(
        f"""
name: fresh
schedule: {{asset: "file://{incoming}/digits.csv.gz"}}
params: {{project_id: fresh, provider: local, poll_interval_seconds: 1, config: {{iterations: 1, epochs: 2}}}}
promotion: {{metric: f1}}
"""
    )
    (directory / "sweep.yaml").write_text(
        f"""
name: sweep
schedule: null
params: {{project_id: sweep, provider: local, poll_interval_seconds: 1, config: {TRIAL_CONFIG}}}
sweep: {{grid: {GRID}, metric: f1, mode: max, pool: gpu_instances, max_parallel: {POOL_SLOTS}}}
promotion: {{metric: f1}}
"""
    )
    # On the fake Lambda cloud (a priced instance): a budget spent once the first instances run.
    (directory / "sweep_budget.yaml").write_text(
        f"""
name: sweep-budget
schedule: null
params:
  project_id: sweep-budget
  provider: {cloud.name}
  gpu: "{cloud.gpu}"
  poll_interval_seconds: 1
  config: {TRIAL_CONFIG}
sweep: {{grid: {GRID}, metric: accuracy, mode: max, budget_usd: 0.0001, pool: gpu_instances}}
"""
    )


@pytest.fixture(scope="module")
def pool(cluster: AirflowCluster) -> str:
    body = {"name": "gpu_instances", "slots": POOL_SLOTS, "include_deferred": True}
    resp = cluster.api("POST", "/pools", json=body)
    if resp.status_code == 409:
        resp = cluster.api("PATCH", "/pools/gpu_instances", json=body)
    resp.raise_for_status()
    return "gpu_instances"


def jobs_of_run(store: ResultsStore, dag_id: str, run_id: str) -> list[TrainingJob]:
    with store.session() as s:
        return list(
            s.scalars(
                select(TrainingJob)
                .where(TrainingJob.dag_id == dag_id, TrainingJob.run_id == run_id)
                .order_by(TrainingJob.map_index)
            )
        )


def max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    """The most intervals open at one moment (an end before a start at the same instant)."""
    points = sorted(
        [(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals], key=lambda p: (p[0], p[1])
    )
    most = current = 0
    for _, step in points:
        current += step
        most = max(most, current)
    return most


def instance_intervals(store: ResultsStore, jobs: list[TrainingJob]) -> list[tuple[datetime, datetime]]:
    with store.session() as s:
        rows = s.scalars(select(Instance).where(Instance.job_id.in_([j.id for j in jobs]))).all()
    assert all(r.terminated_at is not None for r in rows), "an instance was left running"
    return [(r.created_at, r.terminated_at) for r in rows if r.terminated_at is not None]


def task_states(cluster: AirflowCluster, dag_id: str, run_id: str) -> dict[tuple[str, int], str]:
    resp = cluster.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 200})
    resp.raise_for_status()
    return {(ti["task_id"], ti["map_index"]): ti["state"] for ti in resp.json()["task_instances"]}


def report_of(cluster: AirflowCluster, dag_id: str, run_id: str) -> dict[str, Any]:
    resp = cluster.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/report_sweep/xcomEntries/return_value")
    resp.raise_for_status()
    return dict(resp.json()["value"])


def test_an_asset_event_starts_the_retraining_run(
    cluster: AirflowCluster, store: ResultsStore, retraining_dir: Path
) -> None:
    dag_id = "retrain_fresh"
    cluster.wait_dag_parsed(dag_id)
    uri = f"file://{retraining_dir}/incoming/digits.csv.gz"
    assets = cluster.api("GET", "/assets", params={"uri_pattern": "digits.csv.gz"}).json()["assets"]
    asset = next(a for a in assets if a["uri"] == uri)
    # The producer of new data names the new object in the event's extra; the run trains on it.
    batch = retraining_dir / "incoming" / "batch-2.csv.gz"
    shutil.copy(DIGITS, batch)
    resp = cluster.api(
        "POST", "/assets/events", json={"asset_id": asset["id"], "extra": {"dataset_uri": f"file://{batch}"}}
    )
    resp.raise_for_status()

    def asset_run() -> str | None:
        runs = cluster.api("GET", f"/dags/{dag_id}/dagRuns").json()["dag_runs"]
        return next((r["dag_run_id"] for r in runs if r["run_type"] == "asset_triggered"), None)

    run_id = str(cluster.wait_until("the asset-triggered run", asset_run, 120, components=["scheduler"]))
    assert cluster.wait_run(dag_id, run_id, timeout=240) == "success"
    (job,) = jobs_of_run(store, dag_id, run_id)
    assert job.status == "completed"
    assert job.params["dataset_uri"] == f"file://{batch}"
    assert "dataset_path: data/batch-2.csv.gz" in (job.config_yaml or "")


def test_a_sweep_runs_its_trials_two_at_a_time_in_the_pool(
    cluster: AirflowCluster, store: ResultsStore, pool: str
) -> None:
    dag_id = "retrain_sweep"
    cluster.wait_dag_parsed(dag_id)
    run_id = cluster.trigger(dag_id)
    assert cluster.wait_run(dag_id, run_id, timeout=400) == "success"
    jobs = jobs_of_run(store, dag_id, run_id)
    assert [j.map_index for j in jobs] == [0, 1, 2, 3]
    assert {j.stage for j in jobs} == {"trial"} and {j.status for j in jobs} == {"completed"}
    assert [(j.params["config"]["learning_rate"], j.params["config"]["hidden_size"]) for j in jobs] == [
        (0.003, 16),
        (0.003, 32),
        (0.02, 16),
        (0.02, 32),
    ]
    # Concurrent (not one after another), and never more instances up at once (launch to verified
    # termination) than the sweep's max_parallel: Airflow's pool bounds the trials' steps, and at a
    # hand-over between two steps another trial's provision can take the freed slot; the run's own
    # limit (checked in the results DB at launch) then makes it wait.
    assert max_overlap(instance_intervals(store, jobs)) == POOL_SLOTS
    states = task_states(cluster, dag_id, run_id)
    assert {states["trial.provision", i] for i in range(4)} == {"success"}
    report = report_of(cluster, dag_id, run_id)
    values = {t["map_index"]: t["value"] for t in report["trials"]}
    assert report["best"]["value"] == max(values.values())
    assert report["best"]["job_uuid"] == jobs[max(values, key=lambda i: (values[i], -i))].uuid


def test_a_sweep_stops_launching_when_its_budget_is_spent(
    cluster: AirflowCluster, store: ResultsStore, cloud: Rig, pool: str
) -> None:
    dag_id = "retrain_sweep_budget"
    cluster.wait_dag_parsed(dag_id)
    run_id = cluster.trigger(dag_id)
    # Trials not launched for the budget are skipped, not failed: the run did what it was told.
    assert cluster.wait_run(dag_id, run_id, timeout=400) == "success"
    steps = task_states(cluster, dag_id, run_id)
    jobs = jobs_of_run(store, dag_id, run_id)
    launched = [j for j in jobs if j.status == "completed"]
    stopped = [j for j in jobs if j.status == "cancelled"]
    # The pool's first trials launch before any cost is counted: both, or only one when the other's
    # provision came after the first instance had already spent the budget (a loaded machine).
    assert 1 <= len(launched) <= POOL_SLOTS and len(stopped) == len(jobs) - len(launched)
    for job in stopped:
        assert steps["trial.provision", job.map_index] == "skipped"
        assert steps["trial.teardown", job.map_index] == "success"  # teardown still ran, finding nothing
        assert job.cancelled_by is not None and job.cancelled_by.startswith("run budget of 0.0001 USD spent")
        assert store.instances_for_job(job.uuid) == []  # nothing was launched for it
    assert all(j.cost_usd and j.cost_usd > 0 for j in launched)
    instance_intervals(store, launched)  # every instance row terminated...
    names = {r.name for j in launched for r in store.instances_for_job(j.uuid)}
    assert len(names) == len(launched)
    assert [i for i in cloud.fake.live() if i.name in names] == []  # ...and the cloud agrees
    report = report_of(cluster, dag_id, run_id)
    assert report["best"]["job_uuid"] in {j.uuid for j in launched}
    assert report["cost_usd"] == pytest.approx(sum(j.cost_usd or 0 for j in jobs))
