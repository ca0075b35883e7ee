"""Server-Sent Events of one job: ``status``, ``epoch`` and ``eval`` events as rows are stored.

The stream opens with a ``status`` event (the job), then sends every epoch and evaluation row once,
in the order stored (those stored before the stream opened first), and a ``status`` event whenever
the job's status or outcome changes. After a terminal status (completed, failed, cancelled) and the
rows stored before it, a last ``status`` event is sent and the stream ends. The database is polled
about once a second in a worker thread; a comment line keeps idle connections open.

Each event's ``id`` is the cursor ``"{last epoch row id}-{last eval row id}"``: a client that
reconnects with ``Last-Event-ID`` gets only rows stored after it, and one that already read the job's
rows (a chart's series, which says its cursor) opens the stream with ``?after=<cursor>``. A results
DB that goes away mid-stream ends the stream (logged): the browser's EventSource reconnects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from gpu_training.api import queries
from gpu_training.api.schemas import Epoch, Evaluation, Job
from gpu_training.results.models import TERMINAL_STATUSES, TrainingJob
from gpu_training.results.store import ResultsStore

BATCH = 500
#: A cursor: ``"{epoch row id}-{eval row id}"``.
CURSOR_PATTERN = r"^\d{1,18}-\d{1,18}$"
_CURSOR = re.compile(r"^(\d{1,18})-(\d{1,18})$")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    poll_interval: float = 1.0
    keepalive: float = 15.0


@dataclasses.dataclass
class Cursor:
    epoch_id: int = 0
    eval_id: int = 0

    @classmethod
    def parse(cls, last_event_id: str | None) -> Cursor:
        match = _CURSOR.match((last_event_id or "").strip())
        return cls(int(match[1]), int(match[2])) if match else cls()

    def __str__(self) -> str:
        return f"{self.epoch_id}-{self.eval_id}"


def sse(event: str, data: BaseModel | dict[str, Any], event_id: str) -> bytes:
    body = data.model_dump_json() if isinstance(data, BaseModel) else json.dumps(data)
    return f"id: {event_id}\nevent: {event}\ndata: {body}\n\n".encode()


KEEPALIVE = b": keepalive\n\n"


def _outcome(job: TrainingJob) -> tuple[Any, ...]:
    """What makes a new ``status`` event (not the byte offset, which moves with every batch)."""
    return (
        job.status,
        job.started_at,
        job.completed_at,
        job.failure_reason,
        job.non_finite_loss,
        job.trainer_exit_code,
        job.cost_usd,
    )


async def job_events(
    store: ResultsStore, job: TrainingJob, settings: StreamSettings, last_event_id: str | None = None
) -> AsyncIterator[bytes]:
    """The event stream of ``job`` (already authorized); ends after its terminal status."""
    cursor = Cursor.parse(last_event_id)
    yield sse("status", Job.of(job), str(cursor))
    sent = _outcome(job)
    last_write = time.monotonic()
    while True:
        try:
            found = await run_in_threadpool(
                queries.rows_after, store, job.id, epoch_id=cursor.epoch_id, eval_id=cursor.eval_id, limit=BATCH
            )
        except SQLAlchemyError as err:
            log.warning("stream of job %s ended: the results database is unavailable: %s", job.uuid, err)
            return
        if found is None:  # the job was deleted
            return
        for epoch in found.epochs:
            cursor.epoch_id = epoch["id"]
            yield sse("epoch", Epoch.model_validate(epoch), str(cursor))
        for row in found.evals:
            cursor.eval_id = row["id"]
            yield sse("eval", Evaluation.model_validate(row), str(cursor))
        more = found.more
        if found.epochs or found.evals:
            last_write = time.monotonic()
        ended = found.job.status in TERMINAL_STATUSES and not more
        if _outcome(found.job) != sent or ended:
            sent = _outcome(found.job)
            yield sse("status", Job.of(found.job), str(cursor))
            last_write = time.monotonic()
        if ended:
            return
        if more:
            continue
        if time.monotonic() - last_write >= settings.keepalive:
            yield KEEPALIVE
            last_write = time.monotonic()
        await asyncio.sleep(settings.poll_interval)
