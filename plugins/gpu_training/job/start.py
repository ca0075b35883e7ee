"""Starting the training: the inputs onto every node (config, dataset, initial checkpoint, the
reference trainer), then the trainer, detached (on several nodes: with the distributed environment)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from gpu_training import storage
from gpu_training.errors import StorageError, TrainerFailedError
from gpu_training.hosts.base import CONFIG_PATH, INIT_DIR, OUTPUT_DIR, REFERENCE_TRAINER_DIR, TRAINER_DIR, Host
from gpu_training.job.context import JobContext, load_context
from gpu_training.job.nodes import current_instance, host_and_trainer, node_hosts, on_each
from gpu_training.params import DEFAULT_COMMAND, JobSpec, render_command
from gpu_training.policy import Policy
from gpu_training.providers.base import InstanceInfo
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.states import JobStatus
from gpu_training.results.store import ResultsStore
from gpu_training.runtimes import ContainerSpec, ContainerTrainer, registry_login
from gpu_training.storage import fetch_dataset, fetch_dataset_direct

log = logging.getLogger(__name__)

#: Where node 0 listens for the others when no free port could be asked for (torchrun's default).
DEFAULT_MASTER_PORT = 29500
_FREE_PORT = 'exec "$1" -c "import socket; s = socket.socket(); s.bind((\'\', 0)); print(s.getsockname()[1])"'


def transfer_inputs(store: ResultsStore, job_uuid: str) -> dict[str, int]:
    """Put the config, the dataset and (for the default command) the reference trainer on the host."""
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    return put_inputs(ctx)


def put_inputs(ctx: JobContext) -> dict[str, int]:
    """The inputs onto every node of the job; returns the file count (and the node count)."""
    spec = ctx.spec
    if ctx.job.config_yaml is None:
        raise TrainerFailedError(f"job {ctx.uuid} has no config yet: the build_config step did not run")
    config = ctx.job.config_yaml.encode()

    def transfer(host: Host) -> int:
        host.prepare()
        host.put_bytes(config, CONFIG_PATH)
        files = 1
        if spec.dataset_uri:
            if direct_s3(spec, host, spec.dataset_uri):
                expiry = int(spec.presigned_url_expiry_minutes * 60)
                files += len(
                    fetch_dataset_direct(spec.dataset_uri, host, expiry_seconds=expiry, aws_conn_id=spec.aws_conn_id)
                )
            else:
                files += len(
                    fetch_dataset(
                        spec.dataset_uri, host, check_path=_allowed_path("dataset_uri"), aws_conn_id=spec.aws_conn_id
                    )
                )
        if spec.init_checkpoint_uri:
            files += fetch_init_checkpoint(spec, host)
        reference_trainer = list(spec.command) == DEFAULT_COMMAND and spec.runtime == "process"
        if reference_trainer or any("{workdir}/trainer/" in part for part in spec.command):
            files += len(host.put_tree(REFERENCE_TRAINER_DIR, TRAINER_DIR))
        return files

    # Every node gets the same inputs (each trains on its shard of the same data).
    counts = on_each([host for _, _, host in node_hosts(ctx)], transfer)
    return {"files": sum(counts), **({"nodes": len(counts)} if len(counts) > 1 else {})}


def fetch_init_checkpoint(spec: JobSpec, host: Host) -> int:
    """The initial checkpoint into ``init/`` (one file, or every file under a prefix)."""
    uri = spec.init_checkpoint_uri
    try:
        if direct_s3(spec, host, uri):
            expiry = int(spec.presigned_url_expiry_minutes * 60)
            return len(
                fetch_dataset_direct(uri, host, expiry_seconds=expiry, dest_dir=INIT_DIR, aws_conn_id=spec.aws_conn_id)
            )
        checked = _allowed_path("init_checkpoint_uri")
        return len(fetch_dataset(uri, host, dest_dir=INIT_DIR, check_path=checked, aws_conn_id=spec.aws_conn_id))
    except StorageError as err:
        raise StorageError(f"init_checkpoint_uri: {err}".replace("dataset ", "")) from err


def _allowed_path(param: str) -> Any:
    """Every local file a ``file://`` param reads is checked against the deployment's allowed roots
    as it is read (symlinks resolved): one planted since the job registered is refused too."""
    policy = Policy.current()
    return lambda path: policy.check_path(param, path)


def direct_s3(spec: JobSpec, host: Host, uri: str) -> bool:
    """S3 data moves between a remote instance and S3 itself, not through this worker."""
    return uri.startswith("s3://") and host.remote and spec.s3_transfer == "direct"


def trainer_env(host: Host) -> dict[str, str]:
    """The trainer's whole environment: nothing of the worker's (no secrets) leaks into it."""
    import os

    env = {key: os.environ[key] for key in ("PATH", "LANG", "LC_ALL", "TZ") if key in os.environ}
    env.update(
        {
            "HOME": host.workdir,
            "PYTHONUNBUFFERED": "1",
            "TRAINING_CONFIG": host.path(CONFIG_PATH),
            "TRAINING_OUTPUT_DIR": host.path(OUTPUT_DIR),
        }
    )
    return env


def start_trainer(store: ResultsStore, job_uuid: str) -> int | None:
    """Start the trainer detached (re-attaching if a retry finds it started). Returns its pid.

    On an interruptible (spot) instance the trainer's latest checkpoint is synced to the job's
    outputs URI while it trains, for a recovery on another instance to resume from.
    """
    ctx = load_context(store, job_uuid)
    ctx.ensure_not_cancelled()
    return run_trainer(ctx)


def run_trainer(ctx: JobContext) -> int | None:
    """Start the job's trainer (every node's) and mark the job running; returns node 0's pid."""
    spec = ctx.spec
    host, trainer = host_and_trainer(ctx)
    if current_instance(ctx).spot and (outputs := ctx.job.outputs_uri):
        expiry = int(min(7 * 24 * 3600, spec.max_runtime_minutes * 60 + 3600))
        storage.start_checkpoint_sync(host, outputs, expiry_seconds=expiry, aws_conn_id=spec.aws_conn_id)
    if isinstance(trainer, ContainerTrainer):
        report = trainer.start(ContainerSpec.for_job(spec, host), registry_login(spec.registry_conn_id))
        log.info("%s", report)
        status = trainer.status()
    elif spec.distributed:
        status = _start_distributed(ctx)
    else:
        argv = render_command(spec.command, python=host.python, workdir=host.workdir)
        status = host.start_trainer(argv, trainer_env(host))
    if ctx.job.trainer_started_at is None:
        ctx.store.update_job(ctx.uuid, trainer_started_at=utcnow())
    ctx.store.set_status(
        ctx.uuid, JobStatus.RUNNING.value, from_statuses=(JobStatus.PENDING.value, JobStatus.PROVISIONING.value)
    )
    return status.pid


def distributed_env(spec: JobSpec, *, rank: int, master_addr: str, master_port: int, nproc: int) -> dict[str, str]:
    """The usual distributed environment of node ``rank`` (what torchrun and launchers read)."""
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        "NODE_RANK": str(rank),
        "NNODES": str(spec.num_nodes),
        "NPROC_PER_NODE": str(nproc),
        "WORLD_SIZE": str(spec.num_nodes * nproc),
    }


def distributed_command(spec: JobSpec, env: Mapping[str, str], *, python: str, workdir: str) -> list[str]:
    """The node's trainer command: the reference trainer under torchrun, or ``command`` with its
    ``{torchrun}`` placeholder expanded to the launcher and this node's flags."""
    command = list(spec.command)
    if command == DEFAULT_COMMAND:
        command = ["{torchrun}", "{workdir}/trainer/train.py"]
    torchrun = [
        python,
        "-m",
        "torch.distributed.run",
        f"--nnodes={env['NNODES']}",
        f"--nproc-per-node={env['NPROC_PER_NODE']}",
        f"--node-rank={env['NODE_RANK']}",
        f"--master-addr={env['MASTER_ADDR']}",
        f"--master-port={env['MASTER_PORT']}",
    ]
    argv: list[str] = []
    for part in render_command(command, python=python, workdir=workdir):
        argv.extend(torchrun if part == "{torchrun}" else [part])
    return argv


def _master_port(store: ResultsStore, record: Instance, host: Host) -> int:
    """A free port on node 0 for the others to meet at, asked once and kept on its record (a
    retried start uses the same)."""
    details = dict(record.details or {})
    if details.get("master_port"):
        return int(details["master_port"])
    rc, out, _ = host.script(_FREE_PORT, host.python, check=False, timeout=60)
    port = int(out.strip()) if rc == 0 and out.strip().isdigit() else DEFAULT_MASTER_PORT
    store.update_instance(record.name, details={**details, "master_port": port})
    return port


def _start_distributed(ctx: JobContext) -> Any:
    """Start the trainer on every node with the distributed environment; returns node 0's status."""
    spec = ctx.spec
    nodes = node_hosts(ctx)
    head, head_info, head_host = nodes[0]
    master_addr = str(head_info.details.get("private_ip") or head_info.address or "127.0.0.1")
    master_port = _master_port(ctx.store, head, head_host)
    nproc = spec.gpus_per_node or max(1, len(head_host.gpus))

    def start(node: tuple[Instance, InstanceInfo, Host]) -> Any:
        record, _, host = node
        env = distributed_env(
            spec, rank=record.node_rank, master_addr=master_addr, master_port=master_port, nproc=nproc
        )
        argv = distributed_command(spec, env, python=host.python, workdir=host.workdir)
        return host.start_trainer(argv, {**trainer_env(host), **env})

    log.info("starting %d nodes x %d processes (master %s:%d)", len(nodes), nproc, master_addr, master_port)
    return on_each(nodes, start)[0]
