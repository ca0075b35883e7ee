"""The ``gpu_training`` trigger form in the real Airflow UI, driven by headless Chromium.

A user opens the DAG, clicks Trigger and fills in the form Airflow builds from the DAG's params: it
submits with nothing but the defaults (and the job trains), and with only Project typed; only
Project is marked required; the params are grouped in sections; a refused value is said in the
dialog in words, naming the field's title, and creates no run; a provider whose connection is
missing is refused by ``register_job`` before anything is provisioned. Screenshots go to each
test's tmp dir.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster

from . import DAG_ID
from .chromium import needs_chromium, sign_in, start_chromium, wait_for

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

pytestmark = [pytest.mark.e2e, needs_chromium]

SECTIONS = ["Run Parameters", "Where it runs", "Trainer", "Data and outputs", "Limits and budget", "Notifications"]


@pytest.fixture(scope="module")
def browser(cluster: AirflowCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-form"), cluster.logs / "chromedriver-form.log")
    try:
        sign_in(driver, cluster)
        yield driver
    finally:
        driver.quit()


def open_form(driver: Any, cluster: AirflowCluster) -> Any:
    """The DAG's page, then its Trigger button: the dialog with the params' form."""
    driver.get(f"{cluster.base_url}/dags/{DAG_ID}")
    button = wait_for(
        "the Trigger button",
        lambda: next((b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Trigger"), None),
    )
    button.click()
    wait_for("the Project field", lambda: driver.find_element(By.ID, "element_project_id").is_displayed())
    return dialog(driver)


def dialog(driver: Any) -> Any:
    return next(d for d in driver.find_elements(By.CSS_SELECTOR, "[role=dialog]") if d.is_displayed())


def shown_dialog_saying(driver: Any, text: str) -> Any:
    """The dialog once it shows ``text`` (None meanwhile, also while React has none on screen)."""
    shown = next((d for d in driver.find_elements(By.CSS_SELECTOR, "[role=dialog]") if d.is_displayed()), None)
    return shown if shown is not None and text in shown.text else None


def dialog_button(driver: Any, text: str) -> Any:
    return next(b for b in dialog(driver).find_elements(By.TAG_NAME, "button") if b.text.strip() == text)


def type_into(field: Any, text: str) -> None:
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def run_ids(cluster: AirflowCluster) -> set[str]:
    runs = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 100}).json()["dag_runs"]
    return {r["dag_run_id"] for r in runs}


def job_count(store: ResultsStore) -> int:
    from sqlalchemy import func, select

    from gpu_training.results.models import TrainingJob

    with store.session() as s:
        return int(s.scalar(select(func.count()).select_from(TrainingJob)) or 0)


def submitted_run(driver: Any, cluster: AirflowCluster, before: set[str]) -> dict[str, Any]:
    """Click Trigger; the run it created (the dialog closes and the run page opens)."""
    dialog_button(driver, "Trigger").click()
    new = wait_for("the new dag run", lambda: run_ids(cluster) - before, 30)
    assert len(new) == 1, new
    run_id = new.pop()
    wait_for("the run's page", lambda: "/runs/" in driver.current_url)
    return dict(cluster.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json())


@pytest.fixture(scope="module")
def submitted() -> dict[str, dict[str, Any]]:
    """The runs the form created, checked at the end of the module (they train meanwhile)."""
    return {}


def test_the_form_submits_with_its_defaults(
    browser: Any, cluster: AirflowCluster, submitted: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    form = open_form(browser, cluster)
    browser.save_screenshot(str(tmp_path / "trigger-form.png"))
    triggers = [t.text for t in form.find_elements(By.CSS_SELECTOR, "[data-part=item-trigger]")]
    assert triggers == [*SECTIONS, "Advanced Options"], triggers
    required = form.find_elements(By.CSS_SELECTOR, "label[data-scope=field][data-required]")
    assert [label.text.replace("*", "").strip() for label in required] == ["Project"]
    assert browser.find_element(By.ID, "element_project_id").get_attribute("value") == "demo"
    # Airflow disables Trigger while a required field is empty or a section is in error.
    assert dialog_button(browser, "Trigger").is_enabled()

    run = submitted_run(browser, cluster, run_ids(cluster))
    assert run["conf"]["project_id"] == "demo" and run["conf"]["gpu"] is None
    submitted["defaults"] = run


def test_the_form_submits_with_only_the_project_typed(
    browser: Any, cluster: AirflowCluster, submitted: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    open_form(browser, cluster)
    project = f"form-project-{time.time_ns()}"
    type_into(browser.find_element(By.ID, "element_project_id"), project)
    browser.save_screenshot(str(tmp_path / "trigger-form-project.png"))
    run = submitted_run(browser, cluster, run_ids(cluster))
    assert run["conf"]["project_id"] == project
    submitted["project"] = run


@pytest.mark.parametrize(
    ("section", "field", "value", "message"),
    [
        (
            None,
            "element_project_id",
            "../../etc",
            "Project (project_id): '../../etc' is not allowed: 1 to 64 letters, digits, '_', '.' or '-'",
        ),
        (
            "Limits and budget",
            "element_max_runtime_minutes",
            "-5",
            "Max runtime (minutes) (max_runtime_minutes): -5 is not allowed: a number greater than 0, at most 20160",
        ),
    ],
)
def test_a_refused_value_is_said_in_the_dialog_and_creates_no_run(
    browser: Any,
    cluster: AirflowCluster,
    store: ResultsStore,
    tmp_path: Path,
    section: str | None,
    field: str,
    value: str,
    message: str,
) -> None:
    open_form(browser, cluster)
    if section:
        dialog_button(browser, section).click()
    element = wait_for(field, lambda: browser.find_element(By.NAME, field))
    type_into(element, value)
    before, jobs_before = run_ids(cluster), job_count(store)
    dialog_button(browser, "Trigger").click()
    alert = wait_for("the refusal in the dialog", lambda: shown_dialog_saying(browser, message), 30)
    browser.save_screenshot(str(tmp_path / "trigger-form-refused.png"))
    assert "400 Bad Request" in alert.text
    assert "Failed validating" not in alert.text and "{'type'" not in alert.text  # no jsonschema dump
    time.sleep(2)
    assert run_ids(cluster) == before
    assert job_count(store) == jobs_before


def test_a_provider_without_its_connection_is_refused_before_provisioning(
    browser: Any, cluster: AirflowCluster, store: ResultsStore, tmp_path: Path
) -> None:
    """This deployment has the fake Lambda cloud's connection only: RunPod's is missing."""
    open_form(browser, cluster)
    type_into(browser.find_element(By.ID, "element_project_id"), f"form-runpod-{time.time_ns()}")
    provider = browser.find_element(By.ID, "element_provider").find_element(By.TAG_NAME, "input")
    provider.send_keys("RunPod")
    provider.send_keys(Keys.ENTER)
    assert browser.find_element(By.ID, "element_provider").text == "RunPod"
    run = submitted_run(browser, cluster, run_ids(cluster))
    assert run["conf"]["provider"] == "runpod"
    assert cluster.wait_run(DAG_ID, run["dag_run_id"], timeout=120) == "failed"
    states = cluster.task_states(DAG_ID, run["dag_run_id"])
    assert states["register_job"] == "failed" and states["provision"] in ("upstream_failed", "skipped"), states
    # The exception is an entry's error_detail (the log's text has "Task failed with exception").
    log = json.dumps(cluster.task_log_entries(DAG_ID, run["dag_run_id"], "register_job"))
    assert (
        "provider 'runpod' (the RunPod API key) needs the Airflow connection 'runpod_default', which is not "
        "defined here: add it under Admin > Connections" in log
    ), log[-3000:]
    assert store.jobs_for_run(DAG_ID, run["dag_run_id"]) == []  # no job row, so no instance
    browser.get(f"{cluster.base_url}/dags/{DAG_ID}/runs/{run['dag_run_id']}/tasks/register_job")
    wait_for("the task's log", lambda: "runpod_default" in browser.find_element(By.TAG_NAME, "body").text, 60)
    browser.save_screenshot(str(tmp_path / "register-job-refused.png"))


def test_the_runs_submitted_from_the_form_trained(
    cluster: AirflowCluster, store: ResultsStore, submitted: dict[str, dict[str, Any]]
) -> None:
    """Last: the two runs the form created trained the reference trainer to the end."""
    assert set(submitted) == {"defaults", "project"}
    for key, run in submitted.items():
        assert cluster.wait_run(DAG_ID, run["dag_run_id"], timeout=240) == "success", key
        [job_uuid] = store.jobs_for_run(DAG_ID, run["dag_run_id"])
        job = store.job(job_uuid)
        assert (job.status, job.project_id, job.provider) == ("completed", run["conf"]["project_id"], "local")
        assert job.params["gpu"] == "" and job.params["max_runtime_minutes"] == 120
        assert store.epoch_count(job_uuid) > 0
