"""What a job may spend: its cost so far, ``max_cost_usd``, its run's ``run_budget_usd`` and
``run_max_instances``."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from gpu_training.errors import JobCancelledError, JobLimitError, RunSlotBusyError
from gpu_training.job.context import JobContext
from gpu_training.job.nodes import current_nodes
from gpu_training.results.models import utcnow
from gpu_training.results.states import InstanceState
from gpu_training.results.store import ResultsStore

#: ``cancelled_by`` of a job that was not launched because its run's budget was spent.
BUDGET_CANCELLER = "run budget"


def job_cost(store: ResultsStore, job_uuid: str, *, now: datetime | None = None) -> float:
    """What the job's instances have cost so far: settled ones as settled, live ones until now."""
    now = now or utcnow()
    total = 0.0
    for record in store.instances_for_job(job_uuid):
        if record.state == InstanceState.TERMINATED or record.cost_usd is not None:
            total += record.cost_usd or 0.0
        elif record.instance_id and record.state != InstanceState.FAILED:
            started = record.launched_at or record.created_at
            total += max(0.0, (now - started).total_seconds()) / 3600 * (record.price_per_hour or 0.0)
    return total


def cost_deadline(ctx: JobContext) -> datetime | None:
    """When the job reaches ``max_cost_usd`` if its current instance keeps running (None: no limit,
    or a free instance)."""
    if not ctx.spec.max_cost_usd:
        return None
    price = sum(node.price_per_hour or 0.0 for node in current_nodes(ctx))
    if not price:
        return None
    now = utcnow()
    left = ctx.spec.max_cost_usd - job_cost(ctx.store, ctx.uuid, now=now)
    return now + timedelta(hours=max(0.0, left) / price)


def ensure_within_cost(ctx: JobContext, what: str) -> None:
    """Nothing more is spent once the job's instances cost ``max_cost_usd``."""
    limit = ctx.spec.max_cost_usd
    if limit and (spent := job_cost(ctx.store, ctx.uuid)) >= limit:
        raise JobLimitError(f"reached max_cost_usd ({limit:g} USD, spent {spent:.4f}) {what}")


def budget_cancelled(job: Any) -> bool:
    """The job was cancelled before launching because its run's budget was spent."""
    return (job.cancelled_by or "").startswith(BUDGET_CANCELLER)


def run_cost(store: ResultsStore, dag_id: str, run_id: str) -> float:
    """What every job of a dag run has cost so far (a sweep's trials, a pipeline's stages)."""
    return sum(job_cost(store, uuid) for uuid in store.jobs_for_run(dag_id, run_id))


def ensure_within_run_budget(ctx: JobContext) -> None:
    """No launch once the run's ``run_budget_usd`` is spent: the job is cancelled, not failed,
    because its run did what it was asked to (stop spending)."""
    budget = ctx.spec.run_budget_usd
    if not budget:
        return
    spent = run_cost(ctx.store, ctx.job.dag_id, ctx.job.run_id)
    if spent >= budget:
        reason = f"{BUDGET_CANCELLER} of {budget:g} USD spent ({spent:.4f} USD)"
        ctx.store.request_cancel(ctx.uuid, by=reason)
        raise JobCancelledError(f"not launched: the {reason}")


def ensure_run_slot(ctx: JobContext, *, intent: str | None = None, also: tuple[str, ...] = ()) -> None:
    """At most ``run_max_instances`` jobs of the run hold an instance (launch to verified
    termination). Checked before listing offers, and again once this launch's intent row is
    committed: of two launches racing for the last slot the older row wins and the other forgets
    its intent and waits (raises :class:`RunSlotBusyError`)."""
    slots = ctx.spec.run_max_instances
    if not slots:
        return
    job = ctx.job
    live = ctx.store.live_instances_of_run(job.dag_id, job.run_id)
    if intent is None:
        holders = {r.job_id for r in live if r.job_id != job.id}
        busy = len(holders) >= slots
    else:
        order: list[int] = []
        for r in live:  # one place per job, in the order the jobs first recorded an instance
            if r.job_id not in order:
                order.append(r.job_id)
        busy = job.id in order and order.index(job.id) >= slots
        if busy:
            for name in (intent, *also):  # ``also``: the other nodes of a multi-node attempt
                ctx.store.delete_instance_intent(name)
    if busy:
        raise RunSlotBusyError(f"waiting for a slot: the run's jobs already hold {slots} instances (run_max_instances)")
