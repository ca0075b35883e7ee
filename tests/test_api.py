"""The results REST API (``gpu_training.api``) over a real migrated results DB (SQLite and PostgreSQL).

The app is mounted under ``/training`` as the api-server mounts it, its rows stored by the real
ingestion path (``global.json`` lines through ``ResultsStore.ingest``). Authorization is the real
``DagAccess`` over an auth manager whose per-DAG rules each test sets; only the user (who the
token would say) is injected, and the test client sends the ``Origin`` a browser on the api-server's
own page sends. ``test_no_token_is_401`` keeps Airflow's own authentication, and the order of
authentication and the results DB is tested with Airflow's own ``get_user`` and ``get_store``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import requests
import uvicorn
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event, insert, select

from gpu_training.api import db, output_files, queries, schemas
from gpu_training.api.app import TITLE, UNAVAILABLE, create_app
from gpu_training.api.auth import origin_of
from gpu_training.api.db import bound_waits, get_store
from gpu_training.api.stream import StreamSettings
from gpu_training.errors import StorageError
from gpu_training.events import parse_chunk
from gpu_training.hooks.results import create_results_engine
from gpu_training.results.models import Base, EpochTrain, Eval, Instance, TrainingIteration, TrainingStep
from gpu_training.results.store import ArtifactRecord, ResultsStore
from gpu_training.retraining.promotion import promote
from gpu_training.retraining.spec import Promotion
from tests.servers import free_port, results_connection, start_postgres, wait_for_port

from .conftest import RESULTS_BACKENDS, event_line

REPO = Path(__file__).resolve().parents[1]
OTHER_DAG = "other_dag"


class PerDagAuthManager(SimpleAuthManager):
    """The simple auth manager with per-DAG rules: ``rules[dag_id]`` = the methods allowed."""

    def __init__(self) -> None:
        super().__init__()
        self.rules: dict[str, set[str]] | None = None  # None: every DAG, every method

    def is_authorized_dag(
        self,
        *,
        method: Any,
        user: SimpleAuthManagerUser,
        access_entity: DagAccessEntity | None = None,
        details: DagDetails | None = None,
    ) -> bool:
        if self.rules is None:
            return True
        dag_id = details.id if details else None
        return dag_id is not None and str(method) in self.rules.get(dag_id, set())


def feed(store: ResultsStore, job_uuid: str, lines: bytes) -> None:
    """Store ``global.json`` lines as the follower does: parsed, then ingested from the stored offset."""
    offset = store.job(job_uuid).ingest_offset
    events, errors, consumed = parse_chunk(lines, offset, final=True)
    result = store.ingest(job_uuid, expected_offset=offset, new_offset=offset + consumed, events=events, errors=errors)
    assert not result.conflict


def epoch_line(iteration: int, epoch: int, loss: float) -> bytes:
    return event_line(
        "TRAINING",
        "epoch_complete",
        iteration=iteration,
        epoch=epoch,
        data={"avg_loss": loss, "model_path": f"checkpoints/iter{iteration:03d}_epoch{epoch:03d}_model.npz"},
    )


def eval_line(iteration: int, epoch: int, accuracy: float) -> bytes:
    return event_line(
        "EVAL_MODEL", "metrics", iteration=iteration, epoch=epoch, data={"accuracy": accuracy, "f1": accuracy - 0.1}
    )


def new_job(
    store: ResultsStore,
    run_id: str,
    *,
    project_id: str = "proj-a",
    provider: str = "local",
    dag_id: str = "gpu_training",
    status: str = "running",
    created_at: datetime | None = None,
    gpu: str = "",
    stage: str = "",
    map_index: int = -1,
) -> str:
    job_uuid = store.create_job(
        project_id=project_id,
        provider=provider,
        runtime="process",
        params={"project_id": project_id, "gpu": gpu, "config": {}},
        dag_id=dag_id,
        run_id=run_id,
        stage=stage,
        map_index=map_index,
    )
    store.update_job(job_uuid, status=status, created_at=created_at or datetime.now(UTC))
    return job_uuid


T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
RULE = Promotion(metric="f1", min_delta=0.005)


class World:
    """Five jobs, one of them (``full``) with two iterations of epochs and evals, artifacts and an
    instance; one job in another DAG."""

    def __init__(self, store: ResultsStore, tmp_path: Path) -> None:
        self.store = store
        self.old = new_job(store, "r-old", status="completed", created_at=T0)
        self.failed = new_job(store, "r-failed", status="failed", provider="lambda", created_at=T0 + timedelta(hours=1))
        self.other_project = new_job(store, "r-b", project_id="proj-b", created_at=T0 + timedelta(hours=2))
        self.other_dag = new_job(store, "r-o", dag_id=OTHER_DAG, created_at=T0 + timedelta(hours=3))
        self.full = new_job(store, "r-full", provider="ssh", gpu="A100", created_at=T0 + timedelta(hours=4))
        lines = event_line("PROJECT", "start") + event_line("ITERATION", "start", iteration=1)
        lines += event_line("TRAINING", "start", iteration=1)
        lines += epoch_line(1, 1, 0.9) + epoch_line(1, 2, 0.5) + event_line("TRAINING", "end", iteration=1)
        lines += eval_line(1, 2, 0.8) + event_line("ITERATION", "end", iteration=1)
        lines += event_line("ITERATION", "start", iteration=2) + epoch_line(2, 1, 0.4) + eval_line(2, 1, 0.85)
        feed(store, self.full, lines)
        self.file = tmp_path / "outputs" / "model.npz"
        self.file.parent.mkdir()
        self.file.write_bytes(b"weights" * 100)
        store.record_artifacts(
            self.full,
            [
                ArtifactRecord("model.npz", self.file.as_uri(), self.file.stat().st_size, "0" * 64),
                ArtifactRecord("gone.txt", (tmp_path / "outputs" / "gone.txt").as_uri(), 1, "1" * 64),
            ],
        )
        store.record_instance_intent(
            self.full, provider="ssh", name="gpujob-full", instance_type="a100", region="r1", price_per_hour=2.0
        )
        store.update_instance("gpujob-full", state="terminated", billable_seconds=1800.0, cost_usd=1.0)

    def artifact_id(self, name: str) -> int:
        return next(a.id for a in self.store.artifacts(self.full) if a.name == name)

    def decide_models(self) -> None:
        """Promotion decisions, in this order. Model ``digits`` (DAG gpu_training): ``full`` (f1
        0.75) is the first champion, ``other_project`` (f1 0.9) takes its place, ``old`` (no
        evaluation) is not promoted. Model ``other`` (other_dag): ``other_dag`` (f1 0.5), promoted."""
        feed(self.store, self.other_project, eval_line(1, 1, 1.0))
        feed(self.store, self.other_dag, eval_line(1, 1, 0.6))
        for job in (self.full, self.other_project, self.old):
            promote(self.store, "digits", job, RULE, dag_id="gpu_training", run_id=self.store.job(job).run_id)
        promote(self.store, "other", self.other_dag, RULE, dag_id=OTHER_DAG, run_id="r-o")


class FailedRuns(list):  # type: ignore[type-arg]
    """Stands in for marking a dag run failed in Airflow (the e2e tests do it for real)."""

    error: Exception | None = None

    def __call__(self, dag_id: str, run_id: str) -> bool:
        self.append((dag_id, run_id))
        if self.error is not None:
            raise self.error
        return True


@pytest.fixture
def auth_manager() -> PerDagAuthManager:
    return PerDagAuthManager()


@pytest.fixture
def api(store: ResultsStore, auth_manager: PerDagAuthManager) -> FastAPI:
    app = create_app(stream_settings=StreamSettings(poll_interval=0.05, keepalive=0.5), fail_run=FailedRuns())
    app.state.auth_manager = auth_manager
    app.dependency_overrides[get_store] = lambda: store
    app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="tester", role="VIEWER")
    return app


#: The test client's own origin (its requests go to http://testserver).
OWN_ORIGIN = "http://testserver"


def mounted(api: FastAPI) -> FastAPI:
    root = FastAPI()
    root.mount("/training", api)  # as the api-server mounts plugin apps
    return root


@pytest.fixture
def client(api: FastAPI) -> Iterator[TestClient]:
    # The Origin the page's fetch() sends (a POST authenticated by the session cookie needs it).
    with TestClient(mounted(api), headers={"Origin": OWN_ORIGIN}) as c:
        yield c


@pytest.fixture
def world(store: ResultsStore, tmp_path: Path) -> World:
    return World(store, tmp_path)


def uuids(resp: requests.Response | Any) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [j["uuid"] for j in resp.json()["jobs"]]


# --- app, plugin, authentication ----------------------------------------------------------------


def test_openapi_is_served_under_the_prefix(client: TestClient) -> None:
    spec = client.get("/training/openapi.json").json()
    assert spec["info"]["title"] == TITLE
    assert {"/v1/jobs", "/v1/jobs/{job_uuid}/stream", "/v1/evaluations", "/v1/models", "/v1/models/{name}"} <= set(
        spec["paths"]
    )


def test_no_token_is_401(api: FastAPI, client: TestClient, world: World) -> None:
    del api.dependency_overrides[get_user]
    paths = (
        "/training/v1/jobs",
        f"/training/v1/jobs/{world.full}",
        f"/training/v1/jobs/{world.full}/log",
        "/training/v1/evaluations",
    )
    for path in (*paths, "/training/v1/models", "/training/v1/models/digits"):
        resp = client.get(path)
        assert resp.status_code == 401, (path, resp.text)
        assert resp.json() == {"detail": "Not authenticated"}
    assert client.post(f"/training/v1/jobs/{world.full}/cancel").status_code == 401


def test_plugin_registers_the_app_without_building_it_at_import() -> None:
    code = (
        "import sys, gpu_training.plugin as p\n"
        "assert 'gpu_training.api.app' not in sys.modules and 'fastapi' not in sys.modules, 'eager'\n"
        "[entry] = p.GpuTrainingPlugin.fastapi_apps\n"
        "assert entry['url_prefix'] == '/training' and entry['app'].title == 'GPU training results'\n"
        "assert p.GpuTrainingPlugin().fastapi_apps[0]['app'] is entry['app']\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO / "plugins", timeout=120)


# --- jobs -----------------------------------------------------------------------------------------


def test_jobs_newest_first_with_every_field(client: TestClient, world: World) -> None:
    resp = client.get("/training/v1/jobs")
    assert uuids(resp) == [world.full, world.other_dag, world.other_project, world.failed, world.old]
    body = resp.json()
    assert (body["total"], body["limit"], body["offset"]) == (5, 50, 0)
    full = body["jobs"][0]
    assert full["gpu"] == "A100" and full["provider"] == "ssh" and full["status"] == "running"
    assert full["ingest_offset"] > 0 and full["started_at"] is not None
    assert set(full) == {
        "uuid", "project_id", "dag_id", "run_id", "status", "provider", "runtime", "gpu", "created_at",
        "started_at", "completed_at", "time_taken", "cost_usd", "failure_reason", "non_finite_loss",
        "trainer_exit_code", "ingest_offset", "stage", "map_index", "updated_at", "cancel_requested_at",
        "cancelled_by",
    }  # fmt: skip
    assert (full["map_index"], full["cancelled_by"], full["cancel_requested_at"]) == (-1, None, None)
    assert full["updated_at"] is not None


def test_jobs_filters(client: TestClient, world: World) -> None:
    assert uuids(client.get("/training/v1/jobs", params={"status": "failed"})) == [world.failed]
    assert uuids(client.get("/training/v1/jobs", params={"project_id": "proj-b"})) == [world.other_project]
    assert uuids(client.get("/training/v1/jobs", params={"provider": "ssh"})) == [world.full]
    since = (T0 + timedelta(hours=3)).isoformat()
    assert uuids(client.get("/training/v1/jobs", params={"since": since})) == [world.full, world.other_dag]
    # An offset other than UTC: 13:00+05:30 is 07:30 UTC, before every job.
    assert len(uuids(client.get("/training/v1/jobs", params={"since": "2026-11-20T13:00:00+05:30"}))) == 5
    both = client.get("/training/v1/jobs", params={"status": "running", "project_id": "proj-a"})
    assert uuids(both) == [world.full, world.other_dag]
    assert uuids(client.get("/training/v1/jobs", params={"project_id": "nobody"})) == []


def test_jobs_of_one_dag_run(client: TestClient, world: World) -> None:
    """The filters of the page's run view (``#/runs/<dag_id>/<run_id>``): a sweep's trials and a
    pipeline's stages in one run."""
    trials = [new_job(world.store, "r-sweep", stage="trial", map_index=i) for i in range(3)]
    stages = [new_job(world.store, "r-pipe", stage=s) for s in ("sft", "rl")]
    other_dag = new_job(world.store, "r-sweep", dag_id=OTHER_DAG)

    def listed(**params: Any) -> set[str]:
        return set(uuids(client.get("/training/v1/jobs", params=params)))

    assert listed(dag_id="gpu_training", run_id="r-sweep") == set(trials)
    assert listed(run_id="r-sweep") == {*trials, other_dag}
    assert listed(dag_id="gpu_training", run_id="r-sweep", stage="trial", map_index=1) == {trials[1]}
    assert listed(dag_id="gpu_training", run_id="r-pipe", stage="rl") == {stages[1]}
    assert listed(dag_id="gpu_training", run_id="r-full", stage="", map_index=-1) == {world.full}
    assert listed(dag_id="gpu_training", run_id="r-nope") == set()
    assert listed(dag_id=OTHER_DAG) == {world.other_dag, other_dag}
    trial = client.get("/training/v1/jobs", params={"run_id": "r-sweep", "map_index": 2}).json()["jobs"]
    assert [(j["uuid"], j["stage"], j["map_index"]) for j in trial] == [(trials[2], "trial", 2)]
    for bad in ({"map_index": -2}, {"map_index": 2**31}, {"map_index": "x"}):
        assert client.get("/training/v1/jobs", params=bad).status_code == 422, bad


def test_jobs_pagination(client: TestClient, world: World) -> None:
    page = client.get("/training/v1/jobs", params={"limit": 2, "offset": 1})
    assert uuids(page) == [world.other_dag, world.other_project]
    assert (page.json()["total"], page.json()["limit"], page.json()["offset"]) == (5, 2, 1)
    assert uuids(client.get("/training/v1/jobs", params={"limit": 500, "offset": 4})) == [world.old]
    assert uuids(client.get("/training/v1/jobs", params={"offset": 10})) == []


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 501},
        {"offset": -1},
        {"offset": 2**63},  # more than a DB integer: was a 500 (OverflowError binding it in SQLite)
        {"limit": "x"},
        {"status": "bogus"},
        {"since": "yesterday"},
        {"since": "1700000000"},  # was read as seconds since the epoch
        {"since": "0.5"},
    ],
)
def test_jobs_bad_query_is_422(client: TestClient, params: dict[str, Any]) -> None:
    resp = client.get("/training/v1/jobs", params=params)
    assert resp.status_code == 422, resp.text
    assert isinstance(resp.json()["detail"], list)


def test_jobs_list_only_readable_dags(client: TestClient, auth_manager: PerDagAuthManager, world: World) -> None:
    auth_manager.rules = {OTHER_DAG: {"GET"}}
    body = client.get("/training/v1/jobs").json()
    assert [j["uuid"] for j in body["jobs"]] == [world.other_dag] and body["total"] == 1
    auth_manager.rules = {}
    assert client.get("/training/v1/jobs").json() == {"jobs": [], "total": 0, "limit": 50, "offset": 0}


def test_jobs_have_their_pipeline_stage(client: TestClient, world: World) -> None:
    staged = new_job(world.store, "r-pipe", stage="sft", created_at=T0 + timedelta(hours=5))
    jobs = client.get("/training/v1/jobs").json()["jobs"]
    assert [(j["uuid"], j["stage"]) for j in jobs[:2]] == [(staged, "sft"), (world.full, "")]
    assert client.get(f"/training/v1/jobs/{staged}").json()["stage"] == "sft"
    assert client.get(f"/training/v1/jobs/{staged}/details").json()["stage"] == "sft"
    assert client.get(f"/training/v1/jobs/{world.full}/details").json()["stage"] == ""


def test_job_by_uuid(client: TestClient, world: World) -> None:
    resp = client.get(f"/training/v1/jobs/{world.failed}")
    assert resp.status_code == 200 and resp.json()["status"] == "failed" and resp.json()["provider"] == "lambda"
    assert client.get(f"/training/v1/jobs/{world.failed.upper()}").json()["uuid"] == world.failed


@pytest.mark.parametrize("job_uuid", ["00000000-0000-4000-8000-000000000000", "not-a-uuid"])
def test_unknown_or_malformed_job_is_404(client: TestClient, world: World, job_uuid: str) -> None:
    for suffix in ("", "/details", "/iterations/1/epochs", "/artifacts/1", "/stream", "/log"):
        resp = client.get(f"/training/v1/jobs/{job_uuid}{suffix}")
        assert resp.status_code == 404, (suffix, resp.text)
        assert resp.json() == {"detail": f"no training job {job_uuid!r}"}
    assert client.post(f"/training/v1/jobs/{job_uuid}/cancel").status_code == 404


def test_job_of_an_unreadable_dag_is_403(client: TestClient, auth_manager: PerDagAuthManager, world: World) -> None:
    auth_manager.rules = {OTHER_DAG: {"GET"}}
    for suffix in ("", "/details", "/iterations/1/epochs", "/stream", "/log"):
        resp = client.get(f"/training/v1/jobs/{world.full}{suffix}")
        assert resp.status_code == 403, (suffix, resp.text)
        assert "gpu_training" in resp.json()["detail"]
    assert client.get(f"/training/v1/jobs/{world.other_dag}").status_code == 200


def test_details(client: TestClient, world: World) -> None:
    resp = client.get(f"/training/v1/jobs/{world.full}/details")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["uuid"] == world.full and body["gpu"] == "A100"
    assert body["params"] == {"project_id": "proj-a", "gpu": "A100", "config": {}}
    job = world.store.job(world.full)
    assert body["training_config"] == job.training_config and body["outputs_uri"] is None
    it1, it2 = body["iterations"]
    assert [e["epoch"] for e in it1["epochs"]] == [1, 2] and it1["epochs"][1]["avg_loss"] == 0.5
    assert it1["epochs"][0]["model_path"] == "checkpoints/iter001_epoch001_model.npz"
    assert [s["step_type"] for s in it1["steps"]] == ["training"] and it1["steps"][0]["duration"] is not None
    assert it1["completed_at"] is not None and it2["completed_at"] is None
    assert [(e["model_id"], e["accuracy"]) for e in it1["evals"]] == [(f"{world.full}/1/2", 0.8)]
    assert [e["epoch"] for e in it2["epochs"]] == [1] and it2["evals"][0]["model_id"] == f"{world.full}/2/1"
    assert [a["name"] for a in body["artifacts"]] == ["gone.txt", "model.npz"]
    [instance] = body["instances"]
    assert instance["name"] == "gpujob-full" and instance["state"] == "terminated"
    assert (instance["price_per_hour"], instance["billable_seconds"], instance["cost_usd"]) == (2.0, 1800.0, 1.0)
    assert {"instance_type", "region", "state_reason", "launched_at", "terminated_at"} <= set(instance)
    empty = client.get(f"/training/v1/jobs/{world.old}/details").json()
    assert (empty["iterations"], empty["artifacts"], empty["instances"]) == ([], [], [])


def details_by_the_models(store: ResultsStore, job_uuid: str) -> schemas.JobDetails:
    """What ``/details`` answered when it built its response models from ORM rows."""
    job = store.job(job_uuid)
    with store.session() as s:

        def rows(model: Any, *order_by: Any) -> list[Any]:
            return list(s.scalars(select(model).where(model.job_id == job.id).order_by(*order_by)))

        steps, epochs = rows(TrainingStep, TrainingStep.id), rows(EpochTrain, EpochTrain.epoch)
        evals, instances = rows(Eval, Eval.epoch), rows(Instance, Instance.id)
        iterations = [
            schemas.Iteration(
                iteration=it.iteration,
                config=it.config,
                started_at=it.started_at,
                completed_at=it.completed_at,
                time_taken=it.time_taken,
                steps=[schemas.Step.of(r) for r in steps if r.iteration == it.iteration],
                epochs=[schemas.Epoch.of(r) for r in epochs if r.iteration == it.iteration],
                evals=[schemas.Evaluation.of(r, job_uuid) for r in evals if r.iteration == it.iteration],
            )
            for it in rows(TrainingIteration, TrainingIteration.iteration)
        ]
    evaluations = [e for it in iterations for e in it.evals]
    artifacts = [schemas.ArtifactInfo.of(a) for a in sorted(store.artifacts(job_uuid), key=lambda a: a.name)]
    return schemas.JobDetails(
        **schemas.Job.of(job).model_dump(),
        iterations=iterations,
        artifacts=artifacts,
        instances=[schemas.InstanceInfo.of(i) for i in instances],
        params=job.params,
        training_config=job.training_config,
        outputs_uri=job.outputs_uri,
        epochs_total=sum(len(it.epochs) for it in iterations),
        epochs_limit=500,
        epochs_offset=0,
        evals_total=len(evaluations),
        evals_limit=500,
        evals_offset=0,
        iterations_total=len(iterations),
        artifacts_total=len(artifacts),
        latest_evaluation=evaluations[-1] if evaluations else None,
    )


def test_list_and_details_json_is_their_response_models_json(client: TestClient, world: World) -> None:
    """The two large answers are written from plain rows, not through their response models: still
    byte for byte the models' JSON (key order, ISO 8601 datetimes, floats, nulls)."""
    store = world.store
    metrics = {"avg_loss": float("nan"), "lr": 1e-05, "sum": 0.1 + 0.2, "big": 2**60, "top": float("inf")}
    evaluation = {"confusion_matrix": [[3, 1], [0, 4]], "auc": 1.0}
    feed(store, world.full, event_line("TRAINING", "epoch_complete", iteration=2, epoch=2, data=metrics))
    feed(store, world.full, event_line("EVAL_MODEL", "metrics", iteration=2, epoch=2, data=evaluation))
    store.record_instance_intent(world.full, provider="ssh", name="gpujob-full-2", instance_type=None, region=None)
    store.update_job(world.failed, time_taken=12.5, cost_usd=0.0, failure_reason="exit 1", trainer_exit_code=1)
    store.update_job(
        world.full, training_config={"lr": 0.01, "layers": [64, 32]}, outputs_uri="file:///tmp/o", cancelled_by="x"
    )
    job = store.job(world.full)
    assert job.non_finite_loss and "NaN" in job.non_finite_loss

    details = client.get(f"/training/v1/jobs/{world.full}/details")
    assert details.status_code == 200 and details.headers["content-type"] == "application/json"
    expected = details_by_the_models(store, world.full)
    assert expected.iterations[1].epochs[1].avg_loss is None and expected.instances[1].instance_type is None
    assert details.content == expected.model_dump_json().encode()

    jobs = client.get("/training/v1/jobs", params={"limit": 4, "offset": 1})
    assert jobs.status_code == 200 and jobs.headers["content-type"] == "application/json"
    listed = [schemas.Job.of(store.job(j["uuid"])) for j in jobs.json()["jobs"]]
    assert jobs.content == schemas.JobList(jobs=listed, total=5, limit=4, offset=1).model_dump_json().encode()


def test_epochs_of_an_iteration(client: TestClient, world: World) -> None:
    resp = client.get(f"/training/v1/jobs/{world.full}/iterations/1/epochs")
    assert resp.status_code == 200
    assert resp.json()["iteration"] == 1 and [e["avg_loss"] for e in resp.json()["epochs"]] == [0.9, 0.5]
    missing = client.get(f"/training/v1/jobs/{world.full}/iterations/3/epochs")
    assert missing.status_code == 404 and missing.json() == {"detail": f"job {world.full} has no iteration 3"}
    assert client.get(f"/training/v1/jobs/{world.full}/iterations/x/epochs").status_code == 422


# --- evaluations ----------------------------------------------------------------------------------


def test_evaluations_by_model_id(client: TestClient, world: World) -> None:
    def model_ids(model_id: str) -> list[str]:
        resp = client.get("/training/v1/evaluations", params={"model_id": model_id})
        assert resp.status_code == 200, resp.text
        return [e["model_id"] for e in resp.json()["evaluations"]]

    assert model_ids(f"{world.full}/1/2") == [f"{world.full}/1/2"]
    assert model_ids(f"{world.full}/2") == [f"{world.full}/2/1"]
    assert model_ids(world.full) == [f"{world.full}/1/2", f"{world.full}/2/1"]
    assert model_ids(f"{world.full}/1/1") == []  # epoch 1 of iteration 1 was not evaluated
    assert model_ids("00000000-0000-4000-8000-000000000000/1/1") == []
    [row] = client.get("/training/v1/evaluations", params={"model_id": f"{world.full}/1/2"}).json()["evaluations"]
    assert row["accuracy"] == 0.8 and row["job_uuid"] == world.full and row["f1"] == pytest.approx(0.7)


@pytest.mark.parametrize(
    "model_id", ["nope", "1/2/3", "{u}/x", "{u}/1/2/3", "{u}/-1", "{u}/", " {u}", "{u}\n", "{u}/\u0661", "-" * 36]
)
def test_evaluations_bad_model_id_is_422(client: TestClient, world: World, model_id: str) -> None:
    resp = client.get("/training/v1/evaluations", params={"model_id": model_id.format(u=world.full)})
    assert resp.status_code == 422, resp.text
    [error] = resp.json()["detail"]  # FastAPI's validation error: the documented pattern
    assert error["loc"] == ["query", "model_id"] and error["type"] == "string_pattern_mismatch", error


def test_latest_evaluations(client: TestClient, auth_manager: PerDagAuthManager, world: World) -> None:
    feed(world.store, world.other_dag, eval_line(1, 3, 0.9))
    rows = client.get("/training/v1/evaluations").json()["evaluations"]
    assert [r["model_id"] for r in rows] == [f"{world.other_dag}/1/3", f"{world.full}/2/1", f"{world.full}/1/2"]
    page = client.get("/training/v1/evaluations", params={"limit": 1, "offset": 1}).json()
    assert [r["model_id"] for r in page["evaluations"]] == [f"{world.full}/2/1"]
    assert client.get("/training/v1/evaluations", params={"limit": 501}).status_code == 422
    auth_manager.rules = {"gpu_training": {"GET"}}
    assert [r["job_uuid"] for r in client.get("/training/v1/evaluations").json()["evaluations"]] == [world.full] * 2
    forbidden = client.get("/training/v1/evaluations", params={"model_id": world.other_dag})
    assert forbidden.status_code == 403


# --- models (promotion decisions) -----------------------------------------------------------------


def test_models_with_their_champion_and_latest_decision(client: TestClient, world: World) -> None:
    world.decide_models()
    resp = client.get("/training/v1/models")
    assert resp.status_code == 200, resp.text
    digits, other = resp.json()["models"]
    assert digits["name"] == "digits" and digits["decision_count"] == 3
    champion = digits["champion"]
    assert champion["job_uuid"] == world.other_project and champion["metric"] == "f1"
    assert champion["value"] == pytest.approx(0.9)
    assert champion["reason"] == "promoted: f1 0.9000 >= champion 0.7500 + 0.005"
    assert (champion["dag_id"], champion["run_id"]) == ("gpu_training", "r-b")
    assert set(champion) == {"job_uuid", "metric", "value", "decided_at", "reason", "dag_id", "run_id"}
    latest = digits["latest"]
    assert (latest["job_uuid"], latest["promoted"], latest["value"]) == (world.old, False, None)
    assert latest["reason"] == "not promoted: the job reported no f1"
    assert datetime.fromisoformat(latest["decided_at"]) >= datetime.fromisoformat(champion["decided_at"])
    assert set(latest) == {"job_uuid", "metric", "value", "promoted", "reason", "decided_at"}
    assert other["name"] == "other" and other["decision_count"] == 1
    assert other["champion"]["job_uuid"] == other["latest"]["job_uuid"] == world.other_dag
    assert other["latest"]["promoted"] is True and other["champion"]["reason"] == "promoted: first champion (f1 0.5000)"


def test_no_models_yet(client: TestClient, world: World) -> None:
    assert client.get("/training/v1/models").json() == {"models": []}


def test_model_decisions_newest_first(client: TestClient, world: World) -> None:
    world.decide_models()
    resp = client.get("/training/v1/models/digits")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert (body["name"], body["total"], body["limit"], body["offset"]) == ("digits", 3, 50, 0)
    assert body["champion"]["job_uuid"] == world.other_project
    old, better, first = body["decisions"]
    assert [d["job_uuid"] for d in body["decisions"]] == [world.old, world.other_project, world.full]
    assert [d["promoted"] for d in body["decisions"]] == [False, True, True]
    assert [d["is_champion"] for d in body["decisions"]] == [False, True, False]
    assert first["previous_champion_job_uuid"] is None and first["previous_value"] is None
    assert first["retired_at"] is not None and first["value"] == pytest.approx(0.75)
    assert first["reason"] == "promoted: first champion (f1 0.7500)"
    assert better["previous_champion_job_uuid"] == world.full and better["previous_value"] == pytest.approx(0.75)
    assert better["retired_at"] is None and better["decided_at"] == body["champion"]["decided_at"]
    assert old["previous_champion_job_uuid"] == world.other_project and old["value"] is None
    assert old["rule"] == {"metric": "f1", "mode": "max", "min_delta": 0.005}
    assert (old["dag_id"], old["run_id"], old["metric"]) == ("gpu_training", "r-old", "f1")
    assert set(old) == {
        "job_uuid", "metric", "value", "previous_champion_job_uuid", "previous_value", "promoted", "is_champion",
        "reason", "rule", "dag_id", "run_id", "decided_at", "retired_at",
    }  # fmt: skip
    page = client.get("/training/v1/models/digits", params={"limit": 1, "offset": 1}).json()
    assert [d["job_uuid"] for d in page["decisions"]] == [world.other_project]
    assert (page["total"], page["limit"], page["offset"]) == (3, 1, 1) and page["champion"] == body["champion"]
    assert client.get("/training/v1/models/digits", params={"offset": 3}).json()["decisions"] == []
    assert client.get("/training/v1/models/digits", params={"limit": 0}).status_code == 422


def test_unknown_model_is_404(client: TestClient, world: World) -> None:
    world.decide_models()
    for name in ("nope", "Digits", "digits "):
        resp = client.get(f"/training/v1/models/{name}")
        assert resp.status_code == 404, (name, resp.text)
        assert resp.json() == {"detail": f"no model {name!r}"}


def test_models_of_unreadable_dags_are_hidden(
    client: TestClient, auth_manager: PerDagAuthManager, world: World
) -> None:
    world.decide_models()
    auth_manager.rules = {OTHER_DAG: {"GET"}}
    assert [m["name"] for m in client.get("/training/v1/models").json()["models"]] == ["other"]
    assert client.get("/training/v1/models/other").status_code == 200
    hidden = client.get("/training/v1/models/digits")  # as unknown as a name never decided
    assert hidden.status_code == 404 and hidden.json() == {"detail": "no model 'digits'"}
    auth_manager.rules = {}
    assert client.get("/training/v1/models").json() == {"models": []}
    assert client.get("/training/v1/models/other").status_code == 404


def test_model_decisions_in_an_unreadable_dag_are_hidden(
    client: TestClient, auth_manager: PerDagAuthManager, world: World
) -> None:
    """A name decided in two DAGs: each user sees the decisions of the DAGs they can read, and no
    job uuid of the others (the previous champion's uuid is null)."""
    feed(world.store, world.other_dag, eval_line(1, 1, 0.6))
    promote(world.store, "mixed", world.other_dag, RULE, dag_id=OTHER_DAG, run_id="r-o")
    promote(world.store, "mixed", world.full, RULE, dag_id="gpu_training", run_id="r-full")

    auth_manager.rules = {"gpu_training": {"GET"}}
    [summary] = client.get("/training/v1/models").json()["models"]
    assert summary["champion"]["job_uuid"] == summary["latest"]["job_uuid"] == world.full
    assert summary["decision_count"] == 1
    body = client.get("/training/v1/models/mixed").json()
    [decision] = body["decisions"]
    assert decision["job_uuid"] == world.full and body["total"] == 1
    assert decision["previous_champion_job_uuid"] is None and decision["previous_value"] == pytest.approx(0.5)

    auth_manager.rules = {OTHER_DAG: {"GET"}}
    [summary] = client.get("/training/v1/models").json()["models"]
    assert summary["champion"] is None and summary["latest"]["job_uuid"] == world.other_dag
    body = client.get("/training/v1/models/mixed").json()
    assert body["champion"] is None and body["total"] == 1
    [decision] = body["decisions"]
    assert decision["job_uuid"] == world.other_dag and decision["promoted"] is True
    assert decision["is_champion"] is False and decision["retired_at"] is not None

    auth_manager.rules = None
    body = client.get("/training/v1/models/mixed").json()
    assert [d["job_uuid"] for d in body["decisions"]] == [world.full, world.other_dag]
    assert body["decisions"][0]["previous_champion_job_uuid"] == world.other_dag


# --- artifacts ------------------------------------------------------------------------------------


def test_file_artifact_is_streamed(client: TestClient, world: World) -> None:
    resp = client.get(f"/training/v1/jobs/{world.full}/artifacts/{world.artifact_id('model.npz')}")
    assert resp.status_code == 200, resp.text
    assert resp.content == world.file.read_bytes()
    assert 'filename="model.npz"' in resp.headers["content-disposition"]


def test_missing_artifacts_are_404(client: TestClient, world: World) -> None:
    gone_id = world.artifact_id("gone.txt")
    gone = client.get(f"/training/v1/jobs/{world.full}/artifacts/{gone_id}")
    assert gone.status_code == 404
    assert gone.json()["detail"] == (
        f"artifact {gone_id} of job {world.full} is not available: gone, or not a regular file inside the job's "
        "outputs folder"
    )
    assert client.get(f"/training/v1/jobs/{world.full}/artifacts/99999").status_code == 404
    # An artifact id of another job is not this job's.
    other = client.get(f"/training/v1/jobs/{world.old}/artifacts/{world.artifact_id('model.npz')}")
    assert other.status_code == 404 and other.json() == {"detail": f"job {world.old} has no artifact 1"}


def test_s3_artifact_redirects_to_a_presigned_url(
    client: TestClient, world: World, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", moto_server.aws_connection())
    s3 = moto_server.client()
    bucket = f"api{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key=f"outputs/{world.full}/final.npz", Body=b"final weights")
    uri = f"s3://{bucket}/outputs/{world.full}/final.npz"
    world.store.record_artifacts(world.full, [ArtifactRecord("final.npz", uri, 13, "2" * 64)])
    resp = client.get(
        f"/training/v1/jobs/{world.full}/artifacts/{world.artifact_id('final.npz')}", follow_redirects=False
    )
    assert resp.status_code == 307, resp.text
    location = resp.headers["location"]
    assert location.startswith(moto_server.endpoint) and "Signature=" in location
    assert requests.get(location, timeout=10).content == b"final weights"


# --- trainer log ----------------------------------------------------------------------------------


def upload_log(world: World, job_uuid: str, uri: str, size: int = 1) -> None:
    """What upload_outputs records for the trainer log, and the job ended."""
    world.store.record_artifacts(job_uuid, [ArtifactRecord("logs/trainer.log", uri, size, "3" * 64)])
    world.store.update_job(job_uuid, status="completed")


def write_log(tmp_path: Path, job_uuid: str, text: str) -> Path:
    path = tmp_path / "outputs" / job_uuid / "logs" / "trainer.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_log_of_a_running_job_is_the_tail_the_follower_stores(client: TestClient, world: World) -> None:
    url = f"/training/v1/jobs/{world.full}/log"
    assert client.get(url).json() == {
        "job_uuid": world.full,
        "source": "none",
        "lines": [],
        "truncated": False,
        "uri": None,
        "updated_at": None,
        "detail": None,
    }
    tail = "\n".join(f"[node {i % 2}] epoch {i}" for i in range(300))
    world.store.update_job(world.full, log_tail=tail, log_tail_at=T0)
    body = client.get(url, params={"lines": 5}).json()
    assert body["source"] == "live" and body["truncated"] is True
    assert body["lines"] == [f"[node {i % 2}] epoch {i}" for i in range(295, 300)]
    assert datetime.fromisoformat(body["updated_at"]) == T0
    assert len(client.get(url).json()["lines"]) == 200  # the default
    everything = client.get(url, params={"lines": 2000}).json()
    assert len(everything["lines"]) == 300 and everything["truncated"] is False
    # A tail as long as the follower keeps has lost the log's beginning.
    world.store.update_job(world.full, log_tail="x" * 100 + "\n" + "y" * 32_700)
    full = client.get(url, params={"lines": 2000}).json()
    assert len(full["lines"]) == 2 and full["truncated"] is True
    for bad in (0, 2001, "x"):
        assert client.get(url, params={"lines": bad}).status_code == 422, bad


def test_log_of_an_ended_job_is_the_end_of_the_uploaded_file(client: TestClient, world: World, tmp_path: Path) -> None:
    world.store.update_job(world.full, log_tail="the live tail")
    url = f"/training/v1/jobs/{world.full}/log"
    path = write_log(tmp_path, world.full, "".join(f"line {i}\n" for i in range(1000)) + "z" * 3000 + "\nlast\n")
    upload_log(world, world.full, path.as_uri(), path.stat().st_size)
    body = client.get(url, params={"lines": 3}).json()
    assert body["source"] == "uploaded" and body["uri"] == path.as_uri() and body["truncated"] is True
    assert body["lines"] == ["line 999", "z" * 1000 + "... [2000 more characters]", "last"]
    assert body["detail"] is None and body["updated_at"] is not None
    whole = client.get(url, params={"lines": 2000}).json()
    assert whole["lines"][0] == "line 0" and len(whole["lines"]) == 1002 and whole["truncated"] is False

    # Longer than what is read from its end (256 KiB): whole lines of the end only.
    path.write_text("".join(f"{i:07d} " + "x" * 92 + "\n" for i in range(5000)))
    end = client.get(url, params={"lines": 2000}).json()
    assert end["truncated"] is True and len(end["lines"]) == 2000
    assert end["lines"][-1] == "0004999 " + "x" * 92 and all(len(line) == 100 for line in end["lines"])


def test_an_unreadable_uploaded_log_falls_back_to_the_stored_tail(
    client: TestClient, world: World, tmp_path: Path
) -> None:
    url = f"/training/v1/jobs/{world.full}/log"
    world.store.update_job(world.full, log_tail="one\ntwo")
    gone = tmp_path / "outputs" / world.full / "logs" / "trainer.log"
    upload_log(world, world.full, gone.as_uri())
    body = client.get(url).json()
    assert (body["source"], body["lines"], body["uri"]) == ("live", ["one", "two"], None)
    assert body["detail"].startswith("the uploaded log could not be read: ") and "trainer.log" in body["detail"]

    # A symlink out of the job's outputs folder is not followed, nor is a directory read.
    secret = tmp_path / "secret.txt"
    secret.write_text("not a log\n")
    gone.parent.mkdir(parents=True)
    gone.symlink_to(secret)
    body = client.get(url).json()
    assert body["source"] == "live" and "outside the job's outputs folder" in body["detail"], body
    gone.unlink()
    gone.mkdir()
    body = client.get(url).json()
    assert body["source"] == "live" and "not a regular file" in body["detail"], body
    # No stored tail either: nothing to show, and why.
    world.store.update_job(world.full, log_tail=None)
    body = client.get(url).json()
    assert (body["source"], body["lines"]) == ("none", []) and body["detail"]


def test_log_of_an_ended_job_on_s3_is_one_ranged_get_of_its_end(
    client: TestClient, world: World, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpu_training.api import trainer_log

    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", moto_server.aws_connection())
    monkeypatch.setattr(trainer_log, "READ_BYTES", 100)
    s3 = moto_server.client()
    bucket = f"log{time.monotonic_ns()}"
    s3.create_bucket(Bucket=bucket)
    text = "".join(f"step {i:04d}\n" for i in range(3000))  # 10 bytes a line
    s3.put_object(Bucket=bucket, Key=f"outputs/{world.full}/logs/trainer.log", Body=text.encode())
    uri = f"s3://{bucket}/outputs/{world.full}/logs/trainer.log"
    upload_log(world, world.full, uri, len(text))
    body = client.get(f"/training/v1/jobs/{world.full}/log").json()
    assert body["source"] == "uploaded" and body["uri"] == uri and body["truncated"] is True
    assert body["lines"] == [f"step {i:04d}" for i in range(2990, 3000)]  # the last 100 bytes only
    monkeypatch.setattr(trainer_log, "READ_BYTES", 10**6)  # more than the object: all of it
    whole = client.get(f"/training/v1/jobs/{world.full}/log", params={"lines": 2000}).json()
    assert whole["lines"][-1] == "step 2999" and len(whole["lines"]) == 2000 and whole["truncated"] is True
    assert len(client.get(f"/training/v1/jobs/{world.full}/log", params={"lines": 2000}).json()["lines"]) == 2000
    s3.delete_object(Bucket=bucket, Key=f"outputs/{world.full}/logs/trainer.log")
    world.store.update_job(world.full, log_tail="kept")
    missing = client.get(f"/training/v1/jobs/{world.full}/log").json()
    assert (missing["source"], missing["lines"]) == ("live", ["kept"]) and "NoSuchKey" in missing["detail"]


# --- cancel ---------------------------------------------------------------------------------------


def test_cancel_a_running_job(api: FastAPI, client: TestClient, world: World) -> None:
    resp = client.post(f"/training/v1/jobs/{world.full}/cancel")
    assert resp.status_code == 202, resp.text
    assert resp.json()["uuid"] == world.full and resp.json()["status"] == "cancelled"
    assert resp.json()["cancelled_by"] == "tester" and resp.json()["cancel_requested_at"] is not None
    assert client.get(f"/training/v1/jobs/{world.full}").json()["cancelled_by"] == "tester"
    job = world.store.job(world.full)
    assert job.status == "cancelled" and job.cancelled_by == "tester" and job.cancel_requested_at is not None
    assert api.state.fail_run == [(job.dag_id, job.run_id)]  # and its dag run is marked failed
    again = client.post(f"/training/v1/jobs/{world.full}/cancel")
    assert again.status_code == 400 and again.json() == {"detail": f"job {world.full} already ended: cancelled"}


def test_cancel_holds_when_airflow_cannot_fail_the_run(api: FastAPI, client: TestClient, world: World) -> None:
    """The cancel in the results DB alone stops the job (every step checks it): still 202."""
    api.state.fail_run.error = RuntimeError("metadata DB unavailable")
    resp = client.post(f"/training/v1/jobs/{world.full}/cancel")
    assert resp.status_code == 202 and world.store.job(world.full).status == "cancelled"


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_cancel_an_ended_job_is_400(api: FastAPI, client: TestClient, world: World, status: str) -> None:
    world.store.update_job(world.other_project, status=status)
    resp = client.post(f"/training/v1/jobs/{world.other_project}/cancel")
    assert resp.status_code == 400 and resp.json()["detail"] == f"job {world.other_project} already ended: {status}"
    assert world.store.job(world.other_project).status == status
    assert api.state.fail_run == []  # the dag run is left alone


def test_cancel_needs_edit_access_to_the_dag_runs(
    client: TestClient, auth_manager: PerDagAuthManager, world: World
) -> None:
    auth_manager.rules = {"gpu_training": {"GET"}}
    resp = client.post(f"/training/v1/jobs/{world.full}/cancel")
    assert resp.status_code == 403 and "edit access" in resp.json()["detail"]
    assert world.store.job(world.full).status == "running"
    auth_manager.rules = {"gpu_training": {"GET", "PUT"}}
    assert client.post(f"/training/v1/jobs/{world.full}/cancel").status_code == 202


# --- Server-Sent Events ---------------------------------------------------------------------------


@pytest.fixture
def live_url(api: FastAPI) -> Iterator[str]:
    """The app on a real HTTP server (the test client buffers whole responses: no live stream)."""
    root = FastAPI()
    root.mount("/training", api)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(root, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for_port(port, timeout=20)
    yield f"http://127.0.0.1:{port}/training"
    server.should_exit = True
    thread.join(10)


class SseReader:
    """Reads events of a ``text/event-stream`` response one at a time."""

    def __init__(self, resp: requests.Response) -> None:
        self.lines = resp.iter_lines(decode_unicode=True)
        self.comments = 0

    def next(self) -> dict[str, Any] | None:
        """The next event (``event``, ``id``, ``data`` parsed), None at the end of the stream."""
        fields: dict[str, Any] = {}
        for line in self.lines:
            if line == "":
                if fields:
                    fields["data"] = json.loads(fields["data"])
                    return fields
                continue
            if line.startswith(":"):
                self.comments += 1
                continue
            key, _, value = line.partition(": ")
            fields[key] = value
        return None


def test_stream_sends_rows_as_stored_then_ends_on_a_terminal_status(live_url: str, world: World) -> None:
    job = world.other_project
    with requests.get(f"{live_url}/v1/jobs/{job}/stream", stream=True, timeout=30) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = SseReader(resp)
        first = events.next()
        assert first is not None and first["event"] == "status" and first["data"]["status"] == "running"
        assert first["id"] == "0-0"

        feed(world.store, job, event_line("ITERATION", "start", iteration=1) + epoch_line(1, 1, 0.7))
        epoch = events.next()
        assert epoch is not None and epoch["event"] == "epoch"
        assert (epoch["data"]["iteration"], epoch["data"]["epoch"], epoch["data"]["avg_loss"]) == (1, 1, 0.7)

        feed(world.store, job, epoch_line(1, 2, 0.6) + eval_line(1, 2, 0.75))
        second, evaluation = events.next(), events.next()
        assert second is not None and second["data"]["epoch"] == 2
        assert evaluation is not None and evaluation["event"] == "eval"
        assert evaluation["data"]["model_id"] == f"{job}/1/2"
        last_id = evaluation["id"]

        time.sleep(0.8)  # idle: a keepalive comment (0.5 s in this test)
        world.store.finish(job, "completed")
        final = events.next()
        assert final is not None and final["event"] == "status" and final["data"]["status"] == "completed"
        assert events.next() is None  # the server closed the stream
        assert events.comments >= 1

    # Reconnecting with Last-Event-ID sends no row twice: only the status, then the end.
    with requests.get(
        f"{live_url}/v1/jobs/{job}/stream", headers={"Last-Event-ID": last_id}, stream=True, timeout=30
    ) as resp:
        events = SseReader(resp)
        got = [e["event"] for e in iter(events.next, None)]
    assert got == ["status", "status"]


def test_stream_of_an_ended_job_replays_its_rows_and_ends(client: TestClient, world: World) -> None:
    world.store.finish(world.full, "completed")
    resp = client.get(f"/training/v1/jobs/{world.full}/stream")
    assert resp.status_code == 200
    kinds = [line.split(": ", 1)[1] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["status", "epoch", "epoch", "epoch", "eval", "eval", "status"]


def test_a_repeated_query_parameter_is_422(client: TestClient, world: World) -> None:
    resp = client.get("/training/v1/jobs", params=[("provider", "ssh"), ("provider", "local")])
    assert resp.status_code == 422, resp.text
    assert resp.json()["detail"][0]["loc"] == ["query", "provider"]
    assert "takes one value, got 2" in resp.json()["detail"][0]["msg"]


# --- authentication before the results DB; 503 names no location ---------------------------------

#: Every operation, as an anonymous client would send it.
ANONYMOUS_CALLS = (
    ("GET", "/training/v1/jobs"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/details"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/epochs"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/evaluations"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/series"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/log"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/iterations/1/epochs"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/artifacts/1"),
    ("GET", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/stream"),
    ("POST", "/training/v1/jobs/00000000-0000-4000-8000-000000000000/cancel"),
    ("GET", "/training/v1/evaluations"),
    ("GET", "/training/v1/models"),
    ("GET", "/training/v1/models/digits"),
)


@contextmanager
def connects_recorded() -> Iterator[list[dict[str, Any]]]:
    """The parameters of every DBAPI connect any engine makes meanwhile."""
    seen: list[dict[str, Any]] = []

    def record(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(dict(cparams))

    event.listen(Engine, "do_connect", record)
    try:
        yield seen
    finally:
        event.remove(Engine, "do_connect", record)


@pytest.mark.parametrize("where", ["postgresql refused", "sqlite unreachable", "sqlite not migrated"])
def test_anonymous_is_401_without_touching_the_results_db(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """Airflow's own get_user and our own get_store: an anonymous request is answered 401 and no
    connection to the results DB is even tried; a signed-in one finds the DB unavailable: 503,
    whose body names no URL, host, port, database, path or driver (the cause is logged)."""
    secret = "s3cr3t"
    hidden_dir = tmp_path / f"hidden-{secret}"
    urls = {
        "postgresql refused": f"postgresql://results:pw-{secret}@127.0.0.1:{free_port()}/db_{secret}",
        "sqlite unreachable": f"sqlite:///{hidden_dir}/no/such/dir/results.db",
        "sqlite not migrated": f"sqlite:///{hidden_dir}/empty.db",
    }
    hidden_dir.mkdir()
    monkeypatch.setenv("AIRFLOW_CONN_TRAINING_RESULTS", results_connection(urls[where]))
    monkeypatch.setattr(db, "_store", None)
    app = create_app(fail_run=FailedRuns())
    app.state.auth_manager = PerDagAuthManager()
    with connects_recorded() as connects, TestClient(mounted(app)) as anonymous:
        for method, path in ANONYMOUS_CALLS:
            resp = anonymous.request(method, path)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json() == {"detail": "Not authenticated"}
        assert connects == []  # the results DB was never connected to
        assert db._store is None

        app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="tester", role="VIEWER")
        with caplog.at_level(logging.ERROR, logger="gpu_training.api.app"):
            for method, path in ANONYMOUS_CALLS:
                resp = anonymous.request(method, path, headers={"Origin": OWN_ORIGIN})
                assert resp.status_code == 503, (method, path, resp.text)
                assert resp.json() == {"detail": UNAVAILABLE}
                for leak in (secret, "127.0.0.1", "results.db", str(tmp_path), "psycopg", "sqlite", "revision"):
                    assert leak not in resp.text.lower(), (leak, resp.text)
    assert connects, "the signed-in requests tried the results DB"
    causes = {
        "postgresql refused": "Connection refused",
        "sqlite unreachable": "unable to open database file",
        "sqlite not migrated": "is at schema revision none",
    }
    assert causes[where] in caplog.text and UNAVAILABLE in caplog.text  # the cause: on the api-server only


def test_postgres_connections_wait_a_bounded_time() -> None:
    engine = bound_waits(create_results_engine(f"postgresql://u@127.0.0.1:{free_port()}/x"))
    with connects_recorded() as connects, pytest.raises(Exception, match="refused"), engine.connect():
        pass
    assert connects  # the class-level listener runs first, then the engine's own
    engine.dispose()
    seen: dict[str, Any] = {}
    event.listen(engine, "do_connect", lambda _d, _r, _a, cparams: seen.update(cparams))
    with pytest.raises(Exception, match="refused"), engine.connect():
        pass
    assert (seen["connect_timeout"], seen["keepalives"]) == (5, 1)


@pytest.mark.skipif("postgresql" not in RESULTS_BACKENDS, reason="RESULTS_DB is sqlite only")
def test_postgresql_stopped_mid_request_is_503() -> None:
    """A PostgreSQL server of its own, stopped (fast shutdown, as an operator or a crash does) between
    two queries of one request: 503, not 500; then refused at connect: 503 again."""
    root = Path(tempfile.mkdtemp(prefix="results-postgres-stop-"))  # the server runs as postgres
    server = start_postgres(root, user="results", database="results")
    try:
        engine = bound_waits(create_results_engine(server.url()))
        Base.metadata.create_all(engine)
        store = ResultsStore(engine)
        job = new_job(store, "r-stop")
        feed(store, job, event_line("ITERATION", "start", iteration=1) + epoch_line(1, 1, 0.5))
        app = create_app(fail_run=FailedRuns())
        app.state.auth_manager = PerDagAuthManager()
        app.dependency_overrides[get_store] = lambda: store
        app.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="tester", role="VIEWER")
        statements: list[str] = []

        def stop_before_the_second(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)
            if len(statements) == 2:
                server.stop()

        event.listen(engine, "before_cursor_execute", stop_before_the_second)
        with TestClient(mounted(app)) as client:
            resp = client.get(f"/training/v1/jobs/{job}/details")
            assert "training_jobs" in statements[0]  # the job was read, then the server went away
            assert resp.status_code == 503 and resp.json() == {"detail": UNAVAILABLE}, resp.text
            for path in ("/training/v1/jobs", f"/training/v1/jobs/{job}/series"):
                again = client.get(path)
                assert again.status_code == 503 and again.json() == {"detail": UNAVAILABLE}, again.text
        engine.dispose()
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


# --- artifacts only from inside the job's outputs folder ------------------------------------------


def record_artifact(world: World, name: str, path: Path) -> int:
    world.store.record_artifacts(world.full, [ArtifactRecord(name, path.as_uri(), 1, "4" * 64)])
    return world.artifact_id(name)


def test_artifact_that_is_not_a_regular_file_inside_the_outputs_is_404(
    client: TestClient, world: World, tmp_path: Path
) -> None:
    outputs = world.file.parent  # the job's outputs folder (as its other artifacts say)
    secret = tmp_path / "secret.txt"
    secret.write_text("the api-server's secret\n")
    (outputs / "escape.txt").symlink_to(secret)
    (outputs / "folder").mkdir()
    os.mkfifo(outputs / "pipe")
    (outputs / "inside.npz").symlink_to(world.file)  # a link that stays inside is followed
    cases = {
        "escape.txt": outputs / "escape.txt",
        "folder": outputs / "folder",
        "pipe": outputs / "pipe",  # opened without blocking, then refused
        "../secret.txt": outputs / ".." / "secret.txt",  # a name that climbs out
    }
    for name, path in cases.items():
        artifact_id = record_artifact(world, name, path)
        started = time.monotonic()
        resp = client.get(f"/training/v1/jobs/{world.full}/artifacts/{artifact_id}")
        assert resp.status_code == 404, (name, resp.text)
        assert time.monotonic() - started < 5
        detail = resp.json()["detail"]
        assert detail == (
            f"artifact {artifact_id} of job {world.full} is not available: gone, or not a regular file inside "
            "the job's outputs folder"
        )
        assert str(tmp_path) not in detail and "secret" not in detail
    inside = client.get(
        f"/training/v1/jobs/{world.full}/artifacts/{record_artifact(world, 'in', outputs / 'inside.npz')}"
    )
    assert inside.status_code == 200 and inside.content == world.file.read_bytes()
    assert inside.headers["content-length"] == str(world.file.stat().st_size)


def test_artifact_outside_the_outputs_uri_of_its_job_is_404(client: TestClient, world: World, tmp_path: Path) -> None:
    """The job's outputs_uri is its folder: a file elsewhere (another job's, the api-server's) is
    not served, whatever path its artifact row names."""
    mine = tmp_path / "outputs" / world.full
    mine.mkdir()
    (mine / "model.npz").write_bytes(b"mine")
    world.store.update_job(world.full, outputs_uri=mine.as_uri())
    ok = client.get(
        f"/training/v1/jobs/{world.full}/artifacts/{record_artifact(world, 'model2.npz', mine / 'model.npz')}"
    )
    assert ok.status_code == 200 and ok.content == b"mine"
    # model.npz of the World lies in tmp_path/outputs, beside (not inside) the job's own folder.
    elsewhere = client.get(f"/training/v1/jobs/{world.full}/artifacts/{world.artifact_id('model.npz')}")
    assert elsewhere.status_code == 404 and "not available" in elsewhere.json()["detail"]
    world.store.update_job(world.full, outputs_uri="s3://bucket/outputs/x")
    assert client.get(f"/training/v1/jobs/{world.full}/artifacts/{world.artifact_id('model2.npz')}").status_code == 404


def test_a_symlink_swapped_in_after_resolving_is_not_followed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is opened through the outputs folder one component at a time without following
    links: a folder replaced by a link between resolving and opening (a race) is refused."""
    root, outside = tmp_path / "outputs", tmp_path / "elsewhere"
    root.mkdir()
    outside.mkdir()
    (outside / "f").write_text("outside")
    (root / "sub").symlink_to(outside)
    monkeypatch.setattr(Path, "resolve", lambda self, strict=False: self)  # resolved before the swap
    with pytest.raises(StorageError):
        output_files.open_inside(root / "sub" / "f", root)
    monkeypatch.undo()
    with pytest.raises(StorageError, match="outside the job's outputs folder"):
        output_files.open_inside(root / "sub" / "f", root)


# --- a cookie-authenticated cancel comes from our own origin (CSRF) -------------------------------


def cookie_or_bearer_user(request: Request) -> SimpleAuthManagerUser:
    """Airflow's get_user as far as this API sees it: a Bearer header wins over the _token cookie."""
    header = request.headers.get("authorization", "")
    token = header[7:] if header.lower().startswith("bearer ") else request.cookies.get("_token")
    if token != "valid-jwt":
        raise HTTPException(401, "Not authenticated")
    return SimpleAuthManagerUser(username="tester", role="ADMIN")


@pytest.fixture
def origin_clients(api: FastAPI) -> Iterator[dict[str, TestClient]]:
    """A browser signed in (the session cookie) and a script (a Bearer token), neither sending an
    Origin of its own."""
    api.dependency_overrides[get_user] = cookie_or_bearer_user
    root = mounted(api)
    with (
        TestClient(root, cookies={"_token": "valid-jwt"}) as browser,
        TestClient(root, headers={"Authorization": "Bearer valid-jwt"}) as script,
    ):
        yield {"browser": browser, "script": script}


def test_cookie_cancel_needs_our_own_origin(
    api: FastAPI, origin_clients: dict[str, TestClient], world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    browser, script = origin_clients["browser"], origin_clients["script"]
    cancel = f"/training/v1/jobs/{world.full}/cancel"
    for headers in (
        {},  # neither Origin nor Referer
        {"Origin": "http://evil.example"},
        {"Origin": "http://testserver:8080"},  # another port of the same host: same site, not same origin
        {"Origin": "https://testserver"},  # another scheme
        {"Origin": "null"},  # a sandboxed or privacy-hiding page
        {"Referer": "http://evil.example/training/ui/"},
        {"Origin": "http://evil.example", "Referer": f"{OWN_ORIGIN}/training/ui/"},  # Origin wins
    ):
        resp = browser.post(cancel, headers=headers)
        assert resp.status_code == 403, (headers, resp.text)
        assert "session cookie" in resp.json()["detail"] and "Bearer" in resp.json()["detail"]
    assert world.store.job(world.full).status == "running" and api.state.fail_run == []
    # Reads are not state-changing: a cookie's GET needs no Origin.
    assert browser.get(f"/training/v1/jobs/{world.full}").status_code == 200
    # Without any credential it is the 401 of authentication, before the origin is looked at.
    assert TestClient(mounted(api)).post(cancel).status_code == 401

    assert browser.post(cancel, headers={"Origin": OWN_ORIGIN}).status_code == 202
    referer = browser.post(
        f"/training/v1/jobs/{world.other_project}/cancel", headers={"Referer": f"{OWN_ORIGIN}/training/ui/#/jobs/x"}
    )
    assert referer.status_code == 202, referer.text
    # A script's Bearer token is not ambient: no Origin asked for, whatever it sends.
    assert script.post(f"/training/v1/jobs/{world.other_dag}/cancel").status_code == 202
    # [api] base_url (the api-server's public URL behind a proxy) is our origin too.
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "https://airflow.example.com/")
    job = new_job(world.store, "r-proxied")
    forbidden = browser.post(f"/training/v1/jobs/{job}/cancel", headers={"Origin": "https://evil.example.com"})
    assert forbidden.status_code == 403
    assert (
        browser.post(f"/training/v1/jobs/{job}/cancel", headers={"Origin": "https://airflow.example.com"}).status_code
        == 202
    )


def test_origin_of() -> None:
    assert origin_of("http://Host:80/x?y") == "http://host"
    assert origin_of("https://host:443") == "https://host"
    assert origin_of("https://host:8443/") == "https://host:8443"
    assert origin_of("http://[::1]:8080/training/ui/") == "http://[::1]:8080"
    for bad in (None, "", "null", "file:///etc", "javascript:alert(1)", "http://", "http://h:99999", "//host"):
        assert origin_of(bad) is None, bad


# --- epochs and evaluations a page at a time ------------------------------------------------------


def bulk_epochs(store: ResultsStore, job_uuid: str, epochs: dict[int, int], metrics: Any = None) -> None:
    """``epochs[iteration]`` epochs (1..n) of each iteration, inserted at once: avg_loss 1/epoch, and
    ``metrics(iteration, epoch)``."""
    job_id = store.job(job_uuid).id
    rows = [
        {
            "job_id": job_id,
            "iteration": it,
            "epoch": ep,
            "avg_loss": 1 / ep,
            "metrics": metrics(it, ep) if metrics else {"val_loss": 2 / ep},
            "completed_at": T0,
        }
        for it, count in epochs.items()
        for ep in range(1, count + 1)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(TrainingIteration.__table__), [{"job_id": job_id, "iteration": it} for it in epochs])
        conn.execute(insert(EpochTrain.__table__), rows)


def bulk_evals(store: ResultsStore, job_uuid: str, iteration: int, count: int) -> None:
    job_id = store.job(job_uuid).id
    rows = [
        {"job_id": job_id, "iteration": iteration, "epoch": ep, "accuracy": ep / count, "evaluated_at": T0}
        for ep in range(1, count + 1)
    ]
    with store.engine.begin() as conn:
        conn.execute(insert(Eval.__table__), rows)


@contextmanager
def statements_of(store: ResultsStore) -> Iterator[list[str]]:
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        seen.append(" ".join(statement.split()))

    event.listen(store.engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(store.engine, "before_cursor_execute", record)


def unbounded_reads(statements: list[str], table: str) -> list[str]:
    """The statements that read rows of ``table`` with neither a LIMIT nor an aggregate."""
    return [
        sql
        for sql in statements
        if f"FROM {table}" in sql and "LIMIT" not in sql and "count(" not in sql and "max(" not in sql
    ]


@pytest.fixture
def big(world: World) -> str:
    """A job of 20,000 epochs (15,000 + 5,000 in two iterations) and 1,200 evaluations."""
    job = new_job(world.store, "r-big", created_at=T0 + timedelta(hours=6))
    bulk_epochs(world.store, job, {1: 15_000, 2: 5_000})
    bulk_evals(world.store, job, 1, 1_200)
    return job


def test_details_of_a_long_job_is_one_page(client: TestClient, world: World, big: str) -> None:
    url = f"/training/v1/jobs/{big}/details"
    with statements_of(world.store) as statements:
        body = client.get(url).json()
    assert unbounded_reads(statements, "epoch_train") == [] and unbounded_reads(statements, "evals") == []
    epochs = [(e["iteration"], e["epoch"]) for it in body["iterations"] for e in it["epochs"]]
    assert epochs == [(1, n) for n in range(1, 501)]  # the default page: the first 500
    assert [len(it["evals"]) for it in body["iterations"]] == [500, 0]
    assert (body["epochs_total"], body["epochs_limit"], body["epochs_offset"]) == (20_000, 500, 0)
    assert (body["evals_total"], body["evals_limit"], body["evals_offset"]) == (1_200, 500, 0)
    assert body["iterations_total"] == 2 and [it["iteration"] for it in body["iterations"]] == [1, 2]
    assert body["latest_evaluation"]["model_id"] == f"{big}/1/1200"

    # Any page, across iterations; the last one; past the end.
    page = client.get(url, params={"epochs_limit": 5000, "epochs_offset": 14_998, "evals_limit": 0}).json()
    got = [(e["iteration"], e["epoch"]) for it in page["iterations"] for e in it["epochs"]]
    assert got[:3] == [(1, 14_999), (1, 15_000), (2, 1)] and len(got) == 5000 and got[-1] == (2, 4998)
    assert all(not it["evals"] for it in page["iterations"]) and page["evals_total"] == 1_200
    end = client.get(url, params={"epochs_limit": 10, "epochs_offset": 19_995}).json()
    assert [e["epoch"] for it in end["iterations"] for e in it["epochs"]] == [4996, 4997, 4998, 4999, 5000]
    past = client.get(url, params={"epochs_offset": 50_000, "evals_offset": 50_000}).json()
    assert all(not it["epochs"] and not it["evals"] for it in past["iterations"])
    assert (past["epochs_total"], past["evals_total"]) == (20_000, 1_200)
    for bad in ({"epochs_limit": 5001}, {"evals_limit": -1}, {"epochs_offset": -1}, {"evals_offset": 2**63}):
        assert client.get(url, params=bad).status_code == 422, bad


def test_epochs_and_evaluations_of_a_job_in_pages(client: TestClient, world: World, big: str) -> None:
    epochs = client.get(f"/training/v1/jobs/{big}/epochs", params={"limit": 3, "offset": 14_999}).json()
    assert [(e["iteration"], e["epoch"]) for e in epochs["epochs"]] == [(1, 15_000), (2, 1), (2, 2)]
    assert (epochs["total"], epochs["limit"], epochs["offset"], epochs["iteration"]) == (20_000, 3, 14_999, None)
    it2 = client.get(f"/training/v1/jobs/{big}/epochs", params={"iteration": 2, "offset": 4_998}).json()
    assert [e["epoch"] for e in it2["epochs"]] == [4999, 5000] and it2["total"] == 5_000
    assert len(client.get(f"/training/v1/jobs/{big}/epochs").json()["epochs"]) == 500  # the default
    none = client.get(f"/training/v1/jobs/{big}/epochs", params={"iteration": 7}).json()
    assert (none["epochs"], none["total"]) == ([], 0)
    past = client.get(f"/training/v1/jobs/{big}/epochs", params={"offset": 20_000}).json()
    assert (past["epochs"], past["total"]) == ([], 20_000)

    evals = client.get(f"/training/v1/jobs/{big}/evaluations", params={"limit": 5000}).json()
    assert len(evals["evaluations"]) == 1_200 and evals["total"] == 1_200
    assert evals["evaluations"][0]["model_id"] == f"{big}/1/1" and evals["evaluations"][0]["job_uuid"] == big
    last = client.get(f"/training/v1/jobs/{big}/evaluations", params={"limit": 2, "offset": 1_198}).json()
    assert [e["epoch"] for e in last["evaluations"]] == [1199, 1200]
    assert client.get(f"/training/v1/jobs/{world.full}/evaluations", params={"iteration": 2}).json()["total"] == 1

    by_model = client.get("/training/v1/evaluations", params={"model_id": big, "limit": 2, "offset": 10}).json()
    assert [e["epoch"] for e in by_model["evaluations"]] == [11, 12] and by_model["total"] == 1_200
    assert client.get("/training/v1/evaluations").json()["total"] is None  # the latest of every job: not counted

    iteration = client.get(f"/training/v1/jobs/{big}/iterations/2/epochs").json()
    assert len(iteration["epochs"]) == 500 and (iteration["total"], iteration["limit"]) == (5_000, 500)
    tail = client.get(f"/training/v1/jobs/{big}/iterations/2/epochs", params={"offset": 4_999}).json()
    assert [e["epoch"] for e in tail["epochs"]] == [5000]
    for path in ("epochs", "evaluations", "iterations/1/epochs"):
        for bad in ({"limit": 0}, {"limit": 5001}, {"offset": -1}, {"iteration": "x"}):
            if path.startswith("iterations") and "iteration" in bad:
                continue
            assert client.get(f"/training/v1/jobs/{big}/{path}", params=bad).status_code == 422, (path, bad)


def test_details_list_a_bounded_number_of_iterations_and_artifacts(
    client: TestClient, world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queries, "MAX_ITERATIONS", 1)
    monkeypatch.setattr(queries, "MAX_ARTIFACTS", 1)
    body = client.get(f"/training/v1/jobs/{world.full}/details", params={"epochs_limit": 0, "evals_limit": 0}).json()
    assert [it["iteration"] for it in body["iterations"]] == [1] and body["iterations_total"] == 2
    assert [a["name"] for a in body["artifacts"]] == ["gone.txt"] and body["artifacts_total"] == 2
    assert [s["step_type"] for s in body["iterations"][0]["steps"]] == ["training"]


# --- a metric downsampled for a chart -------------------------------------------------------------


def test_series_of_a_short_job_is_every_epoch(client: TestClient, world: World) -> None:
    body = client.get(f"/training/v1/jobs/{world.full}/series").json()
    assert (body["metric"], body["metrics"], body["epochs_total"], body["iterations_total"]) == (
        "avg_loss",
        ["avg_loss"],
        3,
        2,
    )
    it1, it2 = body["iterations"]
    assert (it1["epochs"], it1["values"], it1["counts"]) == ([1, 2], [0.9, 0.5], [1, 1])
    assert it1["low"] == it1["high"] == it1["values"] and it1["epochs_total"] == 2
    assert (it2["iteration"], it2["epochs"], it2["values"]) == (2, [1], [0.4])
    epoch_ids = [e.id for e in world.store.session().scalars(select(EpochTrain))]
    eval_ids = [e.id for e in world.store.session().scalars(select(Eval))]
    assert body["cursor"] == f"{max(epoch_ids)}-{max(eval_ids)}"
    # A metric the job does not have: no value, not an error; names and cursor as before.
    other = client.get(f"/training/v1/jobs/{world.full}/series", params={"metric": "val_loss"}).json()
    assert [it["values"] for it in other["iterations"]] == [[None, None], [None]] and other["metrics"] == ["avg_loss"]
    empty = client.get(f"/training/v1/jobs/{world.old}/series").json()
    assert (empty["iterations"], empty["metrics"], empty["cursor"], empty["epochs_total"]) == ([], [], "0-0", 0)
    for bad in ({"metric": 'a"b'}, {"metric": "a\\b"}, {"metric": ""}, {"points": 0}, {"points": 5001}):
        assert client.get(f"/training/v1/jobs/{world.full}/series", params=bad).status_code == 422, bad


def test_series_of_a_long_job_is_downsampled_keeping_lows_and_highs(client: TestClient, world: World) -> None:
    """15,000 + 5,000 epochs in 500 points: 250 buckets per iteration, each with its last epoch's
    value and its lowest and highest, so a spike between sampled epochs is still there."""
    job = new_job(world.store, "r-series")

    def metrics(it: int, ep: int) -> dict[str, Any]:
        val = 50.0 if (it, ep) == (1, 7777) else 2 / ep
        row: dict[str, Any] = {
            "val_loss": "NaN" if ep % 1000 == 0 else val,
            "lr": 0.01,
            "flag": True,
            "nested": {"a": 1},
        }
        if ep == 3:
            row["huge"] = 10**400  # a JSON number no float holds
        return row

    bulk_epochs(world.store, job, {1: 15_000, 2: 5_000}, metrics)
    with statements_of(world.store) as statements:
        body = client.get(f"/training/v1/jobs/{job}/series", params={"metric": "val_loss", "points": 500}).json()
    assert unbounded_reads(statements, "epoch_train") == []  # aggregates and LIMITs only
    assert body["metrics"] == ["avg_loss", "lr", "val_loss"] and body["points"] == 250
    assert (body["epochs_total"], body["iterations_total"]) == (20_000, 2)
    it1, it2 = body["iterations"]
    assert len(it1["epochs"]) == 250 and it1["epochs"][:2] == [60, 120] and it1["epochs"][-1] == 15_000
    assert set(it1["counts"]) == {60} and it1["epochs_total"] == 15_000
    assert len(it2["epochs"]) == 250 and it2["epochs"][-1] == 5_000 and set(it2["counts"]) == {20}
    spike = it1["epochs"].index(7800)  # the bucket of epochs 7741..7800
    assert it1["high"][spike] == 50.0 and it1["values"][spike] == pytest.approx(2 / 7800)
    assert max(h for h in it1["high"] if h is not None) == 50.0
    assert it1["low"][0] == pytest.approx(2 / 60) and it1["high"][0] == 2.0
    assert it1["values"][it1["epochs"].index(1020)] == pytest.approx(2 / 1020)
    assert it1["values"][it1["epochs"].index(1000 * 3)] is None  # "NaN" (a string) there: no value
    for it in (it1, it2):
        assert all(
            lo <= v <= hi for lo, v, hi in zip(it["low"], it["values"], it["high"], strict=True) if v is not None
        )
    huge = client.get(f"/training/v1/jobs/{job}/series", params={"metric": "huge"})
    assert huge.status_code == 200, huge.text
    assert all(v is None or not math.isfinite(v) for it in huge.json()["iterations"] for v in it["values"])
    assert (
        client.get(f"/training/v1/jobs/{job}/series", params={"metric": "flag"}).json()["iterations"][0]["values"][0]
        is None
    )
    few = client.get(f"/training/v1/jobs/{job}/series", params={"points": 1}).json()
    assert [len(it["epochs"]) for it in few["iterations"]] == [1, 1]
    assert few["iterations"][0]["low"] == [pytest.approx(1 / 15_000)] and few["iterations"][0]["high"] == [1.0]


def test_series_holds_the_last_iterations(client: TestClient, world: World) -> None:
    job = new_job(world.store, "r-iterations")
    bulk_epochs(world.store, job, {it: 2 for it in range(1, 61)})
    body = client.get(f"/training/v1/jobs/{job}/series", params={"points": 100}).json()
    assert [it["iteration"] for it in body["iterations"]] == list(range(11, 61))
    assert (body["iterations_total"], body["epochs_total"], body["points"]) == (60, 120, 2)
    assert all(it["epochs"] == [1, 2] for it in body["iterations"])


def test_stream_after_a_cursor_sends_only_newer_rows(client: TestClient, world: World) -> None:
    world.store.finish(world.full, "completed")
    cursor = client.get(f"/training/v1/jobs/{world.full}/series").json()["cursor"]
    resp = client.get(f"/training/v1/jobs/{world.full}/stream", params={"after": cursor})
    kinds = [line.split(": ", 1)[1] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["status", "status"]
    epoch_id = int(cursor.split("-")[0])
    resp = client.get(
        f"/training/v1/jobs/{world.full}/stream", params={"after": f"{epoch_id - 1}-{cursor.split('-')[1]}"}
    )
    kinds = [line.split(": ", 1)[1] for line in resp.text.splitlines() if line.startswith("event: ")]
    assert kinds == ["status", "epoch", "status"]
    assert client.get(f"/training/v1/jobs/{world.full}/stream", params={"after": "x"}).status_code == 422


def test_a_nul_character_matches_nothing(client: TestClient, world: World) -> None:
    """PostgreSQL text cannot hold NUL (psycopg2 refused to send it: a 500, found by schemathesis)."""
    for param in ("project_id", "provider", "dag_id", "run_id", "stage"):
        resp = client.get("/training/v1/jobs", params={param: "a\x00b"})
        assert resp.status_code == 200 and resp.json()["total"] == 0, (param, resp.text)
    world.decide_models()
    assert client.get("/training/v1/models/digits%00").status_code == 404


# --- a trainer's oversized values: left out, and pages bounded in bytes ---------------------------


def test_oversized_values_are_left_out(client: TestClient, world: World) -> None:
    """One event may be 4 MiB: a metrics object, a path or a config past its CELL_BYTES is null in
    every answer (the rest of the row is there), and is not looked into for metric names."""
    job = new_job(world.store, "r-huge")
    job_id = world.store.job(job).id
    junk = {f"k{i}": i for i in range(4000)}  # ~40 KiB of numbers
    with world.store.engine.begin() as conn:
        conn.execute(insert(TrainingIteration.__table__), [{"job_id": job_id, "iteration": 1, "config": junk}])
        conn.execute(
            insert(EpochTrain.__table__),
            [
                {"job_id": job_id, "iteration": 1, "epoch": 1, "avg_loss": 0.5, "metrics": junk, "completed_at": T0},
                {
                    "job_id": job_id, "iteration": 1, "epoch": 2, "avg_loss": 0.4, "metrics": {"lr": 0.1},
                    "model_path": "x" * 5000, "completed_at": T0,
                },
            ],
        )  # fmt: skip
        conn.execute(
            insert(Eval.__table__),
            [
                {
                    "job_id": job_id,
                    "iteration": 1,
                    "epoch": 1,
                    "f1": 0.9,
                    "confusion_matrix": [[1] * 100_000],
                    "evaluated_at": T0,
                }
            ],
        )
    world.store.update_job(job, training_config={"blob": "y" * 70_000})
    details = client.get(f"/training/v1/jobs/{job}/details").json()
    [it] = details["iterations"]
    assert it["config"] is None and details["training_config"] is None
    first, second = it["epochs"]
    assert (first["metrics"], first["avg_loss"]) == (None, 0.5)
    assert (second["metrics"], second["model_path"], second["avg_loss"]) == ({"lr": 0.1}, None, 0.4)
    [evaluation] = it["evals"]
    assert evaluation["confusion_matrix"] is None and evaluation["f1"] == 0.9
    assert details["latest_evaluation"]["confusion_matrix"] is None
    assert client.get(f"/training/v1/jobs/{job}/epochs").json()["epochs"][0]["metrics"] is None
    assert client.get("/training/v1/evaluations").json()["evaluations"][0]["confusion_matrix"] is None
    series = client.get(f"/training/v1/jobs/{job}/series").json()
    assert series["metrics"] == ["avg_loss", "lr"]  # no k0..k3999: that object is too large to list
    world.store.finish(job, "completed")
    stream = client.get(f"/training/v1/jobs/{job}/stream").text
    assert '"metrics":null' in stream.replace(" ", "") and "k3999" not in stream


def test_pages_are_cut_short_past_their_bytes(
    client: TestClient, world: World, big: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A page holds fewer rows than its limit when they would pass PAGE_BYTES; the total is still
    counted, and the next page starts where it ended. The stream sends every row, batch by batch."""
    monkeypatch.setattr(queries, "PAGE_BYTES", 10 * queries.ROW_BYTES)
    body = client.get(f"/training/v1/jobs/{big}/epochs", params={"limit": 100, "offset": 14_995}).json()
    assert [(e["iteration"], e["epoch"]) for e in body["epochs"]] == [(1, n) for n in range(14_996, 15_001)] + [
        (2, n) for n in range(1, 6)
    ]
    assert (body["total"], body["limit"]) == (20_000, 100)
    details = client.get(f"/training/v1/jobs/{big}/details").json()
    assert sum(len(it["epochs"]) for it in details["iterations"]) == 10 and details["epochs_total"] == 20_000
    assert sum(len(it["evals"]) for it in details["iterations"]) == 10 and details["evals_total"] == 1_200
    few = client.get(f"/training/v1/jobs/{world.full}/epochs").json()  # 3 rows fit: not cut, not counted
    assert len(few["epochs"]) == few["total"] == 3
    world.store.finish(world.full, "completed")
    kinds = [
        line
        for line in client.get(f"/training/v1/jobs/{world.full}/stream").text.splitlines()
        if line.startswith("event: ")
    ]
    assert len(kinds) == 2 + 3 + 2  # status, 3 epochs, 2 evaluations, status
