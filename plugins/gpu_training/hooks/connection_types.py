"""The clouds' Airflow connection types and what the Add Connection form shows for each.

``lambda_cloud`` (Lambda Cloud), ``runpod`` (RunPod) and ``vastai`` (Vast.ai): the API key in the
password field, relabelled "API key"; each setting the provider reads from the connection's extra
(``providers/<cloud>.py``) a field of its own; schema, port and login hidden; the host relabelled
"API base URL" (empty: the cloud's public API). Airflow 3.2+ reads this from the provider info
(``connection-types``: ``conn-fields`` and ``ui-field-behaviour``, what ``get_provider_info.py`` builds
from here) without importing the hooks; the form stores each field under its own name in the
connection's extra, the key the providers read, so an older ``http`` connection with the same keys
typed into Extra works unchanged.

Pure data: the provider info is read by every Airflow process that discovers providers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

#: The Airflow SSH connection with the private key of the clouds' instances when none is named.
DEFAULT_SSH_CONN_ID = "gpu_instance_ssh"

#: Standard fields none of the clouds uses.
HIDDEN_FIELDS = ("schema", "port", "login")


def _text(label: str, description: str, **schema: Any) -> dict[str, Any]:
    """An optional field: a type that admits null, so the form lets it stay empty."""
    return {"label": label, "description": description, "schema": {"type": ["string", "null"], **schema}}


def _number(label: str, description: str, kind: str = "number", **schema: Any) -> dict[str, Any]:
    return {"label": label, "description": description, "schema": {"type": [kind, "null"], **schema}}


#: Fields every cloud's connection has: the SSH key connection and the HTTP client's retry policy
#: (``hooks/cloud_api.py``; empty: the defaults named).
COMMON_FIELDS: dict[str, dict[str, Any]] = {
    "ssh_conn_id": _text(
        "SSH key connection",
        f"The Airflow SSH connection with the private key the instances accept (empty: {DEFAULT_SSH_CONN_ID}).",
    ),
    "retry_attempts": _number(
        "Request attempts", "Tries per API request on 429, 5xx and no answer (empty: 8).", "integer", minimum=1
    ),
    "retry_budget_seconds": _number(
        "Retry budget (s)", "The longest one request keeps retrying, in seconds (empty: 300).", minimum=0
    ),
    "retry_initial_seconds": _number(
        "First retry wait (s)", "The first backoff between tries, in seconds (empty: 1).", minimum=0
    ),
    "retry_max_wait_seconds": _number(
        "Longest retry wait (s)",
        "The longest wait between tries, Retry-After included, in seconds (empty: 60).",
        minimum=0,
    ),
    "timeout_seconds": _number("Request timeout (s)", "Each request's timeout, in seconds (empty: 30).", minimum=0),
}


@dataclasses.dataclass(frozen=True)
class CloudConnectionType:
    """One cloud's connection type: its name, hook and form."""

    conn_type: str
    hook_name: str
    hook_class_name: str
    #: The API's public base URL (the hook's ``default_url`` + ``api_path``): the host's placeholder, as
    #: an empty host means this URL (set one for a proxy).
    api_url: str
    #: The cloud's own settings (``conn-fields``), then :data:`COMMON_FIELDS`.
    fields: Mapping[str, Mapping[str, Any]]

    def conn_fields(self) -> dict[str, dict[str, Any]]:
        """Every extra field of the form, in the form's order."""
        return {name: dict(field) for name, field in {**self.fields, **COMMON_FIELDS}.items()}

    def field_behaviour(self) -> dict[str, Any]:
        """The standard fields' behaviour, as ``get_ui_field_behaviour()`` returns it."""
        return {
            "hidden_fields": list(HIDDEN_FIELDS),
            "relabeling": {"password": "API key", "host": "API base URL"},
            "placeholders": {
                "password": f"the {self.hook_name} API key",
                "host": self.api_url,
            },
        }

    def provider_info(self) -> dict[str, Any]:
        """The ``connection-types`` entry of the provider info."""
        behaviour = self.field_behaviour()
        return {
            "connection-type": self.conn_type,
            "hook-class-name": self.hook_class_name,
            "hook-name": self.hook_name,
            "ui-field-behaviour": {
                "hidden-fields": behaviour["hidden_fields"],
                "relabeling": behaviour["relabeling"],
                "placeholders": behaviour["placeholders"],
            },
            "conn-fields": self.conn_fields(),
        }


LAMBDA_CLOUD = CloudConnectionType(
    conn_type="lambda_cloud",
    hook_name="Lambda Cloud",
    hook_class_name="gpu_training.hooks.lambda_cloud.LambdaCloudHook",
    api_url="https://cloud.lambda.ai/api/v1",
    fields={
        "ssh_key_name": _text(
            "SSH key name",
            "Required to launch: the name of an SSH key registered in the Lambda Cloud console, installed "
            "for user ubuntu; its private half goes into the SSH key connection.",
        ),
        "file_system_names": _text(
            "File systems", "Lambda persistent file systems to attach to each instance, comma-separated."
        ),
    },
)

RUNPOD = CloudConnectionType(
    conn_type="runpod",
    hook_name="RunPod",
    hook_class_name="gpu_training.hooks.runpod.RunPodHook",
    api_url="https://api.runpod.io/v2",
    fields={
        "image": _text(
            "Container image",
            "The pod's image; it must start sshd from PUBLIC_KEY, as RunPod's images do "
            "(empty: runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04).",
        ),
        "ssh_public_key": _text(
            "SSH public key",
            "The public half of the SSH key connection's key, sent as the pod's PUBLIC_KEY "
            "(empty: RunPod installs the account's registered SSH keys).",
        ),
        "cloud_type": {
            "label": "Cloud",
            "description": "SECURE (Secure Cloud), COMMUNITY (Community Cloud: hosts may have no public IP) "
            "or ALL (offers from both).",
            "schema": {"type": "string", "enum": ["SECURE", "COMMUNITY", "ALL"], "default": "SECURE"},
        },
        "container_disk_gb": _number(
            "Container disk (GB)", "The pod's container disk (empty: 50).", "integer", minimum=1
        ),
        "volume_gb": _number(
            "Volume (GB)", "A persistent pod volume, at least 10 GB (empty or 0: none).", "integer", minimum=0
        ),
        "volume_mount_path": _text("Volume mount path", "Where the volume is mounted (empty: /workspace)."),
    },
)

VASTAI = CloudConnectionType(
    conn_type="vastai",
    hook_name="Vast.ai",
    hook_class_name="gpu_training.hooks.vast.VastHook",
    api_url="https://console.vast.ai",
    fields={
        "image": _text(
            "Docker image",
            "The image the instance runs; Vast starts sshd in it "
            "(empty: pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime).",
        ),
        "disk_gb": _number(
            "Disk (GB)",
            "The instance's disk; only machines with that much free disk are offered (empty: 40).",
            exclusiveMinimum=0,
        ),
        "verified_only": {
            "label": "Verified hosts only",
            "description": "Only offers of hosts Vast.ai has verified.",
            "schema": {"type": ["boolean", "null"], "default": True},
        },
        "bid_multiplier": _number(
            "Bid multiplier",
            "Interruptible offers bid this times the ask's min_bid, at least 1 (empty: 1).",
            minimum=1,
        ),
        "onstart": _text(
            "On-start commands", "Shell commands appended to the instance's on-start script.", format="multiline"
        ),
    },
)

#: Every cloud connection type, in the order the provider info lists them.
CLOUD_CONNECTION_TYPES = (LAMBDA_CLOUD, RUNPOD, VASTAI)


def connection_settings(extra: Mapping[str, Any] | None, conn_type: str) -> dict[str, Any]:
    """A cloud connection's settings from its extra: each key as the form (and older hand-typed JSON)
    stores it, else as Airflow 2's form stored it (``extra__<conn_type>__<key>``); a key left empty
    (null or blank) is not set, so the provider's default applies."""
    prefix = f"extra__{conn_type}__"
    settings: dict[str, Any] = {}
    for key, value in (extra or {}).items():
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        if name in settings and key.startswith(prefix):
            continue  # the plain key wins
        settings[name] = value
    return settings
