"""Provider lookup by the ``provider`` param's value and the job's provider options."""

from __future__ import annotations

from gpu_training.errors import JobParamsError
from gpu_training.params import JobSpec
from gpu_training.providers.base import ComputeProvider

AVAILABLE = ("local", "ssh")


def get_provider(name: str, spec: JobSpec | None = None) -> ComputeProvider:
    """The provider called ``name``, configured from the job's params (connection ids)."""
    if name == "local":
        from gpu_training.providers.local import LocalProvider

        return LocalProvider()
    if name == "ssh":
        from gpu_training.providers.ssh import SshProvider

        if spec is None or not spec.ssh_conn_id:
            raise JobParamsError("ssh_conn_id", "is required when provider is 'ssh'")
        return SshProvider(spec.ssh_conn_id, require_docker=spec.runtime == "docker")
    raise JobParamsError(
        "provider", f"{name!r} is not available yet in this installation (available: {', '.join(AVAILABLE)})"
    )
