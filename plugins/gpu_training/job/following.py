"""Following the running job: what :class:`~gpu_training.triggers.GlobalJsonTrigger` needs to follow
it, and stopping a trainer that must not keep the GPU busy once following ended."""

from __future__ import annotations

import logging
from typing import Any

from gpu_training.errors import InstanceNotFoundError, TrainerFailedError
from gpu_training.job.budget import cost_deadline
from gpu_training.job.context import JobContext, load_context
from gpu_training.job.nodes import host_and_trainer, node_hosts, on_each
from gpu_training.progress import FollowOutcome
from gpu_training.results.store import ResultsStore
from gpu_training.runtimes import trainer_for

log = logging.getLogger(__name__)

#: Ends after which the trainer may still be running and must be stopped.
_STOP_AFTER = frozenset(
    {
        FollowOutcome.STALL,
        FollowOutcome.MAX_RUNTIME,
        FollowOutcome.MAX_COST,
        FollowOutcome.NON_FINITE_LOSS,
        FollowOutcome.CANCELLED,
        FollowOutcome.NODE_FAILED,
        FollowOutcome.NOT_REGULAR_FILE,
        FollowOutcome.MAX_METRIC_ROWS,
    }
)
#: How often :func:`after_follow` tries to stop the trainer, and the wait before the n-th retry
#: (n times this).
STOP_ATTEMPTS = 3
STOP_BACKOFF_SECONDS = 2.0


def follow_kwargs(store: ResultsStore, job_uuid: str) -> dict[str, Any]:
    """What :class:`~gpu_training.triggers.GlobalJsonTrigger` needs to follow the job: how to
    reach its host, how to ask for the trainer's status, and the job's limits."""
    from datetime import timedelta

    from gpu_training.follow.settings import FollowSettings, PeerSettings

    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    spec = ctx.spec
    host, trainer = host_and_trainer(ctx)
    peers = []
    if spec.num_nodes > 1:  # the other nodes: their trainers are watched and their logs shown too
        for record, _, node_host in node_hosts(ctx)[1:]:
            peers.append(
                PeerSettings(
                    rank=record.node_rank,
                    name=record.name,
                    target=node_host.follow_target(),
                    status_command=tuple(trainer_for(spec, node_host, record.name).status_command()),
                )
            )
    settings = FollowSettings(
        job_uuid=job_uuid,
        target=host.follow_target(),
        status_command=tuple(trainer.status_command()),
        peers=tuple(peers),
        runtime=spec.runtime,
        poll_interval=spec.poll_interval_seconds,
        stall_timeout=timedelta(minutes=spec.stall_timeout_minutes),
        max_runtime=timedelta(minutes=spec.max_runtime_minutes),
        unreachable_timeout=timedelta(minutes=spec.unreachable_timeout_minutes),
        stop_on_nan=spec.stop_on_nan,
        cost_deadline=cost_deadline(ctx),
        max_cost_usd=spec.max_cost_usd,
    )
    return settings.to_kwargs()  # the caller names the results connection (results_conn_id)


def after_follow(store: ResultsStore, job_uuid: str, result: dict[str, Any]) -> None:
    """Act on how following ended: stop a trainer that must not keep the GPU busy.

    A failed stop (SSH refused or timing out, the cloud's API down) is tried again here, not by a
    retry of the task: that retry would not stop anything for a cancelled job (every step refuses
    to start once a job is cancelled) and would re-follow a stalled one first. A trainer that still
    could not be stopped fails the step for good (``TrainerFailedError``), with why following ended
    and why the stop failed; teardown, which runs whatever failed, then terminates the instance
    (the SSH provider: stops the trainer and removes the work directory), retried until verified.
    """
    kind = result.get("kind")
    if kind != FollowOutcome.TRAINER_EXIT and kind not in _STOP_AFTER:
        return
    ctx = load_context(store, job_uuid)
    # Node 0's trainer ended: the other nodes' may still run (waiting for it), so they are stopped
    # too. A single node's trainer that ended has nothing left to stop.
    if kind == FollowOutcome.TRAINER_EXIT and ctx.spec.num_nodes == 1:
        return
    import time

    for attempt in range(1, STOP_ATTEMPTS + 1):
        try:
            stop_trainers(ctx)
            return
        except InstanceNotFoundError:
            return  # the instance is gone, and its trainer with it
        except Exception as err:
            if attempt >= STOP_ATTEMPTS:
                reason = result.get("reason") or result.get("kind")
                raise TrainerFailedError(
                    f"{reason}; the trainer could not be stopped ({type(err).__name__}: {err}) after "
                    f"{STOP_ATTEMPTS} tries: terminating the instance stops it"
                ) from err
            log.warning("job %s: stopping the trainer failed (%s: %s); trying again", job_uuid, type(err).__name__, err)
            time.sleep(STOP_BACKOFF_SECONDS * attempt)


def stop_trainers(ctx: JobContext) -> None:
    """Stop the trainer on every node of the job."""
    on_each(node_hosts(ctx), lambda node: trainer_for(ctx.spec, node[2], node[0].name).stop())
