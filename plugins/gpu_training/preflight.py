"""What can be known before a job is created is checked then: the connections it needs exist.

``register_job`` runs :func:`check_connections` after the params' own validation and before the job's
row exists, so a job that could only fail later (``provider=lambda`` without ``lambda_default`` used
to fail 14 s later in ``provision``) is refused at once, naming the param, the missing connection
and how to add it, and nothing is provisioned. Connections are looked up as Airflow does everywhere
(environment variables, secrets backends, the metadata DB): ``BaseHook.get_connection``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from gpu_training.errors import JobParamsError
from gpu_training.params import JobSpec, refused

#: What each kind of connection is for, and how to add it (the CLI form; the UI has the same fields).
_CLOUD_KEYS = {
    "lambda": ("the Lambda Cloud API key", "--conn-type lambda_cloud --conn-password <API key>"),
    "runpod": ("the RunPod API key", "--conn-type runpod --conn-password <API key>"),
    "vast": ("the Vast.ai API key", "--conn-type vastai --conn-password <API key>"),
    "ec2": ("the AWS credentials", "--conn-type aws --conn-login <access key id> --conn-password <secret key>"),
}
_SSH_ADD = '--conn-type ssh --conn-login <user> --conn-extra \'{"private_key": "<the key>"}\''


@dataclasses.dataclass(frozen=True)
class Needed:
    """A connection the job needs: its id, the param that calls for it, what it holds, how to add it."""

    conn_id: str
    param: str
    why: str
    add: str

    def refusal(self) -> JobParamsError:
        return refused(
            self.param,
            f"{self.why} needs the Airflow connection {self.conn_id!r}, which is not defined here: add it under "
            f"Admin > Connections, or `airflow connections add {self.conn_id} {self.add}`",
        )


def _exists(conn_id: str) -> bool:
    from airflow.sdk import BaseHook

    try:
        BaseHook.get_connection(conn_id)
    except Exception:  # AirflowNotFoundException (the SDK raises its own class in a task)
        return False
    return True


def needed_connections(spec: JobSpec, exists: Callable[[str], bool] = _exists) -> list[Needed]:
    """The connections ``spec`` names or needs, in the order they are checked. A cloud's SSH key
    connection (its extra ``ssh_conn_id``) is only known once the cloud's connection exists."""
    from gpu_training.notify import parse_target
    from gpu_training.providers.registry import CLOUD_CONNECTIONS, cloud_class, provider_names

    needed: list[Needed] = []
    clouds = [name for name in provider_names(spec) if name in CLOUD_CONNECTIONS]
    param = "providers" if spec.providers else "provider"
    for cloud in clouds:
        what, add = _CLOUD_KEYS[cloud]
        conn_id = spec.aws_conn_id if cloud == "ec2" else CLOUD_CONNECTIONS[cloud]
        needed.append(Needed(conn_id, "aws_conn_id" if cloud == "ec2" else param, f"provider {cloud!r} ({what})", add))
        if exists(conn_id):
            ssh_conn_id = cloud_class(cloud)(conn_id).ssh_conn_id
            needed.append(
                Needed(
                    ssh_conn_id,
                    param,
                    f"provider {cloud!r} (the SSH key of its instances, extra ssh_conn_id of {conn_id!r})",
                    _SSH_ADD,
                )
            )
    s3 = [uri for uri in (spec.dataset_uri, spec.init_checkpoint_uri, spec.outputs_uri) if uri.startswith("s3://")]
    if s3 and spec.aws_conn_id != CLOUD_CONNECTIONS["ec2"] and "ec2" not in clouds:
        # A connection the job names for its s3:// URIs must exist (without one, aws_default falls
        # back to the machine's own AWS credentials, as boto3 does).
        needed.append(Needed(spec.aws_conn_id, "aws_conn_id", f"the s3:// URIs ({s3[0]})", _CLOUD_KEYS["ec2"][1]))
    if spec.ssh_conn_id:
        needed.append(Needed(spec.ssh_conn_id, "ssh_conn_id", "your SSH host (ssh_conn_id)", _SSH_ADD))
    if spec.registry_conn_id:
        needed.append(
            Needed(
                spec.registry_conn_id,
                "registry_conn_id",
                "the image registry (registry_conn_id)",
                "--conn-type docker --conn-host <registry host:port> --conn-login <user> --conn-password <password>",
            )
        )
    for raw in spec.notify:
        target = parse_target(raw)
        add = {
            "smtp": "--conn-type smtp --conn-host <mail server> --conn-port 587 --conn-login <user> "
            "--conn-password <password>",
            "slack": "--conn-type slackwebhook --conn-password <the webhook URL>",
            "webhook": "--conn-type http --conn-host <the URL>",
        }[target.kind]
        needed.append(Needed(target.conn_id, "notify", f"the notify target {raw!r}", add))
    return needed


def check_connections(spec: JobSpec, exists: Callable[[str], bool] = _exists) -> None:
    """Raise :class:`JobParamsError` for the first connection the job needs that does not exist."""
    for need in needed_connections(spec, exists):
        if not exists(need.conn_id):
            raise need.refusal()
