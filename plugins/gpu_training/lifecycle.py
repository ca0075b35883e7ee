"""The steps of a training job, as plain functions over the results store and a provider.

Operators are thin wrappers around these; tests call them directly. Each step reads what it needs
from the results DB (not XCom), so any step can be retried on its own.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta

from gpu_training.errors import InstanceNotFoundError, NoCapacityError, ProviderError, TrainerFailedError
from gpu_training.hosts.base import CONFIG_PATH, OUTPUT_DIR, REFERENCE_TRAINER_DIR, TRAINER_DIR, Host
from gpu_training.job_config import build_job_config, render_yaml
from gpu_training.offers import NoOfferError, rank_offers, request_from
from gpu_training.params import DEFAULT_COMMAND, JobSpec, parse_job_params, render_command
from gpu_training.progress import PollOutcome, poll_progress, read_log_since
from gpu_training.providers.base import ComputeProvider, InstanceInfo, InstanceState, Offer, instance_name
from gpu_training.providers.registry import get_provider
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.store import ResultsStore
from gpu_training.runtimes import ContainerSpec, ContainerTrainer, Trainer, registry_login, trainer_for
from gpu_training.storage import fetch_dataset, fetch_dataset_direct, job_outputs_uri, upload_outputs

log = logging.getLogger(__name__)

# How long an instance may take to become usable before the job gives up on it.
BOOT_TIMEOUT = timedelta(minutes=30)


def job_spec(store: ResultsStore, job_uuid: str) -> JobSpec:
    return parse_job_params(store.job(job_uuid).params)


def register_job(store: ResultsStore, params: dict, *, dag_id: str, run_id: str, map_index: int = -1) -> str:
    """Validate params and create the job row (idempotent per dag run). Returns the job uuid."""
    spec = parse_job_params(params)
    get_provider(spec.provider, spec)  # an unavailable provider fails here, before anything is created
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


def provision(store: ResultsStore, job_uuid: str, *, attempt: int = 1) -> InstanceInfo:
    """Launch the cheapest offer that fits, failing over to the next on a capacity error.

    Every attempt gets its own deterministic name and its ``instances`` row *before* the launch
    call; a refused attempt stays there as ``failed`` with the cloud's error. A retried task first
    looks for a live instance of an earlier try and keeps it.
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
    request = request_from(
        spec.gpu,
        instance_type=spec.instance_type,
        regions=spec.regions,
        max_price_per_hour=spec.max_price_per_hour,
        spot=spec.spot,
    )
    providers = {name: get_provider(name, spec) for name in (spec.providers or (spec.provider,))}
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
    refusals: list[str] = []
    for number, offer in enumerate(ranked, start=attempt):
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
            if err.instance_id:  # created despite the error: make sure teardown can find it
                store.update_instance(name, instance_id=err.instance_id, state="unknown", state_reason=str(err))
            else:
                store.update_instance(name, state="failed", state_reason=str(err))
            if isinstance(err, NoCapacityError):
                refusals.append(f"{offer.provider} {offer.instance_type} {offer.region or ''}: {err}".strip())
                log.warning("no capacity for %s %s, trying the next offer", offer.provider, offer.instance_type)
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
        return info
    raise NoCapacityError(
        "all", f"every fitting offer was refused for capacity ({len(refusals)}): " + "; ".join(refusals)
    )


def current_instance(store: ResultsStore, job_uuid: str) -> Instance:
    """The job's latest instance record that was not terminated."""
    live = [i for i in store.instances_for_job(job_uuid) if i.state not in ("terminated", "failed")]
    if not live:
        raise InstanceNotFoundError(store.job(job_uuid).provider, f"job {job_uuid} has no live instance")
    return live[-1]


def _provider_and_info(store: ResultsStore, job_uuid: str) -> tuple[ComputeProvider, InstanceInfo]:
    record = current_instance(store, job_uuid)
    provider = get_provider(record.provider, job_spec(store, job_uuid))
    if not record.instance_id:
        found = provider.find_instance(record.name)
        if found is None:
            raise InstanceNotFoundError(provider.name, f"instance {record.name} was never created")
        return provider, found
    return provider, provider.get_instance(record.instance_id)


def host_for(store: ResultsStore, job_uuid: str) -> Host:
    provider, info = _provider_and_info(store, job_uuid)
    return provider.host(info)


def host_and_trainer(store: ResultsStore, job_uuid: str) -> tuple[Host, Trainer]:
    """The instance's host and the job's trainer on it (a process or a container)."""
    provider, info = _provider_and_info(store, job_uuid)
    host = provider.host(info)
    return host, trainer_for(job_spec(store, job_uuid), host, info.name)


def check_ready(store: ResultsStore, job_uuid: str, *, boot_timeout: timedelta = BOOT_TIMEOUT) -> bool:
    """Whether the instance is up and its host usable; raises if it failed or overran its boot time."""
    record = current_instance(store, job_uuid)
    provider, info = _provider_and_info(store, job_uuid)
    if info.state != record.state:
        store.update_instance(record.name, state=str(info.state))
    if info.state.is_gone:
        raise ProviderError(provider.name, f"instance {info.instance_id} is {info.state} while booting")
    if info.state != InstanceState.RUNNING:
        waited = utcnow() - (record.launched_at or record.created_at)
        if waited > boot_timeout:
            raise ProviderError(
                provider.name,
                f"instance {info.instance_id} still {info.state} after {waited.total_seconds() / 60:.1f} min "
                f"(boot timeout {boot_timeout.total_seconds() / 60:g} min)",
            )
        return False
    provider.host(info).prepare()
    store.update_instance(record.name, ready_at=utcnow())
    return True


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


def poll(store: ResultsStore, job_uuid: str, *, log_offset: int | None = None) -> PollOutcome:
    """One progress poll (see :func:`gpu_training.progress.poll_progress`), with the trainer's new
    log lines since ``log_offset`` (``None``: its recent tail) for the task log."""
    spec = job_spec(store, job_uuid)
    host, trainer = host_and_trainer(store, job_uuid)
    outcome = poll_progress(
        store,
        host,
        job_uuid,
        stall_timeout=timedelta(minutes=spec.stall_timeout_minutes),
        max_runtime=timedelta(minutes=spec.max_runtime_minutes),
        trainer=trainer,
    )
    if outcome.done and not outcome.succeeded:
        trainer.stop()  # a stalled or overdue trainer must not keep the GPU busy
    text, next_offset = read_log_since(host, log_offset)
    return dataclasses.replace(outcome, log_text=text, log_offset=next_offset)


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
    after the cloud created it (found by its deterministic name).
    """
    terminated: list[str] = []
    errors: list[str] = []
    total_cost = 0.0
    spec = job_spec(store, job_uuid)
    for record in store.instances_for_job(job_uuid):
        if record.state == "terminated":
            total_cost += _cost(record)
            continue
        try:
            provider = get_provider(record.provider, spec)
            instance_id = record.instance_id
            if not instance_id:
                found = provider.find_instance(record.name)
                instance_id = found.instance_id if found else None
            if instance_id:
                provider.terminate(instance_id)
                _confirm_gone(provider, instance_id)
            now = utcnow()
            store.update_instance(record.name, state="terminated", terminated_at=now, instance_id=instance_id)
            record.terminated_at = now
            total_cost += _cost(record)
            terminated.append(record.name)
        except Exception as err:  # keep going: one stuck instance must not shield the others
            log.exception("terminating %s failed", record.name)
            errors.append(f"{record.name}: {err}")
    store.update_job(job_uuid, cost_usd=round(total_cost, 6))
    if errors:
        raise ProviderError("teardown", "could not terminate " + "; ".join(errors))
    return terminated


def _confirm_gone(provider: ComputeProvider, instance_id: str) -> None:
    try:
        info = provider.get_instance(instance_id)
    except InstanceNotFoundError:
        return
    if info.state not in (InstanceState.TERMINATED, InstanceState.STOPPING):
        raise ProviderError(provider.name, f"instance {instance_id} is still {info.state} after terminate")


def _cost(record: Instance) -> float:
    if not record.price_per_hour or not record.launched_at:
        return 0.0
    end = record.terminated_at or utcnow()
    return max(0.0, (end - record.launched_at).total_seconds()) / 3600 * record.price_per_hour


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
