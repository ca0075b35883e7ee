"""The Training jobs page: the static build of ``include/ui`` served at ``/training/ui/``.

The Airflow UI shows it in an iframe (the plugin's ``external_views`` entry, "Training jobs" in the
nav bar). The page calls ``/training/v1`` from the same origin, so the browser sends the Airflow UI's
``_token`` cookie and the API authenticates the signed-in user; the static files themselves hold no
data and need no authentication. The build (``make ui``: ``npm ci && npm run build`` in
``include/ui``) writes ``plugins/gpu_training/ui_dist/``, which is not committed: without it the page
answers 503 saying so, and the rest of the plugin works as before.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from fastapi.responses import FileResponse, PlainTextResponse, RedirectResponse, Response

#: Where ``npm run build`` (include/ui/vite.config.js) writes the page.
UI_DIST = Path(__file__).resolve().parents[1] / "ui_dist"

NOT_BUILT = (
    "The Training jobs page is not built: {index} is missing.\n"
    "Build it from the repository root with `make ui` (runs `npm ci && npm run build` in include/ui; "
    "needs Node.js 20 and npm), then reload. The results API under /training/v1 works without it.\n"
)

router = APIRouter(prefix="/ui", include_in_schema=False)


@router.get("")
def ui_slash(request: Request) -> RedirectResponse:
    """``/training/ui`` -> ``/training/ui/`` (the page's asset and API URLs are relative)."""
    return RedirectResponse(request.url.path + "/", status_code=status.HTTP_307_TEMPORARY_REDIRECT)


@router.get("/", response_model=None)
def ui_index(request: Request) -> Response:
    index = getattr(request.app.state, "ui_dist", UI_DIST) / "index.html"
    if not index.is_file():
        return PlainTextResponse(NOT_BUILT.format(index=index), status_code=status.HTTP_503_SERVICE_UNAVAILABLE)
    # Not cached: a rebuild names new hashed assets.
    return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/assets/{name}")
def ui_asset(name: str, request: Request) -> FileResponse:
    """A built asset (content-hashed names, so cached for a year)."""
    dist: Path = getattr(request.app.state, "ui_dist", UI_DIST)
    assets = (dist / "assets").resolve()
    path = (assets / name).resolve()
    if path.parent != assets or not path.is_file():
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no asset {name!r}")
    return FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})
