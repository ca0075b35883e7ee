"""The Training jobs page's static files (``gpu_training/api/ui.py``), built or not."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from gpu_training.api.app import create_app


@pytest.fixture
def client_for(tmp_path: Path) -> Callable[[bool], TestClient]:
    def make(built: bool) -> TestClient:
        dist = tmp_path / "ui_dist"
        if built:
            (dist / "assets").mkdir(parents=True)
            (dist / "index.html").write_text('<script type="module" src="./assets/index-abc.js"></script>')
            (dist / "assets" / "index-abc.js").write_text("console.log(1)")
        (tmp_path / "secret.txt").write_text("no")
        app = create_app()
        app.state.ui_dist = dist
        return TestClient(app, follow_redirects=False)

    return make


def test_served_when_built(client_for: Callable[[bool], TestClient]) -> None:
    client = client_for(True)
    page = client.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.headers["cache-control"] == "no-cache"
    asset = client.get("/ui/assets/index-abc.js")
    assert asset.status_code == 200 and "immutable" in asset.headers["cache-control"]
    redirect = client.get("/ui")
    assert redirect.status_code == 307 and redirect.headers["location"] == "/ui/"
    assert client.get("/ui/assets/nope.js").status_code == 404
    assert client.get("/ui/assets/..%2F..%2Fsecret.txt").status_code == 404
    # Not part of the API's schema.
    assert not any(path.startswith("/ui") for path in client.get("/openapi.json").json()["paths"])


def test_503_says_how_to_build_it(client_for: Callable[[bool], TestClient]) -> None:
    client = client_for(False)
    page = client.get("/ui/")
    assert page.status_code == 503
    assert "make ui" in page.text and "npm ci && npm run build" in page.text
    assert client.get("/ui/assets/index-abc.js").status_code == 404


# --- the page's pure modules, run by Node (the page's own toolchain): routes and chart data --------

NODE = shutil.which("node")
UI_SRC = Path(__file__).resolve().parents[1] / "include" / "ui" / "src"


def run_node(script: str) -> Any:
    """``script`` as an ES module that ``print``s one JSON value (the page's modules imported)."""
    prelude = (
        f'import * as router from "{(UI_SRC / "router.js").as_uri()}";\n'
        f'import * as metrics from "{(UI_SRC / "metrics.js").as_uri()}";\n'
        "const print = (v) => console.log(JSON.stringify(v));\n"
    )
    assert NODE
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", prelude + script], capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(done.stdout)


@pytest.mark.skipif(NODE is None, reason="needs node (the page's build tool)")
def test_routes_round_trip_run_ids_and_filters() -> None:
    run_id = "manual__2026-12-07T18:33:10.173685+00:00"
    got = run_node(
        f"""
        const run = {json.dumps(run_id)};
        print([
          router.parseHash("#/runs/gpu_training/" + encodeURIComponent(run) + "?stage=trial&map_index=3"),
          router.parseHash("#/runs/gpu_training/" + run),
          router.parseHash(router.runHref("retrain_x", run, {{ stage: "sft" }})),
          router.parseHash("#/jobs/abc?metric=val_loss"),
          router.parseHash("#/?status=failed&project_id=p&offset=50"),
          router.parseHash(""),
          router.parseHash("#/compare?jobs=a,b"),
          router.compareHref(["a", "b"], {{ metric: "lr" }}),
          router.href([], {{ status: "", project_id: "p q", offset: 0 }}),
          router.airflowBase("http://h:8080/base/training/ui/#/jobs/x"),
          router.airflowBase("http://localhost:5173/"),
          router.taskId("trial", "finalize"),
          router.taskId("", "finalize"),
        ]);
        """
    )
    assert got[0] == {
        "name": "run",
        "dagId": "gpu_training",
        "runId": run_id,
        "query": {"stage": "trial", "map_index": "3"},
    }
    assert got[1]["runId"] == run_id  # unencoded ("+" is not a space in a path)
    assert got[2] == {"name": "run", "dagId": "retrain_x", "runId": run_id, "query": {"stage": "sft"}}
    assert got[3] == {"name": "job", "uuid": "abc", "query": {"metric": "val_loss"}}
    assert got[4] == {"name": "jobs", "query": {"status": "failed", "project_id": "p", "offset": "50"}}
    assert got[5] == {"name": "jobs", "query": {}}
    assert got[6] == {"name": "compare", "query": {"jobs": "a,b"}}
    assert got[7] == "#/compare?jobs=a,b&metric=lr"
    assert got[8] == "#/?project_id=p+q&offset=0"
    assert got[9:] == ["http://h:8080/base/", "http://localhost:5173/", "trial.finalize", "finalize"]


@pytest.mark.skipif(NODE is None, reason="needs node (the page's build tool)")
def test_chart_data_every_stored_metric_and_evaluations_by_epoch() -> None:
    got = run_node(
        """
        const e = (iteration, epoch, avg_loss, m) => ({ iteration, epoch, avg_loss, metrics: m });
        const its = [
          {
            iteration: 1,
            epochs: [
              e(1, 1, 0.9, { val_loss: 1.0, lr: 0.1, note: "x", avg_loss: 0.9 }),
              e(1, 2, 0.5, { val_loss: 0.7 }),
            ],
          },
          { iteration: 2, epochs: [e(2, 1, null, { lr: 0.05 })] },
        ];
        const rowsOf = (iterations) => iterations.flatMap((it) => it.epochs);  // as the stream brings them
        const one = [{ id: 1, iteration: 1, epoch: 5 }];
        const two = [
          { id: 2, iteration: 2, epoch: 5 }, { id: 1, iteration: 1, epoch: 5 }, { id: 3, iteration: 2, epoch: 0 },
        ];
        print([
          metrics.epochMetricNames(its),
          metrics.seriesChart([{ prefix: "", series: null, live: rowsOf(its) }], "val_loss"),
          metrics.seriesChart([{ prefix: "j1", series: null, live: rowsOf(its), color: "#f00" }], "lr")
            .series.map((s) => [s.label, s.dash ?? null]),
          metrics.evalPoints(one).labels,
          metrics.evalPoints(two).labels,
          metrics.latestEval(two).id,
        ]);
        """
    )
    assert got[0] == ["avg_loss", "lr", "val_loss"]  # numbers only, avg_loss first
    assert got[1] == {"x": [1, 2], "series": [{"label": "iteration 1", "values": [1.0, 0.7]}]}
    assert got[2] == [["j1 iteration 1", None], ["j1 iteration 2", [6, 4]]]
    assert got[3] == ["ep 5"]
    assert got[4] == ["1/5", "it 2", "2/5"]
    assert got[5] == 2


@pytest.mark.skipif(NODE is None, reason="needs node (the page's build tool)")
def test_chart_of_a_downsampled_series_and_the_epochs_streamed_after_it() -> None:
    """The chart of a long job: the API's series (buckets: last epoch, value, low, high), a band
    where a point stands for several epochs, then the stream's epochs after the series' last one."""
    got = run_node(
        """
        const series = {
          metric: "avg_loss", metrics: ["avg_loss", "lr"], cursor: "10-0",
          iterations: [
            { iteration: 1, epochs: [60, 120], values: [0.5, 0.25], low: [0.4, 0.2], high: [9, 0.3], counts: [60, 60] },
            { iteration: 2, epochs: [1, 2], values: [0.9, 0.8], low: [0.9, 0.8], high: [0.9, 0.8], counts: [1, 1] },
          ],
        };
        const live = [
          { id: 11, iteration: 2, epoch: 2, avg_loss: 0.7, metrics: {} },  // already in the series
          { id: 12, iteration: 2, epoch: 3, avg_loss: 0.6, metrics: { lr: 0.1, note: "x" } },
          { id: 13, iteration: 3, epoch: 1, avg_loss: 1.5, metrics: {} },
        ];
        const chart = metrics.seriesChart([{ prefix: "", series, live }], "avg_loss");
        const rows = [{ id: 1, iteration: 1, epoch: 2 }, { id: 2, iteration: 1, epoch: 1 }];
        print([
          chart.x,
          chart.series.map((s) => [s.label, s.role ?? null, s.values]),
          metrics.seriesChart([{ prefix: "", series, live }], "lr").series.map((s) => [s.label, s.values]),
          metrics.metricNames(series, live),
          metrics.chosenMetric(["avg_loss", "lr"], "lr"),
          metrics.chosenMetric(["avg_loss", "lr"], "nope"),
          metrics.chosenMetric(["lr"], undefined),
          metrics.mergeRows(rows, [{ id: 3, iteration: 0, epoch: 9 }, rows[0]], 2).map((r) => r.id),
          metrics.mergeRows(rows, [rows[0]], 5) === rows,
        ]);
        """
    )
    assert got[0] == [1, 2, 3, 60, 120]
    n = None
    assert got[1] == [
        ["iteration 1", None, [n, n, n, 0.5, 0.25]],
        ["iteration 1 high", "high", [n, n, n, 9, 0.3]],
        ["iteration 1 low", "low", [n, n, n, 0.4, 0.2]],
        ["iteration 2", None, [0.9, 0.8, 0.6, n, n]],  # epoch 2 from the series, 3 from the stream
        ["iteration 3", None, [1.5, n, n, n, n]],
    ]
    assert got[2] == [["iteration 2", [n, n, 0.1]]]  # the series is of avg_loss: only the stream's lr
    assert got[3] == ["avg_loss", "lr"]
    assert got[4:7] == ["lr", "avg_loss", "lr"]
    assert got[7] == [2, 1] and got[8] is True
