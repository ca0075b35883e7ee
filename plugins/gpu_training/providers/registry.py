"""Provider lookup by the ``provider`` param's value."""

from __future__ import annotations

from gpu_training.errors import JobParamsError
from gpu_training.providers.base import ComputeProvider


def get_provider(name: str) -> ComputeProvider:
    """The provider called ``name``; a clear error for one not available in this build."""
    if name == "local":
        from gpu_training.providers.local import LocalProvider

        return LocalProvider()
    raise JobParamsError("provider", f"{name!r} is not available yet in this installation (available: local)")
