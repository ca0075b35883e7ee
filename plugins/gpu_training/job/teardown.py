"""The job's end: every instance terminated until verified gone (also one whose launch was still in
flight), its cost settled, and the job's final status."""

from __future__ import annotations

import logging
from datetime import timedelta

from gpu_training.errors import ProviderError
from gpu_training.job.context import cancelled_reason, load_context
from gpu_training.job.outputs import salvage
from gpu_training.job.terminate import terminate_record
from gpu_training.providers.base import ComputeProvider
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.states import InstanceState, JobStatus
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)

#: How long after recording a launch intent teardown waits for that launch to settle (get an id, or
#: fail) while polling the cloud by the instance's name. A launch task killed by a cancel stops
#: within ~10 s (SIGTERM at its next heartbeat, SIGKILL 5 s later); what a cloud creates even later
#: is the reaper's.
LAUNCH_SETTLE = timedelta(seconds=45)
LAUNCH_SETTLE_POLL_SECONDS = 3.0


def teardown(store: ResultsStore, job_uuid: str, *, settle: timedelta = LAUNCH_SETTLE) -> list[str]:
    """Terminate every instance of the job that is not known to be gone; returns their names.

    Works from the results DB alone, so it also catches an instance whose launch call crashed
    after the cloud created it (found by its deterministic name). Each termination is retried
    until the provider reports the instance gone; cost is settled per instance and on the job.

    A cancelled job's trainer log and latest checkpoint are kept first, when its instance still
    answers (:func:`~gpu_training.job.outputs.salvage_cancelled`, at most
    :data:`~gpu_training.job.outputs.SALVAGE_BUDGET`).

    Teardown can start while the launch is still in flight (a cancelled run's teardown starts
    before its killed launch task stops). So it first records that it started, which a launch
    checks after its intent and after its call, and a launch intent younger than ``settle`` is
    waited for (polling the cloud by name) until it has an id or failed.
    """
    terminated: list[str] = []
    errors: list[str] = []
    ctx = load_context(store, job_uuid)
    store.begin_teardown(job_uuid)
    salvage(ctx)
    for record in store.instances_for_job(job_uuid):
        if record.state == InstanceState.TERMINATED:
            continue
        try:
            provider = ctx.provider(record.provider)
            record = _settled(store, record, provider, settle)
            if record.state == InstanceState.FAILED and not record.instance_id:
                continue
            if terminate_record(store, record, provider):
                terminated.append(record.name)
        except Exception as err:  # keep going: one stuck instance must not shield the others
            log.exception("terminating %s failed", record.name)
            errors.append(f"{record.name}: {err}")
    costs = [i.cost_usd or 0.0 for i in store.instances_for_job(job_uuid)]
    store.update_job(job_uuid, cost_usd=round(sum(costs), 6))
    if errors:
        raise ProviderError("teardown", "could not terminate " + "; ".join(errors))
    return terminated


def _settled(store: ResultsStore, record: Instance, provider: ComputeProvider, settle: timedelta) -> Instance:
    """The record once its launch settled: it has an instance id, the launch failed, the cloud
    shows the instance by name, or ``settle`` after the intent passed (then it is what it is)."""
    import time

    deadline = record.created_at + settle
    while record.state == InstanceState.REQUESTED and not record.instance_id:
        found = provider.find_instance(record.name)
        if found is not None:
            store.update_instance(record.name, instance_id=found.instance_id, state=str(found.state))
            return store.instance(record.name) or record
        if utcnow() >= deadline:
            break
        log.info("%s: its launch may still be in flight; waiting for it to settle", record.name)
        time.sleep(min(LAUNCH_SETTLE_POLL_SECONDS, max(0.0, (deadline - utcnow()).total_seconds())))
        record = store.instance(record.name) or record
    return record


def finalize(store: ResultsStore, job_uuid: str, *, failed_tasks: list[str], run_marked_failed: bool = False) -> str:
    """Settle the job's final status from what happened; returns it.

    A job is ``cancelled`` when it was cancelled through the results API or when its dag run was
    marked failed by someone (the Airflow UI, ``PATCH .../dagRuns/{run}``) before it completed.
    """
    job = store.job(job_uuid)
    if run_marked_failed and job.status not in (JobStatus.COMPLETED, JobStatus.CANCELLED) and not job.project_ended:
        store.request_cancel(job_uuid, by="airflow (the dag run was marked failed)")
        job = store.job(job_uuid)
    if job.status == JobStatus.CANCELLED or job.cancel_requested_at is not None:
        if job.failure_reason is None:
            store.update_job(job_uuid, failure_reason=cancelled_reason(job))
        store.finish(job_uuid, JobStatus.CANCELLED.value)
        return JobStatus.CANCELLED.value
    if job.failure_reason is None and (failed_tasks or not job.project_ended):
        what = ", ".join(failed_tasks) if failed_tasks else "the trainer never reported PROJECT end"
        store.record_failure(job_uuid, f"job did not complete: {what}")
    job = store.job(job_uuid)
    status = (JobStatus.FAILED if job.failure_reason else JobStatus.COMPLETED).value
    store.finish(job_uuid, status)
    return status
