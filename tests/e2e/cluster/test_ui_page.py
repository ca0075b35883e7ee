"""The Training jobs page in the real Airflow UI, driven by headless Chromium (Selenium).

A real api-server, scheduler and triggerer (``tests/airflow_cluster.py``) with SimpleAuthManager
users; the browser signs in on Airflow's own login page (``/auth/login``, which stores the JWT in
the ``_token`` cookie), opens "Training jobs" (``/plugin/training-jobs``: the plugin's
``external_views`` entry, an iframe of ``/training/ui/``) and works inside that iframe: the jobs
table, a finished job's plots, confusion matrix, artifacts and instances, a running job's live
updates and the Cancel button (confirmed in the page's own dialog; a job that ended meanwhile gets
the API's 400 message).

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/system-deps``), ``selenium`` (pip) and
the built page (``make ui``); skipped without them. Screenshots go to the test's tmp dir, and the
finished job's also to /tmp/ui-screenshot.png.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import requests

from gpu_training.results.store import ResultsStore
from gpu_training.retraining.promotion import promote
from gpu_training.retraining.spec import Promotion
from tests.airflow_cluster import AirflowCluster

from . import DAG_ID, USERS

REPO = Path(__file__).resolve().parents[3]
UI_TRAINER = REPO / "tests" / "fixtures" / "ui_trainer.py"
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
UI_INDEX = REPO / "plugins" / "gpu_training" / "ui_dist" / "index.html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
SCREENSHOT = Path("/tmp/ui-screenshot.png")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs chromium and chromium-driver (apt)"),
    pytest.mark.skipif(not UI_INDEX.is_file(), reason="the page is not built: make ui"),
]

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float = 30.0) -> T:
    """``probe()`` once it is truthy (WebDriver errors count as not yet)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (WebDriverException, requests.RequestException) as err:
            last = err
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
        time.sleep(0.25)


@pytest.fixture(scope="module")
def jobs(cluster: AirflowCluster) -> dict[str, dict[str, Any]]:
    """Three jobs triggered at once: ``done`` (2 iterations of 5 epochs, evaluated; it finishes),
    ``live`` and ``ended`` (an epoch a second, then they hang until cancelled)."""
    stamp = time.time_ns()
    commands = {
        "done": ["{python}", str(UI_TRAINER), "2", "5", "0.2"],
        "live": ["{python}", str(SCRIPTED), "hang", "60", "1"],
        "ended": ["{python}", str(SCRIPTED), "hang", "60", "1"],
    }
    runs = {}
    for key, command in commands.items():
        conf = {"project_id": f"ui-{key}-{stamp}", "provider": "local", "command": command, "poll_interval_seconds": 1}
        runs[key] = (conf["project_id"], cluster.trigger(DAG_ID, conf))
    headers = {"Authorization": f"Bearer {cluster.token('admin')}"}

    def job_of(project: str) -> dict[str, Any] | None:
        resp = requests.get(
            f"{cluster.base_url}/training/v1/jobs", params={"project_id": project}, headers=headers, timeout=30
        )
        resp.raise_for_status()
        found = resp.json()["jobs"]
        return dict(found[0]) if found else None

    out = {}
    for key, (project, run_id) in runs.items():
        job = cluster.wait_until(f"the job of {run_id}", lambda p=project: job_of(p), 120)
        out[key] = {**job, "run_id": run_id}
    return out


@pytest.fixture(scope="module")
def browser(cluster: AirflowCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,2400"):
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    # Explicit paths: Selenium Manager never looks for (or downloads) a browser or driver.
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER), log_output=str(cluster.logs / "chromedriver.log")),
        options=options,
    )
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: WebDriver, cluster: AirflowCluster, user: str = "admin") -> None:
    """As a user does: Airflow's login page, which stores the JWT it gets in the ``_token`` cookie."""
    driver.get(f"{cluster.base_url}/auth/login")
    wait_for("the login form", lambda: driver.find_element(By.NAME, "username")).send_keys(user)
    driver.find_element(By.NAME, "password").send_keys(USERS[user][1])
    driver.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait_for("the redirect after sign-in", lambda: "/auth/login" not in driver.current_url)
    assert wait_for("the _token cookie", lambda: driver.get_cookie("_token"))


def open_page(driver: WebDriver, cluster: AirflowCluster, fragment: str = "") -> None:
    """The Airflow UI's Training jobs page, then into its iframe (the Airflow UI mirrors the iframe's
    location into its own URL, so ``/plugin/training-jobs/training/ui/#/jobs/<uuid>`` deep-links)."""
    driver.switch_to.default_content()
    path = f"/plugin/training-jobs/training/ui/{fragment}" if fragment else "/plugin/training-jobs"
    driver.get(f"{cluster.base_url}{path}")
    frame = wait_for(
        "the Training jobs iframe", lambda: driver.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']")
    )
    assert "allow-same-origin" in (frame.get_attribute("sandbox") or "")
    driver.switch_to.frame(frame)


def row_of(driver: WebDriver, uuid: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f"table.jobs tr[data-job='{uuid}']")


def points(driver: WebDriver, testid: str) -> int:
    return int(driver.find_element(By.CSS_SELECTOR, f"[data-testid={testid}]").get_attribute("data-points") or 0)


def inked_pixels(driver: WebDriver, testid: str) -> int:
    """Pixels of the first series' colour (#2563eb) on the chart's canvas: its line and points (the
    axes and grid uPlot draws there too are grey)."""
    return int(
        driver.execute_script(
            "const c = document.querySelector(`[data-testid=${arguments[0]}] canvas`);"
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            "let n = 0;"
            "for (let i = 0; i < d.length; i += 4)"
            "  if (d[i + 3] > 200 && Math.abs(d[i] - 37) < 40 && Math.abs(d[i + 1] - 99) < 40"
            "      && Math.abs(d[i + 2] - 235) < 40) n++;"
            "return n;",
            testid,
        )
    )


def test_the_nav_entry_and_the_unbuilt_answer(cluster: AirflowCluster) -> None:
    plugins = requests.get(
        f"{cluster.base_url}/api/v2/plugins",
        headers={"Authorization": f"Bearer {cluster.token('admin')}"},
        timeout=30,
    ).json()["plugins"]
    [ours] = [p for p in plugins if p["name"] == "gpu_training"]
    assert ours["external_views"][0]["href"] == "/training/ui/"
    assert ours["external_views"][0]["destination"] == "nav"
    page = requests.get(f"{cluster.base_url}/training/ui/", timeout=30)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_job_table_and_a_finished_job(
    browser: WebDriver,
    cluster: AirflowCluster,
    store: ResultsStore,
    jobs: dict[str, dict[str, Any]],
    tmp_path: Path,
) -> None:
    done = jobs["done"]
    assert cluster.wait_run(DAG_ID, done["run_id"], timeout=120) == "success"
    # The finished job becomes a model's champion, as a retraining DAG's promote task records it.
    model = f"ui-model-{done['project_id']}"
    decision = promote(store, model, done["uuid"], Promotion(metric="f1"), dag_id=DAG_ID, run_id=done["run_id"])
    assert decision.promoted, decision
    sign_in(browser, cluster)
    open_page(browser, cluster)
    wait_for("the finished job in the table", lambda: row_of(browser, done["uuid"]))
    wait_for("its status completed", lambda: "completed" in row_of(browser, done["uuid"]).text)
    cells = [c.text for c in row_of(browser, done["uuid"]).find_elements(By.TAG_NAME, "td")]
    assert cells[0:3] == ["completed", done["project_id"], "local"], cells
    for key in ("live", "ended"):
        wait_for(f"the {key} job in the table", lambda k=key: row_of(browser, jobs[k]["uuid"]))
    champion = wait_for(
        "the model in the champions table",
        lambda: browser.find_element(By.CSS_SELECTOR, f"[data-testid=champions-table] tr[data-model='{model}']"),
    )
    link = champion.find_element(By.CSS_SELECTOR, "[data-testid=champion-job] a").get_attribute("href") or ""
    assert link.endswith(f"#/jobs/{done['uuid']}"), link
    assert "promoted: first champion (f1 " in champion.text, champion.text

    row_of(browser, done["uuid"]).click()
    view = wait_for("the job view", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=job-view]"))
    assert view.get_attribute("data-status") == "completed"
    assert wait_for("10 loss points", lambda: points(browser, "loss-chart") == 10)
    assert wait_for("the loss curves drawn", lambda: inked_pixels(browser, "loss-chart") > 200)
    legend = browser.find_element(By.CSS_SELECTOR, "[data-testid=loss-chart] .u-legend").text.lower()
    assert "iteration 1" in legend and "iteration 2" in legend, legend
    # 2 evaluations x accuracy, precision, recall, f1, auc.
    assert points(browser, "eval-chart") == 10
    assert inked_pixels(browser, "eval-chart") > 100
    matrix = browser.find_element(By.CSS_SELECTOR, "[data-testid=confusion-matrix]")
    assert [c.text for c in matrix.find_elements(By.CSS_SELECTOR, "tbody td")][:3] == ["50", "6", "4"]
    links = {
        a.text: a.get_attribute("href") for a in browser.find_elements(By.CSS_SELECTOR, "[data-testid=artifacts] a")
    }
    assert "checkpoints/iter002_model.bin" in links, links
    href = links["checkpoints/iter002_model.bin"]
    assert f"/training/v1/jobs/{done['uuid']}/artifacts/" in href
    # The download is authenticated by the session cookie alone, as the link click is.
    fetched = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(async r => done([r.status, (await r.arrayBuffer()).byteLength]));",
        href,
    )
    assert fetched == [200, 2048]
    timeline = browser.find_element(By.CSS_SELECTOR, "[data-testid=instance-timeline]")
    assert timeline.find_elements(By.CSS_SELECTOR, "rect.tl-bar"), timeline.get_attribute("outerHTML")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=cancel]") == []  # it ended

    browser.switch_to.default_content()
    assert "/plugin/training-jobs" in browser.current_url
    shot = tmp_path / "ui-finished-job.png"
    browser.save_screenshot(str(shot))
    shutil.copy(shot, SCREENSHOT)


def test_a_running_job_updates_live_and_is_cancelled(
    browser: WebDriver, cluster: AirflowCluster, jobs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    live = jobs["live"]
    open_page(browser, cluster, f"#/jobs/{live['uuid']}")
    wait_for("the live marker", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=live]"), 60)
    first = wait_for("a first loss point", lambda: points(browser, "loss-chart"), 60)
    wait_for("more loss points, pushed by the stream", lambda: points(browser, "loss-chart") >= first + 2, 30)
    browser.switch_to.default_content()
    browser.save_screenshot(str(tmp_path / "ui-running-job.png"))
    browser.switch_to.frame(browser.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']"))

    browser.find_element(By.CSS_SELECTOR, "[data-testid=cancel]").click()
    dialog = wait_for(
        "the confirm dialog", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=confirm-cancel]")
    )
    assert live["uuid"] in dialog.text
    dialog.find_element(By.CSS_SELECTOR, "[data-testid=confirm-yes]").click()
    message = wait_for(
        "the cancel message", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=cancel-message]")
    )
    assert message.text.startswith("Cancelled"), message.text
    view = browser.find_element(By.CSS_SELECTOR, "[data-testid=job-view]")
    assert wait_for("status cancelled", lambda: view.get_attribute("data-status") == "cancelled")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=cancel]") == []


def test_cancelling_a_job_that_ended_meanwhile_shows_the_400(
    browser: WebDriver, cluster: AirflowCluster, jobs: dict[str, dict[str, Any]]
) -> None:
    ended = jobs["ended"]
    # The page must not learn that the job ended: no stream (blocked), and the cancel below comes
    # before its next details refresh (10 s).
    browser.execute_cdp_cmd("Network.enable", {})
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/stream"]})
    try:
        open_page(browser, cluster, f"#/jobs/{ended['uuid']}")
        button = wait_for(
            "the Cancel button", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=cancel]"), 60
        )
        resp = requests.post(
            f"{cluster.base_url}/training/v1/jobs/{ended['uuid']}/cancel",
            headers={"Authorization": f"Bearer {cluster.token('admin')}"},
            timeout=30,
        )
        assert resp.status_code == 202, resp.text
        button.click()
        browser.find_element(By.CSS_SELECTOR, "[data-testid=confirm-yes]").click()
        message = wait_for("the error", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=cancel-message]"))
        assert message.text == f"400: job {ended['uuid']} already ended: cancelled", message.text
    finally:
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
