"""The Training jobs page in the real Airflow UI, driven by headless Chromium (Selenium).

A real api-server, scheduler and triggerer (``tests/airflow_cluster.py``) with SimpleAuthManager
users; the browser signs in on Airflow's own login page (``/auth/login``, which stores the JWT in
the ``_token`` cookie), opens "Training jobs" (``/plugin/training-jobs``: the plugin's
``external_views`` entry, an iframe of ``/training/ui/``) and works inside that iframe: the jobs
table, a finished job's header (labelled durations, links into Airflow), its per-epoch metrics (any
stored one selectable), evaluations by epoch (one and two points), confusion matrix, params, the
uploaded trainer log, artifacts by folder and instances; deep links (the Airflow URL follows the
page's view and reloads into it); two jobs compared; a dag run's jobs; a job of 200,000 epochs,
whose chart is a series the API downsampled (the page never reads the epochs themselves); a running
job's live updates and log, and the Cancel button (confirmed in the page's own dialog; a job that
ended meanwhile gets the API's 400 message).

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
from urllib.parse import quote

import pytest
import requests
from sqlalchemy import delete, insert

from gpu_training.results.models import EpochTrain, Eval, TrainingIteration, TrainingJob
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
    """Four jobs triggered at once: ``done`` (2 iterations of 5 epochs, each evaluated) and ``one``
    (1 iteration of 3 epochs, one evaluation) finish, with other hyperparameters; ``live`` and
    ``ended`` (an epoch a second, then they hang until cancelled). And ``refused``: a run without a
    job (its register_job refuses the params)."""
    stamp = time.time_ns()
    commands = {
        "done": ["{python}", str(UI_TRAINER), "2", "5", "0.2"],
        "one": ["{python}", str(UI_TRAINER), "1", "3", "0.2"],
        "live": ["{python}", str(SCRIPTED), "hang", "600", "1"],
        "ended": ["{python}", str(SCRIPTED), "hang", "600", "1"],
    }
    configs = {"done": {"lr": 0.01, "hidden": 64}, "one": {"lr": 0.05, "hidden": 64}}
    runs = {}
    for key, command in commands.items():
        conf = {
            "project_id": f"ui-{key}-{stamp}",
            "provider": "local",
            "command": command,
            "poll_interval_seconds": 1,
            "config": configs.get(key, {}),
        }
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
    # A run whose register_job refuses its params (ssh without a connection): it has no job.
    refused = {"project_id": f"ui-refused-{stamp}", "provider": "ssh"}
    out["refused"] = {"run_id": cluster.trigger(DAG_ID, refused)}
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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the console, for failures' reports
    # Explicit paths: Selenium Manager never looks for (or downloads) a browser or driver.
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER), log_output=str(cluster.logs / "chromedriver.log")),
        options=options,
    )
    try:
        sign_in(driver, cluster)  # each test runs on its own too (pytest -k)
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
        "the Training jobs iframe", lambda: driver.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']"), 60
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


def top_url(driver: WebDriver) -> str:
    """The Airflow UI's own URL (the top window), then back into the page's iframe."""
    driver.switch_to.default_content()
    url = driver.current_url
    driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']"))
    return url


def by_testid(driver: WebDriver, name: str) -> WebElement:
    return driver.find_element(By.CSS_SELECTOR, f"[data-testid={name}]")


def words(element: WebElement) -> str:
    """An element's text, its white space (line breaks between inline-flex parts) as single spaces."""
    return " ".join(element.text.split())


def choose(select: WebElement, value: str) -> None:
    """Picks an option of a <select> as a user does (Preact sets option values as properties, so
    there is no value attribute to select by)."""
    [option] = [o for o in select.find_elements(By.TAG_NAME, "option") if o.get_attribute("value") == value]
    option.click()


def legend(driver: WebDriver, chart: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, f"[data-testid={chart}] .u-legend").text


def what_the_page_shows(driver: WebDriver, reads: str) -> str:
    """For a failure's message: the frame's URL and text, the console, and the page's reads of URLs
    containing ``reads`` (status, duration)."""
    url = driver.execute_script("return location.href")
    text = driver.execute_script("return document.body.innerText")[:1500]
    entries = driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes(arguments[0]))"
        ".map(e => [e.name, e.responseStatus, Math.round(e.duration)]);",
        reads,
    )
    console = [f"{e.get('level')} {e.get('message')}"[:300] for e in driver.get_log("browser")][-20:]
    return f"the page at {url} shows: {text}\nits reads of {reads}: {entries}\nits console: {console}"


def job_view_of(driver: WebDriver, uuid: str) -> WebElement:
    return wait_for(
        f"the job view of {uuid}",
        lambda: driver.find_element(By.CSS_SELECTOR, f"[data-testid=job-view][data-uuid='{uuid}']"),
        60,
    )


def screenshot(driver: WebDriver, path: Path) -> None:
    """The whole Airflow page (the iframe scrolls inside it): the window as tall as the page."""
    driver.switch_to.default_content()
    driver.save_screenshot(str(path))
    driver.switch_to.frame(driver.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']"))


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

    # The jobs table: wall time and an (empty) failure reason for every row.
    headings = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table.jobs thead th")]
    assert {"WALL TIME", "TRAINING", "FAILURE REASON", "COMPARE"} <= set(headings), headings

    row_of(browser, done["uuid"]).click()
    view = job_view_of(browser, done["uuid"])
    assert view.get_attribute("data-status") == "completed"
    # The view is in the Airflow UI's own URL, so that URL reloads into it.
    assert top_url(browser) == f"{cluster.base_url}/plugin/training-jobs/training/ui/#/jobs/{done['uuid']}"

    # Header: labelled durations, no GPU on the local provider, links to the dag run and task logs.
    header = by_testid(browser, "job-header")
    assert "gpu" not in header.text.lower(), header.text
    wall = words(by_testid(browser, "wall-duration"))
    assert wall.startswith("WALL TIME ") and words(by_testid(browser, "training-duration")).startswith("TRAINING TIME ")
    assert "PROVIDER local / process" in words(header), header.text
    run_url = f"{cluster.base_url}/dags/{DAG_ID}/runs/{quote(done['run_id'], safe='')}"
    run_link = by_testid(browser, "dag-run-link")
    assert (run_link.get_attribute("href"), run_link.get_attribute("target")) == (run_url, "_top")
    tasks = {a.get_attribute("data-task"): a for a in browser.find_elements(By.CSS_SELECTOR, "[data-testid=task-link]")}
    assert list(tasks) == [
        "register_job", "build_config", "provision", "wait_until_ready", "transfer_inputs", "start_trainer",
        "sense_progress", "upload_outputs", "teardown", "finalize",
    ]  # fmt: skip
    assert tasks["sense_progress"].get_attribute("href") == f"{run_url}/tasks/sense_progress"
    assert tasks["register_job"].get_attribute("target") == "_top"
    # The link the Airflow UI answers with that task's page (its log).
    assert requests.get(tasks["finalize"].get_attribute("href") or "", timeout=30).status_code == 200

    # Per-epoch metrics: avg_loss first, its latest values in the legend without hovering.
    assert wait_for("10 loss points", lambda: points(browser, "loss-chart") == 10)
    assert wait_for("the loss curves drawn", lambda: inked_pixels(browser, "loss-chart") > 200)
    text = legend(browser, "loss-chart")
    assert "iteration 1" in text.lower() and "iteration 2" in text.lower(), text
    assert "0.29" in text and "0.2714" in text and "--" not in text, text  # epoch 5 of each iteration
    select = by_testid(browser, "metric-select")
    options = [o.get_attribute("value") for o in select.find_elements(By.TAG_NAME, "option")]
    assert options == ["avg_loss", "lr", "samples", "val_loss"], options
    choose(select, "val_loss")
    wait_for("the val_loss curves", lambda: "0.3186" in legend(browser, "loss-chart"))
    assert "0.339" in legend(browser, "loss-chart") and points(browser, "loss-chart") == 10
    assert inked_pixels(browser, "loss-chart") > 200
    assert top_url(browser).endswith(f"#/jobs/{done['uuid']}?metric=val_loss")
    choose(by_testid(browser, "metric-select"), "samples")
    wait_for("integers as integers", lambda: "359" in legend(browser, "loss-chart"))
    assert "359.0" not in legend(browser, "loss-chart")

    # Evaluations by iteration/epoch: 2 evaluations x accuracy, precision, recall, f1, auc.
    assert points(browser, "eval-chart") == 10
    assert inked_pixels(browser, "eval-chart") > 100
    evals = legend(browser, "eval-chart")
    assert "evaluation (iteration/epoch)" in evals.lower() and "2/5" in evals and "0.9" in evals, evals
    matrix = by_testid(browser, "confusion-matrix")
    assert [c.text for c in matrix.find_elements(By.CSS_SELECTOR, "tbody td")][:3] == ["50", "6", "4"]
    hyper_rows = by_testid(browser, "hyperparameters").find_elements(By.TAG_NAME, "tr")
    hyper = {r.get_attribute("data-key"): r.text for r in hyper_rows}
    assert hyper == {"lr": "lr 0.01", "hidden": "hidden 64"}, hyper
    params = by_testid(browser, "params").text
    assert f"project_id {done['project_id']}" in params and "provider local" in params, params

    # The trainer log: the end of the uploaded logs/trainer.log once the job ended.
    panel = wait_for(
        "the uploaded log",
        lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=log-panel][data-source=uploaded]"),
        30,
    )
    lines = panel.find_element(By.CSS_SELECTOR, "[data-testid=log-lines]").text.splitlines()
    assert lines[-1] == "iteration 2 epoch 5: loss 0.2714", lines
    assert "iteration 1 epoch 1: loss 1.2500" in lines, lines

    # Artifacts by folder: checkpoints/ collapsed until clicked.
    folders = {
        f.get_attribute("data-folder"): f
        for f in browser.find_elements(By.CSS_SELECTOR, "[data-testid=artifact-folder]")
    }
    assert set(folders) == {"checkpoints", "logs"}, list(folders)
    assert folders["checkpoints"].get_attribute("data-open") == "false"
    assert "2 files, 4.0 KiB" in folders["checkpoints"].text, folders["checkpoints"].text
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=artifacts] a[data-name^='checkpoints/']") == []
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=artifacts] a[data-name='logs/trainer.log']")
    folders["checkpoints"].click()
    checkpoint = wait_for(
        "the expanded checkpoints",
        lambda: browser.find_element(
            By.CSS_SELECTOR, "[data-testid=artifacts] a[data-name='checkpoints/iter002_model.bin']"
        ),
    )
    assert checkpoint.text == "iter002_model.bin"
    href = checkpoint.get_attribute("href") or ""
    assert f"/training/v1/jobs/{done['uuid']}/artifacts/" in href
    # The download is authenticated by the session cookie alone, as the link click is.
    fetched = browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "fetch(arguments[0]).then(async r => done([r.status, (await r.arrayBuffer()).byteLength]));",
        href,
    )
    assert fetched == [200, 2048]
    timeline = by_testid(browser, "instance-timeline")
    assert timeline.find_elements(By.CSS_SELECTOR, "rect.tl-bar"), timeline.get_attribute("outerHTML")
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=cancel]") == []  # it ended
    assert words(by_testid(browser, "wall-duration")) == wall  # frozen: the job ended

    browser.switch_to.default_content()
    assert "/plugin/training-jobs" in browser.current_url
    shot = tmp_path / "ui-finished-job.png"
    browser.set_window_size(1440, 3400)
    browser.save_screenshot(str(shot))
    browser.set_window_size(1440, 2400)
    shutil.copy(shot, SCREENSHOT)

    # Reloading the Airflow page opens the same view (with the metric chosen).
    browser.refresh()
    browser.switch_to.frame(
        wait_for("the iframe", lambda: browser.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']"))
    )
    job_view_of(browser, done["uuid"])
    assert by_testid(browser, "metric-select").get_attribute("value") == "samples"


def test_one_evaluation_is_drawn_at_its_epoch(
    browser: WebDriver, cluster: AirflowCluster, jobs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    one = jobs["one"]
    assert cluster.wait_run(DAG_ID, one["run_id"], timeout=120) == "success"
    open_page(browser, cluster, f"#/jobs/{one['uuid']}")
    job_view_of(browser, one["uuid"])
    assert wait_for("3 loss points", lambda: points(browser, "loss-chart") == 3)
    assert wait_for("5 metrics of one evaluation", lambda: points(browser, "eval-chart") == 5)
    # One point per metric, drawn (a 9 px dot), and the axis is the evaluation's epoch, not a date.
    assert inked_pixels(browser, "eval-chart") > 30
    evals = legend(browser, "eval-chart")
    assert "evaluation (epoch)" in evals.lower() and "ep 3" in evals and "0.75" in evals, evals
    screenshot(browser, tmp_path / "ui-one-evaluation.png")


def test_two_jobs_compared(
    browser: WebDriver, cluster: AirflowCluster, jobs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    done, one = jobs["done"], jobs["one"]
    assert cluster.wait_run(DAG_ID, one["run_id"], timeout=120) == "success"
    open_page(browser, cluster)
    # The table's filters are in the URL too: a reload keeps them.
    wait_for("the jobs table", lambda: row_of(browser, done["uuid"]))
    choose(by_testid(browser, "filter-status"), "completed")
    wait_for("the filter in the URL", lambda: top_url(browser).endswith("/training/ui/#/?status=completed"))
    browser.refresh()
    browser.switch_to.frame(
        wait_for("the iframe", lambda: browser.find_element(By.CSS_SELECTOR, "iframe[title='Training jobs']"))
    )
    wait_for("the filter kept", lambda: by_testid(browser, "filter-status").get_attribute("value") == "completed")
    wait_for("the completed jobs", lambda: row_of(browser, done["uuid"]))
    assert not browser.find_elements(By.CSS_SELECTOR, f"table.jobs tr[data-job='{jobs['live']['uuid']}']")
    for job in (done, one):
        wait_for(f"the row of {job['uuid']}", lambda j=job: row_of(browser, j["uuid"]))
        row_of(browser, job["uuid"]).find_element(By.CSS_SELECTOR, "[data-testid=compare-check]").click()
    assert browser.find_elements(By.CSS_SELECTOR, "[data-testid=job-view]") == []  # a tick opens nothing
    by_testid(browser, "compare-button").click()
    wait_for("the comparison", lambda: by_testid(browser, "compare-params"))
    assert top_url(browser).endswith(f"#/compare?jobs={done['uuid']},{one['uuid']}")
    # Both jobs' curves overlaid: 2 x 5 + 3 points, each job in its colour.
    assert wait_for("13 points", lambda: points(browser, "compare-chart") == 13)
    assert inked_pixels(browser, "compare-chart") > 200
    red = browser.execute_script(
        "const c = document.querySelector('[data-testid=compare-chart] canvas');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (d[i + 3] > 200 && d[i] > 180 && d[i + 1] < 80 && d[i + 2] < 80) n++;"
        "return n;"
    )
    assert red > 100, red  # the second job (#dc2626)
    text = legend(browser, "compare-chart")
    assert done["uuid"][:8] in text and one["uuid"][:8] in text, text
    # Side by side: only what differs is highlighted.
    rows = {
        r.get_attribute("data-key"): r
        for r in browser.find_elements(By.CSS_SELECTOR, "[data-testid=compare-params] tr[data-key]")
    }
    assert rows["config.lr"].get_attribute("data-differs") == "true"
    assert "differs" in (rows["config.lr"].get_attribute("class") or "")
    assert rows["config.lr"].text.split() == ["config.lr", "0.01", "0.05"]
    assert rows["config.hidden"].get_attribute("data-differs") == "false"
    assert rows["provider"].get_attribute("data-differs") == "false"
    assert rows["project_id"].get_attribute("data-differs") == "true"
    assert rows["last evaluation.f1"].get_attribute("data-differs") == "true"
    screenshot(browser, tmp_path / "ui-compare.png")


#: The long job's size: two iterations of 5,000 epochs (10 to a bucket), more evaluations than the
#: page holds.
LONG_EPOCHS = 5_000
LONG_EVALS = 3_000


def test_a_long_jobs_chart_is_paged_in(
    browser: WebDriver, cluster: AirflowCluster, store: ResultsStore, tmp_path: Path
) -> None:
    """10,000 epochs: the page reads the job's details without epochs, a series of ~1000 buckets
    (each iteration's curve with its lowest-to-highest band, a one-epoch spike kept) and the latest
    2,000 evaluations in pages, a few hundred kB in all, where /details once sent every epoch."""
    run_id = f"ui_long__{time.time_ns()}"
    job = store.create_job(
        project_id="ui-long", provider="local", runtime="process", params={"config": {}}, dag_id=DAG_ID, run_id=run_id
    )
    store.update_job(job, status="completed")
    job_id = store.job(job).id
    stamp = store.job(job).created_at
    try:
        with store.engine.begin() as conn:
            conn.execute(insert(TrainingIteration.__table__), [{"job_id": job_id, "iteration": it} for it in (1, 2)])
            conn.execute(
                insert(EpochTrain.__table__),
                [
                    {
                        "job_id": job_id,
                        "iteration": it,
                        "epoch": ep,
                        "avg_loss": 9.0 if (it, ep) == (1, 2_501) else it * (0.5 + 1 / ep),
                        "metrics": {"val_loss": it * (0.25 + 1 / ep)},
                        "completed_at": stamp,
                    }
                    for it in (1, 2)
                    for ep in range(1, LONG_EPOCHS + 1)
                ],
            )
            conn.execute(
                insert(Eval.__table__),
                [
                    {"job_id": job_id, "iteration": 2, "epoch": ep, "accuracy": ep / LONG_EVALS, "evaluated_at": stamp}
                    for ep in range(1, LONG_EVALS + 1)
                ],
            )
        open_page(browser, cluster, f"#/jobs/{job}")
        job_view_of(browser, job)
        try:
            chart = wait_for(
                "the banded chart",
                lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=loss-chart][data-banded=true]"),
                120,
            )
        except AssertionError as err:  # what the page shows instead, and a picture of it
            screenshot(browser, tmp_path / "ui-long-job-timeout.png")
            shown = browser.execute_script("return document.body.innerText")[:3000]
            raise AssertionError(f"{err}; the page shows: {shown}") from None
        assert 0 < points(browser, "loss-chart") <= 1000  # 500 buckets an iteration
        assert chart.get_attribute("data-points") == "1000"
        assert wait_for("the curves drawn", lambda: inked_pixels(browser, "loss-chart") > 200)
        note = by_testid(browser, "chart-note").text
        assert "10,000 epochs" in note and "shaded from their lowest to highest" in note, note
        text = legend(browser, "loss-chart")
        assert "iteration 1" in text.lower() and "high" not in text.lower(), text  # band edges not listed
        assert "0.5" in text, text  # iteration 1's last epoch (0.5002; iteration 2's is 1)
        evals_note = by_testid(browser, "evals-note").text
        assert "The latest 2,000 of 3,000 evaluations" in evals_note, evals_note
        assert points(browser, "eval-chart") == 2000

        # What the page read: no epoch row, the series, the evaluations in pages: little.
        reads = browser.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(e => e.name.includes('/training/v1/jobs/' + arguments[0]))"
            ".map(e => [e.name, e.encodedBodySize]);",
            job,
        )
        details = [url for url, _ in reads if "/details" in url]
        assert details and all("epochs_limit=0" in url and "evals_limit=0" in url for url in details), reads
        assert [url for url, _ in reads if "/series" in url], reads
        assert not [url for url, _ in reads if "/epochs" in url], reads
        total = sum(size for _, size in reads)
        assert total < 1_000_000, reads  # /details alone was ~1.75 MB for this job (~35 MB at 200,000 epochs)
        # The val_loss series' first read fails (the connection dropped): the page says so and
        # reads it again, rather than showing "Loading val_loss…" until a reload.
        browser.execute_cdp_cmd("Network.enable", {})
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*metric=val_loss*"]})
        choose(by_testid(browser, "metric-select"), "val_loss")
        try:
            wait_for(
                "the failed read shown",
                lambda: "Failed to fetch" in browser.find_element(By.CSS_SELECTOR, "p.error").text,
                60,
            )
            assert "Loading val_loss" in browser.find_element(By.CSS_SELECTOR, "[data-testid=job-view]").text
            browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": []})
            wait_for("the val_loss series", lambda: "0.25" in legend(browser, "loss-chart"), 120)
            assert not browser.find_elements(By.CSS_SELECTOR, "p.error")
        except AssertionError as err:
            screenshot(browser, tmp_path / "ui-long-job-val-loss-timeout.png")
            raise AssertionError(f"{err}; {what_the_page_shows(browser, '/series')}") from None
        assert inked_pixels(browser, "loss-chart") > 200
        screenshot(browser, tmp_path / "ui-long-job.png")
    finally:
        with store.engine.begin() as conn:
            conn.execute(delete(TrainingJob).where(TrainingJob.run_id == run_id))


def test_the_jobs_of_a_dag_run(
    browser: WebDriver, cluster: AirflowCluster, store: ResultsStore, jobs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    """``#/runs/<dag_id>/<run_id>``: the dag run's "Training" tab and the tasks' extra link."""
    done = jobs["done"]
    # One job: its view, in place.
    open_page(browser, cluster, f"#/runs/{DAG_ID}/{quote(done['run_id'], safe='')}?stage=&map_index=-1")
    job_view_of(browser, done["uuid"])
    # Several (a sweep's trials, as register_job records them): a table of them.
    run_id = f"ui_sweep__{time.time_ns()}"
    trials = [
        store.create_job(
            project_id="ui-sweep", provider="local", runtime="process", params={"config": {"lr": lr}},
            dag_id=DAG_ID, run_id=run_id, stage="trial", map_index=i,
        )
        for i, lr in enumerate((0.1, 0.01))
    ]  # fmt: skip
    try:
        open_page(browser, cluster, f"#/runs/{DAG_ID}/{run_id}")
        table = wait_for("the run's jobs", lambda: by_testid(browser, "run-jobs"))
        rows = table.find_elements(By.CSS_SELECTOR, "tr[data-job]")
        assert [r.get_attribute("data-job") for r in rows] == trials
        assert [r.text.split()[1:3] for r in rows] == [["trial", "#0"], ["trial", "#1"]]
        compare_all = by_testid(browser, "compare-all").get_attribute("href") or ""
        assert compare_all.endswith(f"#/compare?jobs={trials[0]},{trials[1]}"), compare_all
        screenshot(browser, tmp_path / "ui-run-jobs.png")
        # One trial of it (the "Training job" link of a mapped task).
        open_page(browser, cluster, f"#/runs/{DAG_ID}/{run_id}?stage=trial&map_index=1")
        view = job_view_of(browser, trials[1])
        assert "TRIAL trial #1" in words(by_testid(browser, "job-header"))
        finalize = view.find_element(By.CSS_SELECTOR, "[data-testid=task-link][data-task=finalize]")
        run_url = f"{cluster.base_url}/dags/{DAG_ID}/runs/{run_id}"
        assert finalize.get_attribute("href") == f"{run_url}/tasks/trial.finalize/mapped/1"
        # None, and Airflow has no such run.
        open_page(browser, cluster, f"#/runs/{DAG_ID}/{run_id}?stage=trial&map_index=7")
        empty = wait_for("the empty run", lambda: by_testid(browser, "no-job"))
        assert "No training job in this run" in by_testid(browser, "run-view").text
        link = empty.find_element(By.CSS_SELECTOR, "[data-testid=register-log-link]")
        assert link.get_attribute("href") == f"{run_url}/tasks/trial.register_job/mapped/7"
        assert link.get_attribute("target") == "_top"
        wait_for("Airflow's answer", lambda: browser.find_element(By.CSS_SELECTOR, "[data-state=absent]"))
    finally:  # rows without a dag run: gone again, for the package's other tests
        with store.engine.begin() as conn:
            conn.execute(delete(TrainingJob).where(TrainingJob.run_id == run_id))

    # None, because register_job refused the run's params: said so, with its log.
    refused = jobs["refused"]["run_id"]
    open_page(browser, cluster, f"#/runs/{DAG_ID}/{quote(refused, safe='')}")
    state = wait_for(
        "register_job failed",
        lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=register-state][data-state=failed]"),
        90,
    )
    assert state.text.startswith("register_job failed: it refused this run's params"), state.text
    link = by_testid(browser, "register-log-link")
    assert (
        link.get_attribute("href")
        == f"{cluster.base_url}/dags/{DAG_ID}/runs/{quote(refused, safe='')}/tasks/register_job"
    )
    screenshot(browser, tmp_path / "ui-run-without-job.png")


def test_a_running_job_updates_live_and_is_cancelled(
    browser: WebDriver, cluster: AirflowCluster, jobs: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    live = jobs["live"]
    open_page(browser, cluster, f"#/jobs/{live['uuid']}")
    wait_for("the live marker", lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=live]"), 60)
    first = wait_for("a first loss point", lambda: points(browser, "loss-chart"), 60)
    wait_for("more loss points, pushed by the stream", lambda: points(browser, "loss-chart") >= first + 2, 30)
    # The trainer log's last lines, live (stored by the follower every ~2 s).
    panel = wait_for(
        "the live log",
        lambda: browser.find_element(By.CSS_SELECTOR, "[data-testid=log-panel][data-source=live]"),
        30,
    )
    seen = wait_for("log lines", lambda: panel.find_element(By.CSS_SELECTOR, "[data-testid=log-lines]").text, 30)
    assert "epoch 1 done" in seen, seen
    wait_for(
        "newer log lines",
        lambda: (
            panel.find_element(By.CSS_SELECTOR, "[data-testid=log-lines]").text.splitlines()[-1]
            != seen.splitlines()[-1]
        ),
        30,
    )
    # Durations tick while it runs.
    wall = by_testid(browser, "wall-duration").text
    wait_for("the wall time ticking", lambda: by_testid(browser, "wall-duration").text != wall, 5)
    assert "GPU" not in by_testid(browser, "job-header").text
    screenshot(browser, tmp_path / "ui-running-job.png")

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
    assert words(by_testid(browser, "cancelled-by")) == "CANCELLED BY admin"
    # A job that ended never ticks, though its finalize (completed_at) is still to come.
    wall, training = by_testid(browser, "wall-duration").text, by_testid(browser, "training-duration").text
    time.sleep(2.5)
    assert (by_testid(browser, "wall-duration").text, by_testid(browser, "training-duration").text) == (wall, training)
    screenshot(browser, tmp_path / "ui-cancelled-job.png")


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
        # Nor its details, re-read every few seconds.
        browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["*/stream", "*/details"]})
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
