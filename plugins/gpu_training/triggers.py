"""Triggers of the ``gpu_training`` DAG: async, small, and free of job logic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
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
