"""The job's outputs: uploaded with checksums as its artifacts; of a cancelled job, what exists
(its log and latest checkpoint) before teardown terminates the instance."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from gpu_training import storage
from gpu_training.errors import InstanceNotFoundError
from gpu_training.hosts.base import LOG_PATH
from gpu_training.job.budget import budget_cancelled
from gpu_training.job.context import JobContext, load_context
from gpu_training.job.nodes import current_nodes, host_for
from gpu_training.job.start import direct_s3
from gpu_training.policy import Policy
from gpu_training.results.store import ResultsStore
from gpu_training.storage import upload_outputs

log = logging.getLogger(__name__)

#: The artifact name of the trainer's log (``logs/trainer.log`` on the host, uploaded as is).
LOG_ARTIFACT = LOG_PATH
#: The longest teardown waits for a cancelled job's log and latest checkpoint to upload before it
#: terminates the instance anyway: money comes first.
SALVAGE_BUDGET = timedelta(seconds=30)


def upload(store: ResultsStore, job_uuid: str) -> int:
    """Upload outputs with checksums and record them as artifacts; returns the file count."""
    return len(_upload_and_record(load_context(store, job_uuid)))


def _upload_and_record(ctx: JobContext, *, salvaging: bool = False) -> list[Any]:
    """The job's outputs uploaded with checksums from its host to ``outputs_uri`` and recorded as
    artifacts (``salvaging`` a cancelled job: only its log and latest checkpoint); the records."""
    spec, store, job_uuid = ctx.spec, ctx.store, ctx.uuid
    Policy.current().check_file_uri("outputs_uri", spec.outputs_uri)
    host = host_for(ctx)
    which: dict[str, Any] = (
        {"only": storage.latest_checkpoint_sources(host)}
        if salvaging
        else {"on_skipped": lambda skipped: store.record_skipped_outputs(job_uuid, skipped)}
    )
    records = upload_outputs(
        host,
        spec.outputs_uri,
        job_uuid,
        direct=direct_s3(spec, host, ctx.job.outputs_uri or ""),
        expiry_seconds=int(spec.presigned_url_expiry_minutes * 60),
        aws_conn_id=spec.aws_conn_id,
        **which,
    )
    ctx.store.record_artifacts(ctx.uuid, records)
    return records


def salvage_cancelled(store: ResultsStore, job_uuid: str, *, budget: timedelta | None = None) -> list[str]:
    """A cancelled job keeps what exists: its trainer log and latest checkpoint (the pointer and the
    files it names), uploaded with checksums as the job's artifacts, when its instance still answers
    and within ``budget``. Returns the names uploaded (none: not cancelled, no instance that got
    ready, already kept, or not in time). Never raises: teardown terminates whatever happens here.

    The upload runs in a thread that teardown waits for at most ``budget``; one still running then
    is abandoned (the instance's termination ends its transfer).
    """
    return salvage(load_context(store, job_uuid), budget=budget)


def salvage(ctx: JobContext, *, budget: timedelta | None = None) -> list[str]:
    """:func:`salvage_cancelled` within a step that has the job's context (teardown)."""
    import threading

    budget = budget or SALVAGE_BUDGET
    job, store, job_uuid = ctx.job, ctx.store, ctx.uuid
    if job.cancel_requested_at is None or budget_cancelled(job) or not job.outputs_uri:
        return []
    if any(a.name == LOG_ARTIFACT for a in store.artifacts(job_uuid)):
        return []  # kept by an earlier try of teardown (or uploaded before the cancel)
    try:
        node = current_nodes(ctx)[0]
    except InstanceNotFoundError:
        return []
    if node.ready_at is None:
        return []  # never booted: nothing was written
    uploaded: list[str] = []

    def keep() -> None:
        try:
            records = _upload_and_record(ctx, salvaging=True)
            uploaded.extend(r.name for r in records)
        except Exception as err:  # an instance that no longer answers keeps nothing: say so
            log.warning("job %s was cancelled; its log and checkpoint could not be kept: %s", job_uuid, err)

    worker = threading.Thread(target=keep, name=f"salvage {job_uuid}", daemon=True)
    worker.start()
    worker.join(budget.total_seconds())
    if worker.is_alive():
        log.warning(
            "job %s was cancelled; keeping its log and checkpoint took more than %.0f s: terminating anyway",
            job_uuid,
            budget.total_seconds(),
        )
        return []
    if uploaded:
        log.info("job %s was cancelled; kept %s", job_uuid, ", ".join(uploaded))
    return list(uploaded)
