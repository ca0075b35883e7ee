"""Each fake cloud wired for a whole job: its API server, its Airflow connection, and SSH to the
test sshd, so an instance it "launches" is a real box the job's transfer and trainer steps use.

Lambda and EC2 report no SSH port (it is 22 there), and moto's public IPs lead nowhere, so their
SSH connection carries the test sshd's host and port (the documented override for forwards);
RunPod and Vast.ai report the address and port themselves, so theirs carries only the key.

Each fake knows where its boxes are (``fake.box_root``): terminating an instance kills the
processes of its box, and stopping the rig those of every box, as switching machines off would
(``tests/fakeclouds/boxes.py``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Fast retries for tests: the policy is the same, the waits are short.
FAST_RETRIES = {"retry_initial_seconds": 0.05, "retry_max_wait_seconds": 2, "retry_attempts": 6}


@dataclasses.dataclass
class Rig:
    """One fake cloud ready for jobs."""

    name: str  # the provider name (param value)
    fake: Any  # faults, instances, calls, assert_all_terminated(), reset()
    env: dict[str, str]  # AIRFLOW_CONN_* values
    ssh_conn_id: str  # the connection the provider SSHes with
    gpu: str  # a GPU request with at least two fitting offers that have capacity
    stop: Callable[[], None]

    def conn_var(self) -> str:
        return f"AIRFLOW_CONN_{self.ssh_conn_id.upper()}"


def ssh_connections(sshd: Any, work_root: Path) -> dict[str, str]:
    """``gpu_instance_ssh`` (the key only) and ``gpu_instance_fwd`` (key + the sshd's host and port)."""
    full = json.loads(sshd.connection(work_root=str(work_root), python=sys.executable))
    key_only = {k: v for k, v in full.items() if k not in ("host", "port")}
    return {"AIRFLOW_CONN_GPU_INSTANCE_SSH": json.dumps(key_only), "AIRFLOW_CONN_GPU_INSTANCE_FWD": json.dumps(full)}


def unreachable(conn_json: str, port: int) -> str:
    """The same SSH connection pointed at a port where nothing listens."""
    data = json.loads(conn_json)
    data.update({"host": "127.0.0.1", "port": port})
    return json.dumps(data)


def start_lambda(sshd: Any, work_root: Path) -> Rig:
    from tests.fakeclouds.lambda_cloud import FakeLambda

    fake = FakeLambda(ssh_host="127.0.0.1", ssh_port=sshd.port)
    fake.box_root = work_root
    env = ssh_connections(sshd, work_root)
    env["AIRFLOW_CONN_LAMBDA_DEFAULT"] = fake.connection(
        ssh_key_name="test-key", ssh_conn_id="gpu_instance_fwd", **FAST_RETRIES
    )
    return Rig("lambda", fake, env, "gpu_instance_fwd", "A100", fake.stop)


STARTERS: dict[str, Callable[..., Rig]] = {"lambda": start_lambda}


def start_vast(sshd: Any, work_root: Path) -> Rig:
    from tests.fakeclouds.vast import FakeVast

    fake = FakeVast(ssh_host="127.0.0.1", ssh_port=sshd.port)
    fake.box_root = work_root
    env = ssh_connections(sshd, work_root)
    env["AIRFLOW_CONN_VAST_DEFAULT"] = fake.connection(ssh_conn_id="gpu_instance_ssh", **FAST_RETRIES)
    return Rig("vast", fake, env, "gpu_instance_ssh", "A100", fake.stop)


STARTERS["vast"] = start_vast


def start_runpod(sshd: Any, work_root: Path) -> Rig:
    from tests.fakeclouds.runpod import FakeRunPod

    fake = FakeRunPod(ssh_host="127.0.0.1", ssh_port=sshd.port)
    fake.box_root = work_root
    env = ssh_connections(sshd, work_root)
    env["AIRFLOW_CONN_RUNPOD_DEFAULT"] = fake.connection(ssh_conn_id="gpu_instance_ssh", **FAST_RETRIES)
    return Rig("runpod", fake, env, "gpu_instance_ssh", "A100", fake.stop)


STARTERS["runpod"] = start_runpod


def start_ec2(sshd: Any, work_root: Path) -> Rig:
    """EC2 is moto behind a fault-injecting proxy; moto's public IPs lead nowhere, so SSH goes to
    the sshd through the forward connection."""
    from tests.fakeclouds.ec2 import Ec2FaultProxy

    fake = Ec2FaultProxy()  # starts its own moto server
    fake.box_root = work_root
    images = fake.moto(fake.region).describe_images(
        Owners=["amazon"], Filters=[{"Name": "name", "Values": ["*ubuntu*"]}]
    )["Images"]
    ami = sorted(i["ImageId"] for i in images if i.get("RootDeviceName"))[0]
    env = ssh_connections(sshd, work_root)
    env["AIRFLOW_CONN_AWS_DEFAULT"] = fake.connection(ami_id=ami, ssh_conn_id="gpu_instance_fwd", retry_attempts=4)
    return Rig("ec2", fake, env, "gpu_instance_fwd", "A10G", fake.stop)


STARTERS["ec2"] = start_ec2
