"""The provider's connection types in Airflow's own Add Connection form, driven by headless Chromium.

An admin opens Admin > Connections > Add Connection and picks Vast.ai, RunPod or Lambda Cloud: the
form shows the API base URL and the API key (labelled so, with placeholders), not Login, Port or
Schema, and one field per setting under Extra Fields. A Vast.ai connection saved through the form,
and nothing else, is what a job on (a fake) Vast.ai then runs with, end to end. Screenshots go to
each test's tmp dir.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster
from tests.fakeclouds.rigs import Rig

from . import DAG_ID
from .chromium import needs_chromium, sign_in, start_chromium, wait_for

pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

pytestmark = [pytest.mark.e2e, needs_chromium]

#: What each connection type's form shows (labels of its standard fields) and the extra fields it has.
FORMS = {
    "Vast.ai": (
        ["Description", "API base URL", "API key"],
        ["image", "disk_gb", "verified_only", "bid_multiplier", "onstart", "ssh_conn_id", "retry_attempts"],
    ),
    "RunPod": (
        ["Description", "API base URL", "API key"],
        ["image", "ssh_public_key", "cloud_type", "container_disk_gb", "ssh_conn_id", "retry_attempts"],
    ),
    "Lambda Cloud": (["Description", "API base URL", "API key"], ["ssh_key_name", "ssh_conn_id", "retry_attempts"]),
}


@pytest.fixture(scope="module")
def browser(cluster: AirflowCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    driver = start_chromium(tmp_path_factory.mktemp("chromium-conn"), cluster.logs / "chromedriver-conn.log")
    try:
        sign_in(driver, cluster)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def vast(cloud: Rig, sshd_server: Any) -> Iterator[Any]:
    """A fake Vast.ai whose instances are boxes beside the package's Lambda ones (the deployment's
    ``gpu_instance_ssh`` connection reaches them); the deployment has no connection for it."""
    from tests.fakeclouds.vast import FakeVast

    fake = FakeVast(ssh_host="127.0.0.1", ssh_port=sshd_server.port)
    fake.box_root = cloud.fake.box_root
    yield fake
    fake.stop()


def open_add_connection(driver: Any, cluster: AirflowCluster, conn_id: str, type_name: str) -> Any:
    """Admin > Connections > Add Connection, the id typed and the type picked: the dialog."""
    driver.get(f"{cluster.base_url}/connections")
    wait_for(
        "the Add Connection button",
        lambda: next(
            (b for b in driver.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Add Connection"), None
        ),
    ).click()
    dialog = wait_for("the dialog", lambda: driver.find_element(By.CSS_SELECTOR, "[role=dialog]"))
    dialog.find_element(By.NAME, "connection_id").send_keys(conn_id)
    kind = dialog.find_element(By.CSS_SELECTOR, "input[role=combobox]")
    kind.send_keys(type_name)
    wait_for(f"the {type_name} option", lambda: type_name in dialog.text)
    kind.send_keys(Keys.ENTER)
    wait_for("the type's fields", lambda: dialog.find_element(By.NAME, "password").is_displayed())
    return dialog


def shown_labels(dialog: Any) -> list[str]:
    return [
        label.text.split("\n")[0].strip()
        for label in dialog.find_elements(By.TAG_NAME, "label")
        if label.is_displayed()
    ]


def expand(dialog: Any, section: str) -> None:
    header = next(b for b in dialog.find_elements(By.TAG_NAME, "button") if b.text.strip() == section)
    if header.get_attribute("aria-expanded") != "true":
        header.click()


@pytest.mark.parametrize("type_name", sorted(FORMS))
def test_each_connection_type_has_its_form(
    browser: Any, cluster: AirflowCluster, type_name: str, tmp_path: Path
) -> None:
    standard, extras = FORMS[type_name]
    dialog = open_add_connection(browser, cluster, f"form_{type_name.split()[0].lower()}", type_name)
    assert shown_labels(dialog)[2:] == standard  # after Connection ID and Connection Type
    for hidden in ("login", "port", "schema"):
        assert not [e for e in dialog.find_elements(By.NAME, hidden) if e.is_displayed()], hidden
    key = dialog.find_element(By.NAME, "password")
    assert key.get_attribute("type") == "password" and "API key" in (key.get_attribute("placeholder") or "")
    assert (dialog.find_element(By.NAME, "host").get_attribute("placeholder") or "").startswith("https://")
    expand(dialog, "Extra Fields")
    for name in extras:
        field = wait_for(f"the {name} field", lambda n=name: dialog.find_element(By.NAME, f"element_{n}"))
        # its field shown (a choice's input is a hidden one inside its visible select)
        assert field.find_element(By.XPATH, "./ancestor::*[@role='group'][1]").is_displayed(), name
    browser.save_screenshot(str(tmp_path / f"add-connection-{type_name.split()[0].lower()}.png"))
    dialog.find_element(By.CSS_SELECTOR, "button[aria-label=Close]").click()


def test_a_connection_saved_in_the_form_runs_a_job_on_its_cloud(
    browser: Any, cluster: AirflowCluster, store: ResultsStore, vast: Any, tmp_path: Path
) -> None:
    from tests.fakeclouds.rigs import FAST_RETRIES

    dialog = open_add_connection(browser, cluster, "vast_default", "Vast.ai")
    dialog.find_element(By.NAME, "host").send_keys(vast.url)
    dialog.find_element(By.NAME, "password").send_keys(vast.api_key)
    expand(dialog, "Extra Fields")
    fields = {"ssh_conn_id": "gpu_instance_ssh", **{k: str(v) for k, v in FAST_RETRIES.items()}}
    for name, value in fields.items():
        field = dialog.find_element(By.NAME, f"element_{name}")
        field.send_keys(Keys.CONTROL, "a", Keys.DELETE)
        field.send_keys(value)
    browser.save_screenshot(str(tmp_path / "vast-connection-filled.png"))
    next(b for b in dialog.find_elements(By.TAG_NAME, "button") if b.text.strip() == "Save").click()
    saved = wait_for(
        "the connection in Airflow",
        lambda: (r := cluster.api("GET", "/connections/vast_default")).status_code == 200 and r.json(),
    )
    try:
        assert saved["conn_type"] == "vastai" and saved["host"] == vast.url
        assert '"ssh_conn_id": "gpu_instance_ssh"' in (saved["extra"] or "")

        project = f"form-conn-{time.time_ns()}"
        run_id = cluster.trigger(
            DAG_ID,
            {
                "project_id": project,
                "provider": "vast",
                "gpu": "A100",
                "config": {"iterations": 1, "epochs": 2},
                "poll_interval_seconds": 1,
            },
        )
        assert cluster.wait_run(DAG_ID, run_id, timeout=300) == "success"
        job = store.job(store.job_uuid_for_run(DAG_ID, run_id, -1))
        assert job.status == "completed" and job.provider == "vast"
        assert [i.provider for i in store.instances_for_job(job.uuid)] == ["vast"]
        assert vast.calls, "the fake Vast.ai was never called"
        vast.assert_all_terminated()
    finally:
        cluster.api("DELETE", "/connections/vast_default")
