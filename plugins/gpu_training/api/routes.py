"""The endpoints of the results API (``/training/v1/...`` once mounted).

Every request is authenticated first (the router's first dependency: 401 before anything else, the
results DB untouched), a state-changing one made with the session cookie then checked for its
origin (:func:`gpu_training.api.auth.same_origin_unless_bearer`). DB work runs in FastAPI's thread
pool (plain ``def`` endpoints, ``run_in_threadpool`` in the stream), never on the api-server's event
loop, and every answer is bounded: a job's epochs and evaluations come a page at a time.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

from airflow.api_fastapi.core_api.security import get_user
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response, StreamingResponse
from pydantic import BeforeValidator
from pydantic_core import to_json
from starlette.concurrency import run_in_threadpool

from gpu_training.api import commands, output_files, queries, trainer_log
from gpu_training.api.auth import DagAccess, DagAccessDep, same_origin_unless_bearer
from gpu_training.api.db import StoreDep
from gpu_training.api.schemas import (
    EpochPage,
    EvaluationList,
    EvaluationPage,
    IterationEpochs,
    Job,
    JobDetails,
    JobList,
    JobLog,
    MetricSeries,
    ModelDetails,
    ModelList,
)
from gpu_training.api.stream import CURSOR_PATTERN, StreamSettings, job_events
from gpu_training.errors import StorageError
from gpu_training.results.models import JOB_STATUSES, TrainingJob
from gpu_training.results.store import ResultsStore
from gpu_training.storage import parse_uri, presigned_get_url

log = logging.getLogger(__name__)


def single_valued_query(request: Request) -> None:
    """Every query parameter of this API takes one value: a repeated one (``?provider=a&provider=b``)
    is refused with 422 rather than half read."""
    repeated = sorted({key for key in request.query_params if len(request.query_params.getlist(key)) > 1})
    if repeated:
        raise RequestValidationError(
            [
                {
                    "type": "repeated_parameter",
                    "loc": ["query", key],
                    "msg": f"query parameter {key!r} takes one value, got {len(request.query_params.getlist(key))}",
                    "input": request.query_params.getlist(key),
                }
                for key in repeated
            ]
        )


# In this order: who asks (401), whether a cookie's request comes from our pages (403), then the rest.
router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(get_user), Depends(same_origin_unless_bearer), Depends(single_valued_query)],
)

#: Lifetime of a presigned artifact URL.
PRESIGNED_EXPIRY_SECONDS = 600

Responses = dict[int | str, dict[str, Any]]

NOT_FOUND: Responses = {404: {"description": "no such job (a malformed uuid is an unknown job too)"}}
MODEL_NOT_FOUND: Responses = {404: {"description": "no decision of this model name (in a DAG the user can read)"}}
FORBIDDEN: Responses = {
    401: {"description": "not authenticated"},
    403: {"description": "no access to the job's DAG"},
    503: {"description": "the results database is unreachable or not migrated (the body names no location)"},
}

#: The widest integer a results DB column holds (SQLite INTEGER, PostgreSQL BIGINT): a larger one
#: could not even be bound as a parameter (SQLite: OverflowError), so it is a 422, not a 500.
INT64_MAX = 2**63 - 1
#: The widest value of an INTEGER column (``map_index``) on PostgreSQL.
INT32_MAX = 2**31 - 1

Limit = Annotated[int, Query(ge=1, le=500, description="page size, 1 to 500")]
Offset = Annotated[int, Query(ge=0, le=INT64_MAX)]
DbInt = Annotated[int, PathParam(ge=-INT64_MAX - 1, le=INT64_MAX)]
RowLimit = Annotated[int, Query(ge=1, le=queries.MAX_PAGE, description=f"page size, 1 to {queries.MAX_PAGE}")]
IterationFilter = Annotated[int | None, Query(ge=-INT64_MAX - 1, le=INT64_MAX, description="only this iteration's")]


def _not_a_number(value: Any) -> Any:
    """Pydantic reads a number as seconds since the epoch: ``since=0.5`` would mean 1970, silently.
    Only ISO 8601 is documented, so a number is a 422."""
    if isinstance(value, int | float) or (isinstance(value, str) and _is_number(value)):
        raise ValueError("expected an ISO 8601 date or date-time, not a number")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def json_response(content: Any) -> Response:
    """``content`` (plain dicts and lists of a response model's fields) as the JSON FastAPI writes
    for that model: pydantic's serializer (ISO 8601 datetimes, a non-finite float as null), without
    validating thousands of rows on the way out. The route still declares the model (OpenAPI)."""
    return Response(to_json(content, inf_nan_mode="null"), media_type="application/json")


def readable_job(store: ResultsStore, access: DagAccess, job_uuid: str) -> TrainingJob:
    """The job, 404 if unknown, 403 if its DAG is not readable by the user."""
    job = queries.job(store, job_uuid)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no training job {job_uuid!r}")
    access.require_read(job.dag_id)
    return job


def readable_dags(store: ResultsStore, access: DagAccess) -> set[str] | None:
    """DAG ids to restrict a list to, or None when the user can read every DAG that has jobs."""
    every = queries.dag_ids(store)
    allowed = access.readable(every)
    return None if allowed >= every else allowed


def readable_model_dags(store: ResultsStore, access: DagAccess) -> set[str] | None:
    """DAG ids to restrict promotion decisions (and the previous champions' jobs) to, or None when
    the user can read every DAG that has jobs or decisions."""
    every = queries.dag_ids(store) | queries.model_dag_ids(store)
    allowed = access.readable(every)
    return None if allowed >= every else allowed


@router.get("/jobs", response_model=JobList, responses=FORBIDDEN)
def list_jobs(
    store: StoreDep,
    access: DagAccessDep,
    status_: Annotated[
        str | None, Query(alias="status", pattern="^(" + "|".join(JOB_STATUSES) + ")$", description="job status")
    ] = None,
    project_id: str | None = None,
    provider: str | None = None,
    since: Annotated[
        datetime | None,
        BeforeValidator(_not_a_number),
        Query(description="created at or after (ISO 8601; naive: UTC)"),
    ] = None,
    dag_id: Annotated[str | None, Query(description="jobs of this DAG")] = None,
    run_id: Annotated[str | None, Query(description="jobs of this dag run (with dag_id: one run)")] = None,
    stage: Annotated[str | None, Query(description='pipeline stage (task group); "" for a single job')] = None,
    map_index: Annotated[
        int | None, Query(ge=-1, le=INT32_MAX, description="a sweep trial's map index; -1 when not mapped")
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> Response:
    """Jobs, newest first, of the DAGs the user can read."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=UTC)
    filters = queries.JobFilters(
        status=status_,
        project_id=project_id,
        provider=provider,
        since=since,
        dag_id=dag_id,
        run_id=run_id,
        stage=stage,
        map_index=map_index,
    )
    jobs, total = queries.list_jobs(store, filters, readable=readable_dags(store, access), limit=limit, offset=offset)
    return json_response({"jobs": jobs, "total": total, "limit": limit, "offset": offset})


@router.get("/jobs/{job_uuid}", response_model=Job, responses={**NOT_FOUND, **FORBIDDEN})
def get_job(job_uuid: str, store: StoreDep, access: DagAccessDep) -> Job:
    return Job.of(readable_job(store, access, job_uuid))


@router.get("/jobs/{job_uuid}/details", response_model=JobDetails, responses={**NOT_FOUND, **FORBIDDEN})
def get_job_details(
    job_uuid: str,
    store: StoreDep,
    access: DagAccessDep,
    epochs_limit: Annotated[
        int,
        Query(
            ge=0,
            le=queries.MAX_PAGE,
            description=f"at most this many epochs, in (iteration, epoch) order (0 to {queries.MAX_PAGE}; 0: none)",
        ),
    ] = queries.DETAILS_PAGE,
    epochs_offset: Annotated[int, Query(ge=0, le=INT64_MAX, description="after this many epochs")] = 0,
    evals_limit: Annotated[
        int,
        Query(ge=0, le=queries.MAX_PAGE, description="at most this many evaluations, in (iteration, epoch) order"),
    ] = queries.DETAILS_PAGE,
    evals_offset: Annotated[int, Query(ge=0, le=INT64_MAX, description="after this many evaluations")] = 0,
) -> Response:
    """The job with its iterations (steps, and one page of its epochs and of its evaluations: by
    default the first 500 of each), artifacts and instances, with ``epochs_total``, ``evals_total``
    and the latest evaluation. The rest of the epochs and evaluations: ``epochs_offset`` /
    ``evals_offset``, ``/epochs``, ``/evaluations``, or a chart's ``/series``. A page holds fewer
    rows than its limit when they would pass 4 MiB (continue from its offset plus the rows it
    has); a value a trainer made larger than its cap (e.g. metrics over 16 KiB) is null."""
    job = readable_job(store, access, job_uuid)
    page = queries.job_details(
        store,
        job,
        epochs=queries.Page(epochs_limit, epochs_offset),
        evals=queries.Page(evals_limit, evals_offset),
    )
    return json_response(page)


@router.get("/jobs/{job_uuid}/epochs", response_model=EpochPage, responses={**NOT_FOUND, **FORBIDDEN})
def get_job_epochs(
    job_uuid: str,
    store: StoreDep,
    access: DagAccessDep,
    iteration: IterationFilter = None,
    limit: RowLimit = queries.DETAILS_PAGE,
    offset: Offset = 0,
) -> Response:
    """The job's epochs a page at a time, in (iteration, epoch) order, and how many there are (fewer
    than ``limit`` when they would pass 4 MiB: the next page starts at ``offset`` + those received)."""
    job = readable_job(store, access, job_uuid)
    rows, total = queries.epochs_page(store, job, queries.Page(limit, offset), iteration)
    return json_response(
        {"job_uuid": job.uuid, "iteration": iteration, "epochs": rows, "total": total, "limit": limit, "offset": offset}
    )


@router.get("/jobs/{job_uuid}/evaluations", response_model=EvaluationPage, responses={**NOT_FOUND, **FORBIDDEN})
def get_job_evaluations(
    job_uuid: str,
    store: StoreDep,
    access: DagAccessDep,
    iteration: IterationFilter = None,
    limit: RowLimit = queries.DETAILS_PAGE,
    offset: Offset = 0,
) -> Response:
    """The job's evaluations a page at a time, in (iteration, epoch) order, and how many there are
    (fewer than ``limit`` when they would pass 4 MiB: the next page starts at ``offset`` + those
    received)."""
    job = readable_job(store, access, job_uuid)
    rows, total = queries.evaluations_page(store, job, queries.Page(limit, offset), iteration)
    return json_response(
        {
            "job_uuid": job.uuid,
            "iteration": iteration,
            "evaluations": rows,
            "total": total,
            "limit": limit,
            "offset": offset,
        }
    )


@router.get("/jobs/{job_uuid}/series", response_model=MetricSeries, responses={**NOT_FOUND, **FORBIDDEN})
def get_metric_series(
    job_uuid: str,
    store: StoreDep,
    access: DagAccessDep,
    metric: Annotated[
        str,
        Query(pattern=queries.METRIC_PATTERN, description="avg_loss, or a key of the epochs' metrics"),
    ] = "avg_loss",
    points: Annotated[
        int,
        Query(
            ge=1,
            le=queries.MAX_SERIES_POINTS,
            description="buckets in all, shared by the iterations shown (each gets at least one)",
        ),
    ] = 500,
) -> Response:
    """A per-epoch metric for a chart, downsampled in the database: the last 50 iterations with
    epochs, each in buckets of consecutive epochs (the value at the bucket's last epoch, its lowest
    and highest), every epoch when they fit; with the names of the metrics and the stream cursor to
    follow the job from."""
    job = readable_job(store, access, job_uuid)
    return json_response(queries.metric_series(store, job, metric, points))


@router.get("/jobs/{job_uuid}/log", response_model=JobLog, responses={**NOT_FOUND, **FORBIDDEN})
def get_job_log(
    job_uuid: str,
    store: StoreDep,
    access: DagAccessDep,
    lines: Annotated[int, Query(ge=1, le=2000, description="at most this many of the last lines")] = 200,
) -> JobLog:
    """The last lines of the trainer log: while the job has not ended, those the follower stores
    every ~2 s (``source`` live); once it ended, the end of the uploaded ``logs/trainer.log``
    (``uploaded``), else the stored ones again (``live``, with ``detail`` saying why); ``none``: no
    log yet. ``truncated``: earlier lines exist that are not shown."""
    job = readable_job(store, access, job_uuid)
    uploaded = queries.artifact_named(store, job, trainer_log.UPLOADED_LOG_NAME)
    found = trainer_log.job_log(job, uploaded, lines)
    return JobLog(
        job_uuid=job.uuid,
        source=found.source,
        lines=found.lines,
        truncated=found.truncated,
        uri=found.uri,
        updated_at=found.updated_at,
        detail=found.detail,
    )


@router.get(
    "/jobs/{job_uuid}/iterations/{iteration}/epochs",
    response_model=IterationEpochs,
    responses={**NOT_FOUND, **FORBIDDEN},
)
def get_iteration_epochs(
    job_uuid: str,
    iteration: DbInt,
    store: StoreDep,
    access: DagAccessDep,
    limit: RowLimit = queries.DETAILS_PAGE,
    offset: Offset = 0,
) -> Response:
    """The epochs of one iteration a page at a time (by default its first 500), and their total."""
    job = readable_job(store, access, job_uuid)
    found = queries.iteration_epochs(store, job, iteration, queries.Page(limit, offset))
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.uuid} has no iteration {iteration}")
    rows, total = found
    return json_response(
        {"job_uuid": job.uuid, "iteration": iteration, "epochs": rows, "total": total, "limit": limit, "offset": offset}
    )


@router.get("/evaluations", response_model=EvaluationList, responses=FORBIDDEN)
def list_evaluations(
    store: StoreDep,
    access: DagAccessDep,
    model_id: Annotated[
        str | None,
        Query(
            pattern=queries.MODEL_ID_PATTERN,
            description='"{job_uuid}/{iteration}/{epoch}": the evaluations of one checkpoint; '
            '"{job_uuid}/{iteration}" or "{job_uuid}": of an iteration or a job. '
            "Without it: the latest evaluations stored.",
        ),
    ] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> EvaluationList:
    if model_id is None:
        latest = queries.latest_evaluations(store, readable=readable_dags(store, access), limit=limit, offset=offset)
        return EvaluationList.model_validate({"evaluations": latest, "limit": limit, "offset": offset, "total": None})
    try:
        model = queries.ModelId.parse(model_id)
    except ValueError as err:  # the pattern let it through: still the documented 422 body
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", "model_id"), "msg": str(err), "input": model_id}]
        ) from err
    job = queries.job(store, model.job_uuid)
    if job is None:
        return EvaluationList(evaluations=[], limit=limit, offset=offset, total=0)
    access.require_read(job.dag_id)
    found, total = queries.evaluations_of(store, job, model, queries.Page(limit, offset))
    return EvaluationList.model_validate({"evaluations": found, "limit": limit, "offset": offset, "total": total})


@router.get("/models", response_model=ModelList, responses=FORBIDDEN)
def list_models(store: StoreDep, access: DagAccessDep) -> ModelList:
    """Every model name (retraining spec) with a promotion decision in a DAG the user can read, by
    name: its champion (null when none), its latest decision and how many decisions it has."""
    return ModelList.model_validate({"models": queries.list_models(store, readable=readable_model_dags(store, access))})


@router.get("/models/{name}", response_model=ModelDetails, responses={**MODEL_NOT_FOUND, **FORBIDDEN})
def get_model(name: str, store: StoreDep, access: DagAccessDep, limit: Limit = 50, offset: Offset = 0) -> ModelDetails:
    """The champion of a model name and its promotion decisions, promoted or not, newest first (of
    the DAGs the user can read: a name with none of those is unknown, 404)."""
    found = queries.model_details(store, name, readable=readable_model_dags(store, access), limit=limit, offset=offset)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no model {name!r}")
    return ModelDetails.model_validate(found)


@router.get(
    "/jobs/{job_uuid}/artifacts/{artifact_id}",
    responses={
        **NOT_FOUND,
        **FORBIDDEN,
        200: {"description": "the file (file:// artifacts)", "content": {"application/octet-stream": {}}},
        307: {"description": "redirect to a presigned S3 GET URL (s3:// artifacts)"},
        502: {"description": "the presigned URL could not be made (storage error)"},
    },
    response_model=None,
)
def get_artifact(
    job_uuid: str,
    artifact_id: DbInt,
    store: StoreDep,
    access: DagAccessDep,
) -> RedirectResponse | StreamingResponse:
    """Download an artifact: s3:// through a presigned URL (valid 10 minutes), file:// streamed when
    it is a regular file inside the job's outputs folder (its path resolved, symlinks included;
    anything else is 404, not available)."""
    job = readable_job(store, access, job_uuid)
    row = queries.artifact(store, job, artifact_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.uuid} has no artifact {artifact_id}")
    if parse_uri(row.uri).scheme == "s3":
        url = presigned_get_url(
            row.uri, expires_in=PRESIGNED_EXPIRY_SECONDS, aws_conn_id=trainer_log.job_aws_conn_id(job)
        )
        return RedirectResponse(url, status_code=status.HTTP_307_TEMPORARY_REDIRECT)
    try:
        opened = output_files.open_output_file(job, row)
    except StorageError as err:
        # The reason (with its paths) is for the api-server's log, not for the client.
        log.info("artifact %s of job %s not served: %s", row.id, job.uuid, err)
        raise HTTPException(
            status.HTTP_404_NOT_FOUND,
            f"artifact {row.id} of job {job.uuid} is not available: gone, or not a regular file inside "
            "the job's outputs folder",
        ) from None
    return output_files.file_response(opened, filename=Path(row.name).name)


@router.post(
    "/jobs/{job_uuid}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=Job,
    responses={**NOT_FOUND, **FORBIDDEN, 400: {"description": "the job already ended"}},
)
def cancel_job(job_uuid: str, request: Request, store: StoreDep, access: DagAccessDep) -> Job:
    """Cancel a job that has not ended, at any stage: the job is ``cancelled`` at once and its dag
    run is marked failed (as the Airflow UI does), so the running step is killed, the rest skipped
    and teardown terminates the instance. Needs the right to edit the DAG's runs."""
    job = readable_job(store, access, job_uuid)
    access.require_edit_runs(job.dag_id)
    result = commands.cancel_job(store, job, by=access.user.get_name(), fail_run=request.app.state.fail_run)
    if not result.cancelled:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"job {job.uuid} already ended: {result.job.status}")
    return Job.of(result.job)


@router.get(
    "/jobs/{job_uuid}/stream",
    responses={
        **NOT_FOUND,
        **FORBIDDEN,
        200: {"description": "Server-Sent Events: status, epoch, eval", "content": {"text/event-stream": {}}},
    },
    response_class=StreamingResponse,
)
async def stream_job(
    job_uuid: str,
    request: Request,
    store: StoreDep,
    access: DagAccessDep,
    last_event_id: Annotated[str | None, Header()] = None,
    after: Annotated[
        str | None,
        Query(
            pattern=CURSOR_PATTERN,
            description='only rows stored after this cursor ("{epoch row id}-{eval row id}", e.g. a series\' '
            "`cursor`); a reconnect's Last-Event-ID wins",
        ),
    ] = None,
) -> StreamingResponse:
    """Events of the job as they are stored; the stream ends after the job's terminal status."""
    job = await run_in_threadpool(readable_job, store, access, job_uuid)
    settings: StreamSettings = getattr(request.app.state, "stream_settings", StreamSettings())
    return StreamingResponse(
        job_events(store, job, settings, last_event_id or after),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
