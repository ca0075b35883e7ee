"""The job as a step sees it: its row, its validated params and its providers, loaded once per step.

Every step of a job (:mod:`gpu_training.job`) starts with :func:`load_context` and hands the
:class:`JobContext` to its helpers, instead of each helper reading the job row and parsing its
params again. The row is a snapshot taken as the step began: what may change meanwhile (a cancel,
teardown starting) is read again with :meth:`JobContext.fresh_job`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from gpu_training.errors import JobCancelledError
from gpu_training.params import JobSpec, parse_job_params
from gpu_training.providers.base import ComputeProvider
from gpu_training.providers.registry import get_provider, provider_names
from gpu_training.results.models import TrainingJob
from gpu_training.results.states import JobStatus
from gpu_training.results.store import ResultsStore


@dataclasses.dataclass
class JobContext:
    """One step's view of a job: the store, the job's row as the step began, its params, and each
    provider it asks (looked up once per step)."""

    store: ResultsStore
    job: TrainingJob
    spec: JobSpec
    _providers: dict[str, ComputeProvider] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def uuid(self) -> str:
        return self.job.uuid

    def provider(self, name: str) -> ComputeProvider:
        """The provider ``name`` with this job's settings."""
        if name not in self._providers:
            self._providers[name] = get_provider(name, self.spec)
        return self._providers[name]

    def offer_providers(self) -> dict[str, ComputeProvider]:
        """Every provider the job may launch on (``provider``: one, or each configured cloud)."""
        return {name: self.provider(name) for name in provider_names(self.spec)}

    def fresh_job(self) -> TrainingJob:
        """The job's row now (a cancel or teardown may have come since the step began)."""
        return self.store.job(self.uuid)

    def ensure_not_cancelled(self, *, fresh: bool = False) -> None:
        """Every step starts here: a cancelled job starts nothing new (no launch, no transfer)."""
        reason = cancelled_reason(self.fresh_job() if fresh else self.job)
        if reason:
            raise JobCancelledError(reason)


def load_context(store: ResultsStore, job_uuid: str) -> JobContext:
    """The job's context: its row read and its params parsed, once for the step."""
    job = store.job(job_uuid)
    return JobContext(store, job, parse_job_params(job.params))


def providers_for(spec: JobSpec) -> dict[str, ComputeProvider]:
    """The providers a job of ``spec`` may launch on (an unavailable one raises here)."""
    return {name: get_provider(name, spec) for name in provider_names(spec)}


def cancelled_reason(job: Any) -> str | None:
    """Why the job must not go on (cancelled, or being torn down), else None."""
    if job.status == JobStatus.CANCELLED or job.cancel_requested_at is not None:
        return f"job {job.uuid} was cancelled" + (f" by {job.cancelled_by}" if job.cancelled_by else "")
    if job.teardown_started_at is not None:
        return f"job {job.uuid} is being torn down"
    return None
