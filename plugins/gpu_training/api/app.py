"""The FastAPI app of the results API: factory, lifespan and error handlers.

The plugin mounts it on the api-server under ``/training`` (OpenAPI at ``/training/openapi.json``,
Swagger UI at ``/training/docs``). Its lifespan (entered by the api-server's own) hands the
api-server's auth manager to the security dependencies.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from gpu_training import __version__
from gpu_training.api.commands import RunFailer
from gpu_training.api.stream import StreamSettings
from gpu_training.errors import JobNotFoundError, ResultsDbError, StorageError

TITLE = "GPU training results"

#: The whole body of every 503: where the database is (URL, host, path, driver) and why it failed
#: are logged on the api-server, never sent to a client, who may be anyone before authentication.
UNAVAILABLE = "the results database is unavailable"

#: What a results DB that cannot be reached raises: ResultsDbError (not migrated, or unreachable when
#: first opened), and SQLAlchemy's errors of a connection refused, reset or timed out, at connect or
#: in the middle of a query (OperationalError and InterfaceError are DBAPIErrors), or of a pool with
#: no connection left to give.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (ResultsDbError, DBAPIError, DisconnectionError, PoolTimeoutError)

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    if getattr(app.state, "auth_manager", None) is None:
        from airflow.api_fastapi.app import get_auth_manager

        app.state.auth_manager = get_auth_manager()
    yield


async def _job_not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)


async def _results_db_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.error("%s %s: %s: %s", request.method, request.url.path, UNAVAILABLE, exc, exc_info=exc)
    return JSONResponse({"detail": UNAVAILABLE}, status_code=status.HTTP_503_SERVICE_UNAVAILABLE)


async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": f"storage error: {exc}"}, status_code=status.HTTP_502_BAD_GATEWAY)


def create_app(*, stream_settings: StreamSettings | None = None, fail_run: RunFailer | None = None) -> FastAPI:
    """The results API app (routes under ``/v1``).

    ``fail_run`` marks a cancelled job's dag run failed; by default in-process through the
    api-server's own service (:func:`gpu_training.api.airflow_runs.fail_dag_run`).
    """
    from gpu_training.api import param_refusals
    from gpu_training.api.airflow_runs import fail_dag_run
    from gpu_training.api.routes import router
    from gpu_training.api.ui import router as ui_router

    # This app is built by the api-server (the plugin's fastapi_apps): its trigger refusals of our
    # params are explained in words from here on.
    param_refusals.install()
    app = FastAPI(
        title=TITLE,
        version=__version__,
        description=(
            "Training jobs, their metrics, evaluations and artifacts from the results database, "
            "with live progress as Server-Sent Events. Authenticate as for Airflow's REST API "
            "(`Authorization: Bearer <token from POST /auth/token>`); access is per DAG."
        ),
        lifespan=lifespan,
    )
    app.state.stream_settings = stream_settings or StreamSettings()
    app.state.fail_run = fail_run if fail_run is not None else fail_dag_run
    app.include_router(router)
    app.include_router(ui_router)
    app.add_exception_handler(JobNotFoundError, _job_not_found)
    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, _results_db_unavailable)
    app.add_exception_handler(StorageError, _storage_error)
    return app
