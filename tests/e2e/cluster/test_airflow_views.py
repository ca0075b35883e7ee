"""The training job from Airflow's own pages, in headless Chromium on the package's deployment.

- a dag run's "Training" tab (the plugin's ``dag_run`` external view) shows its job in place;
- every task of the job has a "Training job" extra link (registered by the plugin, built by the
  api-server from the task's key) that opens the job in the Training jobs page;
- a webhook whose URL holds its token never shows it in a log (worker or triggerer);
- a run marked failed in Airflow is a cancel: the run gets a note saying who cancelled which job,
  the API's ``cancelled_by`` names that user, and teardown kept the trainer log, which the job
  page shows as the uploaded log.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster

from . import DAG_ID, TOKEN_HOOK_URL
from .chromium import needs_chromium, sign_in, start_chromium, wait_for

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By

pytestmark = [pytest.mark.e2e, needs_chromium]

REPO = Path(__file__).resolve().parents[3]
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
TOKEN_HOOK_SECRETS = ("cluster-path-token-3c9f1e", "cluster-query-secret-8a2d", TOKEN_HOOK_URL)


@pytest.fixture(scope="module")
def browser(cluster: AirflowCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-views"), cluster.logs / "chromedriver-views.log")
    try:
        sign_in(driver, cluster)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def finished(cluster: AirflowCluster, store: ResultsStore) -> dict[str, str]:
    """A job that trained 3 epochs and completed: its run id and uuid. It also notified a webhook
    whose URL holds its token and where nothing answers (the deployment's ``token_hook``)."""
    conf = {
        "project_id": f"views-{time.time_ns()}",
        "command": ["{python}", str(SCRIPTED), "ok", "3", "0.5"],
        "notify": ["webhook://token_hook"],
        "notify_every_epochs": 1,
        "poll_interval_seconds": 1,
    }
    run_id = cluster.trigger(DAG_ID, conf)
    assert cluster.wait_run(DAG_ID, run_id, timeout=180) == "success"
    [uuid] = store.jobs_for_run(DAG_ID, run_id)
    return {"run_id": run_id, "uuid": uuid}


def run_page(cluster: AirflowCluster, run_id: str) -> str:
    return f"{cluster.base_url}/dags/{DAG_ID}/runs/{quote(run_id, safe='')}"


def link_named(driver: Any, text: str) -> Any:
    return next((a for a in driver.find_elements(By.TAG_NAME, "a") if a.text.strip() == text), None)


def in_frame(driver: Any, title: str) -> None:
    frame = wait_for(f"the {title} iframe", lambda: driver.find_element(By.CSS_SELECTOR, f"iframe[title='{title}']"))
    driver.switch_to.frame(frame)


def test_a_dag_runs_training_tab_shows_its_job(
    browser: Any, cluster: AirflowCluster, finished: dict[str, str], tmp_path: Path
) -> None:
    browser.switch_to.default_content()
    browser.get(run_page(cluster, finished["run_id"]))
    wait_for("the Training tab", lambda: link_named(browser, "Training")).click()
    wait_for("the tab's URL", lambda: browser.current_url.endswith("/plugin/training-run"))
    in_frame(browser, "Training")
    view = wait_for("the job view", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=job-view]"), 30)
    assert view.get_attribute("data-status") == "completed"
    assert finished["uuid"] in view.text
    assert wait_for("3 loss points", lambda: view.find_element(By.CSS_SELECTOR, "[data-testid=loss-chart]"))
    browser.switch_to.default_content()
    browser.save_screenshot(str(tmp_path / "dag-run-training-tab.png"))


def test_each_task_of_a_job_links_to_its_job_view(
    browser: Any, cluster: AirflowCluster, finished: dict[str, str], tmp_path: Path
) -> None:
    run = quote(finished["run_id"], safe="")
    for task_id in ("register_job", "provision", "sense_progress", "teardown", "finalize"):
        links = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns/{run}/taskInstances/{task_id}/links").json()
        assert links["extra_links"] == {
            "Training job": f"{cluster.base_url}/plugin/training-jobs/training/ui/#/runs/{DAG_ID}/{run}"
        }, (task_id, links)
    browser.switch_to.default_content()
    browser.get(f"{run_page(cluster, finished['run_id'])}/tasks/sense_progress")
    wait_for("the Details tab", lambda: link_named(browser, "Details")).click()
    wait_for("the Training job link", lambda: link_named(browser, "Training job")).click()
    wait_for("the Training jobs page", lambda: "/plugin/training-jobs/" in browser.current_url)
    in_frame(browser, "Training jobs")
    view = wait_for("the job view", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=job-view]"), 30)
    assert finished["uuid"] in view.text
    browser.switch_to.default_content()
    browser.save_screenshot(str(tmp_path / "extra-link-job-view.png"))


def test_a_webhook_token_in_its_url_is_masked_in_the_logs(
    cluster: AirflowCluster, store: ResultsStore, finished: dict[str, str]
) -> None:
    """The HTTP hook logs the URL it fails to reach; the notifier hands every part of it to
    Airflow's log maskers first (the Task SDK's in the worker, the core one in the triggerer): the
    end is told by finalize on a worker (its task log), progress by the follower in the triggerer
    (in a thread, whose lines land in the triggerer's own log). A failing notifier fails nothing."""
    rows = store.notifications(finished["uuid"])
    assert {(n.event, n.status) for n in rows} >= {("completed", "failed"), ("progress", "failed")}, rows
    run_id = finished["run_id"]
    finalize = json.dumps(cluster.task_log_entries(DAG_ID, run_id, "finalize"))
    triggerer = (cluster.logs / "triggerer.log").read_text(errors="replace")
    for where, text in (("finalize's task log", finalize), ("the triggerer's log", triggerer)):
        assert "Tenacity will retry" in text, f"{where}: the hook's failure was not logged at all"
        assert "/***?***" in text, where
        for secret in TOKEN_HOOK_SECRETS:
            assert secret not in text, (where, secret)
    sense = json.dumps(cluster.task_log_entries(DAG_ID, run_id, "sense_progress"))
    for secret in TOKEN_HOOK_SECRETS:
        assert secret not in sense and all(secret not in (n.error or "") for n in rows), secret


def test_a_run_marked_failed_in_airflow_notes_who_cancelled_and_keeps_the_log(
    browser: Any, cluster: AirflowCluster, store: ResultsStore, tmp_path: Path
) -> None:
    conf = {
        "project_id": f"views-cancel-{time.time_ns()}",
        "command": ["{python}", str(SCRIPTED), "hang", "600", "0.5"],
        "poll_interval_seconds": 1,
    }
    run_id = cluster.trigger(DAG_ID, conf)
    cluster.wait_task_state(DAG_ID, run_id, "sense_progress", ("deferred", "running"), timeout=120)
    [uuid] = store.jobs_for_run(DAG_ID, run_id)
    wait_for("a few epochs", lambda: "epoch 3 done" in (store.job(uuid).log_tail or ""), 30)
    # As the Airflow UI's "Mark run as failed" does, signed in as admin.
    token = cluster.token("admin")
    resp = requests.patch(
        f"{cluster.base_url}/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}",
        json={"state": "failed"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    assert cluster.wait_run(DAG_ID, run_id, timeout=120) == "failed"
    note = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}").json()["note"]
    assert note.startswith(
        f"Cancelled by admin (marked the dag run failed in Airflow): training job {uuid} ({conf['project_id']})."
    ), note
    api_job = requests.get(
        f"{cluster.base_url}/training/v1/jobs/{uuid}", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    assert api_job["status"] == "cancelled"
    assert api_job["cancelled_by"] == "admin (marked the dag run failed in Airflow)"
    kept = {a.name for a in store.artifacts(uuid)}
    assert "logs/trainer.log" in kept, kept
    log = requests.get(
        f"{cluster.base_url}/training/v1/jobs/{uuid}/log", headers={"Authorization": f"Bearer {token}"}, timeout=30
    ).json()
    assert log["source"] == "uploaded" and "epoch 3 done" in log["lines"], log

    browser.switch_to.default_content()
    browser.get(run_page(cluster, run_id))
    wait_for("the run's note", lambda: "Cancelled by admin" in browser.find_element(By.TAG_NAME, "body").text, 30)
    browser.save_screenshot(str(tmp_path / "cancelled-run-note.png"))
    wait_for("the Training tab", lambda: link_named(browser, "Training")).click()
    in_frame(browser, "Training")
    panel = wait_for(
        "the uploaded log",
        lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=log-panel][data-source=uploaded]"),
        30,
    )
    assert "epoch 3 done" in panel.text
    browser.switch_to.default_content()
    browser.save_screenshot(str(tmp_path / "cancelled-job-uploaded-log.png"))
