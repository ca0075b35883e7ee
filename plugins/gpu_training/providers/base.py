"""The provider interface: the narrow contract every compute provider implements.

Modelled on SkyPilot's ``sky/provision`` and dstack's ``Compute``: list offers with prices, launch
idempotently by a deterministic name, query, terminate (tolerating an instance already gone), list
our instances for the reaper, and open a :class:`~gpu_training.hosts.base.Host` on a running
instance. Each provider maps its own states to :class:`InstanceState` and raises the typed errors
of :mod:`gpu_training.errors` (no capacity, bad request, provider down, not found).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import re
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar

# The shared state enum lives with the results schema that stores it; re-exported here for providers.
from gpu_training.results.states import InstanceState as InstanceState

if TYPE_CHECKING:
    from gpu_training.hosts.base import Host

# Every instance this system launches carries this prefix, so the reaper never touches others.
NAME_PREFIX = "gpujob-"


@dataclasses.dataclass(frozen=True)
class GpuRequest:
    """What a job asks for; the clouds issue adds GPU names, regions and price caps here."""

    gpu: str | None = None
    gpu_count: int = 1
    instance_type: str | None = None
    regions: tuple[str, ...] = ()
    max_price_per_hour: float | None = None
    spot: bool = False


@dataclasses.dataclass(frozen=True)
class Offer:
    """A launchable configuration with its hourly price."""

    provider: str
    instance_type: str
    price_per_hour: float
    region: str | None = None
    gpu_name: str | None = None
    gpu_count: int = 0
    spot: bool = False
    available: bool = True


@dataclasses.dataclass(frozen=True)
class InstanceInfo:
    """What a provider reports about one instance.

    ``interrupted``: the cloud took the instance back (a spot / interruptible instance reclaimed or
    outbid), not our terminate; its state is then gone and ``details["interruption"]`` says why in
    the cloud's own words.
    """

    provider: str
    instance_id: str
    name: str
    state: InstanceState
    instance_type: str | None = None
    region: str | None = None
    price_per_hour: float | None = None
    address: str | None = None
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    interrupted: bool = False


def instance_name(dag_id: str, run_id: str, job_uuid: str, try_number: int = 1) -> str:
    """Deterministic instance name for a dag run's job and launch attempt.

    Retrying the same attempt finds the same name (idempotent launch); the hash keeps names short
    and free of characters clouds reject.
    """
    digest = hashlib.sha256(f"{dag_id}\0{run_id}\0{job_uuid}".encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-z0-9]+", "-", dag_id.lower()).strip("-")[:20] or "job"
    return f"{NAME_PREFIX}{slug}-{digest}-{try_number}"


class ComputeProvider(abc.ABC):
    """One compute provider: where instances come from and how they go away."""

    name: ClassVar[str]
    #: How long an instance may take from launch to a usable host before the job gives up on it.
    provision_timeout: ClassVar[timedelta] = timedelta(minutes=30)
    #: Instances are rented for the job: a broken one is terminated and replaced by the next offer.
    ephemeral: ClassVar[bool] = False

    @property
    def api_calls(self) -> int:
        """API requests this provider object has sent (0 where there is no API)."""
        return 0

    @abc.abstractmethod
    def list_offers(self, request: GpuRequest) -> list[Offer]:
        """Offers that fit ``request``, cheapest first."""

    @abc.abstractmethod
    def find_instance(self, name: str) -> InstanceInfo | None:
        """The live (not terminated) instance with this name, if any."""

    @abc.abstractmethod
    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        """Launch an instance named ``name``; if one exists already, return it instead."""

    @abc.abstractmethod
    def get_instance(self, instance_id: str) -> InstanceInfo:
        """Current state; raises :class:`~gpu_training.errors.InstanceNotFoundError`."""

    @abc.abstractmethod
    def terminate(self, instance_id: str) -> None:
        """Terminate; an instance that is already gone is not an error."""

    @abc.abstractmethod
    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        """Live instances whose name starts with ``name_prefix`` (for the reaper)."""

    @abc.abstractmethod
    def host(self, instance: InstanceInfo) -> Host:
        """A host handle to run commands and move files on a running instance."""
