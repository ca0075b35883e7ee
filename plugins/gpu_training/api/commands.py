"""Writes of the results API: what a user asks of a job."""

from __future__ import annotations

import dataclasses

from gpu_training.api import queries
from gpu_training.results.models import JOB_STATUSES, TERMINAL_STATUSES, TrainingJob
from gpu_training.results.store import ResultsStore

ACTIVE_STATUSES = tuple(s for s in JOB_STATUSES if s not in TERMINAL_STATUSES)


@dataclasses.dataclass(frozen=True)
class CancelResult:
    job: TrainingJob
    cancelled: bool  # False: the job had already ended (``job.status`` says how)


def cancel_job(store: ResultsStore, job: TrainingJob) -> CancelResult:
    """Cancel a job that has not ended: its status becomes ``cancelled`` in the results DB, which the
    job's trigger sees at its next status check (it stops the trainer, the task ends the run's
    training). Only from an active status, so a job that ends meanwhile keeps its final status.

    The seam for more: failing the dag run through Airflow belongs here, after the status change.
    """
    if job.status in TERMINAL_STATUSES:
        return CancelResult(job, cancelled=False)
    changed = store.set_status(job.uuid, "cancelled", from_statuses=ACTIVE_STATUSES)
    now = queries.job(store, job.uuid) or job
    return CancelResult(now, cancelled=changed)
