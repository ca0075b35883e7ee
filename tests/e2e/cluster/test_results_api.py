"""The results API on the REAL api-server (``tests/airflow_cluster.py``) with real users.

SimpleAuthManager users: ``admin`` (ADMIN), ``viewer`` (VIEWER: reads every DAG, edits none) and
``nobody`` (no role: SimpleAuthManager grants a role-less user nothing; it has no per-DAG rules, so
"no access to this DAG" is "no access to any DAG"). Tokens come from ``POST /auth/token``; the job
is triggered through Airflow's own REST API and read back through ``/training/v1``, a page at a
time; a cancel authenticated by the ``_token`` cookie (as the Airflow UI's page sends it) needs the
api-server's own ``Origin``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import delete

from gpu_training.results.models import TrainingJob
from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster

from . import DAG_ID, USERS

REPO = Path(__file__).resolve().parents[3]
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tokens(cluster: AirflowCluster) -> dict[str, str]:
    return {name: cluster.token(name) for name in USERS}


def get(cluster: AirflowCluster, path: str, token: str | None, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(f"{cluster.base_url}/training{path}", headers=headers, timeout=60, **kw)


@pytest.fixture(scope="module")
def run(cluster: AirflowCluster, tokens: dict[str, str]) -> dict[str, Any]:
    """One job triggered by the admin through POST /api/v2/dags/gpu_training/dagRuns; its SSE events
    are read while it runs (from the job's first appearance in the API until the stream ends)."""
    project = f"api-e2e-{time.time_ns()}"
    conf = {
        "project_id": project,
        "provider": "local",
        "command": ["{python}", str(SCRIPTED), "ok", "5", "0.5"],
        "poll_interval_seconds": 1,
    }
    resp = requests.post(
        f"{cluster.base_url}/api/v2/dags/{DAG_ID}/dagRuns",
        json={"logical_date": None, "conf": conf},
        headers={"Authorization": f"Bearer {tokens['admin']}"},
        timeout=60,
    )
    assert resp.status_code == 200, resp.text
    run_id = resp.json()["dag_run_id"]

    def listed() -> list[dict[str, Any]]:
        r = get(cluster, "/v1/jobs", tokens["admin"], params={"project_id": project})
        r.raise_for_status()
        return list(r.json()["jobs"])

    [job] = cluster.wait_until(f"the job of {run_id} in /training/v1/jobs", listed, 120)
    events: list[tuple[str, dict[str, Any]]] = []
    with get(cluster, f"/v1/jobs/{job['uuid']}/stream", tokens["admin"], stream=True) as stream:
        assert stream.status_code == 200, stream.text
        assert stream.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in stream.iter_lines(decode_unicode=True):  # ends when the server closes the stream
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name:
                events.append((name, json.loads(line[len("data: ") :])))
    state = cluster.wait_run(DAG_ID, run_id, timeout=120)
    return {"project": project, "run_id": run_id, "job": job, "events": events, "state": state}


def test_openapi_of_the_plugin_app(cluster: AirflowCluster) -> None:
    spec = requests.get(f"{cluster.base_url}/training/openapi.json", timeout=30).json()
    assert spec["info"]["title"] == "GPU training results"
    assert "/v1/jobs/{job_uuid}/details" in spec["paths"]


def test_without_a_valid_token(cluster: AirflowCluster) -> None:
    assert get(cluster, "/v1/jobs", None).status_code == 401
    assert get(cluster, "/v1/jobs", None).json() == {"detail": "Not authenticated"}
    # A token that does not verify: Airflow's own authentication answers 403 "Invalid JWT token", as
    # it does for /api/v2 (an expired one is 401 "Token Expired").
    bad = get(cluster, "/v1/jobs", "not.a.jwt")
    core = requests.get(f"{cluster.base_url}/api/v2/dags", headers={"Authorization": "Bearer not.a.jwt"}, timeout=30)
    assert (bad.status_code, bad.json()) == (403, {"detail": "Invalid JWT token"})
    assert core.status_code == 403


def test_admin_reads_the_job_it_triggered(cluster: AirflowCluster, tokens: dict[str, str], run: dict[str, Any]) -> None:
    assert run["state"] == "success"
    uuid = run["job"]["uuid"]
    assert run["job"]["dag_id"] == DAG_ID and run["job"]["run_id"] == run["run_id"]
    listed = get(cluster, "/v1/jobs", tokens["admin"], params={"project_id": run["project"]}).json()
    assert listed["total"] == 1 and listed["jobs"][0]["status"] == "completed"
    details = get(cluster, f"/v1/jobs/{uuid}/details", tokens["admin"])
    assert details.status_code == 200, details.text
    body = details.json()
    assert body["status"] == "completed" and body["provider"] == "local"
    assert [e["epoch"] for it in body["iterations"] for e in it["epochs"]] == [1, 2, 3, 4, 5]
    assert any(a["name"] == "logs/trainer.log" for a in body["artifacts"]), body["artifacts"]
    log = next(a for a in body["artifacts"] if a["name"] == "logs/trainer.log")
    download = get(cluster, f"/v1/jobs/{uuid}/artifacts/{log['id']}", tokens["admin"])
    assert download.status_code == 200 and b"epoch" in download.content


def test_the_stream_followed_the_job_to_its_end(run: dict[str, Any]) -> None:
    names = [name for name, _ in run["events"]]
    assert names[0] == "status" and names[-1] == "status", names
    assert run["events"][-1][1]["status"] == "completed"
    epochs = [data["epoch"] for name, data in run["events"] if name == "epoch"]
    assert epochs == [1, 2, 3, 4, 5], names


def test_viewer_reads_but_cannot_cancel(cluster: AirflowCluster, tokens: dict[str, str], run: dict[str, Any]) -> None:
    uuid = run["job"]["uuid"]
    assert get(cluster, f"/v1/jobs/{uuid}", tokens["viewer"]).status_code == 200
    assert get(cluster, "/v1/jobs", tokens["viewer"], params={"project_id": run["project"]}).json()["total"] == 1
    cancel = requests.post(
        f"{cluster.base_url}/training/v1/jobs/{uuid}/cancel",
        headers={"Authorization": f"Bearer {tokens['viewer']}"},
        timeout=30,
    )
    assert cancel.status_code == 403, cancel.text
    # The admin may, but the job already ended.
    ended = requests.post(
        f"{cluster.base_url}/training/v1/jobs/{uuid}/cancel",
        headers={"Authorization": f"Bearer {tokens['admin']}"},
        timeout=30,
    )
    assert ended.status_code == 400 and "already ended: completed" in ended.json()["detail"]


def test_user_without_dag_access(cluster: AirflowCluster, tokens: dict[str, str], run: dict[str, Any]) -> None:
    uuid = run["job"]["uuid"]
    for path in (f"/v1/jobs/{uuid}", f"/v1/jobs/{uuid}/details", f"/v1/jobs/{uuid}/stream"):
        resp = get(cluster, path, tokens["nobody"])
        assert resp.status_code == 403, (path, resp.text)
    listed = get(cluster, "/v1/jobs", tokens["nobody"]).json()
    assert (listed["jobs"], listed["total"]) == ([], 0)
    assert get(cluster, "/v1/evaluations", tokens["nobody"]).json()["evaluations"] == []


def test_results_db_touched_only_after_authentication(cluster: AirflowCluster, run: dict[str, Any]) -> None:
    """On the real api-server: every operation, anonymous, is Airflow's 401 (the results DB is opened
    only for a known user: tests/test_api.py proves it with an unreachable one)."""
    uuid = run["job"]["uuid"]
    for path in (
        f"/v1/jobs/{uuid}/details",
        f"/v1/jobs/{uuid}/epochs",
        f"/v1/jobs/{uuid}/evaluations",
        f"/v1/jobs/{uuid}/series",
        f"/v1/jobs/{uuid}/artifacts/1",
    ):
        resp = get(cluster, path, None)
        assert (resp.status_code, resp.json()) == (401, {"detail": "Not authenticated"}), path


def test_epochs_and_evaluations_in_pages(cluster: AirflowCluster, tokens: dict[str, str], run: dict[str, Any]) -> None:
    uuid = run["job"]["uuid"]
    page = get(cluster, f"/v1/jobs/{uuid}/details", tokens["viewer"], params={"epochs_limit": 2, "epochs_offset": 3})
    body = page.json()
    assert [e["epoch"] for it in body["iterations"] for e in it["epochs"]] == [4, 5]
    assert (body["epochs_total"], body["epochs_limit"], body["epochs_offset"]) == (5, 2, 3)
    epochs = get(cluster, f"/v1/jobs/{uuid}/epochs", tokens["viewer"], params={"limit": 3}).json()
    assert [e["epoch"] for e in epochs["epochs"]] == [1, 2, 3] and epochs["total"] == 5
    series = get(cluster, f"/v1/jobs/{uuid}/series", tokens["viewer"]).json()
    assert [it["epochs"] for it in series["iterations"]] == [[1, 2, 3, 4, 5]] and "avg_loss" in series["metrics"]


def cookie_cancel(cluster: AirflowCluster, token: str, uuid: str, headers: dict[str, str]) -> requests.Response:
    """A cancel as the Airflow UI's page sends it: the JWT in the ``_token`` cookie, no Authorization."""
    return requests.post(
        f"{cluster.base_url}/training/v1/jobs/{uuid}/cancel", cookies={"_token": token}, headers=headers, timeout=30
    )


def test_a_cookie_cancel_needs_the_api_servers_own_origin(
    cluster: AirflowCluster, store: ResultsStore, tokens: dict[str, str]
) -> None:
    """CSRF: the session cookie is sent with a cross-site form or fetch too; a cancel it authenticates
    must come from the api-server's own origin (Origin, else Referer). A Bearer token is not ambient:
    a script's cancel needs no Origin. Jobs of dag runs that do not exist: the cancel is recorded
    (202) and Airflow has no run to mark failed."""
    jobs = [
        store.create_job(
            project_id="csrf",
            provider="local",
            runtime="process",
            params={},
            dag_id=DAG_ID,
            run_id=f"csrf__{i}_{time.time_ns()}",
        )
        for i in range(3)
    ]
    for uuid in jobs:
        store.update_job(uuid, status="running")
    own = cluster.base_url.rstrip("/")
    try:
        for headers in (
            {},
            {"Origin": "http://evil.example"},
            {"Origin": "null"},
            {"Referer": "http://evil.example/x"},
        ):
            resp = cookie_cancel(cluster, tokens["admin"], jobs[0], headers)
            assert resp.status_code == 403, (headers, resp.text)
            assert "session cookie" in resp.json()["detail"]
        assert store.job(jobs[0]).status == "running"
        ok = cookie_cancel(cluster, tokens["admin"], jobs[0], {"Origin": own})
        assert ok.status_code == 202 and ok.json()["cancelled_by"] == "admin", ok.text
        by_referer = cookie_cancel(cluster, tokens["admin"], jobs[1], {"Referer": f"{own}/training/ui/"})
        assert by_referer.status_code == 202, by_referer.text
        bearer = requests.post(
            f"{cluster.base_url}/training/v1/jobs/{jobs[2]}/cancel",
            headers={"Authorization": f"Bearer {tokens['admin']}", "Origin": "http://evil.example"},
            timeout=30,
        )
        assert bearer.status_code == 202, bearer.text
        # The viewer's cookie from the right origin: its own 403 (no edit access), not the origin's.
        viewer = cookie_cancel(cluster, tokens["viewer"], jobs[0], {"Origin": own})
        assert viewer.status_code in (400, 403) and "session cookie" not in viewer.text
    finally:
        with store.engine.begin() as conn:
            conn.execute(delete(TrainingJob).where(TrainingJob.project_id == "csrf"))
