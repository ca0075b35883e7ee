"""How the trainer runs on a host: as a process (``runtime=process``) or a container (``docker``).

Both are driven through the host's :meth:`~gpu_training.hosts.base.Host.script`, so they work the
same on this machine and over SSH. The container side lives in ``include/remote/run_container.sh``
(login, pull, ``docker run -d`` under a deterministic name, a watcher that streams ``docker logs``
into ``logs/trainer.log`` and records the exit code and OOM kill).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from gpu_training.errors import HostError, TrainerFailedError
from gpu_training.hosts.base import (
    RUN_CONTAINER_SCRIPT,
    TRAINER_STATUS_SCRIPT,
    Host,
    TrainerStatus,
    parse_trainer_status,
)
from gpu_training.params import DEFAULT_COMMAND, JobSpec, render_command

#: Where the work directory is mounted inside the container.
CONTAINER_WORKDIR = "/workspace"

# Exit statuses of `run_container.sh start` that no retry can fix, and what they mean.
_START_FAILURES = {10: "registry login refused", 11: "image not available", 12: "container did not start"}
_NO_DOCKER = 13


class Trainer(Protocol):
    """The running trainer, whatever runs it."""

    def status(self) -> TrainerStatus: ...

    def stop(self, grace_seconds: float = 10.0) -> None: ...

    def status_command(self) -> list[str]:
        """``[body, *args]``: the bash script that prints the status, for :meth:`parse_status`
        (the triggerer runs it over its own connection)."""
        ...

    @staticmethod
    def parse_status(rc: int, out: str, err: str) -> TrainerStatus: ...


@dataclasses.dataclass(frozen=True)
class RegistryLogin:
    """Credentials for ``docker login``; the password never reaches a repr, a log or argv."""

    registry: str
    username: str
    password: str = dataclasses.field(repr=False)

    def as_stdin(self) -> bytes:
        for value in (self.registry, self.username, self.password):
            if "\n" in value or "\r" in value:
                raise TrainerFailedError("registry connection: host, login and password must be single lines")
        return f"{self.registry}\n{self.username}\n{self.password}\n".encode()


def registry_login(conn_id: str) -> RegistryLogin | None:
    """Registry credentials from an Airflow connection (host[:port], login, password)."""
    if not conn_id:
        return None
    from airflow.sdk import BaseHook

    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception as err:
        raise TrainerFailedError(f"registry connection {conn_id!r} is not defined: {err}") from err
    if not conn.login:
        raise TrainerFailedError(f"registry connection {conn_id!r} has no login")
    if conn.password:
        try:  # the secrets masker hides it in every log line from here on
            from airflow.sdk.log import mask_secret
        except ImportError:  # pragma: no cover - older task SDKs
            from airflow.sdk.execution_time.secrets_masker import mask_secret  # type: ignore[no-redef]
        mask_secret(conn.password)
    registry = (conn.host or "") + (f":{conn.port}" if conn.port else "")
    return RegistryLogin(registry=registry, username=conn.login, password=conn.password or "")


@dataclasses.dataclass(frozen=True)
class ContainerSpec:
    image: str
    command: tuple[str, ...] = ()  # empty: the image's own entrypoint and command
    user: str = ""
    gpus: bool = False
    memory: str = ""
    cpus: float = 0
    shm_size: str = ""
    pull: str = "missing"

    @classmethod
    def for_job(cls, spec: JobSpec, host: Host) -> ContainerSpec:
        command: tuple[str, ...] = ()
        if list(spec.command) != DEFAULT_COMMAND:
            command = tuple(render_command(spec.command, python="python3", workdir=CONTAINER_WORKDIR))
        return cls(
            image=spec.image,
            command=command,
            user=host.user,
            gpus=bool(host.gpus),
            memory=spec.container_memory,
            cpus=spec.container_cpus,
            shm_size=spec.container_shm_size,
            pull=spec.image_pull,
        )


class ProcessTrainer:
    """The trainer as a detached process group on the host (``run_trainer.sh``)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    def status(self) -> TrainerStatus:
        return self.host.trainer_status()

    def stop(self, grace_seconds: float = 10.0) -> None:
        self.host.stop_trainer(grace_seconds)

    def status_command(self) -> list[str]:
        return [TRAINER_STATUS_SCRIPT, self.host.workdir]

    @staticmethod
    def parse_status(rc: int, out: str, err: str) -> TrainerStatus:
        if rc != 0:
            raise HostError(f"trainer status failed ({rc}): {err.strip()[-500:]}")
        return parse_trainer_status(out)


class ContainerTrainer:
    """The trainer as a detached container named after the instance (``run_container.sh``)."""

    def __init__(self, host: Host, name: str) -> None:
        self.host = host
        self.name = name

    def _command(self, mode: str, *args: str) -> list[str]:
        return [
            'script=$1; shift; exec bash "$script" "$@"',
            self.host.remote_script(RUN_CONTAINER_SCRIPT),
            mode,
            self.host.workdir,
            self.name,
            *args,
        ]

    def _call(self, mode: str, *args: str, stdin: bytes | None = None, timeout: float = 120) -> tuple[int, str, str]:
        return self.host.script(*self._command(mode, *args), stdin=stdin, timeout=timeout, check=False)

    def start(self, spec: ContainerSpec, login: RegistryLogin | None = None, *, timeout: float = 1800) -> str:
        """Log in, pull and start the container, or re-attach to it; returns the script's report."""
        rc, out, err = self._call(
            "start",
            spec.image,
            spec.user,
            "all" if spec.gpus else "",
            spec.memory,
            f"{spec.cpus:g}" if spec.cpus else "",
            spec.shm_size,
            spec.pull,
            "--",
            *spec.command,
            stdin=login.as_stdin() if login else b"",
            timeout=timeout,  # a pull of a large image takes a while
        )
        reason = err.strip()[-2000:] or out.strip()[-2000:]
        if rc in _START_FAILURES:
            raise TrainerFailedError(f"{_START_FAILURES[rc]}: {reason}")
        if rc != 0:
            what = "no usable docker on the host" if rc == _NO_DOCKER else f"run_container.sh exited {rc}"
            raise HostError(f"{what}: {reason}")
        return out.strip()

    def status(self) -> TrainerStatus:
        return self.parse_status(*self._call("status"))

    def status_command(self) -> list[str]:
        return self._command("status")

    @staticmethod
    def parse_status(rc: int, out: str, err: str) -> TrainerStatus:
        if rc != 0:
            raise HostError(f"container status failed: {err.strip()[-500:]}")
        code, running, oom, started = [*out.split(), "-", "0", "-", "0"][:4]
        exit_code = int(code) if code.lstrip("-").isdigit() else None
        oom_killed = None if oom == "-" else oom == "1"
        if exit_code is not None:
            return TrainerStatus(started=True, running=False, exit_code=exit_code, oom_killed=oom_killed)
        # started without a container and without an exit code: it vanished (removed by hand).
        return TrainerStatus(started=started == "1", running=running == "1")

    def stop(self, grace_seconds: float = 10.0) -> None:
        self._call("stop", str(int(max(1, grace_seconds))), timeout=grace_seconds + 60)


def trainer_for(spec: JobSpec, host: Host, instance_name: str) -> Trainer:
    if spec.runtime == "docker":
        return ContainerTrainer(host, instance_name)
    return ProcessTrainer(host)
