"""The steps of a training job, as plain functions over the results store and a provider.

Operators are thin wrappers around these; tests call them directly. Each step reads what it needs
from the results DB (not XCom), so any step can be retried on its own.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from gpu_training.errors import (
    BadRequestError,
    HostError,
    InstanceNotFoundError,
    NoCapacityError,
    ProviderError,
    TrainerFailedError,
)
from gpu_training.hosts.base import CONFIG_PATH, OUTPUT_DIR, REFERENCE_TRAINER_DIR, TRAINER_DIR, Host
from gpu_training.job_config import build_job_config, render_yaml
from gpu_training.offers import NoOfferError, rank_offers, request_from
from gpu_training.params import DEFAULT_COMMAND, JobSpec, parse_job_params, render_command
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
#: ``state_reason`` prefixes of attempts whose offer is not tried again for the job.
NO_CAPACITY = "no capacity:"
REPLACED = "replaced:"


def job_spec(store: ResultsStore, job_uuid: str) -> JobSpec:
    return parse_job_params(store.job(job_uuid).params)


def register_job(store: ResultsStore, params: dict, *, dag_id: str, run_id: str, map_index: int = -1) -> str:
    """Validate params and create the job row (idempotent per dag run). Returns the job uuid."""
    spec = parse_job_params(params)
    _providers(spec)  # an unavailable provider fails here, before anything is created
    store.check_schema()
    job_uuid = store.create_job(
        project_id=spec.project_id,
        provider=spec.provider,
        runtime=spec.runtime,
        params=spec.to_dict(),
        dag_id=dag_id,
        run_id=run_id,
        map_index=map_index,
    )
    store.update_job(job_uuid, outputs_uri=job_outputs_uri(spec.outputs_uri, job_uuid))
    return job_uuid


def build_config(store: ResultsStore, job_uuid: str) -> str:
    """Render the job's YAML config and store it on the job row."""
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
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    store.set_status(job_uuid, "provisioning", from_statuses=("pending",))
    live = [i for i in store.instances_for_job(job_uuid) if i.state not in ("terminated", "failed")]
    for record in reversed(live):
        provider = get_provider(record.provider, spec)
        found = provider.find_instance(record.name)
        if found is not None:
            store.update_instance(record.name, instance_id=found.instance_id, state=str(found.state))
            return found
        if not record.instance_id:  # the intent was recorded, the launch never happened
            store.update_instance(record.name, state="failed", state_reason="launch did not complete")
    return launch_next(store, job_uuid)


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
        if (r.state_reason or "").startswith((NO_CAPACITY, REPLACED))
    }
    history = [f"{key[0]} {key[1]} {key[2]}".strip() + f": {why}" for key, why in given_up.items()]
    for offer in ranked:
        if _offer_key(offer.provider, offer.instance_type, offer.region) in given_up:
            continue
        number = len(store.instances_for_job(job_uuid)) + 1
        if number > spec.max_launch_attempts:
            raise NoCapacityError(
                "all",
                f"gave up after {spec.max_launch_attempts} launch attempts (max_launch_attempts): "
                + "; ".join(history),
            )
        provider = providers[offer.provider]
        name = instance_name(job.dag_id, job.run_id, job_uuid, number)
        store.record_instance_intent(
            job_uuid,
            provider=provider.name,
            name=name,
            instance_type=offer.instance_type,
            region=offer.region,
            price_per_hour=offer.price_per_hour,
            spot=offer.spot,
        )
        try:
            info = provider.find_instance(name) or provider.launch(offer, name)
        except ProviderError as err:
            if isinstance(err, NoCapacityError):
                reason = f"{NO_CAPACITY} {err}"
                history.append(f"{offer.provider} {offer.instance_type} {offer.region or ''}".strip() + f": {err}")
                log.warning("no capacity for %s %s, trying the next offer", offer.provider, offer.instance_type)
            else:
                reason = str(err)
            if err.instance_id:  # created despite the error: make sure teardown can find it
                store.update_instance(name, instance_id=err.instance_id, state="unknown", state_reason=reason)
            else:
                store.update_instance(name, state="failed", state_reason=reason)
            if isinstance(err, NoCapacityError):
                continue
            raise
        store.update_instance(
            name,
            instance_id=info.instance_id,
            state=str(info.state),
            address=info.address,
            launched_at=utcnow(),
            details=info.details,
        )
        log.info(
            "launched %s: %s %s %s at %s USD/h (%s)",
            name,
            offer.provider,
            offer.instance_type,
            offer.region or "",
            offer.price_per_hour,
            info.instance_id,
        )
        return info
    raise NoCapacityError("all", f"every fitting offer was refused or given up ({len(history)}): " + "; ".join(history))


def current_instance(store: ResultsStore, job_uuid: str) -> Instance:
    """The job's latest instance record that was not terminated."""
    live = [i for i in store.instances_for_job(job_uuid) if i.state not in ("terminated", "failed")]
    if not live:
        raise InstanceNotFoundError(store.job(job_uuid).provider, f"job {job_uuid} has no live instance")
    return live[-1]


def _provider_and_info(store: ResultsStore, job_uuid: str) -> tuple[ComputeProvider, InstanceInfo]:
    record = current_instance(store, job_uuid)
    provider = get_provider(record.provider, job_spec(store, job_uuid))
    return provider, _instance_info(provider, record)


def host_for(store: ResultsStore, job_uuid: str) -> Host:
    provider, info = _provider_and_info(store, job_uuid)
    return provider.host(info)


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
    """Whether the instance runs and answers SSH; called once per poll by the boot wait.

    A rented instance that turns unhealthy, vanishes, or is not usable within the provider's
    provisioning timeout is terminated and replaced by the next offer (``False``: keep waiting).
    """
    spec = job_spec(store, job_uuid)
    record = current_instance(store, job_uuid)
    provider = get_provider(record.provider, spec)
    timeout = provision_timeout(spec, provider)
    waited = utcnow() - (record.launched_at or record.created_at)
    over = waited > timeout
    took = f"after {waited.total_seconds() / 60:.1f} min (provisioning timeout {timeout.total_seconds() / 60:g} min)"
    try:
        info = _instance_info(provider, record)
    except InstanceNotFoundError as err:
        return _replace_or_raise(store, job_uuid, record, provider, f"instance vanished while booting: {err}")
    if info.state != record.state:
        store.update_instance(record.name, state=str(info.state), address=info.address)
    if info.state.is_gone:
        status = info.details.get("status") or info.state
        return _replace_or_raise(
            store, job_uuid, record, provider, f"instance {info.instance_id} turned {status} while booting"
        )
    if info.state != InstanceState.RUNNING:
        if over:
            return _replace_or_raise(store, job_uuid, record, provider, f"instance still {info.state} {took}")
        return False
    try:
        provider.host(info).prepare()
    except BadRequestError:
        raise  # a wrong key or host key: a new instance would not help
    except (ProviderError, HostError) as err:
        if not provider.ephemeral:
            raise
        if over:
            return _replace_or_raise(store, job_uuid, record, provider, f"not reachable by SSH {took}: {err}")
        log.info("instance %s runs but does not answer SSH yet: %s", info.instance_id, err)
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
    store: ResultsStore, job_uuid: str, record: Instance, provider: ComputeProvider, reason: str
) -> bool:
    """Terminate a broken instance and launch the next offer (rented instances only)."""
    if not provider.ephemeral:
        raise ProviderError(provider.name, reason)
    log.warning("%s: %s; terminating it and trying the next offer", record.name, reason)
    _terminate_record(store, record, provider, reason=f"{REPLACED} {reason}")
    try:
        info = launch_next(store, job_uuid)
    except (NoCapacityError, NoOfferError) as err:
        raise NoOfferError(f"{reason}; no other offer could replace it: {err}") from err
    log.info("replacement instance %s (%s) is %s", info.name, info.instance_id, info.state)
    return False


def transfer_inputs(store: ResultsStore, job_uuid: str) -> dict[str, int]:
    """Put the config, the dataset and (for the default command) the reference trainer on the host."""
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    if job.config_yaml is None:
        raise TrainerFailedError(f"job {job_uuid} has no config yet: the build_config step did not run")
    host = host_for(store, job_uuid)
    host.prepare()
    host.put_bytes(job.config_yaml.encode(), CONFIG_PATH)
    files = 1
    if spec.dataset_uri:
        if _direct_s3(spec, host, spec.dataset_uri):
            expiry = int(spec.presigned_url_expiry_minutes * 60)
            files += len(fetch_dataset_direct(spec.dataset_uri, host, expiry_seconds=expiry))
        else:
            files += len(fetch_dataset(spec.dataset_uri, host))
    reference_trainer = list(spec.command) == DEFAULT_COMMAND and spec.runtime == "process"
    if reference_trainer or any("{workdir}/trainer/" in part for part in spec.command):
        files += len(host.put_tree(REFERENCE_TRAINER_DIR, TRAINER_DIR))
    return {"files": files}


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
    """Start the trainer detached (re-attaching if a retry finds it started). Returns its pid."""
    spec = job_spec(store, job_uuid)
    host, trainer = host_and_trainer(store, job_uuid)
    if isinstance(trainer, ContainerTrainer):
        report = trainer.start(ContainerSpec.for_job(spec, host), registry_login(spec.registry_conn_id))
        log.info("%s", report)
        status = trainer.status()
    else:
        argv = render_command(spec.command, python=host.python, workdir=host.workdir)
        status = host.start_trainer(argv, trainer_env(host))
    job = store.job(job_uuid)
    if job.trainer_started_at is None:
        store.update_job(job_uuid, trainer_started_at=utcnow())
    store.set_status(job_uuid, "running", from_statuses=("pending", "provisioning"))
    return status.pid


def follow_kwargs(store: ResultsStore, job_uuid: str) -> dict[str, Any]:
    """What :class:`~gpu_training.triggers.GlobalJsonTrigger` needs to follow the job: how to
    reach its host, how to ask for the trainer's status, and the job's limits."""
    spec = job_spec(store, job_uuid)
    host, trainer = host_and_trainer(store, job_uuid)
    return {
        "job_uuid": job_uuid,
        "target": host.follow_target(),
        "status_command": trainer.status_command(),
        "runtime": spec.runtime,
        "poll_interval_seconds": spec.poll_interval_seconds,
        "stall_timeout_seconds": spec.stall_timeout_minutes * 60,
        "max_runtime_seconds": spec.max_runtime_minutes * 60,
        "unreachable_timeout_seconds": spec.unreachable_timeout_minutes * 60,
        "stop_on_nan": spec.stop_on_nan,
    }


#: Ends after which the trainer may still be running and must be stopped.
_STOP_AFTER = frozenset({"stall", "max_runtime", "non_finite_loss", "cancelled"})


def after_follow(store: ResultsStore, job_uuid: str, result: dict[str, Any]) -> None:
    """Act on how following ended: stop a trainer that must not keep the GPU busy."""
    if result.get("kind") in _STOP_AFTER:
        _, trainer = host_and_trainer(store, job_uuid)
        trainer.stop()


def upload(store: ResultsStore, job_uuid: str) -> int:
    """Upload outputs with checksums and record them as artifacts; returns the file count."""
    job = store.job(job_uuid)
    spec = parse_job_params(job.params)
    host = host_for(store, job_uuid)
    records = upload_outputs(
        host,
        spec.outputs_uri,
        job_uuid,
        direct=_direct_s3(spec, host, job.outputs_uri or ""),
        expiry_seconds=int(spec.presigned_url_expiry_minutes * 60),
    )
    store.record_artifacts(job_uuid, records)
    return len(records)


def teardown(store: ResultsStore, job_uuid: str) -> list[str]:
    """Terminate every instance of the job that is not known to be gone; returns their names.

    Works from the results DB alone, so it also catches an instance whose launch call crashed
    after the cloud created it (found by its deterministic name). Each termination is retried
    until the provider reports the instance gone; cost is settled per instance and on the job.
    """
    terminated: list[str] = []
    errors: list[str] = []
    spec = job_spec(store, job_uuid)
    for record in store.instances_for_job(job_uuid):
        if record.state == "terminated":
            continue
        try:
            provider = get_provider(record.provider, spec)
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
    now = utcnow()
    started = record.launched_at or record.created_at
    billable = max(0.0, (now - started).total_seconds())
    store.update_instance(
        record.name,
        instance_id=instance_id,
        state="terminated",
        terminated_at=now,
        billable_seconds=round(billable, 3),
        cost_usd=round(billable / 3600 * (record.price_per_hour or 0.0), 6),
        **({"state_reason": reason} if reason else {}),
    )
    return True


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


def finalize(store: ResultsStore, job_uuid: str, *, failed_tasks: list[str]) -> str:
    """Settle the job's final status from what happened; returns it."""
    job = store.job(job_uuid)
    if job.status == "cancelled":
        store.finish(job_uuid, "cancelled")
        return "cancelled"
    if job.failure_reason is None and (failed_tasks or not job.project_ended):
        what = ", ".join(failed_tasks) if failed_tasks else "the trainer never reported PROJECT end"
        store.record_failure(job_uuid, f"job did not complete: {what}")
    job = store.job(job_uuid)
    status = "failed" if job.failure_reason else "completed"
    store.finish(job_uuid, status)
    return status
