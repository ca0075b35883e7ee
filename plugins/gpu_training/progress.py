"""How a followed job ended: :class:`FollowOutcome`, and :func:`judge`, which decides it.

:func:`judge` decides from the job's row and the trainer's status: ``PROJECT end``, a cancel, a
trainer that exited without it, a stall, ``max_runtime``, ``max_cost_usd``. The triggerer's follower
(:mod:`gpu_training.follow`) calls it on every check and adds the ends only it sees (a non-finite
loss, the host unreachable, another node failed, global.json refused, the row limit).
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import datetime, timedelta
from typing import Any

from gpu_training.events import GLOBAL_JSON
from gpu_training.hosts.base import OUTPUT_DIR, TrainerStatus
from gpu_training.results.states import JobStatus

GLOBAL_JSON_PATH = f"{OUTPUT_DIR}/{GLOBAL_JSON}"


class FollowOutcome(enum.StrEnum):
    """How following a job ended: the ``kind`` of a :class:`Verdict` and of the trigger's event."""

    #: The trainer wrote ``PROJECT end``: the one success.
    PROJECT_END = "project_end"
    CANCELLED = "cancelled"
    #: The trainer was never started on the instance.
    NOT_STARTED = "not_started"
    #: The trainer exited without ``PROJECT end``.
    TRAINER_EXIT = "trainer_exit"
    MAX_RUNTIME = "max_runtime"
    MAX_COST = "max_cost"
    #: No new bytes in global.json for ``stall_timeout``.
    STALL = "stall"
    #: A non-finite loss with ``stop_on_nan``.
    NON_FINITE_LOSS = "non_finite_loss"
    #: The host did not answer for ``unreachable_timeout``.
    UNREACHABLE = "unreachable"
    #: Another node of a multi-node job failed first.
    NODE_FAILED = "node_failed"
    #: global.json is not a regular file (a symlink, a FIFO...): it is never read.
    NOT_REGULAR_FILE = "not_regular_file"
    #: The job reached ``max_metric_rows_per_job``.
    MAX_METRIC_ROWS = "max_metric_rows"


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How a job ended: ``kind`` is machine-readable, ``reason`` is for people."""

    kind: FollowOutcome
    succeeded: bool
    reason: str


def judge(
    job: Any,
    status: TrainerStatus | None,
    *,
    now: datetime,
    stall_timeout: timedelta,
    max_runtime: timedelta,
    cost_deadline: datetime | None = None,
    max_cost_usd: float = 0,
) -> Verdict | None:
    """Whether the job ended, from its row in the results DB and the trainer's status (``None``:
    unknown, the host did not answer). ``None`` means it still runs. ``cost_deadline``: when the
    job's instances will have cost ``max_cost_usd`` (see :func:`gpu_training.lifecycle.cost_deadline`)."""
    if job.project_ended:
        return Verdict(FollowOutcome.PROJECT_END, True, "PROJECT end")
    if job.status == JobStatus.CANCELLED:
        by = getattr(job, "cancelled_by", None)
        return Verdict(FollowOutcome.CANCELLED, False, "the job was cancelled" + (f" by {by}" if by else ""))
    if status is not None and not status.started:
        return Verdict(
            FollowOutcome.NOT_STARTED, False, "the trainer is not running: it was never started on the instance"
        )
    if status is not None and not status.running:
        return Verdict(FollowOutcome.TRAINER_EXIT, False, f"trainer {exit_description(status)} without PROJECT end")
    started = job.trainer_started_at or job.created_at
    if now - started > max_runtime:
        return Verdict(FollowOutcome.MAX_RUNTIME, False, f"exceeded max_runtime_minutes ({_minutes(max_runtime)})")
    if cost_deadline is not None and now >= cost_deadline:
        return Verdict(
            FollowOutcome.MAX_COST, False, f"reached max_cost_usd ({max_cost_usd:g} USD): the instance was stopped"
        )
    last = job.last_progress_at or started
    if now - last > stall_timeout:
        return Verdict(
            FollowOutcome.STALL,
            False,
            f"stalled: no new bytes in global.json for {_minutes(now - last)} "
            f"(stall_timeout_minutes={_minutes(stall_timeout)})",
        )
    return None


def exit_description(status: TrainerStatus) -> str:
    """``exited with code 3``, with what an OOM kill or a SIGKILL means."""
    how = (
        f"exited with code {status.exit_code}" if status.exit_code is not None else "vanished (killed with its wrapper)"
    )
    if status.oom_killed:
        how += ": out of memory (the kernel's OOM killer ended it; raise container_memory or use less)"
    elif status.exit_code is not None and status.exit_code in (137, -9):
        how += " (SIGKILL: out of memory?)"
    return how


def with_log_tail(reason: str, tail: str) -> str:
    return reason + (f"; last log lines:\n{tail}" if tail else "; its log is empty")


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g} min"
