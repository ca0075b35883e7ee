"""What following a job needs, as one type from the worker to the triggerer: :class:`FollowSettings`.

The worker builds it (:func:`gpu_training.lifecycle.follow_kwargs`), the trigger carries it as its
kwargs (:meth:`FollowSettings.to_kwargs`, JSON-serializable) and rebuilds it in the triggerer
(:meth:`FollowSettings.from_kwargs`), and the follower runs on it. No secret is ever in it: a host is
reached through its Airflow connection's id, never its password or key, and a target that holds a
secret is refused both ways. The byte offset is not in it either: it lives in the results DB.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

#: The results DB connection when none is named (``hooks.results.DEFAULT_CONN_ID``).
DEFAULT_RESULTS_CONN_ID = "training_results"
#: Keys a follow target must never hold: an SSH connection's secrets stay in the connection.
SECRET_KEYS = frozenset({"password", "private_key", "private_key_passphrase", "passphrase", "pkey", "key_file"})


def _checked_target(target: Mapping[str, Any]) -> dict[str, Any]:
    secrets = sorted(SECRET_KEYS & {str(key).lower() for key in target})
    if secrets:
        raise ValueError(
            f"a follow target must not hold secrets ({', '.join(secrets)}): name the Airflow connection "
            "(ssh_conn_id) that holds them"
        )
    return dict(target)


@dataclasses.dataclass(frozen=True)
class PeerSettings:
    """Another node of a multi-node job: how to reach it and ask for its trainer's status."""

    rank: int
    name: str
    target: Mapping[str, Any]
    #: ``[body, *args]`` of the script printing this node's trainer status.
    status_command: tuple[str, ...] = ()

    def to_kwargs(self) -> dict[str, Any]:
        """JSON-serializable, without secrets."""
        return {
            "rank": self.rank,
            "name": self.name,
            "target": _checked_target(self.target),
            "status_command": list(self.status_command),
        }

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> PeerSettings:
        """The peer :meth:`to_kwargs` wrote."""
        return cls(
            rank=int(kwargs["rank"]),
            name=str(kwargs["name"]),
            target=_checked_target(kwargs["target"]),
            status_command=tuple(kwargs.get("status_command") or ()),
        )


@dataclasses.dataclass(frozen=True)
class FollowSettings:
    """How to follow one job: where its host is, how to ask for the trainer's status, its limits."""

    job_uuid: str
    results_conn_id: str = DEFAULT_RESULTS_CONN_ID
    #: How the triggerer reaches the host (:meth:`~gpu_training.hosts.base.Host.follow_target`).
    target: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    #: ``[body, *args]`` of the bash script printing the trainer's status (see runtimes.Trainer).
    status_command: tuple[str, ...] = ()
    #: ``process`` or ``docker``: how the status output is parsed.
    runtime: str = "process"
    poll_interval: float = 5.0
    stall_timeout: timedelta = timedelta(minutes=15)
    max_runtime: timedelta = timedelta(hours=2)
    unreachable_timeout: timedelta = timedelta(minutes=2)
    stop_on_nan: bool = False
    #: When the job's instances reach ``max_cost_usd`` (None: no cost limit).
    cost_deadline: datetime | None = None
    max_cost_usd: float = 0.0
    #: The most metric rows the job may store; None: the deployment's ``max_metric_rows_per_job``.
    max_metric_rows: int | None = None
    #: The other nodes of a multi-node job (node 0, :attr:`target`, writes global.json).
    peers: tuple[PeerSettings, ...] = ()

    def to_kwargs(self) -> dict[str, Any]:
        """The trigger's kwargs: JSON-serializable, no secret, durations in seconds, the cost
        deadline in ISO 8601."""
        return {
            "job_uuid": self.job_uuid,
            "results_conn_id": self.results_conn_id,
            "target": _checked_target(self.target),
            "status_command": list(self.status_command),
            "runtime": self.runtime,
            "poll_interval_seconds": float(self.poll_interval),
            "stall_timeout_seconds": self.stall_timeout.total_seconds(),
            "max_runtime_seconds": self.max_runtime.total_seconds(),
            "unreachable_timeout_seconds": self.unreachable_timeout.total_seconds(),
            "stop_on_nan": bool(self.stop_on_nan),
            "cost_deadline": self.cost_deadline.isoformat() if self.cost_deadline else None,
            "max_cost_usd": float(self.max_cost_usd),
            "max_metric_rows": self.max_metric_rows,
            "peers": [peer.to_kwargs() for peer in self.peers],
        }

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any]) -> FollowSettings:
        """The settings :meth:`to_kwargs` wrote (keys left out take their defaults)."""
        defaults = cls(job_uuid="")
        seconds = {
            "stall_timeout": defaults.stall_timeout,
            "max_runtime": defaults.max_runtime,
            "unreachable_timeout": defaults.unreachable_timeout,
        }
        durations = {
            name: timedelta(seconds=float(kwargs[f"{name}_seconds"])) if f"{name}_seconds" in kwargs else default
            for name, default in seconds.items()
        }
        deadline = kwargs.get("cost_deadline")
        max_rows = kwargs.get("max_metric_rows")
        return cls(
            job_uuid=str(kwargs["job_uuid"]),
            results_conn_id=str(kwargs.get("results_conn_id") or DEFAULT_RESULTS_CONN_ID),
            target=_checked_target(kwargs.get("target") or {}),
            status_command=tuple(kwargs.get("status_command") or ()),
            runtime=str(kwargs.get("runtime") or defaults.runtime),
            poll_interval=float(kwargs.get("poll_interval_seconds", defaults.poll_interval)),
            stop_on_nan=bool(kwargs.get("stop_on_nan", False)),
            cost_deadline=datetime.fromisoformat(deadline) if deadline else None,
            max_cost_usd=float(kwargs.get("max_cost_usd") or 0.0),
            max_metric_rows=int(max_rows) if max_rows is not None else None,
            peers=tuple(PeerSettings.from_kwargs(peer) for peer in kwargs.get("peers") or ()),
            **durations,
        )
