"""The boot wait: whether the job's instance runs and answers SSH, replacing one that turns broken
or is not usable in time (a rented instance only)."""

from __future__ import annotations

import logging
from datetime import timedelta

from gpu_training.errors import BadRequestError, HostError, InstanceNotFoundError, OfferRefusedError, ProviderError
from gpu_training.job.budget import ensure_within_cost
from gpu_training.job.context import JobContext, load_context
from gpu_training.job.nodes import current_nodes, instance_info, node_label
from gpu_training.job.provision import REPLACED, launch_next
from gpu_training.job.terminate import terminate_group
from gpu_training.offers import NoOfferError
from gpu_training.params import JobSpec
from gpu_training.providers.base import ComputeProvider, InstanceInfo, InstanceState
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.states import AbandonReason
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)


def provision_timeout(spec: JobSpec, provider: ComputeProvider) -> timedelta:
    """How long an instance may take to run and answer SSH: ``boot_timeout_minutes``, else the
    provider's own."""
    if spec.boot_timeout_minutes:
        return timedelta(minutes=spec.boot_timeout_minutes)
    return provider.provision_timeout


def check_ready(store: ResultsStore, job_uuid: str) -> bool:
    """Whether the instance runs and answers SSH (every node of a multi-node job); called once per
    poll by the boot wait.

    A rented instance that turns unhealthy, vanishes, or is not usable within the provider's
    provisioning timeout is terminated and replaced by the next offer (``False``: keep waiting);
    a multi-node attempt is replaced whole.
    """
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    nodes = current_nodes(ctx)
    provider = ctx.provider(nodes[0].provider)
    timeout = provision_timeout(ctx.spec, provider)
    ensure_within_cost(ctx, "while the instance booted")
    waited = utcnow() - (nodes[0].launched_at or nodes[0].created_at)
    over = waited > timeout
    took = f"after {waited.total_seconds() / 60:.1f} min (provisioning timeout {timeout.total_seconds() / 60:g} min)"
    infos: list[InstanceInfo] = []
    for record in nodes:
        what = f"{node_label(record)}: " if record.node_group else ""
        try:
            info = instance_info(provider, record)
        except InstanceNotFoundError as err:
            return _replace_or_raise(ctx, nodes, provider, f"{what}instance vanished while booting: {err}")
        if info.state != record.state:
            store.update_instance(record.name, state=str(info.state), address=info.address)
        if info.state.is_gone:
            status = info.details.get("status") or info.state
            return _replace_or_raise(
                ctx, nodes, provider, f"{what}instance {info.instance_id} turned {status} while booting"
            )
        infos.append(info)
    for record, info in zip(nodes, infos, strict=True):
        if info.state != InstanceState.RUNNING:
            if over:
                what = f"{node_label(record)}: " if record.node_group else ""
                return _replace_or_raise(ctx, nodes, provider, f"{what}instance still {info.state} {took}")
            return False
    for record, info in zip(nodes, infos, strict=True):
        if record.ready_at is not None:
            continue
        try:
            provider.host(info).prepare()
        except BadRequestError:
            raise  # a wrong key or host key: a new instance would not help
        except (ProviderError, HostError) as err:
            if not provider.ephemeral:
                raise
            what = f"{node_label(record)}: " if record.node_group else ""
            if over:
                return _replace_or_raise(ctx, nodes, provider, f"{what}not reachable by SSH {took}: {err}")
            log.info("%sinstance %s runs but does not answer SSH yet: %s", what, info.instance_id, err)
            return False
        store.update_instance(record.name, ready_at=utcnow(), address=info.address)
    return True


def _replace_or_raise(ctx: JobContext, nodes: list[Instance], provider: ComputeProvider, reason: str) -> bool:
    """Terminate a broken instance (every node of its attempt) and launch the next offer (rented
    instances only)."""
    if not provider.ephemeral:
        raise ProviderError(provider.name, reason)
    log.warning("%s: %s; terminating it and trying the next offer", nodes[0].node_group or nodes[0].name, reason)
    terminate_group(ctx.store, nodes, provider, reason=f"{REPLACED} {reason}", abandon=AbandonReason.REPLACED)
    try:
        info = launch_next(ctx)
    except (OfferRefusedError, NoOfferError) as err:
        raise NoOfferError(f"{reason}; no other offer could replace it: {err}") from err
    log.info("replacement instance %s (%s) is %s", info.name, info.instance_id, info.state)
    return False
