"""A job's first steps: its row (params validated against the schema, the deployment's policy, its
providers and connections) and its YAML config."""

from __future__ import annotations

from gpu_training.job.context import load_context, providers_for
from gpu_training.job_config import build_job_config, render_yaml
from gpu_training.params import parse_job_params, refused
from gpu_training.policy import enforce as enforce_policy
from gpu_training.preflight import check_connections
from gpu_training.results.states import JobStatus
from gpu_training.results.store import ResultsStore
from gpu_training.storage import job_outputs_uri


def register_job(
    store: ResultsStore,
    params: dict,
    *,
    dag_id: str,
    run_id: str,
    map_index: int = -1,
    stage: str = "",
    init_from: tuple[str, str] | None = None,
) -> str:
    """Validate params and create the job row (idempotent per dag run, stage and map index).

    ``init_from`` is ``(stage, checkpoint path)``: the job starts from that file of the completed
    job of that stage of the same run (its uploaded, checksummed artifact). Returns the job uuid.
    """
    store.check_schema()
    if init_from is not None:
        params = {**params, "init_checkpoint_uri": stage_checkpoint_uri(store, dag_id, run_id, *init_from)}
    spec = parse_job_params(params)
    enforce_policy(spec)  # what the deployment allows, before any provider is asked anything
    providers_for(spec)  # an unavailable provider fails here, before anything is created
    check_connections(spec)  # so does a connection the job needs that does not exist
    job_uuid = store.create_job(
        project_id=spec.project_id,
        provider=spec.provider,
        runtime=spec.runtime,
        params=spec.to_dict(),
        dag_id=dag_id,
        run_id=run_id,
        map_index=map_index,
        stage=stage,
    )
    store.update_job(job_uuid, outputs_uri=job_outputs_uri(spec.outputs_uri, job_uuid))
    return job_uuid


def stage_checkpoint_uri(store: ResultsStore, dag_id: str, run_id: str, stage: str, checkpoint: str) -> str:
    """The URI of ``checkpoint`` (a path in the job's outputs) of the run's completed ``stage`` job."""
    upstream = store.job_uuid_for_run(dag_id, run_id, -1, stage=stage)
    if upstream is None:
        raise refused("init_checkpoint_uri", f"stage {stage!r} has no job in run {run_id}")
    job = store.job(upstream)
    if job.status != JobStatus.COMPLETED:
        raise refused("init_checkpoint_uri", f"stage {stage!r} (job {upstream}) is {job.status}, not completed")
    for artifact in store.artifacts(upstream):
        if artifact.name == checkpoint:
            return artifact.uri
    raise refused(
        "init_checkpoint_uri", f"stage {stage!r} (job {upstream}) uploaded no {checkpoint!r} among its outputs"
    )


def build_config(store: ResultsStore, job_uuid: str) -> str:
    """Render the job's YAML config and store it on the job row."""
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    text = render_yaml(build_job_config(ctx.uuid, ctx.spec))
    store.update_job(job_uuid, config_yaml=text)
    return text
