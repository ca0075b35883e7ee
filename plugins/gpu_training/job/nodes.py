"""The job's instances: its live nodes (the latest launch attempt), what the cloud says of them, and
their hosts and trainers."""

from __future__ import annotations

from typing import Any

from gpu_training.errors import InstanceNotFoundError
from gpu_training.hosts.base import Host
from gpu_training.job.context import JobContext
from gpu_training.params import JobSpec
from gpu_training.providers.base import ComputeProvider, InstanceInfo
from gpu_training.results.models import Instance
from gpu_training.results.states import InstanceState
from gpu_training.runtimes import Trainer, trainer_for


def current_nodes(ctx: JobContext) -> list[Instance]:
    """The job's live nodes, rank 0 first: the instances of its latest launch attempt that were not
    terminated (one for a single-node job)."""
    live = [i for i in ctx.store.instances_for_job(ctx.uuid) if not InstanceState(i.state).is_gone]
    if not live:
        raise InstanceNotFoundError(ctx.job.provider, f"job {ctx.uuid} has no live instance")
    group = live[-1].node_group or live[-1].name
    return sorted((i for i in live if (i.node_group or i.name) == group), key=lambda i: i.node_rank)


def current_instance(ctx: JobContext) -> Instance:
    """The job's latest instance record that was not terminated (of a multi-node job: its node 0,
    which writes global.json and holds the outputs)."""
    return current_nodes(ctx)[0]


def instance_info(provider: ComputeProvider, record: Instance) -> InstanceInfo:
    """What the cloud says of the recorded instance (by id, else by its deterministic name)."""
    if record.instance_id:
        return provider.get_instance(record.instance_id)
    found = provider.find_instance(record.name)
    if found is None:
        raise InstanceNotFoundError(provider.name, f"instance {record.name} was never created")
    return found


def _provider_and_info(ctx: JobContext) -> tuple[ComputeProvider, InstanceInfo]:
    record = current_instance(ctx)
    provider = ctx.provider(record.provider)
    return provider, instance_info(provider, record)


def host_for(ctx: JobContext) -> Host:
    """The host of the job's instance (of a multi-node job: node 0, which holds the outputs)."""
    provider, info = _provider_and_info(ctx)
    return provider.host(info)


def host_and_trainer(ctx: JobContext) -> tuple[Host, Trainer]:
    """The instance's host and the job's trainer on it (a process or a container)."""
    provider, info = _provider_and_info(ctx)
    host = provider.host(info)
    return host, trainer_for(ctx.spec, host, info.name)


def node_hosts(ctx: JobContext) -> list[tuple[Instance, InstanceInfo, Host]]:
    """Every live node of the job with what its provider reports and its host, rank 0 first."""
    nodes = current_nodes(ctx)
    provider = ctx.provider(nodes[0].provider)
    out = []
    for record in nodes:
        info = instance_info(provider, record)
        out.append((record, info, provider.host(info)))
    return out


def node_label(record: Instance) -> str:
    """``node 1 (gpujob-...-n1)`` for a node of a multi-node job, the instance name otherwise."""
    return f"node {record.node_rank} ({record.name})" if record.node_group else record.name


def node_names(name: str, num_nodes: int) -> list[str]:
    """The instance names of one launch attempt: ``name`` for node 0, ``name-n<rank>`` for the others."""
    return [name] + [f"{name}-n{rank}" for rank in range(1, num_nodes)]


def node_count(record: Instance, spec: JobSpec) -> int:
    """How many nodes the launch attempt of ``record`` has (1 for a single-node instance)."""
    return spec.num_nodes if record.node_group else 1


def on_each(items: list[Any], fn: Any) -> list[Any]:
    """``fn`` on every item, at once where there are several (nodes are separate machines); the
    first error is raised once all ended."""
    if len(items) == 1:
        return [fn(items[0])]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        futures = [pool.submit(fn, item) for item in items]
    return [f.result() for f in futures]
