"""``make cluster`` as a newcomer meets it (the package's deployment, started as the Makefile does):
nothing answers without signing in, the login it printed works (a token from ``POST /auth/token``,
then the DAGs), the example retraining DAGs are paused while ``gpu_training`` and the reaper are not,
and no dag run or task failed while the components started (the reaper's first run, scheduled as
soon as its DAG is parsed, used to fail when a worker ran it before the api-server answered).
Headless Chromium signs in with the printed login and sees 0 failed DAGs on the home page
(screenshot ``home.png`` in the test's tmp directory).
"""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from gpu_training.retraining.dags import build_dags
from tests.airflow_cluster import AirflowCluster
from tests.e2e.cluster.chromium import needs_chromium, start_chromium, wait_for

from .conftest import MakeCluster

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[3]
REAPER = "gpu_instance_reaper"
EXAMPLE_RETRAINING = sorted(build_dags(REPO / "include" / "retraining"))


def printed_login(make_cluster: MakeCluster) -> tuple[str, str, str]:
    """(URL, user, password) as `make cluster` printed them."""
    url = re.search(r"^Airflow is ready: (http://\S+)$", make_cluster.printed, re.M)
    login = re.search(r"^login with username: (\S+)  password: (\S+)$", make_cluster.printed, re.M)
    assert url and login, make_cluster.printed
    return url.group(1), login.group(1), login.group(2)


def token(url: str, user: str, password: str) -> str:
    resp = requests.post(f"{url}/auth/token", json={"username": user, "password": password}, timeout=60)
    assert resp.status_code == 201, resp.text
    return str(resp.json()["access_token"])


def get(url: str, path: str, bearer: str, **params: Any) -> Any:
    resp = requests.get(f"{url}{path}", headers={"Authorization": f"Bearer {bearer}"}, params=params, timeout=60)
    assert resp.status_code == 200, f"GET {path} -> {resp.status_code}: {resp.text[:500]}"
    return resp.json()


def test_the_printed_url_is_the_port_it_was_given(make_cluster: MakeCluster, cluster: AirflowCluster) -> None:
    url, user, _ = printed_login(make_cluster)
    assert url == f"http://localhost:{cluster.port}" and user == "admin"
    assert f"curl -s -X POST {url}/auth/token" in make_cluster.printed


def test_nothing_answers_without_signing_in(make_cluster: MakeCluster) -> None:
    url, _, _ = printed_login(make_cluster)
    assert requests.get(f"{url}/api/v2/dags", timeout=30).status_code == 401
    resp = requests.post(f"{url}/auth/token", json={"username": "admin", "password": "wrong"}, timeout=30)
    assert resp.status_code == 401


def test_the_printed_login_gets_a_token_that_lists_the_dags(make_cluster: MakeCluster) -> None:
    url, user, password = printed_login(make_cluster)
    dags = get(url, "/api/v2/dags", token(url, user, password), limit=100)["dags"]
    assert {"gpu_training", REAPER} <= {d["dag_id"] for d in dags}


def test_example_retraining_dags_are_paused_and_the_others_are_not(cluster: AirflowCluster) -> None:
    expected = ["gpu_training", REAPER, *EXAMPLE_RETRAINING]

    def every_dag() -> dict[str, bool] | None:
        dags = cluster.api("GET", "/dags", params={"limit": 100}).json()["dags"]
        paused = {d["dag_id"]: d["is_paused"] for d in dags}
        return paused if set(expected) <= set(paused) else None

    paused = cluster.wait_until("every DAG to be parsed", every_dag, 120, components=["dag-processor"])
    assert {dag_id: paused[dag_id] for dag_id in expected} == {
        "gpu_training": False,
        REAPER: False,
        **dict.fromkeys(EXAMPLE_RETRAINING, True),
    }
    # Paused from the start: none of them launched a job nobody asked for.
    for dag_id in EXAMPLE_RETRAINING:
        assert cluster.api("GET", f"/dags/{dag_id}/dagRuns").json()["total_entries"] == 0, dag_id


def test_no_run_or_task_failed_once_the_reaper_ran(make_cluster: MakeCluster, cluster: AirflowCluster) -> None:
    """The reaper's first run starts as soon as its DAG is parsed, while the workers start: it
    succeeds, and nothing of the deployment failed (the other tests' jobs included)."""

    def reaper_runs() -> list[dict[str, Any]] | None:
        runs = cluster.api("GET", f"/dags/{REAPER}/dagRuns").json()["dag_runs"]
        return runs if runs and all(r["state"] in ("success", "failed") for r in runs) else None

    runs = cluster.wait_until("the reaper's first run to finish", reaper_runs, 180)
    assert [r["state"] for r in runs] == ["success"] * len(runs), runs
    url, user, password = printed_login(make_cluster)
    bearer = token(url, user, password)
    failed_runs = get(url, "/api/v2/dags/~/dagRuns", bearer, state="failed")
    assert failed_runs["dag_runs"] == [], failed_runs
    failed_tasks = get(url, "/api/v2/dags/~/dagRuns/~/taskInstances", bearer, state="failed")
    assert failed_tasks["task_instances"] == [], failed_tasks


def _started_at(log: Path) -> datetime:
    """When the harness last started this component (its marker line in the log)."""
    marks = re.findall(r"^===== (\S+) harness: starting", log.read_text(errors="replace"), re.M)
    return datetime.fromisoformat(marks[-1])


def test_what_runs_tasks_started_once_the_api_server_answered(cluster: AirflowCluster) -> None:
    """The cause of the reaper's failed first run: a task runs through the execution API from its
    first step, so the scheduler (which queues tasks) and the Celery workers start only after the
    api-server listens."""
    text = (cluster.logs / "api-server.log").read_text(errors="replace")
    listening = re.findall(r"^(\S+) \[info\s*\] Uvicorn running on http://127\.0\.0\.1", text, re.M)
    assert listening, text[-3000:]
    answered = datetime.fromisoformat(listening[-1].replace("Z", "+00:00"))
    for name in ("scheduler", *cluster.workers):
        assert _started_at(cluster.logs / f"{name}.log") > answered, name


@needs_chromium
def test_signing_in_in_chromium_shows_no_failed_dags(make_cluster: MakeCluster, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url, user, password = printed_login(make_cluster)
    driver = start_chromium(tmp_path / "profile", tmp_path / "chromedriver.log")
    try:
        driver.get(f"{url}/")  # the printed URL, as a user opens it: Airflow's login page first
        wait_for("the login form", lambda: driver.find_element(By.NAME, "username")).send_keys(user)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
        wait_for("the redirect after sign-in", lambda: "/auth/login" not in driver.current_url)

        def loaded() -> str | None:  # the stats, the health badges and the dag run history all shown
            text = str(driver.find_element(By.TAG_NAME, "body").text)
            return text if "Failed Dags" in text and "Dag Processor" in text and "Success" in text else None

        text = wait_for("the home page", loaded, 60)
        driver.save_screenshot(str(tmp_path / "home.png"))
        stats = re.search(r"(\d+)\s*Failed Dags", text)
        assert stats and stats.group(1) == "0", text
    finally:
        driver.quit()
