"""``SshProvider``: your own GPU box, reached through an Airflow SSH connection.

"Launching" an instance checks the host (reachable, free disk, docker when needed, GPUs through
``nvidia-smi``) and creates the run's work directory; terminating stops the job's container and
processes and removes the directory. Host keys are verified by ``SSHHook`` (the connection's
``host_key`` extra or known_hosts); only an explicit ``no_host_key_check: true`` turns that off.

Connection extras read here (all optional): ``work_root`` (default ``gpu-training-jobs`` under the
login's home), ``python`` (the interpreter ``{python}`` expands to, default ``python3``),
``min_free_gb`` (default 1), ``price_per_hour`` (for cost, default 0), ``conn_retry_attempts``.
"""

from __future__ import annotations

import json
from functools import cached_property
from typing import Any

from gpu_training.errors import (
    BadRequestError,
    InstanceNotFoundError,
    ProviderError,
    ProviderUnavailableError,
)
from gpu_training.hosts.ssh import SshHost
from gpu_training.providers.base import (
    NAME_PREFIX,
    ComputeProvider,
    GpuRequest,
    InstanceInfo,
    InstanceState,
    Offer,
)

MARKER = ".instance.json"

# Facts about the host in one round trip: home, free KiB under the work root, docker, GPUs.
_PROBE_SCRIPT = r"""
root=$1
case "$root" in /*) ;; *) root="$HOME/$root" ;; esac
mkdir -p -- "$root" || exit 3
echo "root=$root"
echo "free_kb=$(df -Pk -- "$root" | awk 'NR==2 {print $4}')"
if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then echo docker=1; else echo docker=0; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'
fi
echo "uid=$(id -u)"
echo "gid=$(id -g)"
"""


def ssh_hook(conn_id: str, **overrides: Any) -> Any:
    """An ``SSHHook`` on ``conn_id`` (``remote_host``/``port``/``username`` overrides allowed)."""
    from airflow.providers.ssh.hooks.ssh import SSHHook
    from airflow.sdk import BaseHook

    try:
        extras = BaseHook.get_connection(conn_id).extra_dejson or {}
    except Exception as err:  # AirflowNotFoundException and friends: a retry will not help
        raise BadRequestError("ssh", f"SSH connection {conn_id!r} is not defined in Airflow: {err}") from err
    # SSHHook retries the initial connect with a 3-5 s wait between attempts.
    hook = SSHHook(ssh_conn_id=conn_id, conn_retry_attempts=int(extras.get("conn_retry_attempts", 3)), **overrides)
    if "compress" not in extras:
        # SSHHook compresses by default; data and checkpoints do not compress, and zlib cost 4x the
        # whole send in bench/transfer.py. It must be off before the first connect.
        hook.compress = False
    return hook


def describe_connect_error(err: BaseException, where: str) -> ProviderError:
    """A typed, actionable error for a failed SSH connection."""
    import paramiko

    if isinstance(err, paramiko.BadHostKeyException):
        return BadRequestError(
            "ssh",
            f"host key of {where} does not match the trusted one (connection extra host_key or "
            "known_hosts): refusing to connect; if the host was rebuilt, update the trusted key",
        )
    if isinstance(err, paramiko.AuthenticationException):
        return BadRequestError("ssh", f"authentication to {where} failed: check the connection's login and key")
    if isinstance(err, paramiko.SSHException) and "known_hosts" in str(err):
        return BadRequestError(
            "ssh",
            f"host key of {where} is not trusted: add it to the connection extra host_key or to "
            "known_hosts (or set no_host_key_check explicitly)",
        )
    return ProviderUnavailableError("ssh", f"{where} is unreachable: {err}")


class SshBox:
    """One machine reached by SSH: its facts (probed once), job work directories and hosts.

    The SSH provider is one box named by a connection; a cloud instance becomes one once it boots.
    """

    def __init__(self, hook: Any, extras: dict[str, Any], *, label: str) -> None:
        self.hook = hook
        self.extras = extras
        self.label = label

    @property
    def where(self) -> str:
        return f"{self.hook.remote_host}:{self.hook.port or 22} ({self.label})"

    @cached_property
    def facts(self) -> dict[str, Any]:
        """Probe the host once: work root, free disk, docker, GPUs, uid/gid."""
        try:
            self.hook.get_conn()
        except Exception as err:
            raise describe_connect_error(err, self.where) from err
        session = SshHost(self.hook, "/", python=self.python)
        _, out, _ = session.script(_PROBE_SCRIPT, str(self.extras.get("work_root", "gpu-training-jobs")))
        facts: dict[str, Any] = {"gpus": []}
        for line in out.splitlines():
            key, _, value = line.partition("=")
            if key == "gpu":
                facts["gpus"].append(value.strip())
            elif key:
                facts[key] = value.strip()
        return facts

    @property
    def python(self) -> str:
        return str(self.extras.get("python", "python3"))

    def workdir(self, name: str) -> str:
        if not name.startswith(NAME_PREFIX) or "/" in name:
            raise BadRequestError("ssh", f"invalid instance name {name!r}")
        return f"{self.facts['root']}/{name}"

    def details(self, name: str) -> dict[str, Any]:
        return {
            "workdir": self.workdir(name),
            "gpus": self.facts["gpus"],
            "docker": self.facts.get("docker") == "1",
            "uid": self.facts.get("uid"),
            "gid": self.facts.get("gid"),
        }

    def host(self, name: str) -> SshHost:
        uid, gid = self.facts.get("uid"), self.facts.get("gid")
        return SshHost(
            self.hook,
            self.workdir(name),
            python=self.python,
            gpus=self.facts["gpus"],
            user=f"{uid}:{gid}" if uid and gid else "",
        )


class SshProvider(ComputeProvider):
    """One SSH host; each job's "instance" is a work directory on it."""

    name = "ssh"

    def __init__(self, ssh_conn_id: str, *, require_docker: bool = False) -> None:
        self.ssh_conn_id = ssh_conn_id
        self.require_docker = require_docker

    @cached_property
    def hook(self) -> Any:
        return ssh_hook(self.ssh_conn_id)

    @cached_property
    def extras(self) -> dict[str, Any]:
        return dict(self.hook.get_connection(self.ssh_conn_id).extra_dejson or {})

    @cached_property
    def box(self) -> SshBox:
        return SshBox(self.hook, self.extras, label=f"connection {self.ssh_conn_id!r}")

    @property
    def facts(self) -> dict[str, Any]:
        return self.box.facts

    def _session(self) -> SshHost:
        """A host handle on the work root, for provider-level commands."""
        return SshHost(self.hook, "/", python=self.box.python)

    def _dir(self, name: str) -> str:
        return self.box.workdir(name)

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        gpus = self.facts["gpus"]
        return [
            Offer(
                provider=self.name,
                instance_type=f"ssh:{self.hook.remote_host}" + (f":{len(gpus)}x{gpus[0]}" if gpus else ""),
                price_per_hour=float(self.extras.get("price_per_hour", 0.0)),
                region=self.hook.remote_host,
                gpu_name=gpus[0] if gpus else None,
                gpu_count=len(gpus),
            )
        ]

    def _info(self, name: str, meta: dict[str, Any]) -> InstanceInfo:
        return InstanceInfo(
            provider=self.name,
            instance_id=name,
            name=name,
            state=InstanceState.RUNNING,
            instance_type=meta.get("instance_type"),
            region=self.hook.remote_host,
            price_per_hour=meta.get("price_per_hour"),
            address=f"{self.hook.remote_host}:{self._dir(name)}",
            details=self.box.details(name),
        )

    def find_instance(self, name: str) -> InstanceInfo | None:
        status, out, _ = self._session().script('cat -- "$1" 2>/dev/null', f"{self._dir(name)}/{MARKER}", check=False)
        if status != 0 or not out.strip():
            return None
        try:
            return self._info(name, json.loads(out))
        except ValueError:
            return None

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        existing = self.find_instance(name)
        if existing is not None:
            return existing
        free_gb = int(self.facts.get("free_kb") or 0) / 1024 / 1024
        min_free = float(self.extras.get("min_free_gb", 1))
        if free_gb < min_free:
            raise BadRequestError(
                self.name,
                f"{self.hook.remote_host} has {free_gb:.1f} GB free under {self.facts['root']}, "
                f"needs {min_free:g} GB (connection extra min_free_gb)",
            )
        if self.require_docker and self.facts.get("docker") != "1":
            raise BadRequestError(
                self.name, f"{self.hook.remote_host} has no working docker (runtime 'docker' needs it)"
            )
        meta = {"name": name, "instance_type": offer.instance_type, "price_per_hour": offer.price_per_hour}
        host = SshHost(self.hook, self._dir(name))
        host.run(["mkdir", "-p", "--", host.workdir])
        host.put_bytes(json.dumps(meta).encode(), MARKER)
        return self._info(name, meta)

    def get_instance(self, instance_id: str) -> InstanceInfo:
        info = self.find_instance(instance_id)
        if info is None:
            raise InstanceNotFoundError(self.name, f"no work directory {instance_id!r} on {self.hook.remote_host}")
        return info

    def terminate(self, instance_id: str) -> None:
        path = self._dir(instance_id)
        host = SshHost(self.hook, path)
        host.destroy()

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        _, out, _ = self._session().script(
            'cd -- "$1" && for d in "$2"*; do [ -f "$d/.instance.json" ] && echo "$d"; done; true',
            self.facts["root"],
            name_prefix,
        )
        found = (self.find_instance(n.strip()) for n in out.splitlines() if n.strip())
        return [i for i in found if i is not None]

    def host(self, instance: InstanceInfo) -> SshHost:
        return self.box.host(instance.name)
