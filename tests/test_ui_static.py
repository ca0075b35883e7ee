"""The Training jobs page's static files (``gpu_training/api/ui.py``), built or not."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

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
