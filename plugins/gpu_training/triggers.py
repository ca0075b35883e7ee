"""Triggers of the ``gpu_training`` DAG: async, small, and free of job logic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

if TYPE_CHECKING:
    from gpu_training.follow.settings import FollowSettings


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
    (``kind``, a :class:`~gpu_training.progress.FollowOutcome`; ``succeeded``, ``reason``). Its kwargs
    are its :class:`~gpu_training.follow.settings.FollowSettings` (how to reach the host, with no
    secret: the SSH key stays in the Airflow connection; the limits); the byte offset is not among
    them: it is read from the results DB, so a re-created trigger continues exactly where the last
    one stored.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        from gpu_training.follow.settings import FollowSettings

        self.settings = FollowSettings.from_kwargs(kwargs)

    @classmethod
    def following(cls, settings: FollowSettings) -> GlobalJsonTrigger:
        """The trigger that follows with ``settings``."""
        return cls(**settings.to_kwargs())

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return f"{type(self).__module__}.{type(self).__qualname__}", self.settings.to_kwargs()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from gpu_training import follow
        from gpu_training.notify import ProgressNotifier

        settings = self.settings
        timeout = settings.unreachable_timeout.total_seconds()
        source = follow.source_for(dict(settings.target), unreachable_timeout=timeout)
        peers = [
            follow.Peer(
                rank=peer.rank,
                name=peer.name,
                source=follow.source_for(dict(peer.target), unreachable_timeout=timeout),
                status_command=peer.status_command,
            )
            for peer in settings.peers
        ]
        try:
            store = await follow.DB_THREADS.run(follow.results_store, settings.results_conn_id)
            follower = follow.JobFollower(
                settings, source, log=self.log, store=store, peers=peers, progress=ProgressNotifier(self.log)
            )
            result = await follower.run()
        finally:
            for closing in (source, *(p.source for p in peers)):
                await closing.close()
        self.log.info("job %s ended: %s", settings.job_uuid, result.reason.splitlines()[0] if result.reason else "")
        yield TriggerEvent(result.as_event())
