"""The steps of a training job, as plain functions over the results store and a provider.

Operators are thin wrappers around these; tests call them directly. Each step reads what it needs
from the results DB (not XCom), so any step can be retried on its own.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from gpu_training import storage
from gpu_training.errors import (
    BadRequestError,
    HostError,
    InstanceNotFoundError,
    JobCancelledError,
    JobLimitError,
    JobParamsError,
    NoCapacityError,
    OfferNotOpenError,
    OfferRefusedError,
    ProviderError,
    RunSlotBusyError,
    StorageError,
    TrainerFailedError,
)
from gpu_training.hosts.base import (
    CONFIG_PATH,
    INIT_DIR,
    LOG_PATH,
    OUTPUT_DIR,
    REFERENCE_TRAINER_DIR,
    TRAINER_DIR,
    Host,
)
from gpu_training.job_config import build_job_config, render_yaml
from gpu_training.offers import NoOfferError, rank_offers, request_from
from gpu_training.params import DEFAULT_COMMAND, JobSpec, parse_job_params, render_command
from gpu_training.policy import Policy
from gpu_training.policy import enforce as enforce_policy
from gpu_training.preflight import check_connections
from gpu_training.providers.base import ComputeProvider, InstanceInfo, InstanceState, Offer, instance_name
from gpu_training.providers.registry import get_provider, provider_names
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.store import ResultsStore
from gpu_training.runtimes import ContainerSpec, ContainerTrainer, Trainer, registry_login, trainer_for
from gpu_training.storage import fetch_dataset, fetch_dataset_direct, job_outputs_uri, upload_outputs

log = logging.getLogger(__name__)

#: How long teardown keeps terminating and querying an instance until the provider reports it gone.
TERMINATE_BUDGET = timedelta(minutes=15)
TERMINATE_BACKOFF_SECONDS = 2.0
#: ``state_reason`` prefixes of attempts whose offer is not tried again for the job: refused by the
#: cloud (``OfferRefusedError.why``: no capacity, not open to the account, refused) or replaced.
NO_CAPACITY = f"{NoCapacityError.why}:"
REFUSED = tuple(f"{cls.why}:" for cls in (NoCapacityError, OfferNotOpenError, OfferRefusedError))
REPLACED = "replaced:"
#: ``state_reason`` prefix of an instance the cloud interrupted (spot): its offer stays eligible.
INTERRUPTED = "interrupted:"
#: How long after recording a launch intent teardown waits for that launch to settle (get an id, or
#: fail) while polling the cloud by the instance's name. A launch task killed by a cancel stops
#: within ~10 s (SIGTERM at its next heartbeat, SIGKILL 5 s later); what a cloud creates even later
#: is the reaper's.
LAUNCH_SETTLE = timedelta(seconds=45)
LAUNCH_SETTLE_POLL_SECONDS = 3.0
NOT_LAUNCHED_CANCELLED = "not launched: the job was cancelled or is being torn down"
#: The artifact name of the trainer's log (``logs/trainer.log`` on the host, uploaded as is).
LOG_ARTIFACT = LOG_PATH


def job_spec(store: ResultsStore, job_uuid: str) -> JobSpec:
    return parse_job_params(store.job(job_uuid).params)


def cancelled_reason(job: Any) -> str | None:
    """Why the job must not go on (cancelled, or being torn down), else None."""
    if job.status == "cancelled" or job.cancel_requested_at is not None:
        return f"job {job.uuid} was cancelled" + (f" by {job.cancelled_by}" if job.cancelled_by else "")
    if job.teardown_started_at is not None:
        return f"job {job.uuid} is being torn down"
    return None


def job_cost(store: ResultsStore, job_uuid: str, *, now: datetime | None = None) -> float:
    """What the job's instances have cost so far: settled ones as settled, live ones until now."""
    now = now or utcnow()
    total = 0.0
    for record in store.instances_for_job(job_uuid):
        if record.state == "terminated" or record.cost_usd is not None:
            total += record.cost_usd or 0.0
        elif record.instance_id and record.state != "failed":
            started = record.launched_at or record.created_at
            total += max(0.0, (now - started).total_seconds()) / 3600 * (record.price_per_hour or 0.0)
    return total


def cost_deadline(store: ResultsStore, job_uuid: str, spec: JobSpec) -> datetime | None:
    """When the job reaches ``max_cost_usd`` if its current instance keeps running (None: no limit,
    or a free instance)."""
    if not spec.max_cost_usd:
        return None
    price = sum(node.price_per_hour or 0.0 for node in current_nodes(store, job_uuid))
    if not price:
        return None
    now = utcnow()
    left = spec.max_cost_usd - job_cost(store, job_uuid, now=now)
    return now + timedelta(hours=max(0.0, left) / price)


def ensure_within_cost(store: ResultsStore, job_uuid: str, spec: JobSpec, what: str) -> None:
    if spec.max_cost_usd and (spent := job_cost(store, job_uuid)) >= spec.max_cost_usd:
        raise JobLimitError(f"reached max_cost_usd ({spec.max_cost_usd:g} USD, spent {spent:.4f}) {what}")


#: ``cancelled_by`` of a job that was not launched because its run's budget was spent.
BUDGET_CANCELLER = "run budget"


def budget_cancelled(job: Any) -> bool:
    """The job was cancelled before launching because its run's budget was spent."""
    return (job.cancelled_by or "").startswith(BUDGET_CANCELLER)


def run_cost(store: ResultsStore, dag_id: str, run_id: str) -> float:
    """What every job of a dag run has cost so far (a sweep's trials, a pipeline's stages)."""
    return sum(job_cost(store, uuid) for uuid in store.jobs_for_run(dag_id, run_id))


def ensure_within_run_budget(store: ResultsStore, job_uuid: str, spec: JobSpec) -> None:
    """No launch once the run's ``run_budget_usd`` is spent: the job is cancelled, not failed,
    because its run did what it was asked to (stop spending)."""
    if not spec.run_budget_usd:
        return
    job = store.job(job_uuid)
    spent = run_cost(store, job.dag_id, job.run_id)
    if spent >= spec.run_budget_usd:
        reason = f"{BUDGET_CANCELLER} of {spec.run_budget_usd:g} USD spent ({spent:.4f} USD)"
        store.request_cancel(job_uuid, by=reason)
        raise JobCancelledError(f"not launched: the {reason}")


def ensure_run_slot(
    store: ResultsStore, job_uuid: str, spec: JobSpec, *, intent: str | None = None, also: tuple[str, ...] = ()
) -> None:
    """At most ``run_max_instances`` jobs of the run hold an instance (launch to verified
    termination). Checked before listing offers, and again once this launch's intent row is
    committed: of two launches racing for the last slot the older row wins and the other forgets
    its intent and waits (raises :class:`RunSlotBusyError`)."""
    if not spec.run_max_instances:
        return
    job = store.job(job_uuid)
    live = store.live_instances_of_run(job.dag_id, job.run_id)
    if intent is None:
        holders = {r.job_id for r in live if r.job_id != job.id}
        busy = len(holders) >= spec.run_max_instances
    else:
        order: list[int] = []
        for r in live:  # one place per job, in the order the jobs first recorded an instance
            if r.job_id not in order:
                order.append(r.job_id)
        busy = job.id in order and order.index(job.id) >= spec.run_max_instances
        if busy:
            for name in (intent, *also):  # ``also``: the other nodes of a multi-node attempt
                store.delete_instance_intent(name)
    if busy:
        raise RunSlotBusyError(
            f"waiting for a slot: the run's jobs already hold {spec.run_max_instances} instances (run_max_instances)"
        )


def ensure_not_cancelled(store: ResultsStore, job_uuid: str) -> None:
    """Every step starts here: a cancelled job starts nothing new (no launch, no transfer)."""
    reason = cancelled_reason(store.job(job_uuid))
    if reason:
        raise JobCancelledError(reason)


def register_job(
    store: ResultsStore,
    params: dict,
    *,
    dag_id: str,
    run_id: str,
    map_index: int = -1,
    stage: str = "",
    init_from: tuple[str, str] | None = None,
) -> str:
    """Validate params and create the job row (idempotent per dag run, stage and map index).

    ``init_from`` is ``(stage, checkpoint path)``: the job starts from that file of the completed
    job of that stage of the same run (its uploaded, checksummed artifact). Returns the job uuid.
    """
    store.check_schema()
    if init_from is not None:
        params = {**params, "init_checkpoint_uri": stage_checkpoint_uri(store, dag_id, run_id, *init_from)}
    spec = parse_job_params(params)
    enforce_policy(spec)  # what the deployment allows, before any provider is asked anything
    _providers(spec)  # an unavailable provider fails here, before anything is created
    check_connections(spec)  # so does a connection the job needs that does not exist
    job_uuid = store.create_job(
        project_id=spec.project_id,
        provider=spec.provider,
        runtime=spec.runtime,
        params=spec.to_dict(),
        dag_id=dag_id,
        run_id=run_id,
        map_index=map_index,
        stage=stage,
    )
    store.update_job(job_uuid, outputs_uri=job_outputs_uri(spec.outputs_uri, job_uuid))
    return job_uuid


def stage_checkpoint_uri(store: ResultsStore, dag_id: str, run_id: str, stage: str, checkpoint: str) -> str:
    """The URI of ``checkpoint`` (a path in the job's outputs) of the run's completed ``stage`` job."""
    upstream = store.job_uuid_for_run(dag_id, run_id, -1, stage=stage)
    if upstream is None:
        raise JobParamsError("init_checkpoint_uri", f"stage {stage!r} has no job in run {run_id}")
    job = store.job(upstream)
    if job.status != "completed":
        raise JobParamsError("init_checkpoint_uri", f"stage {stage!r} (job {upstream}) is {job.status}, not completed")
    for artifact in store.artifacts(upstream):
        if artifact.name == checkpoint:
            return artifact.uri
    raise JobParamsError(
        "init_checkpoint_uri", f"stage {stage!r} (job {upstream}) uploaded no {checkpoint!r} among its outputs"
    )


def build_config(store: ResultsStore, job_uuid: str) -> str:
    """Render the job's YAML config and store it on the job row."""
    ensure_not_cancelled(store, job_uuid)
    config = build_job_config(job_uuid, job_spec(store, job_uuid))
    text = render_yaml(config)
    store.update_job(job_uuid, config_yaml=text)
    return text


def _providers(spec: JobSpec) -> dict[str, ComputeProvider]:
    return {name: get_provider(name, spec) for name in provider_names(spec)}


def provision(store: ResultsStore, job_uuid: str) -> InstanceInfo:
    """The job's instance: a live one from an earlier try, else the cheapest offer that fits.

    A retried task first asks the cloud for the instances it recorded (by their deterministic
    names) and keeps a live one; see :func:`launch_next` for the launch itself.
    """
    ensure_not_cancelled(store, job_uuid)
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    store.set_status(job_uuid, "provisioning", from_statuses=("pending",))
    live = [i for i in store.instances_for_job(job_uuid) if i.state not in ("terminated", "failed")]
    groups: dict[str, list[Instance]] = {}
    for record in live:
        groups.setdefault(record.node_group or record.name, []).append(record)
    for nodes in reversed(list(groups.values())):
        provider = get_provider(nodes[0].provider, spec)
        found = [provider.find_instance(record.name) for record in nodes]
        for record, info in zip(nodes, found, strict=True):
            if info is not None:
                store.update_instance(record.name, instance_id=info.instance_id, state=str(info.state))
            elif not record.instance_id:  # the intent was recorded, the launch never happened
                store.update_instance(record.name, state="failed", state_reason="launch did not complete")
        if all(found) and len(found) == node_count(nodes[0], spec):
            return next(info for info in found if info is not None)
        if any(found):  # part of a multi-node launch: all or nothing
            missing = ", ".join(str(r.node_rank) for r, info in zip(nodes, found, strict=True) if info is None)
            _terminate_group(store, nodes, provider, reason=f"launch did not complete: no node {missing}")
    return launch_next(store, job_uuid)


def node_count(record: Instance, spec: JobSpec) -> int:
    """How many nodes the launch attempt of ``record`` has (1 for a single-node instance)."""
    return spec.num_nodes if record.node_group else 1


def _terminate_group(store: ResultsStore, nodes: list[Instance], provider: ComputeProvider, *, reason: str) -> None:
    """Terminate every node of a launch attempt that exists (all or nothing); failures are raised
    after trying each (teardown tries again)."""
    errors = []
    for record in nodes:
        try:
            _terminate_record(store, store.instance(record.name) or record, provider, reason=reason)
        except Exception as err:
            errors.append(f"{record.name}: {err}")
    if errors:
        raise ProviderError(provider.name, "could not terminate " + "; ".join(errors))


def _offer_key(provider: str, instance_type: str | None, region: str | None) -> tuple[str, str, str]:
    return provider, instance_type or "", region or ""


def launch_next(store: ResultsStore, job_uuid: str) -> InstanceInfo:
    """Launch the cheapest fitting offer not yet given up on, failing over on capacity refusals.

    Every attempt gets its own deterministic name and its ``instances`` row *before* the launch
    call; a refused attempt stays there as ``failed`` with the cloud's error, and its offer is not
    tried again for this job (nor is one whose instance was replaced for being broken).
    """
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    request = request_from(
        spec.gpu,
        instance_type=spec.instance_type,
        regions=spec.regions,
        max_price_per_hour=spec.max_price_per_hour,
        spot=spec.spot,
    )
    providers = _providers(spec)
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
        ranked = rank_offers(offers, request)
    except NoOfferError as err:
        raise NoOfferError(str(err) + "".join(f"; {u}" for u in unreachable)) from None
    records = store.instances_for_job(job_uuid)
    given_up = {
        _offer_key(r.provider, r.instance_type, r.region): r.state_reason or ""
        for r in records
        if (r.state_reason or "").startswith((*REFUSED, REPLACED))
    }
    history = [f"{key[0]} {key[1]} {key[2]}".strip() + f": {why}" for key, why in given_up.items()]
    refusals: list[OfferRefusedError] = []  # this call's; the earlier ones' reasons are in history
    if any(not why.startswith((NO_CAPACITY, REPLACED)) for why in given_up.values()):
        refusals.append(OfferRefusedError("earlier", "an earlier attempt's refusal was not for capacity"))
    ensure_within_cost(store, job_uuid, spec, "before launching another instance")
    ensure_within_run_budget(store, job_uuid, spec)
    ensure_run_slot(store, job_uuid, spec)
    for offer in ranked:
        if _offer_key(offer.provider, offer.instance_type, offer.region) in given_up:
            continue
        if offer.gpu_count and offer.gpu_count < spec.gpus_per_node:
            continue  # fewer GPUs than trainer processes per node
        records = store.instances_for_job(job_uuid)
        number = len(records) + 1
        # Relaunches after an interruption are limited by max_recoveries, not max_launch_attempts;
        # the nodes of a multi-node launch are one attempt.
        attempts = len({r.node_group or r.name for r in records if not (r.state_reason or "").startswith(INTERRUPTED)})
        if attempts + 1 > spec.max_launch_attempts:
            raise NoCapacityError(
                "all",
                f"gave up after {spec.max_launch_attempts} launch attempts (max_launch_attempts): "
                + "; ".join(history),
            )
        provider = providers[offer.provider]
        name = instance_name(job.dag_id, job.run_id, job_uuid, number)
        names = node_names(name, spec.num_nodes)
        for rank, node in enumerate(names):
            store.record_instance_intent(
                job_uuid,
                provider=provider.name,
                name=node,
                instance_type=offer.instance_type,
                region=offer.region,
                price_per_hour=offer.price_per_hour,
                spot=offer.spot,
                node_rank=rank,
                node_group=name if spec.num_nodes > 1 else None,
                gpu_name=offer.gpu_name,
                gpu_count=offer.gpu_count,
            )
        # The intents are committed: from here teardown waits for this launch to settle. A cancel or
        # teardown that came first means no launch at all.
        stop = cancelled_reason(store.job(job_uuid))
        if stop:
            for node in names:
                store.update_instance(node, state="failed", state_reason=NOT_LAUNCHED_CANCELLED)
            raise JobCancelledError(stop)
        ensure_run_slot(store, job_uuid, spec, intent=name, also=tuple(names[1:]))
        launched: list[InstanceInfo] = []
        for rank, node in enumerate(names):
            try:
                info = provider.find_instance(node) or provider.launch(offer, node)
            except ProviderError as err:
                capacity = isinstance(err, OfferRefusedError)  # this offer is out; the next is tried
                where = f"node {rank} of {len(names)}: " if len(names) > 1 else ""
                reason = f"{err.why}: {where}{err}" if isinstance(err, OfferRefusedError) else f"{where}{err}"
                if isinstance(err, OfferRefusedError):
                    refusals.append(err)
                    history.append(
                        f"{offer.provider} {offer.instance_type} {offer.region or ''}".strip() + f": {where}{err}"
                    )
                    log.warning(
                        "%s for %s %s %s, trying the next offer", err.why, where, offer.provider, offer.instance_type
                    )
                if err.instance_id:  # created despite the error: make sure teardown can find it
                    store.update_instance(node, instance_id=err.instance_id, state="unknown", state_reason=reason)
                else:
                    store.update_instance(node, state="failed", state_reason=reason)
                _abandon_attempt(store, names, rank, provider, reason)
                if capacity:
                    break
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
        if len(launched) < len(names):
            continue  # all or nothing: the next offer
        _terminate_if_torn_down(store, job_uuid, names, provider)
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
    said = f"every fitting offer was refused or given up ({len(history)}): " + "; ".join(history)
    if all(isinstance(err, NoCapacityError) for err in refusals):
        raise NoCapacityError("all", said)
    raise OfferRefusedError("all", said)


def node_names(name: str, num_nodes: int) -> list[str]:
    """The instance names of one launch attempt: ``name`` for node 0, ``name-n<rank>`` for the others."""
    return [name] + [f"{name}-n{rank}" for rank in range(1, num_nodes)]


def _abandon_attempt(
    store: ResultsStore, names: list[str], failed_rank: int, provider: ComputeProvider, reason: str
) -> None:
    """A node of a multi-node launch could not be had: the nodes launched before it are terminated
    and those after it never launched, all with the same reason (so the offer is given up)."""
    if len(names) == 1:
        return
    why = f"{reason} (all or nothing: the attempt's other nodes are released)"
    launched = [store.instance(n) for n in names[:failed_rank]]
    for node in names[failed_rank + 1 :]:
        store.update_instance(node, state="failed", state_reason=why)
    _terminate_group(store, [r for r in launched if r is not None], provider, reason=why)


def _terminate_if_torn_down(store: ResultsStore, job_uuid: str, names: list[str], provider: ComputeProvider) -> None:
    """A teardown that started while the launch call was in flight may have given up waiting for
    it: terminate what was just created here too (terminating twice is harmless)."""
    job = store.job(job_uuid)
    if job.teardown_started_at is None:
        return
    for name in names:
        record = store.instance(name)
        if record is not None and record.state != "terminated":
            log.warning("teardown began while %s was launching: terminating it", name)
            _terminate_record(
                store, record, provider, reason=NOT_LAUNCHED_CANCELLED.replace("not launched", "launched")
            )
    raise JobCancelledError(cancelled_reason(job) or f"job {job_uuid} is being torn down")


def current_nodes(store: ResultsStore, job_uuid: str) -> list[Instance]:
    """The job's live nodes, rank 0 first: the instances of its latest launch attempt that were not
    terminated (one for a single-node job)."""
    live = [i for i in store.instances_for_job(job_uuid) if i.state not in ("terminated", "failed")]
    if not live:
        raise InstanceNotFoundError(store.job(job_uuid).provider, f"job {job_uuid} has no live instance")
    group = live[-1].node_group or live[-1].name
    return sorted((i for i in live if (i.node_group or i.name) == group), key=lambda i: i.node_rank)


def current_instance(store: ResultsStore, job_uuid: str) -> Instance:
    """The job's latest instance record that was not terminated (of a multi-node job: its node 0,
    which writes global.json and holds the outputs)."""
    return current_nodes(store, job_uuid)[0]


def _provider_and_info(store: ResultsStore, job_uuid: str) -> tuple[ComputeProvider, InstanceInfo]:
    record = current_instance(store, job_uuid)
    provider = get_provider(record.provider, job_spec(store, job_uuid))
    return provider, _instance_info(provider, record)


def host_for(store: ResultsStore, job_uuid: str) -> Host:
    """The host of the job's instance (of a multi-node job: node 0, which holds the outputs)."""
    provider, info = _provider_and_info(store, job_uuid)
    return provider.host(info)


def node_hosts(store: ResultsStore, job_uuid: str) -> list[tuple[Instance, InstanceInfo, Host]]:
    """Every live node of the job with what its provider reports and its host, rank 0 first."""
    nodes = current_nodes(store, job_uuid)
    provider = get_provider(nodes[0].provider, job_spec(store, job_uuid))
    out = []
    for record in nodes:
        info = _instance_info(provider, record)
        out.append((record, info, provider.host(info)))
    return out


def node_label(record: Instance) -> str:
    """``node 1 (gpujob-...-n1)`` for a node of a multi-node job, the instance name otherwise."""
    return f"node {record.node_rank} ({record.name})" if record.node_group else record.name


def _on_each(items: list[Any], fn: Any) -> list[Any]:
    """``fn`` on every item, at once where there are several (nodes are separate machines); the
    first error is raised once all ended."""
    if len(items) == 1:
        return [fn(items[0])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    return [f.result() for f in futures]


def host_and_trainer(store: ResultsStore, job_uuid: str) -> tuple[Host, Trainer]:
    """The instance's host and the job's trainer on it (a process or a container)."""
    provider, info = _provider_and_info(store, job_uuid)
    host = provider.host(info)
    return host, trainer_for(job_spec(store, job_uuid), host, info.name)


def provision_timeout(spec: JobSpec, provider: ComputeProvider) -> timedelta:
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
    ensure_not_cancelled(store, job_uuid)
    spec = job_spec(store, job_uuid)
    nodes = current_nodes(store, job_uuid)
    provider = get_provider(nodes[0].provider, spec)
    timeout = provision_timeout(spec, provider)
    ensure_within_cost(store, job_uuid, spec, "while the instance booted")
    waited = utcnow() - (nodes[0].launched_at or nodes[0].created_at)
    over = waited > timeout
    took = f"after {waited.total_seconds() / 60:.1f} min (provisioning timeout {timeout.total_seconds() / 60:g} min)"
    infos: list[InstanceInfo] = []
    for record in nodes:
        what = f"{node_label(record)}: " if record.node_group else ""
        try:
            info = _instance_info(provider, record)
        except InstanceNotFoundError as err:
            return _replace_or_raise(store, job_uuid, nodes, provider, f"{what}instance vanished while booting: {err}")
        if info.state != record.state:
            store.update_instance(record.name, state=str(info.state), address=info.address)
        if info.state.is_gone:
            status = info.details.get("status") or info.state
            return _replace_or_raise(
                store, job_uuid, nodes, provider, f"{what}instance {info.instance_id} turned {status} while booting"
            )
        infos.append(info)
    for record, info in zip(nodes, infos, strict=True):
        if info.state != InstanceState.RUNNING:
            if over:
                what = f"{node_label(record)}: " if record.node_group else ""
                return _replace_or_raise(store, job_uuid, nodes, provider, f"{what}instance still {info.state} {took}")
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
                return _replace_or_raise(store, job_uuid, nodes, provider, f"{what}not reachable by SSH {took}: {err}")
            log.info("%sinstance %s runs but does not answer SSH yet: %s", what, info.instance_id, err)
            return False
        store.update_instance(record.name, ready_at=utcnow(), address=info.address)
    return True


def _instance_info(provider: ComputeProvider, record: Instance) -> InstanceInfo:
    if record.instance_id:
        return provider.get_instance(record.instance_id)
    found = provider.find_instance(record.name)
    if found is None:
        raise InstanceNotFoundError(provider.name, f"instance {record.name} was never created")
    return found


def _replace_or_raise(
    store: ResultsStore, job_uuid: str, nodes: list[Instance], provider: ComputeProvider, reason: str
) -> bool:
    """Terminate a broken instance (every node of its attempt) and launch the next offer (rented
    instances only)."""
    if not provider.ephemeral:
        raise ProviderError(provider.name, reason)
    log.warning("%s: %s; terminating it and trying the next offer", nodes[0].node_group or nodes[0].name, reason)
    _terminate_group(store, nodes, provider, reason=f"{REPLACED} {reason}")
    try:
        info = launch_next(store, job_uuid)
    except (OfferRefusedError, NoOfferError) as err:
        raise NoOfferError(f"{reason}; no other offer could replace it: {err}") from err
    log.info("replacement instance %s (%s) is %s", info.name, info.instance_id, info.state)
    return False


def transfer_inputs(store: ResultsStore, job_uuid: str) -> dict[str, int]:
    """Put the config, the dataset and (for the default command) the reference trainer on the host."""
    ensure_not_cancelled(store, job_uuid)
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    if job.config_yaml is None:
        raise TrainerFailedError(f"job {job_uuid} has no config yet: the build_config step did not run")
    config = job.config_yaml.encode()

    def transfer(host: Host) -> int:
        host.prepare()
        host.put_bytes(config, CONFIG_PATH)
        files = 1
        if spec.dataset_uri:
            if _direct_s3(spec, host, spec.dataset_uri):
                expiry = int(spec.presigned_url_expiry_minutes * 60)
                files += len(
                    fetch_dataset_direct(spec.dataset_uri, host, expiry_seconds=expiry, aws_conn_id=spec.aws_conn_id)
                )
            else:
                files += len(
                    fetch_dataset(
                        spec.dataset_uri, host, check_path=_allowed_path("dataset_uri"), aws_conn_id=spec.aws_conn_id
                    )
                )
        if spec.init_checkpoint_uri:
            files += _fetch_init_checkpoint(spec, host)
        reference_trainer = list(spec.command) == DEFAULT_COMMAND and spec.runtime == "process"
        if reference_trainer or any("{workdir}/trainer/" in part for part in spec.command):
            files += len(host.put_tree(REFERENCE_TRAINER_DIR, TRAINER_DIR))
        return files

    # Every node gets the same inputs (each trains on its shard of the same data).
    counts = _on_each([host for _, _, host in node_hosts(store, job_uuid)], transfer)
    return {"files": sum(counts), **({"nodes": len(counts)} if len(counts) > 1 else {})}


def _fetch_init_checkpoint(spec: JobSpec, host: Host) -> int:
    """The initial checkpoint into ``init/`` (one file, or every file under a prefix)."""
    uri = spec.init_checkpoint_uri
    try:
        if _direct_s3(spec, host, uri):
            expiry = int(spec.presigned_url_expiry_minutes * 60)
            return len(
                fetch_dataset_direct(uri, host, expiry_seconds=expiry, dest_dir=INIT_DIR, aws_conn_id=spec.aws_conn_id)
            )
        checked = _allowed_path("init_checkpoint_uri")
        return len(fetch_dataset(uri, host, dest_dir=INIT_DIR, check_path=checked, aws_conn_id=spec.aws_conn_id))
    except StorageError as err:
        raise StorageError(f"init_checkpoint_uri: {err}".replace("dataset ", "")) from err


def _allowed_path(param: str) -> Any:
    """Every local file a ``file://`` param reads is checked against the deployment's allowed roots
    as it is read (symlinks resolved): one planted since the job registered is refused too."""
    policy = Policy.current()
    return lambda path: policy.check_path(param, path)


def _direct_s3(spec: JobSpec, host: Host, uri: str) -> bool:
    """S3 data moves between a remote instance and S3 itself, not through this worker."""
    return uri.startswith("s3://") and host.remote and spec.s3_transfer == "direct"


def trainer_env(host: Host) -> dict[str, str]:
    """The trainer's whole environment: nothing of the worker's (no secrets) leaks into it."""
    import os

    env = {key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "TZ") if key in os.environ}
    env.update(
        {
            "HOME": host.workdir,
            "PYTHONUNBUFFERED": "1",
            "TRAINING_CONFIG": host.path(CONFIG_PATH),
            "TRAINING_OUTPUT_DIR": host.path(OUTPUT_DIR),
        }
    )
    return env


def start_trainer(store: ResultsStore, job_uuid: str) -> int | None:
    """Start the trainer detached (re-attaching if a retry finds it started). Returns its pid.

    On an interruptible (spot) instance the trainer's latest checkpoint is synced to the job's
    outputs URI while it trains, for a recovery on another instance to resume from.
    """
    ensure_not_cancelled(store, job_uuid)
    spec = job_spec(store, job_uuid)
    host, trainer = host_and_trainer(store, job_uuid)
    if current_instance(store, job_uuid).spot and (outputs := store.job(job_uuid).outputs_uri):
        expiry = int(min(7 * 24 * 3600, spec.max_runtime_minutes * 60 + 3600))
        storage.start_checkpoint_sync(host, outputs, expiry_seconds=expiry, aws_conn_id=spec.aws_conn_id)
    if isinstance(trainer, ContainerTrainer):
        report = trainer.start(ContainerSpec.for_job(spec, host), registry_login(spec.registry_conn_id))
        log.info("%s", report)
        status = trainer.status()
    elif spec.distributed:
        status = _start_distributed(store, job_uuid, spec)
    else:
        argv = render_command(spec.command, python=host.python, workdir=host.workdir)
        status = host.start_trainer(argv, trainer_env(host))
    job = store.job(job_uuid)
    if job.trainer_started_at is None:
        store.update_job(job_uuid, trainer_started_at=utcnow())
    store.set_status(job_uuid, "running", from_statuses=("pending", "provisioning"))
    return status.pid


#: Where node 0 listens for the others when no free port could be asked for (torchrun's default).
DEFAULT_MASTER_PORT = 29500
_FREE_PORT = 'exec "$1" -c "import socket; s = socket.socket(); s.bind((\'\', 0)); print(s.getsockname()[1])"'


def distributed_env(spec: JobSpec, *, rank: int, master_addr: str, master_port: int, nproc: int) -> dict[str, str]:
    """The usual distributed environment of node ``rank`` (what torchrun and launchers read)."""
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "NODE_RANK": str(rank),
        "NNODES": str(spec.num_nodes),
        "NPROC_PER_NODE": str(nproc),
        "WORLD_SIZE": str(spec.num_nodes * nproc),
    }


def distributed_command(spec: JobSpec, env: Mapping[str, str], *, python: str, workdir: str) -> list[str]:
    """The node's trainer command: the reference trainer under torchrun, or ``command`` with its
    ``{torchrun}`` placeholder expanded to the launcher and this node's flags."""
    command = list(spec.command)
    if command == DEFAULT_COMMAND:
        command = ["{torchrun}", "{workdir}/trainer/train.py"]
    torchrun = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env['NNODES']}",
        f"--nproc-per-node={env['NPROC_PER_NODE']}",
        f"--node-rank={env['NODE_RANK']}",
        f"--master-addr={env['MASTER_ADDR']}",
        f"--master-port={env['MASTER_PORT']}",
    ]
    argv: list[str] = []
    for part in render_command(command, python=python, workdir=workdir):
        argv.extend(torchrun if part == "{torchrun}" else [part])
    return argv


def _master_port(store: ResultsStore, record: Instance, host: Host) -> int:
    """A free port on node 0 for the others to meet at, asked once and kept on its record (a
    retried start uses the same)."""
    details = dict(record.details or {})
    if details.get("master_port"):
        return int(details["master_port"])
    rc, out, _ = host.script(_FREE_PORT, host.python, check=False, timeout=60)
    port = int(out.strip()) if rc == 0 and out.strip().isdigit() else DEFAULT_MASTER_PORT
    store.update_instance(record.name, details={**details, "master_port": port})
    return port


def _start_distributed(store: ResultsStore, job_uuid: str, spec: JobSpec) -> Any:
    """Start the trainer on every node with the distributed environment; returns node 0's status."""
    nodes = node_hosts(store, job_uuid)
    head, head_info, head_host = nodes[0]
    master_addr = str(head_info.details.get("private_ip") or head_info.address or "127.0.0.1")
    master_port = _master_port(store, head, head_host)
    nproc = spec.gpus_per_node or max(1, len(head_host.gpus))

    def start(node: tuple[Instance, InstanceInfo, Host]) -> Any:
        record, _, host = node
        env = distributed_env(
            spec, rank=record.node_rank, master_addr=master_addr, master_port=master_port, nproc=nproc
        )
        argv = distributed_command(spec, env, python=host.python, workdir=host.workdir)
        return host.start_trainer(argv, {**trainer_env(host), **env})

    log.info("starting %d nodes x %d processes (master %s:%d)", len(nodes), nproc, master_addr, master_port)
    return _on_each(nodes, start)[0]


def follow_kwargs(store: ResultsStore, job_uuid: str) -> dict[str, Any]:
    """What :class:`~gpu_training.triggers.GlobalJsonTrigger` needs to follow the job: how to
    reach its host, how to ask for the trainer's status, and the job's limits."""
    ensure_not_cancelled(store, job_uuid)
    spec = job_spec(store, job_uuid)
    host, trainer = host_and_trainer(store, job_uuid)
    peers = []
    if spec.num_nodes > 1:  # the other nodes: their trainers are watched and their logs shown too
        for record, _, node_host in node_hosts(store, job_uuid)[1:]:
            peers.append(
                {
                    "rank": record.node_rank,
                    "name": record.name,
                    "target": node_host.follow_target(),
                    "status_command": trainer_for(spec, node_host, record.name).status_command(),
                }
            )
    return {
        "job_uuid": job_uuid,
        "target": host.follow_target(),
        "status_command": trainer.status_command(),
        "peers": peers,
        "runtime": spec.runtime,
        "poll_interval_seconds": spec.poll_interval_seconds,
        "stall_timeout_seconds": spec.stall_timeout_minutes * 60,
        "max_runtime_seconds": spec.max_runtime_minutes * 60,
        "unreachable_timeout_seconds": spec.unreachable_timeout_minutes * 60,
        "stop_on_nan": spec.stop_on_nan,
        "cost_deadline": deadline.isoformat() if (deadline := cost_deadline(store, job_uuid, spec)) else None,
        "max_cost_usd": spec.max_cost_usd,
    }


# --- spot recovery -------------------------------------------------------------------------------


def interruption(store: ResultsStore, job_uuid: str) -> str | None:
    """Why the job's current instance is lost to an interruption (the cloud's words), else None.

    Asked when following ended with the host unreachable or the trainer gone: a spot instance the
    cloud reports interrupted, or that vanished altogether, is an interruption.
    """
    nodes = current_nodes(store, job_uuid)
    if not nodes[0].spot:
        return None
    provider = get_provider(nodes[0].provider, job_spec(store, job_uuid))
    for record in nodes:  # one node lost is the whole attempt lost
        what = f"{node_label(record)}: " if record.node_group else ""
        try:
            info = _instance_info(provider, record)
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
    ensure_not_cancelled(store, job_uuid)
    spec = job_spec(store, job_uuid)
    job = store.job(job_uuid)
    if job.recovery_count >= spec.max_recoveries:
        raise TrainerFailedError(
            f"instance interrupted ({reason}); no recovery left (max_recoveries={spec.max_recoveries})"
        )
    nodes = current_nodes(store, job_uuid)
    record = nodes[0]
    provider = get_provider(record.provider, spec)
    for node in nodes:
        store.update_instance(node.name, interrupted_at=utcnow(), interruption=reason[:500])
    _terminate_group(store, nodes, provider, reason=f"{INTERRUPTED} {reason}")
    store.begin_recovery(job_uuid)
    log.warning("job %s: %s interrupted (%s); recovery %d", job_uuid, record.name, reason, job.recovery_count + 1)
    return launch_next(store, job_uuid)


def awaiting_restart(store: ResultsStore, job_uuid: str) -> bool:
    """Whether a recovery launched an instance whose trainer has not been started yet."""
    job = store.job(job_uuid)
    if job.recovery_count == 0:
        return False
    if any(node.ready_at is None for node in current_nodes(store, job_uuid)):
        return True
    _, trainer = host_and_trainer(store, job_uuid)
    return not trainer.status().started


def restart_trainer(store: ResultsStore, job_uuid: str) -> dict[str, Any] | None:
    """On the recovered (ready) instance: inputs, the last synced checkpoint, then the trainer,
    which resumes from it. Returns the checkpoint's pointer (None: none was synced, it starts over)."""
    transfer_inputs(store, job_uuid)
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    host = host_for(store, job_uuid)
    pointer = None
    if job.outputs_uri:
        expiry = int(spec.presigned_url_expiry_minutes * 60)
        pointer = storage.restore_checkpoint(host, job.outputs_uri, expiry_seconds=expiry, aws_conn_id=spec.aws_conn_id)
    log.info("job %s resumes from %s", job_uuid, pointer or "the start (no checkpoint was synced)")
    store.update_job(job_uuid, last_progress_at=utcnow())  # the stall timeout counts from the restart
    start_trainer(store, job_uuid)
    return pointer


#: Ends after which the trainer may still be running and must be stopped.
_STOP_AFTER = frozenset(
    {
        "stall",
        "max_runtime",
        "max_cost",
        "non_finite_loss",
        "cancelled",
        "node_failed",
        "not_regular_file",
        "max_metric_rows",
    }
)
#: How often :func:`after_follow` tries to stop the trainer, and the wait before the n-th retry
#: (n times this).
STOP_ATTEMPTS = 3
STOP_BACKOFF_SECONDS = 2.0


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
    if kind == "trainer_exit":
        # Node 0's trainer ended: the other nodes' may still run (waiting for it), so they are
        # stopped too. A single node's trainer that ended has nothing left to stop.
        if job_spec(store, job_uuid).num_nodes == 1:
            return
    elif kind not in _STOP_AFTER:
        return
    import time

    for attempt in range(1, STOP_ATTEMPTS + 1):
        try:
            _stop_trainers(store, job_uuid)
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


def _stop_trainers(store: ResultsStore, job_uuid: str) -> None:
    """Stop the trainer on every node of the job."""
    spec = job_spec(store, job_uuid)
    _on_each(node_hosts(store, job_uuid), lambda node: trainer_for(spec, node[2], node[0].name).stop())


def upload(store: ResultsStore, job_uuid: str) -> int:
    """Upload outputs with checksums and record them as artifacts; returns the file count."""
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    Policy.current().check_file_uri("outputs_uri", spec.outputs_uri)
    host = host_for(store, job_uuid)
    records = upload_outputs(
        host,
        spec.outputs_uri,
        job_uuid,
        direct=_direct_s3(spec, host, job.outputs_uri or ""),
        expiry_seconds=int(spec.presigned_url_expiry_minutes * 60),
        on_skipped=lambda skipped: store.record_skipped_outputs(job_uuid, skipped),
        aws_conn_id=spec.aws_conn_id,
    )
    store.record_artifacts(job_uuid, records)
    return len(records)


#: The longest teardown waits for a cancelled job's log and latest checkpoint to upload before it
#: terminates the instance anyway: money comes first.
SALVAGE_BUDGET = timedelta(seconds=30)


def salvage_cancelled(store: ResultsStore, job_uuid: str, *, budget: timedelta | None = None) -> list[str]:
    """A cancelled job keeps what exists: its trainer log and latest checkpoint (the pointer and the
    files it names), uploaded with checksums as the job's artifacts, when its instance still answers
    and within ``budget``. Returns the names uploaded (none: not cancelled, no instance that got
    ready, already kept, or not in time). Never raises: teardown terminates whatever happens here.

    The upload runs in a thread that teardown waits for at most ``budget``; one still running then
    is abandoned (the instance's termination ends its transfer).
    """
    import threading

    budget = budget or SALVAGE_BUDGET
    job = store.job(job_uuid)
    if job.cancel_requested_at is None or budget_cancelled(job) or not job.outputs_uri:
        return []
    if any(a.name == LOG_ARTIFACT for a in store.artifacts(job_uuid)):
        return []  # kept by an earlier try of teardown (or uploaded before the cancel)
    try:
        node = current_nodes(store, job_uuid)[0]
    except InstanceNotFoundError:
        return []
    if node.ready_at is None:
        return []  # never booted: nothing was written
    uploaded: list[str] = []

    def keep() -> None:
        try:
            spec = job_spec(store, job_uuid)
            Policy.current().check_file_uri("outputs_uri", spec.outputs_uri)
            host = host_for(store, job_uuid)
            records = upload_outputs(
                host,
                spec.outputs_uri,
                job_uuid,
                direct=_direct_s3(spec, host, job.outputs_uri or ""),
                expiry_seconds=int(spec.presigned_url_expiry_minutes * 60),
                only=storage.latest_checkpoint_sources(host),
                aws_conn_id=spec.aws_conn_id,
            )
            store.record_artifacts(job_uuid, records)
            uploaded.extend(r.name for r in records)
        except Exception as err:  # an instance that no longer answers keeps nothing: say so
            log.warning("job %s was cancelled; its log and checkpoint could not be kept: %s", job_uuid, err)

    worker = threading.Thread(target=keep, name=f"salvage {job_uuid}", daemon=True)
    worker.start()
    worker.join(budget.total_seconds())
    if worker.is_alive():
        log.warning(
            "job %s was cancelled; keeping its log and checkpoint took more than %.0f s: terminating anyway",
            job_uuid,
            budget.total_seconds(),
        )
        return []
    if uploaded:
        log.info("job %s was cancelled; kept %s", job_uuid, ", ".join(uploaded))
    return list(uploaded)


def teardown(store: ResultsStore, job_uuid: str, *, settle: timedelta = LAUNCH_SETTLE) -> list[str]:
    """Terminate every instance of the job that is not known to be gone; returns their names.

    Works from the results DB alone, so it also catches an instance whose launch call crashed
    after the cloud created it (found by its deterministic name). Each termination is retried
    until the provider reports the instance gone; cost is settled per instance and on the job.

    A cancelled job's trainer log and latest checkpoint are kept first, when its instance still
    answers (:func:`salvage_cancelled`, at most :data:`SALVAGE_BUDGET`).

    Teardown can start while the launch is still in flight (a cancelled run's teardown starts
    before its killed launch task stops). So it first records that it started, which a launch
    checks after its intent and after its call, and a launch intent younger than ``settle`` is
    waited for (polling the cloud by name) until it has an id or failed.
    """
    terminated: list[str] = []
    errors: list[str] = []
    spec = job_spec(store, job_uuid)
    store.begin_teardown(job_uuid)
    salvage_cancelled(store, job_uuid)
    for record in store.instances_for_job(job_uuid):
        if record.state == "terminated":
            continue
        try:
            provider = get_provider(record.provider, spec)
            record = _settled(store, record, provider, settle)
            if record.state == "failed" and not record.instance_id:
                continue
            if _terminate_record(store, record, provider):
                terminated.append(record.name)
        except Exception as err:  # keep going: one stuck instance must not shield the others
            log.exception("terminating %s failed", record.name)
            errors.append(f"{record.name}: {err}")
    costs = [i.cost_usd or 0.0 for i in store.instances_for_job(job_uuid)]
    store.update_job(job_uuid, cost_usd=round(sum(costs), 6))
    if errors:
        raise ProviderError("teardown", "could not terminate " + "; ".join(errors))
    return terminated


def _settled(store: ResultsStore, record: Instance, provider: ComputeProvider, settle: timedelta) -> Instance:
    """The record once its launch settled: it has an instance id, the launch failed, the cloud
    shows the instance by name, or ``settle`` after the intent passed (then it is what it is)."""
    import time

    deadline = record.created_at + settle
    while record.state == "requested" and not record.instance_id:
        found = provider.find_instance(record.name)
        if found is not None:
            store.update_instance(record.name, instance_id=found.instance_id, state=str(found.state))
            return store.instance(record.name) or record
        if utcnow() >= deadline:
            break
        log.info("%s: its launch may still be in flight; waiting for it to settle", record.name)
        time.sleep(min(LAUNCH_SETTLE_POLL_SECONDS, max(0.0, (deadline - utcnow()).total_seconds())))
        record = store.instance(record.name) or record
    return record


def _terminate_record(store: ResultsStore, record: Instance, provider: ComputeProvider, *, reason: str = "") -> bool:
    """Terminate the recorded instance until gone and settle its cost; False if it never existed."""
    instance_id = record.instance_id
    if not instance_id:
        found = provider.find_instance(record.name)  # a launch that crashed after the cloud acted
        instance_id = found.instance_id if found else None
    if not instance_id:
        if record.state != "failed":
            store.update_instance(record.name, state="failed", state_reason=record.state_reason or "never launched")
        return False
    terminate_until_gone(provider, instance_id)
    settle_terminated(store, record, instance_id, reason=reason)
    return True


def settle_terminated(store: ResultsStore, record: Instance, instance_id: str | None, *, reason: str = "") -> None:
    """Record a verified termination and its cost: billed from launch to now, at the offer's price."""
    now = utcnow()
    billable = max(0.0, (now - (record.launched_at or record.created_at)).total_seconds())
    store.update_instance(
        record.name,
        instance_id=instance_id,
        state="terminated",
        terminated_at=now,
        billable_seconds=round(billable, 3),
        cost_usd=round(billable / 3600 * (record.price_per_hour or 0.0), 6),
        **({"state_reason": reason[:4000]} if reason else {}),
    )


def terminate_until_gone(provider: ComputeProvider, instance_id: str, *, budget: timedelta | None = None) -> None:
    """Terminate and query until the provider reports the instance gone (backoff, up to ``budget``).

    An instance that is already gone is fine; a request the provider refuses as invalid is raised
    at once. The last query is the verification: no "terminated" is recorded without it.
    """
    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential_jitter

    def again(err: BaseException) -> bool:
        return isinstance(err, (ProviderError, HostError)) and not isinstance(err, BadRequestError)

    state: InstanceState | None = None
    retrying = Retrying(
        retry=retry_if_exception(again),
        wait=wait_exponential_jitter(initial=TERMINATE_BACKOFF_SECONDS, max=60),
        stop=stop_after_delay((budget or TERMINATE_BUDGET).total_seconds()),
        before_sleep=lambda rs: log.warning(
            "terminate %s: %s; trying again", instance_id, rs.outcome.exception() if rs.outcome else ""
        ),
        reraise=True,
    )
    for attempt in retrying:
        with attempt:
            if state != InstanceState.STOPPING:  # already on its way out: just ask again
                try:
                    provider.terminate(instance_id)
                except InstanceNotFoundError:
                    return
            try:
                info = provider.get_instance(instance_id)
            except InstanceNotFoundError:
                return
            state = info.state
            if state != InstanceState.TERMINATED:
                raise ProviderError(provider.name, f"instance {instance_id} is still {state} after terminate")


def finalize(store: ResultsStore, job_uuid: str, *, failed_tasks: list[str], run_marked_failed: bool = False) -> str:
    """Settle the job's final status from what happened; returns it.

    A job is ``cancelled`` when it was cancelled through the results API or when its dag run was
    marked failed by someone (the Airflow UI, ``PATCH .../dagRuns/{run}``) before it completed.
    """
    job = store.job(job_uuid)
    if run_marked_failed and job.status not in ("completed", "cancelled") and not job.project_ended:
        store.request_cancel(job_uuid, by="airflow (the dag run was marked failed)")
        job = store.job(job_uuid)
    if job.status == "cancelled" or job.cancel_requested_at is not None:
        if job.failure_reason is None:
            store.update_job(job_uuid, failure_reason=cancelled_reason(job))
        store.finish(job_uuid, "cancelled")
        return "cancelled"
    if job.failure_reason is None and (failed_tasks or not job.project_ended):
        what = ", ".join(failed_tasks) if failed_tasks else "the trainer never reported PROJECT end"
        store.record_failure(job_uuid, f"job did not complete: {what}")
    job = store.job(job_uuid)
    status = "failed" if job.failure_reason else "completed"
    store.finish(job_uuid, status)
    return status
