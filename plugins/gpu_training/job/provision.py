"""Getting the job its instance: a live one from an earlier try, else the cheapest fitting offer,
failing over to the next offer on capacity refusals (every node of a multi-node attempt, or none)."""

from __future__ import annotations

import dataclasses
import logging

from gpu_training.errors import (
    JobCancelledError,
    NoCapacityError,
    OfferNotOpenError,
    OfferRefusedError,
    ProviderError,
)
from gpu_training.job.budget import ensure_run_slot, ensure_within_cost, ensure_within_run_budget
from gpu_training.job.context import JobContext, cancelled_reason, load_context
from gpu_training.job.nodes import node_count, node_names
from gpu_training.job.terminate import terminate_group, terminate_record
from gpu_training.offers import NoOfferError, rank_offers, request_from
from gpu_training.providers.base import ComputeProvider, InstanceInfo, Offer, instance_name
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.states import AbandonReason, InstanceState, JobStatus
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)

#: How the ``state_reason`` of a replaced or interrupted instance begins (why it was given up is in
#: its ``abandon_reason``, :class:`AbandonReason`; this is the text people read).
REPLACED = "replaced:"
INTERRUPTED = "interrupted:"
NOT_LAUNCHED_CANCELLED = "not launched: the job was cancelled or is being torn down"


def provision(store: ResultsStore, job_uuid: str) -> InstanceInfo:
    """The job's instance: a live one from an earlier try, else the cheapest offer that fits.

    A retried task first asks the cloud for the instances it recorded (by their deterministic
    names) and keeps a live one; see :func:`launch_next` for the launch itself.
    """
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    store.set_status(job_uuid, JobStatus.PROVISIONING.value, from_statuses=(JobStatus.PENDING.value,))
    return _adopt_earlier_launch(ctx) or launch_next(ctx)


def _adopt_earlier_launch(ctx: JobContext) -> InstanceInfo | None:
    """A complete launch attempt of an earlier try that the cloud still shows (the latest first);
    the rest of what it recorded is marked failed (never launched) or terminated (part of a
    multi-node attempt: all or nothing)."""
    live = [i for i in ctx.store.instances_for_job(ctx.uuid) if not InstanceState(i.state).is_gone]
    groups: dict[str, list[Instance]] = {}
    for record in live:
        groups.setdefault(record.node_group or record.name, []).append(record)
    for nodes in reversed(list(groups.values())):
        provider = ctx.provider(nodes[0].provider)
        found = [provider.find_instance(record.name) for record in nodes]
        for record, info in zip(nodes, found, strict=True):
            if info is not None:
                ctx.store.update_instance(record.name, instance_id=info.instance_id, state=str(info.state))
            elif not record.instance_id:  # the intent was recorded, the launch never happened
                ctx.store.update_instance(
                    record.name, state=InstanceState.FAILED.value, state_reason="launch did not complete"
                )
        if all(found) and len(found) == node_count(nodes[0], ctx.spec):
            return next(info for info in found if info is not None)
        if any(found):  # part of a multi-node launch: all or nothing
            missing = ", ".join(str(r.node_rank) for r, info in zip(nodes, found, strict=True) if info is None)
            terminate_group(ctx.store, nodes, provider, reason=f"launch did not complete: no node {missing}")
    return None


def _offer_key(provider: str, instance_type: str | None, region: str | None) -> tuple[str, str, str]:
    return provider, instance_type or "", region or ""


@dataclasses.dataclass
class _Failover:
    """What a launch knows of the offers tried for the job: those given up (refused by the cloud,
    or replaced for being broken) with why, and the refusals seen."""

    given_up: dict[tuple[str, str, str], str]
    history: list[str]
    refusals: list[OfferRefusedError]

    @classmethod
    def from_records(cls, records: list[Instance]) -> _Failover:
        abandoned = [(r, AbandonReason(r.abandon_reason)) for r in records if r.abandon_reason]
        given_up = {
            _offer_key(r.provider, r.instance_type, r.region): r.state_reason or ""
            for r, why in abandoned
            if why.gives_up_offer
        }
        history = [f"{key[0]} {key[1]} {key[2]}".strip() + f": {why}" for key, why in given_up.items()]
        refusals: list[OfferRefusedError] = []  # this call's; the earlier ones' reasons are in history
        if any(
            why.gives_up_offer and why not in (AbandonReason.NO_CAPACITY, AbandonReason.REPLACED)
            for _, why in abandoned
        ):
            refusals.append(OfferRefusedError("earlier", "an earlier attempt's refusal was not for capacity"))
        return cls(given_up, history, refusals)

    def skips(self, offer: Offer) -> bool:
        return _offer_key(offer.provider, offer.instance_type, offer.region) in self.given_up

    def refused(self, offer: Offer, err: OfferRefusedError, where: str) -> None:
        self.refusals.append(err)
        self.history.append(f"{offer.provider} {offer.instance_type} {offer.region or ''}".strip() + f": {where}{err}")

    def all_refused(self) -> OfferRefusedError:
        """Every fitting offer was refused or given up: no capacity only if every refusal said so."""
        said = f"every fitting offer was refused or given up ({len(self.history)}): " + "; ".join(self.history)
        if all(isinstance(err, NoCapacityError) for err in self.refusals):
            return NoCapacityError("all", said)
        return OfferRefusedError("all", said)


def launch_next(ctx: JobContext) -> InstanceInfo:
    """Launch the cheapest fitting offer not yet given up on, failing over on capacity refusals.

    Every attempt gets its own deterministic name and its ``instances`` row *before* the launch
    call; a refused attempt stays there as ``failed`` with the cloud's error, and its offer is not
    tried again for this job (nor is one whose instance was replaced for being broken).
    """
    providers = ctx.offer_providers()
    ranked = _ranked_offers(ctx, providers)
    failover = _Failover.from_records(ctx.store.instances_for_job(ctx.uuid))
    ensure_within_cost(ctx, "before launching another instance")
    ensure_within_run_budget(ctx)
    ensure_run_slot(ctx)
    for offer in ranked:
        if failover.skips(offer):
            continue
        if offer.gpu_count and offer.gpu_count < ctx.spec.gpus_per_node:
            continue  # fewer GPUs than trainer processes per node
        name = _next_attempt_name(ctx, failover)
        names = node_names(name, ctx.spec.num_nodes)
        provider = providers[offer.provider]
        _record_intents(ctx, offer, provider, names)
        # The intents are committed: from here teardown waits for this launch to settle. A cancel or
        # teardown that came first means no launch at all.
        _refuse_if_cancelled(ctx, names)
        ensure_run_slot(ctx, intent=name, also=tuple(names[1:]))
        launched = _launch_nodes(ctx, offer, provider, names, failover)
        if launched is None:
            continue  # all or nothing: the next offer
        _terminate_if_torn_down(ctx, names, provider)
        log.info(
            "launched %s: %s%s %s %s at %s USD/h (%s)",
            name,
            f"{len(names)} nodes of " if len(names) > 1 else "",
            offer.provider,
            offer.instance_type,
            offer.region or "",
            offer.price_per_hour,
            ", ".join(i.instance_id for i in launched),
        )
        return launched[0]
    raise failover.all_refused()


def _ranked_offers(ctx: JobContext, providers: dict[str, ComputeProvider]) -> list[Offer]:
    """Every fitting offer of the job's providers, cheapest first; a cloud that cannot be asked is
    skipped while another can (and named if none fits)."""
    spec = ctx.spec
    request = request_from(
        spec.gpu,
        instance_type=spec.instance_type,
        regions=spec.regions,
        max_price_per_hour=spec.max_price_per_hour,
        spot=spec.spot,
    )
    offers: list[Offer] = []
    unreachable: list[str] = []
    for name, provider in providers.items():
        try:
            offers.extend(provider.list_offers(request))
        except ProviderError as err:
            if len(providers) == 1:
                raise
            unreachable.append(f"{name}: {err}")  # the other clouds may still serve the job
    try:
        return rank_offers(offers, request)
    except NoOfferError as err:
        raise NoOfferError(str(err) + "".join(f"; {u}" for u in unreachable)) from None


def _next_attempt_name(ctx: JobContext, failover: _Failover) -> str:
    """The next attempt's deterministic name, once ``max_launch_attempts`` allows another.

    Relaunches after an interruption are limited by max_recoveries, not max_launch_attempts; the
    nodes of a multi-node launch are one attempt.
    """
    records = ctx.store.instances_for_job(ctx.uuid)
    attempts = len({r.node_group or r.name for r in records if r.abandon_reason != AbandonReason.INTERRUPTED})
    if attempts + 1 > ctx.spec.max_launch_attempts:
        raise NoCapacityError(
            "all",
            f"gave up after {ctx.spec.max_launch_attempts} launch attempts (max_launch_attempts): "
            + "; ".join(failover.history),
        )
    return instance_name(ctx.job.dag_id, ctx.job.run_id, ctx.uuid, len(records) + 1)


def _record_intents(ctx: JobContext, offer: Offer, provider: ComputeProvider, names: list[str]) -> None:
    """One ``instances`` row per node, before any launch call (what teardown and the reaper find)."""
    for rank, node in enumerate(names):
        ctx.store.record_instance_intent(
            ctx.uuid,
            provider=provider.name,
            name=node,
            instance_type=offer.instance_type,
            region=offer.region,
            price_per_hour=offer.price_per_hour,
            spot=offer.spot,
            node_rank=rank,
            node_group=names[0] if ctx.spec.num_nodes > 1 else None,
            gpu_name=offer.gpu_name,
            gpu_count=offer.gpu_count,
        )


def _refuse_if_cancelled(ctx: JobContext, names: list[str]) -> None:
    stop = cancelled_reason(ctx.fresh_job())
    if stop:
        for node in names:
            ctx.store.update_instance(
                node,
                state=InstanceState.FAILED.value,
                state_reason=NOT_LAUNCHED_CANCELLED,
                abandon_reason=AbandonReason.CANCELLED.value,
            )
        raise JobCancelledError(stop)


def _launch_nodes(
    ctx: JobContext, offer: Offer, provider: ComputeProvider, names: list[str], failover: _Failover
) -> list[InstanceInfo] | None:
    """Launch every node of the attempt (adopting one the cloud already has by its name). None: the
    offer was refused (the attempt abandoned, the next offer to try); other errors are raised."""
    store = ctx.store
    launched: list[InstanceInfo] = []
    for rank, node in enumerate(names):
        try:
            info = provider.find_instance(node) or provider.launch(offer, node)
        except ProviderError as err:
            capacity = isinstance(err, OfferRefusedError)  # this offer is out; the next is tried
            where = f"node {rank} of {len(names)}: " if len(names) > 1 else ""
            reason = f"{err.why}: {where}{err}" if isinstance(err, OfferRefusedError) else f"{where}{err}"
            abandon = _refusal(err).value if isinstance(err, OfferRefusedError) else None
            if isinstance(err, OfferRefusedError):
                failover.refused(offer, err, where)
                log.warning(
                    "%s for %s %s %s, trying the next offer", err.why, where, offer.provider, offer.instance_type
                )
            if err.instance_id:  # created despite the error: make sure teardown can find it
                store.update_instance(
                    node,
                    instance_id=err.instance_id,
                    state=InstanceState.UNKNOWN.value,
                    state_reason=reason,
                    abandon_reason=abandon,
                )
            else:
                store.update_instance(
                    node, state=InstanceState.FAILED.value, state_reason=reason, abandon_reason=abandon
                )
            _abandon_attempt(store, names, rank, provider, reason, AbandonReason(abandon) if abandon else None)
            if capacity:
                return None
            raise
        store.update_instance(
            node,
            instance_id=info.instance_id,
            state=str(info.state),
            address=info.address,
            launched_at=utcnow(),
            details=info.details,
        )
        launched.append(info)
    return launched


def _refusal(err: OfferRefusedError) -> AbandonReason:
    """How the cloud refused the offer."""
    if isinstance(err, NoCapacityError):
        return AbandonReason.NO_CAPACITY
    if isinstance(err, OfferNotOpenError):
        return AbandonReason.NOT_OPEN
    return AbandonReason.REFUSED


def _abandon_attempt(
    store: ResultsStore,
    names: list[str],
    failed_rank: int,
    provider: ComputeProvider,
    reason: str,
    abandon: AbandonReason | None,
) -> None:
    """A node of a multi-node launch could not be had: the nodes launched before it are terminated
    and those after it never launched, all with the same reason (so the offer is given up)."""
    if len(names) == 1:
        return
    why = f"{reason} (all or nothing: the attempt's other nodes are released)"
    launched = [store.instance(n) for n in names[:failed_rank]]
    for node in names[failed_rank + 1 :]:
        store.update_instance(
            node, state=InstanceState.FAILED.value, state_reason=why, abandon_reason=abandon.value if abandon else None
        )
    terminate_group(store, [r for r in launched if r is not None], provider, reason=why, abandon=abandon)


def _terminate_if_torn_down(ctx: JobContext, names: list[str], provider: ComputeProvider) -> None:
    """A teardown that started while the launch call was in flight may have given up waiting for
    it: terminate what was just created here too (terminating twice is harmless)."""
    job = ctx.fresh_job()
    if job.teardown_started_at is None:
        return
    for name in names:
        record = ctx.store.instance(name)
        if record is not None and record.state != InstanceState.TERMINATED:
            log.warning("teardown began while %s was launching: terminating it", name)
            terminate_record(
                ctx.store,
                record,
                provider,
                reason=NOT_LAUNCHED_CANCELLED.replace("not launched", "launched"),
                abandon=AbandonReason.CANCELLED,
            )
    raise JobCancelledError(cancelled_reason(job) or f"job {ctx.uuid} is being torn down")
