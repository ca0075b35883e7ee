"""``LocalProvider``: the embedded default. An "instance" is a work directory on this machine.

It is recorded in the results DB like any cloud instance and follows the same life: launched
idempotently by name, queried, terminated (its trainer's process group killed, its directory
removed). It costs nothing, so every job can run end to end without a cloud account.

An instance belongs to the machine that launched it (its files, its trainer's processes): every task
of the job must run there. One Airflow host with any number of workers is fine (``make demo``,
``make cluster``); workers on several hosts or containers are not, and get an error saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path

from gpu_training.errors import BadRequestError, InstanceNotFoundError
from gpu_training.hosts.local import LocalHost
from gpu_training.providers.base import (
    NAME_PREFIX,
    ComputeProvider,
    GpuRequest,
    InstanceInfo,
    InstanceState,
    Offer,
)

INSTANCE_FILE = ".instance.json"
ONE_MACHINE = (
    "provider 'local' keeps a job on the machine that launched it, so every worker running the job's "
    "tasks must be that machine (one host, as make demo and make cluster); with workers on several hosts "
    "or containers (docker-compose) use provider 'ssh' or a cloud"
)


def machine_id() -> str:
    """This machine as its processes see it: the kernel's boot id and the PID namespace, which differ
    between hosts and between containers (whose trainers cannot see or signal each other's)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        pid_ns = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux: the host name is the best there is
        return socket.gethostname()
    return f"{boot}/{pid_ns}"


def default_root() -> Path:
    if os.environ.get("GPU_TRAINING_LOCAL_ROOT"):
        return Path(os.environ["GPU_TRAINING_LOCAL_ROOT"])
    from gpu_training.hooks.results import airflow_home

    return airflow_home() / "local_instances"


def _local_gpus() -> tuple[str | None, int]:
    """GPU name and count when nvidia-smi answers; (None, 0) otherwise (that's fine: CPU)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None, 0
    import subprocess

    try:
        out = subprocess.run(
            [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None, 0
    names = [line.strip() for line in out.splitlines() if line.strip()]
    return (names[0] if names else None), len(names)


class LocalProvider(ComputeProvider):
    """Instances are directories under ``root`` (default ``$AIRFLOW_HOME/local_instances``)."""

    name = "local"

    def __init__(self, root: Path | str | None = None, *, run_as: str | None = None) -> None:
        self.root = Path(root) if root else default_root()
        #: Trainers run as this user (``[gpu_training] local_run_as_user``); None: the worker's own.
        self.run_as = run_as

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise BadRequestError(self.name, f"invalid instance name {name!r}")
        return self.root / name

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        gpu_name, gpu_count = _local_gpus()
        return [
            Offer(
                provider=self.name,
                instance_type=f"local-{os.cpu_count() or 1}cpu" + (f"-{gpu_count}gpu" if gpu_count else ""),
                price_per_hour=0.0,
                region="localhost",
                gpu_name=gpu_name,
                gpu_count=gpu_count,
            )
        ]

    def _info(self, path: Path) -> InstanceInfo | None:
        try:
            meta = json.loads((path / INSTANCE_FILE).read_text())
        except (OSError, ValueError):
            return None
        return InstanceInfo(
            provider=self.name,
            instance_id=meta["name"],
            name=meta["name"],
            state=InstanceState.RUNNING,
            instance_type=meta.get("instance_type"),
            region="localhost",
            price_per_hour=0.0,
            address=str(path),
            details={
                "workdir": str(path),
                "launched_at": meta.get("launched_at"),
                "gpus": meta.get("gpus", []),
                "machine": meta.get("machine"),
                "hostname": meta.get("hostname"),
                # The nodes of a multi-node job reach each other here (each is a process group).
                "private_ip": "127.0.0.1",
            },
        )

    def find_instance(self, name: str) -> InstanceInfo | None:
        return self._info(self._dir(name))

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        existing = self.find_instance(name)
        if existing is not None:
            return existing
        path = self._dir(name)
        path.mkdir(parents=True, exist_ok=True)
        meta = {
            "name": name,
            "instance_type": offer.instance_type,
            "launched_at": datetime.now(UTC).isoformat(),
            "gpus": [offer.gpu_name] * offer.gpu_count if offer.gpu_name else [],
            "machine": machine_id(),
            "hostname": socket.gethostname(),
        }
        tmp = path / (INSTANCE_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, path / INSTANCE_FILE)
        info = self._info(path)
        assert info is not None
        return info

    def get_instance(self, instance_id: str) -> InstanceInfo:
        info = self.find_instance(instance_id)
        if info is None:
            raise InstanceNotFoundError(
                self.name,
                f"no local instance {instance_id!r} under {self.root} on {socket.gethostname()} ({ONE_MACHINE})",
            )
        return info

    def terminate(self, instance_id: str) -> None:
        path = self._dir(instance_id)
        if path.exists():
            LocalHost(path).destroy()

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        if not self.root.is_dir():
            return []
        found = (self._info(p) for p in sorted(self.root.iterdir()) if p.name.startswith(name_prefix))
        return [info for info in found if info is not None]

    def host(self, instance: InstanceInfo) -> LocalHost:
        launched_on = (instance.details or {}).get("machine")
        if launched_on and launched_on != machine_id():
            where = (instance.details or {}).get("hostname") or launched_on
            raise BadRequestError(
                self.name,
                f"local instance {instance.name!r} was launched on {where}, this task runs on "
                f"{socket.gethostname()} ({ONE_MACHINE})",
            )
        return LocalHost(self._dir(instance.name), gpus=instance.details.get("gpus") or (), run_as=self.run_as)
