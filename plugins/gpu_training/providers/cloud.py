"""What the GPU clouds (Lambda, RunPod, Vast.ai, EC2) share behind the provider interface.

A cloud provider lists offers, launches by a deterministic name, reports states and terminates; its
hook talks to the cloud's API and nothing else. Once an instance runs it is an SSH box like the
``ssh`` provider's, so the transfer and Docker machinery is the same.

SSH to instances goes through one Airflow SSH connection (the cloud connection's extra
``ssh_conn_id``, default ``gpu_instance_ssh``): its private key (``key_file`` or ``private_key``)
and optionally its login (else the cloud's default user). Fresh instances have unknown host keys,
so that connection usually sets ``no_host_key_check``. Its host and port are normally empty: the
cloud says where the instance is. Set them only when instances are reached through a fixed forward
or bastion; they then replace what the cloud reports.
"""

from __future__ import annotations

from datetime import timedelta
from functools import cached_property
from typing import Any, ClassVar, Generic, TypeVar

from gpu_training.errors import BadRequestError, InstanceNotFoundError, ProviderError, ProviderUnavailableError
from gpu_training.hooks.cloud_api import CloudApiHook
from gpu_training.hooks.connection_types import DEFAULT_SSH_CONN_ID
from gpu_training.providers.base import ComputeProvider, InstanceInfo, InstanceState, Offer
from gpu_training.providers.ssh import SshBox, ssh_hook

HookT = TypeVar("HookT", bound=CloudApiHook)


class CloudProvider(ComputeProvider):
    """Base of the GPU clouds: configuration from one Airflow connection, SSH to the instance."""

    #: The Airflow connection holding the cloud's credentials.
    default_conn_id: ClassVar[str]
    #: How long an instance may take from launch to answering SSH before it is given up.
    provision_timeout: ClassVar[timedelta]
    #: The login of the cloud's images when the SSH connection names none.
    default_ssh_user: ClassVar[str] = "ubuntu"
    ephemeral = True

    def __init__(self, conn_id: str | None = None) -> None:
        self.conn_id = conn_id or self.default_conn_id

    @property
    def settings(self) -> dict[str, Any]:
        """The provider's settings (the cloud connection's extras)."""
        return {}

    @cached_property
    def ssh_conn_id(self) -> str:
        return str(self.settings.get("ssh_conn_id") or DEFAULT_SSH_CONN_ID)

    def ssh_box(self, instance: InstanceInfo) -> SshBox:
        """The running instance as an SSH box."""
        from airflow.sdk import BaseHook

        try:
            conn = BaseHook.get_connection(self.ssh_conn_id)
        except Exception as err:
            raise BadRequestError(
                self.name,
                f"SSH connection {self.ssh_conn_id!r} (the key for {self.name} instances) is not defined: {err}",
            ) from err
        host = conn.host or instance.address
        if not host:
            raise ProviderUnavailableError(self.name, f"instance {instance.instance_id} has no address yet")
        port = conn.port or int(instance.details.get("ssh_port") or 22)
        hook = ssh_hook(self.ssh_conn_id, remote_host=host, port=port, username=conn.login or self.default_ssh_user)
        return SshBox(hook, dict(conn.extra_dejson or {}), label=f"{self.name} instance {instance.instance_id}")

    #: ``details["status"]`` given to an instance launched but not queryable yet.
    launching_status = "booting"

    def _launched(self, instance_id: str, offer: Offer, name: str) -> InstanceInfo:
        """The new instance's state; errors carry its id so teardown can find it."""
        try:
            return self.get_instance(instance_id)
        except InstanceNotFoundError:  # not queryable yet: it was just created
            return InstanceInfo(
                provider=self.name,
                instance_id=instance_id,
                name=name,
                state=InstanceState.BOOTING,
                instance_type=offer.instance_type,
                region=offer.region,
                price_per_hour=offer.price_per_hour,
                details={"status": self.launching_status},
            )
        except ProviderError as err:
            err.instance_id = instance_id
            raise

    def host(self, instance: InstanceInfo) -> Any:
        return self.ssh_box(instance).host(instance.name)


class HttpCloudProvider(CloudProvider, Generic[HookT]):
    """A cloud whose API is one :class:`CloudApiHook`: settings are its connection's extras."""

    hook_class: type[HookT]

    @cached_property
    def hook(self) -> HookT:
        return self.hook_class(self.conn_id)

    @property
    def settings(self) -> dict[str, Any]:
        return self.hook.extras

    @property
    def api_calls(self) -> int:
        return self.hook.calls
