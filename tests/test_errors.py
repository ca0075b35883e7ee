"""The one exception hierarchy (``errors.py``): every class in it, its old import path, and the retry decision."""

from __future__ import annotations

import importlib
import inspect

import pytest

from gpu_training import errors
from gpu_training.errors import fail_unless_retryable, is_retryable, not_retryable_classes

#: class -> (task retry: the step tried again later, resend: the same idempotent request at once,
#: resend of a request that is not idempotent, e.g. a launch). Every class of errors.py is here.
DECISIONS: dict[str, tuple[bool, bool, bool]] = {
    "TrainingError": (True, False, False),
    "JobParamsError": (False, False, False),
    "JobPolicyError": (False, False, False),
    "ResultsDbError": (False, False, False),
    "JobNotFoundError": (False, False, False),
    "ProviderError": (True, False, False),
    "OfferRefusedError": (True, False, False),
    "NoCapacityError": (True, False, False),
    "OfferNotOpenError": (True, False, False),
    "CreateRefusedError": (True, False, False),
    "PoolNotOpenError": (True, False, False),
    "BadRequestError": (False, False, False),
    "AuthorizationError": (False, False, False),
    "ProviderUnavailableError": (True, True, False),
    "RateLimitedError": (True, True, True),
    "ServerError": (True, True, False),
    "InstanceNotFoundError": (True, False, False),
    "NoOfferError": (False, False, False),
    "HostError": (True, False, False),
    "SourceUnreachable": (True, False, False),
    "StreamBroken": (True, False, False),
    "NotRegularFileError": (True, False, False),
    "TransferError": (True, False, False),
    "StorageError": (True, False, False),
    "TrainerFailedError": (False, False, False),
    "RunSlotBusyError": (True, False, False),
    "JobLimitError": (False, False, False),
    "JobCancelledError": (False, False, False),
    "ReapError": (True, False, False),
    "RetrainingSpecError": (False, False, False),
}

#: Where each class lived before errors.py held them all: still importable from there.
OLD_HOMES = {
    "gpu_training.hooks.cloud_api": ("RateLimitedError", "ServerError", "AuthorizationError"),
    "gpu_training.hooks.runpod": ("CreateRefusedError", "PoolNotOpenError"),
    "gpu_training.offers": ("NoOfferError",),
    "gpu_training.reaper": ("ReapError",),
    "gpu_training.policy": ("JobPolicyError",),
    "gpu_training.retraining.spec": ("RetrainingSpecError",),
    "gpu_training.follow.sources": ("SourceUnreachable", "StreamBroken"),
    "gpu_training.follow": ("SourceUnreachable", "StreamBroken"),
}


def hierarchy() -> dict[str, type[errors.TrainingError]]:
    return {
        name: cls
        for name, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.TrainingError) and cls.__module__ == errors.__name__
    }


def example(cls: type[errors.TrainingError]) -> errors.TrainingError:
    """An instance of ``cls`` made with the arguments its ``__init__`` takes."""
    if issubclass(cls, errors.JobParamsError):
        return cls("gpu", "is bad")
    if issubclass(cls, errors.ProviderError):
        return cls("ec2", "it failed")
    if cls is errors.NotRegularFileError:
        return cls("global.json", "a FIFO")
    if cls is errors.RetrainingSpecError:
        return cls("spec.yaml", "schedule", "is bad")
    return cls("it failed")


def test_every_error_class_is_in_the_decision_table() -> None:
    assert sorted(hierarchy()) == sorted(DECISIONS)


@pytest.mark.parametrize("name", sorted(DECISIONS))
def test_the_retry_decision_of_each_error(name: str) -> None:
    err = example(hierarchy()[name])
    task, resend, resend_launch = DECISIONS[name]
    assert is_retryable(err) is task
    assert is_retryable(err, resend=True) is resend
    assert is_retryable(err, resend=True, idempotent=False) is resend_launch


def test_errors_from_outside_the_hierarchy_are_left_to_airflow_and_never_resent() -> None:
    assert is_retryable(OSError("disk full"))
    assert not is_retryable(OSError("disk full"), resend=True)


def test_not_retryable_classes_are_those_whose_flag_says_so() -> None:
    assert {cls.__name__ for cls in not_retryable_classes()} == {n for n, (task, *_) in DECISIONS.items() if not task}
    # No retryable class under one that is not: ``isinstance(err, not_retryable_classes())`` is the decision.
    for cls in hierarchy().values():
        if cls.retryable:
            assert not issubclass(cls, not_retryable_classes()), cls


def test_fail_unless_retryable_fails_the_task_only_for_a_final_error() -> None:
    from airflow.sdk.exceptions import AirflowFailException

    fail_unless_retryable(errors.HostError("ssh refused"))
    fail_unless_retryable(OSError("disk full"))
    with pytest.raises(AirflowFailException, match="invalid param 'gpu'") as failed:
        fail_unless_retryable(errors.JobParamsError("gpu", "is bad"))
    assert isinstance(failed.value.__cause__, errors.JobParamsError)
    with pytest.raises(AirflowFailException, match=r"^the job is refused$"):
        fail_unless_retryable(errors.BadRequestError("ec2", "no AMI"), "the job is refused")


@pytest.mark.parametrize("module", sorted(OLD_HOMES))
def test_the_old_names_still_import(module: str) -> None:
    loaded = importlib.import_module(module)
    for name in OLD_HOMES[module]:
        assert getattr(loaded, name) is getattr(errors, name)


def test_messages_are_as_before() -> None:
    assert str(errors.RateLimitedError("lambda", "slow down", retry_after=3.0)) == "lambda: slow down"
    assert errors.RateLimitedError("lambda", "x", retry_after=3.0).retry_after == 3.0
    assert str(errors.RetrainingSpecError("a.yaml", "schedule", "bad cron")) == "a.yaml: schedule: bad cron"
    assert str(errors.RetrainingSpecError("a.yaml", "", "not YAML")) == "a.yaml: not YAML"
    assert isinstance(errors.RetrainingSpecError("a.yaml", "", "x"), ValueError)


@pytest.mark.parametrize(
    ("code", "status", "resent"),
    [
        ("InsufficientInstanceCapacity", 500, False),  # final for this offer: the next one is tried at once
        ("InstanceLimitExceeded", 400, False),
        ("UnauthorizedOperation", 403, False),
        ("RequestLimitExceeded", 503, None),  # transient: botocore backs off and resends
        ("InternalError", 500, None),  # a code the hook does not know: botocore's own table decides
        ("IdempotentParameterMismatch", 400, None),
    ],
)
def test_ec2_resends_are_vetoed_by_the_same_decision(code: str, status: int, resent: bool | None) -> None:
    from gpu_training.hooks.ec2 import no_resend_when_final

    answer = {"Error": {"Code": code, "Message": "..."}, "ResponseMetadata": {"HTTPStatusCode": status}}
    assert no_resend_when_final(response=(object(), answer)) is resent
    assert no_resend_when_final(response=None) is None  # no answer at all: botocore decides
