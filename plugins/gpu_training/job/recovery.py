"""Spot recovery: whether the job's instance was interrupted, a relaunch (up to ``max_recoveries``),
and the trainer restarted there from the last synced checkpoint."""

from __future__ import annotations

import logging
from typing import Any

from gpu_training import storage
from gpu_training.errors import InstanceNotFoundError, TrainerFailedError
from gpu_training.job.context import load_context
from gpu_training.job.nodes import current_nodes, host_and_trainer, host_for, instance_info, node_label
from gpu_training.job.provision import INTERRUPTED, launch_next
from gpu_training.job.start import put_inputs, run_trainer
from gpu_training.job.terminate import terminate_group
from gpu_training.providers.base import InstanceInfo
from gpu_training.results.models import utcnow
from gpu_training.results.states import AbandonReason
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)


def interruption(store: ResultsStore, job_uuid: str) -> str | None:
    """Why the job's current instance is lost to an interruption (the cloud's words), else None.

    Asked when following ended with the host unreachable or the trainer gone: a spot instance the
    cloud reports interrupted, or that vanished altogether, is an interruption.
    """
    ctx = load_context(store, job_uuid)
    nodes = current_nodes(ctx)
    if not nodes[0].spot:
        return None
    provider = ctx.provider(nodes[0].provider)
    for record in nodes:  # one node lost is the whole attempt lost
        what = f"{node_label(record)}: " if record.node_group else ""
        try:
            info = instance_info(provider, record)
        except InstanceNotFoundError as err:
            return f"{what}the spot instance vanished: {err}"
        if info.interrupted:
            return what + str(info.details.get("interruption") or f"{info.instance_id} interrupted ({info.state})")
        if info.state.is_gone:
            return f"{what}the spot instance is {info.details.get('status') or info.state}"
    return None


def recover(store: ResultsStore, job_uuid: str, reason: str) -> InstanceInfo:
    """Relaunch a job whose instance was interrupted, up to ``max_recoveries``.

    The interrupted instance is recorded (``interrupted_at``, ``interruption``), terminated until
    the cloud says it is gone and its cost settled; the job's ``recovery_count`` goes up and its
    ``global.json`` offsets move on to the new instance's file (``ingest_base``), so nothing stored
    is read again; then the cheapest fitting offer is launched. The trainer restarts there from
    the checkpoint synced to the outputs URI (:func:`restart_trainer`).
    """
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    spec, job = ctx.spec, ctx.job
    if job.recovery_count >= spec.max_recoveries:
        raise TrainerFailedError(
            f"instance interrupted ({reason}); no recovery left (max_recoveries={spec.max_recoveries})"
        )
    nodes = current_nodes(ctx)
    record = nodes[0]
    provider = ctx.provider(record.provider)
    for node in nodes:
        store.update_instance(node.name, interrupted_at=utcnow(), interruption=reason[:500])
    terminate_group(store, nodes, provider, reason=f"{INTERRUPTED} {reason}", abandon=AbandonReason.INTERRUPTED)
    store.begin_recovery(job_uuid)
    log.warning("job %s: %s interrupted (%s); recovery %d", job_uuid, record.name, reason, job.recovery_count + 1)
    return launch_next(ctx)


def awaiting_restart(store: ResultsStore, job_uuid: str) -> bool:
    """Whether a recovery launched an instance whose trainer has not been started yet."""
    ctx = load_context(store, job_uuid)
    if ctx.job.recovery_count == 0:
        return False
    if any(node.ready_at is None for node in current_nodes(ctx)):
        return True
    _, trainer = host_and_trainer(ctx)
    return not trainer.status().started


def restart_trainer(store: ResultsStore, job_uuid: str) -> dict[str, Any] | None:
    """On the recovered (ready) instance: inputs, the last synced checkpoint, then the trainer,
    which resumes from it. Returns the checkpoint's pointer (None: none was synced, it starts over)."""
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    put_inputs(ctx)
    spec = ctx.spec
    host = host_for(ctx)
    pointer = None
    if ctx.job.outputs_uri:
        expiry = int(spec.presigned_url_expiry_minutes * 60)
        pointer = storage.restore_checkpoint(
            host, ctx.job.outputs_uri, expiry_seconds=expiry, aws_conn_id=spec.aws_conn_id
        )
    log.info("job %s resumes from %s", job_uuid, pointer or "the start (no checkpoint was synced)")
    store.update_job(job_uuid, last_progress_at=utcnow())  # the stall timeout counts from the restart
    ctx.ensure_not_cancelled(fresh=True)  # a cancel while the inputs moved starts no trainer
    run_trainer(ctx)
    return pointer
