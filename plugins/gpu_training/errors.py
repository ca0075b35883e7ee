"""One exception hierarchy for the orchestrator.

Messages say what failed, with which input, and what to do about it. Provider errors carry the id of
anything half-created so teardown can still find and terminate it.
"""

from __future__ import annotations

from pathlib import Path


class TrainingError(Exception):
    """Base class of every error this package raises on purpose."""


class JobParamsError(TrainingError, ValueError):
    """A job parameter is invalid; raised before anything is provisioned."""

    def __init__(self, param: str, message: str) -> None:
        self.param = param
        self.reason = message
        super().__init__(f"invalid param {param!r}{_param_title(param)}: {message}")


class JobPolicyError(JobParamsError):
    """A job asks for something the deployment's policy does not allow."""


def _param_title(param: str) -> str:
    """`` (Title)``: the param's title in the trigger form, so a refusal names the field people see."""
    from gpu_training.params import PARAM_SPECS

    spec = PARAM_SPECS.get(param)
    return f" ({spec.title})" if spec is not None else ""


class ResultsDbError(TrainingError):
    """The results database is missing, unreachable or not migrated."""


class JobNotFoundError(ResultsDbError):
    """No training job with this uuid exists in the results database."""


class ProviderError(TrainingError):
    """A compute provider call failed. ``instance_id`` is set when something was created anyway."""

    retryable: bool = False

    def __init__(self, provider: str, message: str, *, instance_id: str | None = None) -> None:
        self.provider = provider
        self.instance_id = instance_id
        super().__init__(f"{provider}: {message}")


class OfferRefusedError(ProviderError):
    """This offer cannot be had: the next offer is tried, and this one is not tried again for the
    job. ``why`` heads the abandoned attempt's reason (``state_reason`` of its instance row)."""

    retryable = True
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


class AuthorizationError(BadRequestError):
    """The cloud does not accept the API key (HTTP 401), or the key may not do what was asked: no
    retry and no other offer of this cloud helps; the message names the connection and what to do."""


class ProviderUnavailableError(ProviderError):
    """The provider's API is down, timing out or rate limiting; retry later."""

    retryable = True


class RateLimitedError(ProviderUnavailableError):
    """HTTP 429: the request was not acted on; wait ``retry_after`` seconds (if the cloud said)."""

    def __init__(self, provider: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(provider, message)
        self.retry_after = retry_after


class ServerError(ProviderUnavailableError):
    """HTTP 5xx or no answer: the cloud may or may not have acted on the request."""


class InstanceNotFoundError(ProviderError):
    """The provider does not know this instance (never created, or already gone)."""


class NoOfferError(TrainingError):
    """No offer fits the request (nothing matches, nothing free, or all above the price cap)."""


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


class RunSlotBusyError(TrainingError):
    """The dag run already has ``run_max_instances`` jobs holding an instance: wait, then try again."""


class JobLimitError(TrainingError):
    """The job reached one of its hard limits (``max_cost_usd``): it is stopped and torn down."""


class JobCancelledError(TrainingError):
    """The job was cancelled (by the results API, or its dag run was marked failed): stop here."""


class ReapError(TrainingError):
    """The reaper could not do everything (a cloud or a lookup failed); the rest was done."""


class RetrainingSpecError(TrainingError, ValueError):
    """A spec that cannot become a DAG; the message names the file and the field."""

    def __init__(self, path: Path | str, field: str, message: str) -> None:
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {field}: {message}" if field else f"{path}: {message}")
