"""One exception hierarchy for the orchestrator, all in this module.

Messages say what failed, with which input, and what to do about it. Provider errors carry the id of
anything half-created so teardown can still find and terminate it.

Whether to try again is decided here, by :func:`is_retryable`, from each class's flags:

- ``retryable``: the step that raised it may succeed when tried again later. False: a job's param, a
  request the provider rejects (``BadRequestError``, ``AuthorizationError``), no fitting offer, the
  trainer failed, a job limit, a cancel, the results DB not there, a retraining spec. An error from
  outside the hierarchy (``OSError``, a bug) counts as retryable: Airflow's ``retries`` decide.
  The operators use it through :func:`fail_unless_retryable`: a task whose error is not retryable fails
  with ``AirflowFailException`` (no Airflow retry); any other error is left to Airflow's retries.
- ``transient``: the API request itself failed for a moment (the provider is down, timing out or rate
  limiting: ``ProviderUnavailableError``), so the same request may be sent again at once. The clouds'
  HTTP retries (tenacity, ``hooks/cloud_api.py``) and the ``needs-retry`` veto on EC2's botocore
  retries (``hooks/ec2.py``) ask ``is_retryable(err, resend=True, idempotent=...)``. A capacity refusal
  is retryable (another offer, or later) but not transient: the same request is not sent again.
- ``may_have_acted``: the provider may have acted on the request before failing (a 5xx, no answer):
  a request that is not idempotent (a launch) is not sent again; the caller asks the provider what
  happened instead. A 429 (``RateLimitedError``) was not acted on.

Private control-flow signals (``_OffsetMoved`` in ``results/store.py``, the follower's) are not errors
and stay beside the code they steer.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar


class TrainingError(Exception):
    """Base class of every error this package raises on purpose."""

    #: The step may succeed when tried again later (an Airflow task retry).
    retryable: ClassVar[bool] = True
    #: The same API request may be sent again at once (it failed for a moment).
    transient: ClassVar[bool] = False
    #: The provider may have acted on the request before it failed.
    may_have_acted: ClassVar[bool] = True


class JobParamsError(TrainingError, ValueError):
    """A job parameter is invalid; raised before anything is provisioned. ``title``: the param's
    title in the trigger form, so a refusal names the field people see (:func:`gpu_training.params.refused`
    makes one with it)."""

    retryable = False

    def __init__(self, param: str, message: str, *, title: str | None = None) -> None:
        self.param = param
        self.reason = message
        self.title = title
        super().__init__(f"invalid param {param!r}{f' ({title})' if title else ''}: {message}")


class JobPolicyError(JobParamsError):
    """A job asks for something the deployment's policy does not allow."""


class ResultsDbError(TrainingError):
    """The results database is missing, unreachable or not migrated."""

    retryable = False


class JobNotFoundError(ResultsDbError):
    """No training job with this uuid exists in the results database."""


class ProviderError(TrainingError):
    """A compute provider call failed. ``instance_id`` is set when something was created anyway."""

    def __init__(self, provider: str, message: str, *, instance_id: str | None = None) -> None:
        self.provider = provider
        self.instance_id = instance_id
        super().__init__(f"{provider}: {message}")


class OfferRefusedError(ProviderError):
    """This offer cannot be had: the next offer is tried, and this one is not tried again for the
    job. ``why`` heads the abandoned attempt's reason (``state_reason`` of its instance row)."""

    why = "refused"


class NoCapacityError(OfferRefusedError):
    """The provider has no capacity for the requested offer right now; try another offer."""

    why = "no capacity"


class OfferNotOpenError(OfferRefusedError):
    """The offer is not open to this account (e.g. a RunPod GPU pool the key may not use): skipped,
    and not a capacity refusal."""

    why = "not open"


class CreateRefusedError(OfferRefusedError):
    """``createPod`` answered 400: the spec's "rule violation, or this GPU and data center could not
    be placed", which it gives no code to tell apart. The next offer is tried; capacity is not claimed."""


class PoolNotOpenError(OfferNotOpenError):
    """``createPod`` answered 403: this GPU pool is not open to the account (the spec: skip this
    candidate, keep going). Not a capacity refusal."""


class BadRequestError(ProviderError):
    """The provider rejected the request as invalid; retrying the same request will not help."""

    retryable = False


class AuthorizationError(BadRequestError):
    """The cloud does not accept the API key (HTTP 401), or the key may not do what was asked: no
    retry and no other offer of this cloud helps; the message names the connection and what to do."""


class ProviderUnavailableError(ProviderError):
    """The provider's API is down, timing out or rate limiting; retry later."""

    transient = True


class RateLimitedError(ProviderUnavailableError):
    """HTTP 429: the request was not acted on; wait ``retry_after`` seconds (if the cloud said)."""

    may_have_acted = False

    def __init__(self, provider: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(provider, message)
        self.retry_after = retry_after


class ServerError(ProviderUnavailableError):
    """HTTP 5xx or no answer: the cloud may or may not have acted on the request."""


class InstanceNotFoundError(ProviderError):
    """The provider does not know this instance (never created, or already gone)."""


class NoOfferError(TrainingError):
    """No offer fits the request (nothing matches, nothing free, or all above the price cap)."""

    retryable = False


class HostError(TrainingError):
    """A command or file operation on the instance failed."""


class NotRegularFileError(TrainingError):
    """A file the trainer writes (``global.json``, its log) is not a regular file (a symlink, a FIFO,
    a device...) or is reached through a symlink: it is never read, whatever it points to."""

    def __init__(self, relpath: str, what: str) -> None:
        super().__init__(f"{relpath} is not a regular file ({what or 'unknown'})")
        self.relpath = relpath
        self.what = what


class SourceUnreachable(TrainingError):
    """The host does not answer (connection refused, lost, or a command timed out)."""


class StreamBroken(TrainingError):
    """A ``tail -F`` stream ended or failed while the host still answers."""


class TransferError(HostError):
    """A file did not arrive intact (size or SHA256 mismatch) or could not be copied."""


class StorageError(TrainingError):
    """Reading the dataset or writing outputs to ``file://`` / ``s3://`` storage failed."""


class TrainerFailedError(TrainingError):
    """The trainer ended without ``PROJECT end``, stalled, or ran past its limits."""

    retryable = False


class RunSlotBusyError(TrainingError):
    """The dag run already has ``run_max_instances`` jobs holding an instance: wait, then try again."""


class JobLimitError(TrainingError):
    """The job reached one of its hard limits (``max_cost_usd``): it is stopped and torn down."""

    retryable = False


class JobCancelledError(TrainingError):
    """The job was cancelled (by the results API, or its dag run was marked failed): stop here."""

    retryable = False


class ReapError(TrainingError):
    """The reaper could not do everything (a cloud or a lookup failed); the rest was done."""


class RetrainingSpecError(TrainingError, ValueError):
    """A spec that cannot become a DAG; the message names the file and the field."""

    retryable = False

    def __init__(self, path: Path | str, field: str, message: str) -> None:
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")


# --- the retry decision -------------------------------------------------------------------------


def is_retryable(err: BaseException, *, resend: bool = False, idempotent: bool = True) -> bool:
    """Whether trying again may succeed: the one place this is decided (the module docstring).

    Without ``resend``: the step tried again later (an Airflow task retry), the error's ``retryable``;
    an error from outside the hierarchy is retryable. With ``resend``: the same API request sent again
    at once, only for a ``transient`` error, and when the request is not ``idempotent`` only if the
    provider did not act on it.
    """
    if not isinstance(err, TrainingError):
        return not resend
    if not resend:
        return err.retryable
    return err.retryable and err.transient and (idempotent or not err.may_have_acted)


def not_retryable_classes() -> tuple[type[TrainingError], ...]:
    """Every class of the hierarchy whose errors are not retryable (``retryable = False``)."""
    found: list[type[TrainingError]] = []
    pending: list[type[TrainingError]] = [TrainingError]
    while pending:
        cls = pending.pop(0)
        if not cls.retryable and cls not in found:
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return tuple(found)


def fail_unless_retryable(err: BaseException, message: str | None = None) -> None:
    """Raise Airflow's ``AirflowFailException`` (the task fails, no retry) from ``err`` when it is not
    retryable, with ``message`` (default: the error's); return when a retry may help."""
    if is_retryable(err):
        return
    from airflow.sdk.exceptions import AirflowFailException

    raise AirflowFailException(str(err) if message is None else message) from err
