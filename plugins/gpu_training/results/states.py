"""The states the results DB stores, one enum per concept: a job's status, an instance's state.

``StrEnum`` members compare equal to their strings, so the stored values, the API and SQL over the
schema stay the same strings; each cloud maps its vendor states onto :class:`InstanceState`.
"""

from __future__ import annotations

import enum


class JobStatus(enum.StrEnum):
    """A training job's status (``training_jobs.status``)."""

    PENDING = "pending"
    PROVISIONING = "provisioning"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class InstanceState(enum.StrEnum):
    """Provider-neutral instance states (``instances.state``); ``requested``: the launch intent is
    recorded, the cloud has not answered yet."""

    REQUESTED = "requested"
    PENDING = "pending"
    BOOTING = "booting"
    RUNNING = "running"
    STOPPING = "stopping"
    TERMINATED = "terminated"
    FAILED = "failed"
    UNKNOWN = "unknown"

    @property
    def is_gone(self) -> bool:
        return self in (InstanceState.TERMINATED, InstanceState.FAILED)


class AbandonReason(enum.StrEnum):
    """Why a launch attempt's instance was given up (``instances.abandon_reason``; its words stay in
    ``state_reason``). The first three and ``replaced``: its offer is not tried again for the job."""

    NO_CAPACITY = "no_capacity"  # the cloud had no capacity for the offer
    NOT_OPEN = "not_open"  # the offer is not open to the account
    REFUSED = "refused"  # the cloud refused the offer otherwise
    REPLACED = "replaced"  # broken while booting, or not usable in time: replaced by the next offer
    INTERRUPTED = "interrupted"  # the cloud interrupted it (spot): its offer stays eligible
    CANCELLED = "cancelled"  # not launched, or terminated at once: the job was cancelled or torn down

    @property
    def gives_up_offer(self) -> bool:
        """The offer is not tried again for the job."""
        return self in (
            AbandonReason.NO_CAPACITY,
            AbandonReason.NOT_OPEN,
            AbandonReason.REFUSED,
            AbandonReason.REPLACED,
        )
