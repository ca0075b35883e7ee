"""The results REST API (``gpu_training.api``) over a real migrated results DB (SQLite and PostgreSQL).

The app is mounted under ``/training`` as the api-server mounts it, its rows stored by the real
ingestion path (``global.json`` lines through ``ResultsStore.ingest``). Authorization is the real
``DagAccess`` over an auth manager whose per-DAG rules each test sets; only the user (who the
token would say) is injected. ``test_no_token_is_401`` keeps Airflow's own authentication.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
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
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select

from gpu_training.api import schemas
from gpu_training.api.app import TITLE, create_app
from gpu_training.api.db import get_store
from gpu_training.api.stream import StreamSettings
from gpu_training.events import parse_chunk
from gpu_training.results.models import EpochTrain, Eval, Instance, TrainingIteration, TrainingStep
from gpu_training.results.store import ArtifactRecord, ResultsStore
from gpu_training.retraining.promotion import promote
from gpu_training.retraining.spec import Promotion
from tests.servers import free_port, wait_for_port

from .conftest import event_line

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


@pytest.fixture
def client(api: FastAPI) -> Iterator[TestClient]:
    root = FastAPI()
    root.mount("/training", api)  # as the api-server mounts plugin apps
    with TestClient(root) as c:
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
        "import sys, gpu_training_plugin as p\n"
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
    return schemas.JobDetails(
        **schemas.Job.of(job).model_dump(),
        iterations=iterations,
        artifacts=[schemas.ArtifactInfo.of(a) for a in sorted(store.artifacts(job_uuid), key=lambda a: a.name)],
        instances=[schemas.InstanceInfo.of(i) for i in instances],
        params=job.params,
        training_config=job.training_config,
        outputs_uri=job.outputs_uri,
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
    gone = client.get(f"/training/v1/jobs/{world.full}/artifacts/{world.artifact_id('gone.txt')}")
    assert gone.status_code == 404 and "is gone" in gone.json()["detail"]
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
