"""The batched writer of a followed job: complete ``global.json`` lines into the results DB.

:class:`BatchWriter` parses what the reader received and stores it in batches of at most
:data:`BATCH_BYTES`, each in one transaction with the new byte offset
(:meth:`~gpu_training.results.store.ResultsStore.ingest`, compare-and-set), so a restarted or a
second follower neither loses nor duplicates a row. Parsing and storing run on :data:`DB_THREADS`,
never on the triggerer's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gpu_training.events import DEFAULT_DECODER, LineDecoder, MalformedLine, parse_chunk
from gpu_training.results.store import ResultsStore

T = TypeVar("T")

#: Largest batch parsed and stored in one transaction; also the read-ahead limit per job.
BATCH_BYTES = 4 << 20


@functools.lru_cache(maxsize=16)
def results_store(conn_id: str) -> ResultsStore:
    """One store (engine and pool) per results connection per process (``results_store.cache_clear()``
    forgets them)."""
    from gpu_training.hooks.results import ResultsDbHook

    return ResultsDbHook(conn_id).get_store()


class DbThreads:
    """The threads every follower of this process runs its results DB calls on (SQLite serialises
    writers anyway; PostgreSQL gets a few concurrent transactions). Started on first use;
    :meth:`shutdown` ends them, and the next call starts new ones."""

    def __init__(self, max_workers: int = 4) -> None:
        self.max_workers = max_workers
        self._executor: ThreadPoolExecutor | None = None

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on one of the threads."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="gpu-training-results")
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self, *, wait: bool = True) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=wait)


#: Shared by the followers of this process.
DB_THREADS = DbThreads()


@dataclasses.dataclass(frozen=True)
class Batch:
    """What storing one batch did."""

    consumed: int
    events: int
    errors: int
    conflict_offset: int | None = None
    project_end: bool = False
    non_finite_loss: str | None = None
    #: The job's metric rows when ``max_metric_rows`` stopped this batch (None: it did not).
    row_limit_at: int | None = None


def metric_rows_limit() -> int:
    """The deployment's ``[gpu_training] max_metric_rows_per_job`` (see :mod:`gpu_training.policy`)."""
    from gpu_training.policy import Policy

    return Policy.current().max_metric_rows_per_job


def ingest_batch(
    store: ResultsStore,
    job_uuid: str,
    data: bytes,
    offset: int,
    *,
    final: bool,
    max_rows: int | None = None,
    batch_bytes: int = BATCH_BYTES,
    decoder: LineDecoder = DEFAULT_DECODER,
) -> Batch:
    """Parse the complete lines of ``data`` (read at ``offset``) and store them with the new offset.

    A line longer than ``batch_bytes`` is recorded as an ingestion error and skipped. Runs on a DB
    thread (parsing a large backlog would otherwise hold the event loop too). With ``max_rows``
    the batch stops at the first line that would take the job past it.
    """
    events, errors, consumed = parse_chunk(data, offset, final=final, decoder=decoder)
    if consumed == 0:
        if len(data) < batch_bytes:
            return Batch(0, 0, 0)
        consumed = len(data)  # part of one huge line: skip it (the rest ends at its newline)
        errors = [MalformedLine(offset, f"line longer than {batch_bytes} bytes", "")]
    result = store.ingest(
        job_uuid,
        expected_offset=offset,
        new_offset=offset + consumed,
        events=events,
        errors=errors,
        max_rows=max_rows,
    )
    if result.conflict:
        return Batch(0, 0, 0, conflict_offset=result.offset)
    stored_to = result.offset
    return Batch(
        stored_to - offset,
        result.events,
        result.errors,
        project_end=any(ev.kind == ("PROJECT", "end") and ev.offset < stored_to for ev in events),
        non_finite_loss=result.non_finite_loss,
        row_limit_at=result.metric_rows if result.row_limit_reached else None,
    )


class BatchWriter:
    """Stores one job's received bytes batch by batch, from the job-wide offset stored in the results
    DB (:attr:`offset`); counts what it stored."""

    def __init__(
        self,
        store: ResultsStore,
        job_uuid: str,
        *,
        max_rows: int | None = None,
        batch_bytes: int = BATCH_BYTES,
        db: DbThreads = DB_THREADS,
        decoder: LineDecoder = DEFAULT_DECODER,
    ) -> None:
        self.store = store
        self.decoder = decoder
        self.job_uuid = job_uuid
        self.max_rows = max_rows
        self.batch_bytes = batch_bytes
        self.db = db
        self.offset = 0  # stored in the results DB up to here (job-wide offsets)
        self.events = self.errors = 0
        self._skip_long_line = False

    async def write_next(self, pending: bytes | bytearray, *, final: bool) -> Batch:
        """Store the complete lines at the start of ``pending`` (received from :attr:`offset` on),
        one batch; ``final``: the trainer exited, an unterminated last line counts."""
        data = bytes(pending[: self.batch_bytes])
        if self._skip_long_line:  # the rest of a line longer than a batch, up to its newline
            newline = data.find(b"\n")
            batch = Batch(len(data) if newline < 0 else newline + 1, 0, 0)
            result = await self.db.run(
                self.store.ingest,
                self.job_uuid,
                expected_offset=self.offset,
                new_offset=self.offset + batch.consumed,
                events=[],
            )
            if result.conflict:
                batch = Batch(0, 0, 0, conflict_offset=result.offset)
            self._skip_long_line = newline < 0
        else:
            batch = await self.db.run(
                ingest_batch,
                self.store,
                self.job_uuid,
                data,
                self.offset,
                final=final,
                max_rows=self.max_rows,
                batch_bytes=self.batch_bytes,
                decoder=self.decoder,
            )
            self._skip_long_line = batch.consumed == len(data) == self.batch_bytes and not data.endswith(b"\n")
        if batch.conflict_offset is not None:  # another follower stored this range first
            self.offset = batch.conflict_offset
        else:
            self.offset += batch.consumed
            self.events += batch.events
            self.errors += batch.errors
        return batch
