"""Provider lookup by the ``provider`` param's value and the job's provider options."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from gpu_training.params import JobSpec, refused
from gpu_training.providers.base import ComputeProvider

if TYPE_CHECKING:
    from gpu_training.providers.cloud import CloudProvider

#: The GPU clouds: provider name -> "module:class". Each reads its credentials from one connection.
CLOUDS = {
    "lambda": "gpu_training.providers.lambda_cloud:LambdaProvider",
    "runpod": "gpu_training.providers.runpod:RunPodProvider",
    "vast": "gpu_training.providers.vast:VastProvider",
    "ec2": "gpu_training.providers.ec2:Ec2Provider",
}
#: Each cloud's Airflow connection (its ``default_conn_id``); "configured" means it exists.
CLOUD_CONNECTIONS = {
    "lambda": "lambda_default",
    "runpod": "runpod_default",
    "vast": "vast_default",
    "ec2": "aws_default",
}
AVAILABLE = ("local", "ssh", *CLOUDS)


def cloud_class(name: str) -> type[CloudProvider]:
    module, _, attr = CLOUDS[name].partition(":")
    cls: type[CloudProvider] = getattr(importlib.import_module(module), attr)
    return cls


def get_provider(name: str, spec: JobSpec | None = None) -> ComputeProvider:
    """The provider called ``name``, configured from the job's params (connection ids)."""
    if name == "local":
        from gpu_training.policy import Policy
        from gpu_training.providers.local import LocalProvider

        return LocalProvider(run_as=Policy.current().local_run_as_user or None)
    if name == "ssh":
        from gpu_training.providers.ssh import SshProvider

        if spec is None or not spec.ssh_conn_id:
            raise refused("ssh_conn_id", "is required when provider is 'ssh'")
        return SshProvider(spec.ssh_conn_id, require_docker=spec.runtime == "docker")
    if name == "ec2" and spec is not None:
        return cloud_class(name)(spec.aws_conn_id)  # the job's AWS connection (S3's too)
    if name in CLOUDS:
        return cloud_class(name)()
    raise refused("provider", f"{name!r} is not available in this installation (available: {', '.join(AVAILABLE)})")


def configured_clouds() -> tuple[str, ...]:
    """The clouds whose Airflow connection exists (``lambda_default``, ``runpod_default``, ...)."""
    from airflow.sdk import BaseHook

    found = []
    for name in CLOUDS:
        conn_id = CLOUD_CONNECTIONS[name]
        try:
            BaseHook.get_connection(conn_id)
        except Exception:  # AirflowNotFoundException: not configured here
            continue
        found.append(name)
    return tuple(found)


def provider_names(spec: JobSpec) -> tuple[str, ...]:
    """Which providers a job compares offers of: ``providers``, else ``provider`` ('cloud': all configured)."""
    if spec.providers:
        return spec.providers
    if spec.provider == "cloud":
        from gpu_training.policy import Policy

        policy = Policy.current()
        configured = configured_clouds()
        clouds = tuple(name for name in configured if policy.allows_provider(name))
        if not clouds and configured:
            raise policy.refuse(
                "provider",
                f"provider 'cloud' (of the clouds with a connection, {', '.join(configured)}, none)",
                "allowed_providers",
                ", ".join(policy.allowed_providers),
            )
        if not clouds:
            raise refused(
                "provider",
                "'cloud' needs at least one cloud connection: define one of " + ", ".join(CLOUD_CONNECTIONS.values()),
            )
        return clouds
    return (spec.provider,)
