"""Writes of the results API: what a user asks of a job."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from gpu_training.api import queries
from gpu_training.results.models import TrainingJob
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)

#: Marks a dag run failed in Airflow; returns False when the run already finished or is gone.
RunFailer = Callable[[str, str], bool]


@dataclasses.dataclass(frozen=True)
class CancelResult:
    job: TrainingJob
    cancelled: bool  # False: the job had already ended (``job.status`` says how)
    run_failed: bool = False  # the dag run was marked failed in Airflow by this cancel


def cancel_job(store: ResultsStore, job: TrainingJob, *, by: str, fail_run: RunFailer | None = None) -> CancelResult:
    """Cancel a job that has not ended, the same way at every stage.

    First the results DB: status ``cancelled`` with who asked (every step that starts after this
    refuses to, a launch in flight terminates what it creates, the trigger following the trainer
    stops at its next status check). Then Airflow: the job's dag run is marked failed, exactly as
    the Airflow UI does, so the running task is killed, the rest skipped, and teardown runs now.
    Only from an active status, so a job that ends meanwhile keeps its final status. A failure
    to reach Airflow is logged, not raised: the cancel in the results DB stops the job anyway.
    """
    if not store.request_cancel(job.uuid, by=by):
        return CancelResult(queries.job(store, job.uuid) or job, cancelled=False)
    run_failed = False
    if fail_run is not None:
        try:
            run_failed = fail_run(job.dag_id, job.run_id)
        except Exception:
            log.exception("job %s cancelled, but its dag run %s could not be marked failed", job.uuid, job.run_id)
    return CancelResult(queries.job(store, job.uuid) or job, cancelled=True, run_failed=run_failed)
