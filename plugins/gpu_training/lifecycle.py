"""The steps of a training job: the stable import path of :mod:`gpu_training.job`.

Operators, the CLI, the reaper and tests import the steps from here (``from gpu_training.lifecycle
import provision``); each lives in the module of its stage under ``gpu_training/job/``:

==============  =========================================================================
``context``     :class:`JobContext`, the job as a step sees it (row, params, providers), loaded once
``nodes``       the job's live nodes, their hosts and trainers
``budget``      cost so far, ``max_cost_usd``, the run's budget and instance slots
``register``    :func:`register_job`, :func:`build_config`
``provision``   :func:`provision`, :func:`launch_next` (failover over offers)
``readiness``   :func:`check_ready` (the boot wait; a broken instance replaced)
``start``       :func:`transfer_inputs`, :func:`start_trainer` (distributed too)
``following``   :func:`follow_kwargs`, :func:`after_follow`
``recovery``    :func:`interruption`, :func:`recover`, :func:`restart_trainer`
``outputs``     :func:`upload`, :func:`salvage_cancelled`
``terminate``   :func:`terminate_until_gone`, :func:`settle_terminated`
``teardown``    :func:`teardown`, :func:`finalize`
==============  =========================================================================

Each step reads what it needs from the results DB (not XCom), so any step can be retried on its own.
The helpers there take a :class:`JobContext`; the few that callers outside a step use are here by
job uuid as before (:func:`current_nodes`, :func:`host_for`, :func:`cost_deadline`, ...).
To patch a module's setting in a test, patch it where it is used (``gpu_training.job.terminate.
TERMINATE_BACKOFF_SECONDS``), not here.
"""

from __future__ import annotations

from datetime import datetime

from gpu_training.hosts.base import Host
from gpu_training.job import budget as _budget
from gpu_training.job import nodes as _nodes
from gpu_training.job import provision as _provision
from gpu_training.job.budget import BUDGET_CANCELLER, budget_cancelled, job_cost, run_cost
from gpu_training.job.context import JobContext, cancelled_reason, load_context
from gpu_training.job.following import STOP_ATTEMPTS, STOP_BACKOFF_SECONDS, after_follow, follow_kwargs
from gpu_training.job.nodes import node_label, node_names
from gpu_training.job.outputs import LOG_ARTIFACT, SALVAGE_BUDGET, salvage_cancelled, upload
from gpu_training.job.provision import INTERRUPTED, NOT_LAUNCHED_CANCELLED, REPLACED, provision
from gpu_training.job.readiness import check_ready, provision_timeout
from gpu_training.job.recovery import awaiting_restart, interruption, recover, restart_trainer
from gpu_training.job.register import build_config, register_job, stage_checkpoint_uri
from gpu_training.job.start import (
    DEFAULT_MASTER_PORT,
    distributed_command,
    distributed_env,
    fetch_init_checkpoint,
    start_trainer,
    trainer_env,
    transfer_inputs,
)
from gpu_training.job.teardown import LAUNCH_SETTLE, LAUNCH_SETTLE_POLL_SECONDS, finalize, teardown
from gpu_training.job.terminate import (
    TERMINATE_BACKOFF_SECONDS,
    TERMINATE_BUDGET,
    settle_terminated,
    terminate_until_gone,
)
from gpu_training.offers import request_from
from gpu_training.params import JobSpec
from gpu_training.providers.base import InstanceInfo
from gpu_training.providers.registry import get_provider
from gpu_training.results.models import Instance
from gpu_training.results.store import ResultsStore

__all__ = [
    "BUDGET_CANCELLER",
    "DEFAULT_MASTER_PORT",
    "INTERRUPTED",
    "LAUNCH_SETTLE",
    "LAUNCH_SETTLE_POLL_SECONDS",
    "LOG_ARTIFACT",
    "NOT_LAUNCHED_CANCELLED",
    "REPLACED",
    "SALVAGE_BUDGET",
    "STOP_ATTEMPTS",
    "STOP_BACKOFF_SECONDS",
    "TERMINATE_BACKOFF_SECONDS",
    "TERMINATE_BUDGET",
    "JobContext",
    "after_follow",
    "awaiting_restart",
    "budget_cancelled",
    "build_config",
    "cancelled_reason",
    "check_ready",
    "cost_deadline",
    "current_instance",
    "current_nodes",
    "distributed_command",
    "distributed_env",
    "ensure_run_slot",
    "ensure_within_run_budget",
    "fetch_init_checkpoint",
    "finalize",
    "follow_kwargs",
    "get_provider",
    "host_for",
    "interruption",
    "job_cost",
    "job_spec",
    "launch_next",
    "load_context",
    "node_hosts",
    "node_label",
    "node_names",
    "provision",
    "provision_timeout",
    "recover",
    "register_job",
    "request_from",
    "restart_trainer",
    "run_cost",
    "salvage_cancelled",
    "settle_terminated",
    "stage_checkpoint_uri",
    "start_trainer",
    "teardown",
    "terminate_until_gone",
    "trainer_env",
    "transfer_inputs",
    "upload",
]


# --- by job uuid, for callers outside a step (operators, the CLI, tests) --------------------------


def job_spec(store: ResultsStore, job_uuid: str) -> JobSpec:
    """The job's validated params."""
    return load_context(store, job_uuid).spec


def current_nodes(store: ResultsStore, job_uuid: str) -> list[Instance]:
    """The job's live nodes, rank 0 first (:func:`gpu_training.job.nodes.current_nodes`)."""
    return _nodes.current_nodes(load_context(store, job_uuid))


def current_instance(store: ResultsStore, job_uuid: str) -> Instance:
    """The job's live node 0 (:func:`gpu_training.job.nodes.current_instance`)."""
    return _nodes.current_instance(load_context(store, job_uuid))


def host_for(store: ResultsStore, job_uuid: str) -> Host:
    """The host of the job's instance, node 0 of several (:func:`gpu_training.job.nodes.host_for`)."""
    return _nodes.host_for(load_context(store, job_uuid))


def node_hosts(store: ResultsStore, job_uuid: str) -> list[tuple[Instance, InstanceInfo, Host]]:
    """Every live node with its provider's report and its host (:func:`gpu_training.job.nodes.node_hosts`)."""
    return _nodes.node_hosts(load_context(store, job_uuid))


def launch_next(store: ResultsStore, job_uuid: str) -> InstanceInfo:
    """Launch the cheapest fitting offer not given up on (:func:`gpu_training.job.provision.launch_next`)."""
    return _provision.launch_next(load_context(store, job_uuid))


def cost_deadline(store: ResultsStore, job_uuid: str, spec: JobSpec) -> datetime | None:
    """When the job reaches ``max_cost_usd`` of ``spec`` (:func:`gpu_training.job.budget.cost_deadline`)."""
    return _budget.cost_deadline(JobContext(store, store.job(job_uuid), spec))


def ensure_within_run_budget(store: ResultsStore, job_uuid: str, spec: JobSpec) -> None:
    """No launch once the run's budget is spent (:func:`gpu_training.job.budget.ensure_within_run_budget`)."""
    _budget.ensure_within_run_budget(JobContext(store, store.job(job_uuid), spec))


def ensure_run_slot(
    store: ResultsStore, job_uuid: str, spec: JobSpec, *, intent: str | None = None, also: tuple[str, ...] = ()
) -> None:
    """At most ``run_max_instances`` jobs of the run hold an instance
    (:func:`gpu_training.job.budget.ensure_run_slot`)."""
    _budget.ensure_run_slot(JobContext(store, store.job(job_uuid), spec), intent=intent, also=also)
