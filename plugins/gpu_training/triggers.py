"""Triggers of the ``gpu_training`` DAG: async, small, and free of job logic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent


class PollIntervalTrigger(BaseTrigger):
    """Sleeps one poll interval in the triggerer, then hands ``state`` back to the task.

    Carrying the state in the event (not in ``next_kwargs``) keeps it on every resume path,
    ``airflow dags test``'s inline triggers included. The state is for display (e.g. how far the
    trainer's log was already shown); whatever must survive a retry lives in the results DB.
    """

    def __init__(self, seconds: float, state: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.seconds = float(seconds)
        self.state = dict(state or {})

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", {"seconds": self.seconds, "state": self.state}

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.sleep(self.seconds)
        yield TriggerEvent({"state": self.state})


class GlobalJsonTrigger(BaseTrigger):
    """Follows a training job's ``global.json`` until the job ends (see :mod:`gpu_training.follow`).

    Stores every event in the results DB as it arrives and fires once, with how the job ended
    (``kind``, ``succeeded``, ``reason``). Its kwargs say how to reach the host (no secret: the SSH
    key stays in the Airflow connection) and the limits; the byte offset is not among them: it is
    read from the results DB, so a re-created trigger continues exactly where the last one stored.
    """

    def __init__(
        self,
        *,
        job_uuid: str,
        results_conn_id: str,
        target: dict[str, Any],
        status_command: list[str],
        runtime: str = "process",
        poll_interval_seconds: float = 5.0,
        stall_timeout_seconds: float = 900.0,
        max_runtime_seconds: float = 7200.0,
        unreachable_timeout_seconds: float = 120.0,
        stop_on_nan: bool = False,
        cost_deadline: str | None = None,
        max_cost_usd: float = 0.0,
        peers: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.kwargs: dict[str, Any] = {
            "job_uuid": job_uuid,
            "results_conn_id": results_conn_id,
            "target": dict(target),
            "status_command": list(status_command),
            "runtime": runtime,
            "poll_interval_seconds": float(poll_interval_seconds),
            "stall_timeout_seconds": float(stall_timeout_seconds),
            "max_runtime_seconds": float(max_runtime_seconds),
            "unreachable_timeout_seconds": float(unreachable_timeout_seconds),
            "stop_on_nan": bool(stop_on_nan),
            "cost_deadline": cost_deadline,  # ISO 8601, UTC
            "max_cost_usd": float(max_cost_usd),
            # The other nodes of a multi-node job: {rank, name, target, status_command} each.
            "peers": [dict(p) for p in peers or ()],
        }

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", dict(self.kwargs)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from gpu_training.follow import FollowSpec, JobFollower, Peer, source_for

        kw = self.kwargs
        spec = FollowSpec(
            job_uuid=kw["job_uuid"],
            results_conn_id=kw["results_conn_id"],
            poll_interval=kw["poll_interval_seconds"],
            stall_timeout=timedelta(seconds=kw["stall_timeout_seconds"]),
            max_runtime=timedelta(seconds=kw["max_runtime_seconds"]),
            unreachable_timeout=timedelta(seconds=kw["unreachable_timeout_seconds"]),
            stop_on_nan=kw["stop_on_nan"],
            status_command=tuple(kw["status_command"]),
            runtime=kw["runtime"],
            cost_deadline=datetime.fromisoformat(kw["cost_deadline"]) if kw.get("cost_deadline") else None,
            max_cost_usd=float(kw.get("max_cost_usd") or 0.0),
        )
        source = source_for(kw["target"], unreachable_timeout=kw["unreachable_timeout_seconds"])
        peers = [
            Peer(
                rank=int(p["rank"]),
                name=str(p["name"]),
                source=source_for(p["target"], unreachable_timeout=kw["unreachable_timeout_seconds"]),
                status_command=tuple(p["status_command"]),
            )
            for p in kw.get("peers") or ()
        ]
        try:
            result = await JobFollower(spec, source, log=self.log, peers=peers).run()
        finally:
            for closing in (source, *(p.source for p in peers)):
                await closing.close()
        self.log.info("job %s ended: %s", spec.job_uuid, result.reason.splitlines()[0] if result.reason else "")
        yield TriggerEvent(result.as_event())
