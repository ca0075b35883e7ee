"""An Airflow listener: a dag run marked failed by someone is a cancel of its training jobs.

The Airflow UI's "Mark run as failed" and ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}
{"state": "failed"}`` both end in the api-server's ``patch_dag_run_state``, which fires
``on_dag_run_failed`` with the message "Dag Run's state was manually set to `failed`.". Airflow
then fails the running and deferred tasks, skips the rest and runs the teardown tasks; recording
the cancel on the jobs first means every step still starting refuses to, a launch in flight
terminates what it creates, the trigger following the trainer stops, and the job ends
``cancelled`` rather than ``failed``. Runs that fail on their own are left to ``finalize``.

Who marked it failed comes from Airflow's audit log (its ``action_logging`` writes the request's
user before the request runs), and the run gets a note saying who cancelled which job, so the
Airflow run says more than "failed". A cancel from the Training jobs page ends here as well (it
marks the run failed the same way), its jobs already cancelled by the user who asked.
"""

from __future__ import annotations

import logging
from typing import Any

from airflow.listeners import hookimpl

from gpu_training.results.states import JobStatus

log = logging.getLogger(__name__)

MANUALLY_FAILED = "manually set to"


#: ``cancelled_by`` when the user who marked the run failed is not known.
UNKNOWN_CANCELLER = "airflow (the dag run was marked failed)"


def _store(conn_id: str | None = None) -> Any:
    from gpu_training.hooks.results import DEFAULT_CONN_ID, ResultsDbHook

    return ResultsDbHook(conn_id or DEFAULT_CONN_ID).get_store()


def cancel_jobs_of_run(dag_id: str, run_id: str, *, by: str, conn_id: str | None = None) -> list[str]:
    """Cancel every job of the dag run that has not ended; returns the uuids cancelled."""
    store = _store(conn_id)
    return [uuid for uuid in store.jobs_for_run(dag_id, run_id) if store.request_cancel(uuid, by=by)]


def who_marked_failed(dag_id: str, run_id: str) -> str | None:
    """The Airflow user of the latest request on this dag run (the audit log's ``patch_dag_run``
    entry, written before the request ran), if there was one in the last minute."""
    from datetime import UTC, datetime, timedelta

    from airflow.models.log import Log
    from airflow.utils.session import create_session
    from sqlalchemy import select

    since = datetime.now(UTC) - timedelta(minutes=1)
    with create_session() as session:
        return session.scalar(
            select(Log.owner)
            .where(Log.dag_id == dag_id, Log.run_id == run_id, Log.event.like("%dag_run%"), Log.dttm >= since)
            .order_by(Log.dttm.desc(), Log.id.desc())
            .limit(1)
        )


def cancel_note(store: Any, dag_id: str, run_id: str) -> str | None:
    """What the run's note says of its cancelled jobs: who cancelled which (None: none was)."""
    lines = []
    for uuid in store.jobs_for_run(dag_id, run_id):
        job = store.job(uuid)
        if job.status == JobStatus.CANCELLED and job.cancel_requested_at is not None:
            what = f"{job.stage} job" if job.stage else "job"
            lines.append(
                f"Cancelled by {job.cancelled_by or 'someone'}: training {what} {uuid} ({job.project_id}). "
                "Teardown keeps its trainer log and latest checkpoint when the instance still answers, "
                "then terminates it."
            )
    return "\n".join(lines) or None


def note_on_run(dag_run: Any, text: str) -> None:
    """Add ``text`` to the dag run's note (after a note someone already wrote). Committed with the
    request that marked the run failed."""
    if not hasattr(dag_run, "dag_run_note"):
        return  # not an ORM dag run (tests)
    current = dag_run.note
    if current and text in current:
        return
    dag_run.note = f"{current}\n\n{text}" if current else text


@hookimpl
def on_dag_run_failed(dag_run: Any, msg: str) -> None:
    if MANUALLY_FAILED not in (msg or ""):
        return
    dag_id, run_id = dag_run.dag_id, dag_run.run_id
    try:
        who = who_marked_failed(dag_id, run_id)
    except Exception:  # not in the api-server, or no metadata DB: the cancel itself matters more
        who = None
    by = f"{who} (marked the dag run failed in Airflow)" if who else UNKNOWN_CANCELLER
    try:
        cancelled = cancel_jobs_of_run(dag_id, run_id, by=by)
        note = cancel_note(_store(), dag_id, run_id)
    except Exception:  # never break Airflow's own request; finalize still sees the skipped steps
        log.exception("could not record the cancel of %s/%s in the results DB", dag_id, run_id)
        return
    if cancelled:
        log.info("dag run %s/%s marked failed by %s: cancelled jobs %s", dag_id, run_id, who or "?", cancelled)
    if note:
        try:
            note_on_run(dag_run, note)
        except Exception:
            log.exception("could not write the cancel's note on %s/%s", dag_id, run_id)
