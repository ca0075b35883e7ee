"""Terminating an instance: asked until the provider reports it gone, then its cost settled.

Used by teardown, by a replaced or interrupted launch attempt, and by the reaper.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from gpu_training.errors import BadRequestError, HostError, InstanceNotFoundError, ProviderError
from gpu_training.providers.base import ComputeProvider, InstanceState
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.states import AbandonReason
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)

#: How long teardown keeps terminating and querying an instance until the provider reports it gone.
TERMINATE_BUDGET = timedelta(minutes=15)
TERMINATE_BACKOFF_SECONDS = 2.0


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


def settle_terminated(
    store: ResultsStore,
    record: Instance,
    instance_id: str | None,
    *,
    reason: str = "",
    abandon: AbandonReason | None = None,
) -> None:
    """Record a verified termination and its cost: billed from launch to now, at the offer's price
    (``abandon``: why its attempt was given up)."""
    now = utcnow()
    billable = max(0.0, (now - (record.launched_at or record.created_at)).total_seconds())
    store.update_instance(
        record.name,
        instance_id=instance_id,
        state=InstanceState.TERMINATED.value,
        terminated_at=now,
        billable_seconds=round(billable, 3),
        cost_usd=round(billable / 3600 * (record.price_per_hour or 0.0), 6),
        **({"state_reason": reason[:4000]} if reason else {}),
        **({"abandon_reason": abandon.value} if abandon else {}),
    )


def terminate_record(
    store: ResultsStore,
    record: Instance,
    provider: ComputeProvider,
    *,
    reason: str = "",
    abandon: AbandonReason | None = None,
) -> bool:
    """Terminate the recorded instance until gone and settle its cost; False if it never existed."""
    instance_id = record.instance_id
    if not instance_id:
        found = provider.find_instance(record.name)  # a launch that crashed after the cloud acted
        instance_id = found.instance_id if found else None
    if not instance_id:
        if record.state != InstanceState.FAILED:
            store.update_instance(
                record.name, state=InstanceState.FAILED.value, state_reason=record.state_reason or "never launched"
            )
        return False
    terminate_until_gone(provider, instance_id)
    settle_terminated(store, record, instance_id, reason=reason, abandon=abandon)
    return True


def terminate_group(
    store: ResultsStore,
    nodes: list[Instance],
    provider: ComputeProvider,
    *,
    reason: str,
    abandon: AbandonReason | None = None,
) -> None:
    """Terminate every node of a launch attempt that exists (all or nothing); failures are raised
    after trying each (teardown tries again)."""
    errors = []
    for record in nodes:
        try:
            terminate_record(store, store.instance(record.name) or record, provider, reason=reason, abandon=abandon)
        except Exception as err:
            errors.append(f"{record.name}: {err}")
    if errors:
        raise ProviderError(provider.name, "could not terminate " + "; ".join(errors))
