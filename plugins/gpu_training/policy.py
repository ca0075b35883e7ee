"""The deployment's policy: what a triggered job may reach. Owned by whoever runs Airflow.

People who may trigger ``gpu_training`` are not the people who run Airflow, and the trainer is code
nobody here reviewed. So which providers, commands, files, connections and images a job may use is
never a param: it is the ``[gpu_training]`` section of Airflow's configuration (``airflow.cfg``, or
``AIRFLOW__GPU_TRAINING__<KEY>`` environment variables), read where the job's tasks run.
:func:`enforce` checks a job against it in ``register_job``, before anything is created or any
provider is called; ``file://`` URIs are checked again when they are read or written (a symlink
planted after registration is resolved then too). A refusal names the param and the policy key:

    provider 'local' is not allowed here ([gpu_training] allowed_providers = ssh, lambda)

The defaults keep ``make demo`` and ``make run`` working as a single user's machine: every
provider, any command, connection and image, trainers as the worker's own user, and ``file://``
only under the embedded storage (``$AIRFLOW_HOME/storage``). A shared deployment narrows them
(``docker-compose.yaml`` ships without ``local``); ``make validate`` prints the policy in force.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from gpu_training.errors import JobPolicyError
from gpu_training.params import param_title

SECTION = "gpu_training"
ANY = "*"


class PolicyOption(NamedTuple):
    """One key of the section: its default as written in airflow.cfg, what it means, its type as
    Airflow's configuration reference names it, and an example value."""

    default: str
    description: str
    type: str = "string"
    example: str | None = None


#: key -> option. The defaults of a single user's machine; the provider info's ``config`` section
#: (``get_provider_info.py``) is made from these, so ``airflow config list`` shows them.
OPTIONS: dict[str, PolicyOption] = {
    "allowed_providers": PolicyOption(
        ANY,
        "Providers a job may use (comma-separated: local, ssh, lambda, runpod, vast, ec2; * for all). "
        "'local' runs trainers on the Airflow worker itself: leave it out of a shared deployment.",
        example="ssh, lambda, runpod, vast, ec2",
    ),
    "allow_custom_command": PolicyOption(
        "True",
        "Whether a job may set `command` (anything but the reference trainer's). A trigger that may set it "
        "runs code of its choosing on the instance.",
        type="boolean",
        example="False",
    ),
    "allowed_file_roots": PolicyOption(
        "",
        "Folders every file:// param (dataset_uri, init_checkpoint_uri, outputs_uri) must be inside once "
        "resolved, symlinks included (comma-separated absolute paths; * for anywhere), besides the embedded "
        "storage ($AIRFLOW_HOME/storage, where jobs' outputs go by default), which is always allowed.",
        example="/data/datasets, /data/checkpoints",
    ),
    "allowed_connections": PolicyOption(
        ANY,
        "Glob patterns of the Airflow connection ids a job may name (ssh_conn_id, registry_conn_id, "
        "aws_conn_id other than aws_default, notify targets), comma-separated, e.g. 'gpu_box_*, team_slack'. "
        "The clouds' own connections are the deployment's, not named by a job.",
        example="gpu_box_*, team_slack",
    ),
    "allowed_images": PolicyOption(
        ANY,
        "Glob patterns of the Docker images a job may run (runtime docker), e.g. 'registry.example.com:5000/team/*'.",
        example="registry.example.com:5000/team/*",
    ),
    "local_run_as_user": PolicyOption(
        "",
        "The local provider's trainers run as this unprivileged user (the worker must run as root), so they "
        "cannot read the worker's processes or files; empty: as the worker's own user.",
        example="gpu-trainer",
    ),
    "max_metric_rows_per_job": PolicyOption(
        "1000000",
        "The most metric rows (epochs, evaluations, steps, events) one job may store; past it the job fails "
        "with that reason and nothing more is stored.",
        type="integer",
        example="200000",
    ),
}


def _items(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _shown(values: tuple[str, ...]) -> str:
    return ", ".join(values) if values else "(none)"


@dataclasses.dataclass(frozen=True)
class Policy:
    """The ``[gpu_training]`` section, parsed. ``("*",)`` allows anything in a list."""

    allowed_providers: tuple[str, ...] = (ANY,)
    allow_custom_command: bool = True
    allowed_file_roots: tuple[str, ...] = ()
    allowed_connections: tuple[str, ...] = (ANY,)
    allowed_images: tuple[str, ...] = (ANY,)
    local_run_as_user: str = ""
    max_metric_rows_per_job: int = 1_000_000

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> Policy:
        """From the section's raw strings (missing keys: :data:`OPTIONS`' defaults)."""
        raw = {key: values.get(key, option.default) for key, option in OPTIONS.items()}
        try:
            rows = int(raw["max_metric_rows_per_job"])
        except ValueError:
            raise ValueError(
                f"[{SECTION}] max_metric_rows_per_job = {raw['max_metric_rows_per_job']!r} is not a whole number"
            ) from None
        custom = raw["allow_custom_command"].strip().lower()
        if custom not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(f"[{SECTION}] allow_custom_command = {raw['allow_custom_command']!r} is not true/false")
        return cls(
            allowed_providers=_items(raw["allowed_providers"]),
            allow_custom_command=custom in ("true", "1", "yes"),
            allowed_file_roots=_items(raw["allowed_file_roots"]),
            allowed_connections=_items(raw["allowed_connections"]),
            allowed_images=_items(raw["allowed_images"]),
            local_run_as_user=raw["local_run_as_user"].strip(),
            max_metric_rows_per_job=max(0, rows),
        )

    @classmethod
    def current(cls) -> Policy:
        """The policy in force in this process (Airflow's configuration, read now)."""
        from airflow.configuration import conf

        values = {}
        for key in OPTIONS:
            value = conf.get(SECTION, key, fallback=None)
            if value is not None:
                values[key] = str(value)
        return cls.from_values(values)

    # --- what is allowed ---------------------------------------------------------------------

    def allows_provider(self, name: str) -> bool:
        return ANY in self.allowed_providers or name in self.allowed_providers

    def file_roots(self) -> tuple[Path, ...] | None:
        """Resolved roots a ``file://`` path must be inside (the allowed ones, then the embedded
        storage, the platform's own outputs); None: anywhere."""
        if ANY in self.allowed_file_roots:
            return None
        from gpu_training.storage import embedded_storage_root

        roots = [Path(os.path.realpath(root)) for root in self.allowed_file_roots]
        embedded = Path(os.path.realpath(embedded_storage_root()))
        return tuple(roots + ([embedded] if embedded not in roots else []))

    def allows_connection(self, conn_id: str) -> bool:
        return any(fnmatch.fnmatchcase(conn_id, pattern) for pattern in self.allowed_connections)

    def allows_image(self, image: str) -> bool:
        return any(fnmatch.fnmatchcase(image, pattern) for pattern in self.allowed_images)

    def described(self) -> list[tuple[str, str]]:
        """``(key, value in force)`` of every option, as ``make validate`` prints them."""
        roots = self.file_roots()
        return [
            ("allowed_providers", _shown(self.allowed_providers)),
            ("allow_custom_command", str(self.allow_custom_command)),
            ("allowed_file_roots", ANY if roots is None else ", ".join(map(str, roots))),
            ("allowed_connections", _shown(self.allowed_connections)),
            ("allowed_images", _shown(self.allowed_images)),
            ("local_run_as_user", self.local_run_as_user or "(the worker's own user)"),
            ("max_metric_rows_per_job", str(self.max_metric_rows_per_job)),
        ]

    # --- checks ------------------------------------------------------------------------------

    def refuse(self, param: str, what: str, key: str, value: str) -> JobPolicyError:
        return JobPolicyError(
            param, f"{what} is not allowed here ([{SECTION}] {key} = {value})", title=param_title(param)
        )

    def check_file_uri(self, param: str, uri: str) -> None:
        """A ``file://`` URI must resolve (symlinks included) inside an allowed root."""
        if uri.startswith("file://"):
            from gpu_training.storage import parse_uri

            self.check_path(param, Path(parse_uri(uri).path), shown=uri)

    def check_path(self, param: str, path: Path, *, shown: str = "") -> None:
        """A local path must resolve (symlinks included) inside an allowed root: every file read
        for a ``file://`` dataset is checked as it is read."""
        roots = self.file_roots()
        if roots is None:
            return
        resolved = Path(os.path.realpath(path))
        if not any(resolved == root or root in resolved.parents for root in roots):
            raise self.refuse(
                param,
                f"{shown or str(path)!r} (resolved: {resolved})",
                "allowed_file_roots",
                ", ".join(map(str, roots)),
            )


def enforce(spec: Any, policy: Policy | None = None) -> None:
    """Raise :class:`JobPolicyError` for the first thing ``spec`` (a ``JobSpec``) asks for that the
    policy does not allow: providers, command, ``file://`` params, connections, image."""
    from gpu_training.notify import parse_target
    from gpu_training.params import DEFAULT_COMMAND

    policy = policy or Policy.current()
    providers_value = _shown(policy.allowed_providers)
    if spec.provider != "cloud" and not policy.allows_provider(spec.provider):
        raise policy.refuse("provider", f"provider {spec.provider!r}", "allowed_providers", providers_value)
    for name in spec.providers:
        if not policy.allows_provider(name):
            raise policy.refuse("providers", f"provider {name!r}", "allowed_providers", providers_value)
    if not policy.allow_custom_command and list(spec.command) != DEFAULT_COMMAND:
        raise policy.refuse("command", "a command of the job's own", "allow_custom_command", "False")
    for param in ("dataset_uri", "init_checkpoint_uri", "outputs_uri"):
        policy.check_file_uri(param, getattr(spec, param))
    named = [("ssh_conn_id", spec.ssh_conn_id), ("registry_conn_id", spec.registry_conn_id)]
    if spec.aws_conn_id != "aws_default":  # the default is the deployment's own, not the job's choice
        named.append(("aws_conn_id", spec.aws_conn_id))
    named += [("notify", parse_target(raw).conn_id) for raw in spec.notify]
    for param, conn_id in named:
        if conn_id and not policy.allows_connection(conn_id):
            raise policy.refuse(
                param, f"connection {conn_id!r}", "allowed_connections", _shown(policy.allowed_connections)
            )
    if spec.runtime == "docker" and not policy.allows_image(spec.image):
        raise policy.refuse("image", f"image {spec.image!r}", "allowed_images", _shown(policy.allowed_images))
