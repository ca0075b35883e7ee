"""An Airflow listener: a dag run marked failed by someone is a cancel of its training jobs.

The Airflow UI's "Mark run as failed" and ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}
{"state": "failed"}`` both end in the api-server's ``patch_dag_run_state``, which fires
``on_dag_run_failed`` with the message "Dag Run's state was manually set to `failed`.". Airflow
then fails the running and deferred tasks, skips the rest and runs the teardown tasks; recording
the cancel on the jobs first means every step still starting refuses to, a launch in flight
terminates what it creates, the trigger following the trainer stops, and the job ends
``cancelled`` rather than ``failed``. Runs that fail on their own are left to ``finalize``.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)

MANUALLY_FAILED = "manually set to"


def cancel_jobs_of_run(dag_id: str, run_id: str, *, by: str, conn_id: str | None = None) -> list[str]:
    """Cancel every job of the dag run that has not ended; returns the uuids cancelled."""
    from gpu_training.hooks.results import DEFAULT_CONN_ID, ResultsDbHook

    store = ResultsDbHook(conn_id or DEFAULT_CONN_ID).get_store()
    return [uuid for uuid in store.jobs_for_run(dag_id, run_id) if store.request_cancel(uuid, by=by)]


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    if MANUALLY_FAILED not in (msg or ""):
        return
    try:
        cancelled = cancel_jobs_of_run(dag_run.dag_id, dag_run.run_id, by="airflow (the dag run was marked failed)")
    except Exception:  # never break Airflow's own request; finalize still sees the skipped steps
        log.exception("could not record the cancel of %s/%s in the results DB", dag_run.dag_id, dag_run.run_id)
        return
    if cancelled:
        log.info("dag run %s/%s marked failed: cancelled jobs %s", dag_run.dag_id, dag_run.run_id, cancelled)
