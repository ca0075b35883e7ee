"""The follower of one job: reader, batched writer, trainer logs and peer watch, until the job ends.

Every ``poll_interval`` the trainer's status and the job's row are checked and the job judged
(:func:`gpu_training.progress.judge`): PROJECT end, trainer exit, stall, ``max_runtime``, a cancel,
a non-finite loss (with ``stop_on_nan``), or the host unreachable for longer than
``unreachable_timeout``. The follower only observes: stopping a trainer is the worker's job once
the trigger returns. Progress is reported to a :class:`ProgressListener` (the trigger passes
:class:`~gpu_training.notify.ProgressNotifier`), never sent from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from gpu_training.errors import HostError, NotRegularFileError
from gpu_training.events import DEFAULT_DECODER, LineDecoder
from gpu_training.follow.peers import Peer, PeerWatch
from gpu_training.follow.reader import GlobalJsonReader
from gpu_training.follow.settings import FollowSettings
from gpu_training.follow.sources import Source, SourceUnreachable, ThrottledWarnings, last_log_lines
from gpu_training.follow.trainer_log import LOG_TAIL_WRITE_SECONDS, LogGate, LogTail, TrainerLog
from gpu_training.follow.writer import BATCH_BYTES, DB_THREADS, BatchWriter, DbThreads, metric_rows_limit
from gpu_training.hosts.base import TrainerStatus
from gpu_training.progress import GLOBAL_JSON_PATH, FollowOutcome, Verdict, judge, with_log_tail
from gpu_training.results.models import utcnow
from gpu_training.results.store import ResultsStore


@dataclasses.dataclass(frozen=True)
class FollowResult:
    """What the trigger hands back to the worker (its event, :meth:`as_event`)."""

    kind: FollowOutcome
    succeeded: bool
    reason: str
    offset: int
    events: int
    errors: int
    exit_code: int | None = None

    def as_event(self) -> dict[str, Any]:
        """The trigger event's payload (plain JSON types: ``kind`` as its string)."""
        return {**dataclasses.asdict(self), "kind": str(self.kind)}


class ProgressListener(Protocol):
    """Told when a batch stored new events (e.g. to send progress notifications)."""

    def events_stored(self, store: ResultsStore, job_uuid: str) -> None:
        """New events of the job are in the results DB; must not block the event loop."""

    async def close(self) -> None:
        """Following ended: finish (or give up) what is in flight."""


class _Finished(Exception):
    def __init__(self, verdict: Verdict, exit_code: int | None = None) -> None:
        super().__init__(verdict.reason)
        self.verdict = verdict
        self.exit_code = exit_code


class _Restart(Exception):
    """Another follower stored a range first: read again from where it stored."""


class JobFollower:
    """Follows one job until it ends; see the module docstring."""

    def __init__(
        self,
        settings: FollowSettings,
        source: Source,
        *,
        log: Any,
        store: ResultsStore,
        parse_status: Callable[[int, str, str], TrainerStatus] | None = None,
        peers: Sequence[Peer] = (),
        progress: ProgressListener | None = None,
        batch_bytes: int = BATCH_BYTES,
        db: DbThreads = DB_THREADS,
        decoder: LineDecoder = DEFAULT_DECODER,
    ) -> None:
        self.settings = settings
        self.source = source
        self.log = log
        self.store = store
        self.progress = progress
        self.batch_bytes = batch_bytes
        self.db = db
        self.warnings = ThrottledWarnings(log)
        parse_status = parse_status or _parse_status_for(settings.runtime)
        self._parse_status = parse_status
        self.peers = PeerWatch(
            peers,
            head=source,
            unreachable_timeout=settings.unreachable_timeout,
            parse_status=parse_status,
            warnings=self.warnings,
        )
        self.base = 0  # the job-wide offset of this instance's global.json byte 0 (a recovery moves it)
        self.writer = BatchWriter(
            store, settings.job_uuid, max_rows=settings.max_metric_rows, batch_bytes=batch_bytes, db=db, decoder=decoder
        )
        self.reader = GlobalJsonReader(
            source,
            start=0,
            poll_interval=settings.poll_interval,
            log=log,
            warnings=self.warnings,
            batch_bytes=batch_bytes,
        )
        self._warned_nan = False
        self.log_tail = LogTail()
        self._logs = [TrainerLog(source, LogGate(log, "node 0" if peers else "trainer"), self.log_tail)] + [
            TrainerLog(peer.source, LogGate(log, f"node {peer.rank}"), self.log_tail) for peer in peers
        ]
        self._tail_saved_at = 0.0

    @property
    def offset(self) -> int:
        """Stored in the results DB up to here (job-wide offsets)."""
        return self.writer.offset

    @property
    def stream_failures(self) -> int:
        return self.reader.stream_failures

    async def _resume(self) -> None:
        """Start from what the results DB holds: the stored offset, the row limit."""
        if self.writer.max_rows is None:
            self.writer.max_rows = metric_rows_limit()
        job = await self.db.run(self.store.job, self.settings.job_uuid)
        self.writer.offset = job.ingest_offset
        self.base = job.ingest_base
        self.reader.restart_at(self.writer.offset - self.base)

    async def run(self) -> FollowResult:
        """Follow until the job ends; how it ended."""
        await self._resume()
        self.log.info(
            "following %s of job %s from byte %d (%s)",
            GLOBAL_JSON_PATH,
            self.settings.job_uuid,
            self.writer.offset,
            getattr(self.source, "where", self.source.workdir),
        )
        self.reader.stream()
        logs = [asyncio.create_task(t.follow(), name=f"trainer.log {i}") for i, t in enumerate(self._logs)]
        try:
            result = await self._main()
            await asyncio.gather(*(t.drain(task) for t, task in zip(self._logs, logs, strict=True)))
            await self._save_log_tail(force=True)
            return result
        finally:
            for task in logs:
                task.cancel()
            await asyncio.gather(*logs, return_exceptions=True)
            await self.reader.stop()
            for trainer_log in self._logs:
                trainer_log.gate.flush()
            if self.progress is not None:
                await self.progress.close()

    async def ingest_to_end(self, *, final: bool = False) -> FollowResult | None:
        """Store what ``global.json`` holds past the stored offset, once, without streaming or
        judging the job: what following does when the trainer exited (``final``: an unterminated
        last line counts) or before it judges a stall. Returns how following ended when a stored
        line ended it (PROJECT end, the row limit, a non-finite loss with ``stop_on_nan``), else None."""
        await self._resume()
        while True:
            try:
                await self._read_and_store(final=final)
                return None
            except _Restart:
                continue  # another follower stored a range first: on from where it stored
            except _Finished as done:
                return self._result(done)

    async def _read_and_store(self, *, final: bool) -> None:
        """Read to the end of the file and store every complete line (the stream must be stopped)."""
        await self.reader.read_to_end()
        await self._store_pending(final=final)

    def _result(self, done: _Finished) -> FollowResult:
        return FollowResult(
            done.verdict.kind,
            done.verdict.succeeded,
            done.verdict.reason,
            self.writer.offset,
            self.writer.events,
            self.writer.errors,
            done.exit_code,
        )

    async def _main(self) -> FollowResult:
        next_check = time.monotonic()
        while True:
            try:
                timeout = max(0.0, next_check - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.reader.wake.wait(), timeout)
                self.reader.wake.clear()
                await self._store_pending(final=False)
                if self.reader.refused is not None:
                    raise self._refusal(self.reader.refused)
                await self._save_log_tail()
                if time.monotonic() >= next_check:
                    await self._check()
                    next_check = time.monotonic() + self.settings.poll_interval
            except _Restart:
                await self.reader.stop()
                self.reader.stream()
            except _Finished as done:
                return self._result(done)

    async def _save_log_tail(self, *, force: bool = False) -> None:
        """The log's last lines onto the job row when they changed (every few seconds at most): the
        job page shows them live. A failed write is not a failed job: the next one catches up."""
        if not self.log_tail.changed or (not force and time.monotonic() - self._tail_saved_at < LOG_TAIL_WRITE_SECONDS):
            return
        self._tail_saved_at = time.monotonic()
        self.log_tail.changed = False
        try:
            await self.db.run(
                self.store.update_job, self.settings.job_uuid, log_tail=self.log_tail.text(), log_tail_at=utcnow()
            )
        except Exception as err:
            self.log_tail.changed = True
            self.warnings.warn("log_tail", f"could not store the trainer log's last lines: {err}")

    # -- global.json ----------------------------------------------------------------------------

    def _refusal(self, err: NotRegularFileError) -> _Finished:
        """global.json is not a regular file: the job fails, said once in the task log."""
        reason = f"{err}: it is never read (the trainer must append to a regular file {GLOBAL_JSON_PATH})"
        self.log.error("%s", reason)
        return _Finished(Verdict(FollowOutcome.NOT_REGULAR_FILE, False, reason))

    async def _store_pending(self, *, final: bool) -> None:
        """Store every complete line received so far, a batch per transaction."""
        reader, writer = self.reader, self.writer
        while reader.pending:
            batch = await writer.write_next(reader.pending, final=final)
            if batch.conflict_offset is not None:
                self._resync(batch.conflict_offset)
            if batch.consumed:
                reader.consumed(batch.consumed)
                if batch.events and self.progress is not None:
                    self.progress.events_stored(self.store, self.settings.job_uuid)
                if batch.non_finite_loss:
                    self._non_finite(batch.non_finite_loss)
            if batch.row_limit_at is not None:  # also when its first line did not fit
                raise _Finished(
                    Verdict(
                        FollowOutcome.MAX_METRIC_ROWS,
                        False,
                        f"{GLOBAL_JSON_PATH}: the job stored {batch.row_limit_at} metric rows, the limit is "
                        f"{writer.max_rows} (max_metric_rows_per_job); nothing from byte {writer.offset - self.base} "
                        "on was stored",
                    )
                )
            if batch.consumed == 0:
                break
            if batch.project_end:
                raise _Finished(Verdict(FollowOutcome.PROJECT_END, True, "PROJECT end"))
        reader.stored_what_it_could()

    def _resync(self, offset: int) -> None:
        """Another follower stored this range first: continue from where it is."""
        self.log.warning("global.json was stored up to byte %d by another follower: continuing there", offset)
        self.reader.restart_at(offset - self.base)
        raise _Restart

    def _non_finite(self, description: str) -> None:
        if self.settings.stop_on_nan:
            raise _Finished(
                Verdict(FollowOutcome.NON_FINITE_LOSS, False, f"non-finite loss: {description} (stop_on_nan)")
            )
        if not self._warned_nan:
            self._warned_nan = True
            self.log.warning("non-finite loss: %s (recorded; set stop_on_nan to stop such jobs)", description)

    # -- the periodic check ---------------------------------------------------------------------

    async def _status(self) -> TrainerStatus | None:
        if not self.settings.status_command:
            return None
        try:
            return self._parse_status(*await self.source.script(*self.settings.status_command))
        except (SourceUnreachable, HostError, TimeoutError, OSError) as err:
            self.warnings.warn("status", f"trainer status unknown: {err}")
            return None

    async def _check(self) -> None:
        status = await self._status()
        if self.peers.peers and (failure := await self.peers.failure(status)) is not None:
            await self._store_pending(final=False)
            raise _Finished(failure.verdict, failure.exit_code)
        if status is not None and not status.running:
            await self._drain()
        verdict = await self._judge(status)
        if verdict is not None and verdict.kind == FollowOutcome.STALL:
            # No new bytes *stored* is not no new bytes *written*: a follower that just started
            # (or restarted) may not have read what the trainer wrote before. Read to the end
            # first; the job stalled only if there was nothing.
            await self._catch_up()
            verdict = await self._judge(status)
        unreachable_timeout = self.settings.unreachable_timeout.total_seconds()
        unreachable = self.source.unreachable_for() > unreachable_timeout
        if unreachable and (verdict is None or verdict.kind == FollowOutcome.STALL):
            verdict = Verdict(
                FollowOutcome.UNREACHABLE,
                False,
                f"host unreachable for more than {unreachable_timeout / 60:g} min: {self.source.last_error}",
            )
        if verdict is None:
            return
        exit_code = status.exit_code if status is not None else None
        if verdict.kind == FollowOutcome.TRAINER_EXIT:
            tail = await last_log_lines(self.source)
            verdict = dataclasses.replace(verdict, reason=with_log_tail(verdict.reason, tail))
            if exit_code is not None:
                await self.db.run(self.store.update_job, self.settings.job_uuid, trainer_exit_code=exit_code)
        raise _Finished(verdict, exit_code)

    async def _judge(self, status: TrainerStatus | None) -> Verdict | None:
        job = await self.db.run(self.store.job, self.settings.job_uuid)
        return judge(
            job,
            status,
            now=utcnow(),
            stall_timeout=self.settings.stall_timeout,
            max_runtime=self.settings.max_runtime,
            cost_deadline=self.settings.cost_deadline,
            max_cost_usd=self.settings.max_cost_usd,
        )

    async def _catch_up(self) -> None:
        """Read and store whatever the file holds past what was received, then stream again."""
        await self.reader.stop()  # only this reads meanwhile: no byte arrives twice
        try:
            await self._read_and_store(final=False)
        except (SourceUnreachable, HostError, TimeoutError, OSError) as err:
            self.warnings.warn("catch-up", f"could not read global.json to its end: {err}")
        except NotRegularFileError as err:
            await self._store_pending(final=False)
            raise self._refusal(err) from None
        finally:
            self.reader.stream()

    async def _drain(self) -> None:
        """The trainer exited: read to the end of the file (an unterminated last line counts)."""
        await self.reader.stop()  # from here on only this reads, so no byte arrives twice
        try:
            await self.reader.read_to_end()
        except NotRegularFileError as err:
            await self._store_pending(final=False)
            raise self._refusal(err) from None
        await self._store_pending(final=True)


def _parse_status_for(runtime: str) -> Callable[[int, str, str], TrainerStatus]:
    from gpu_training.runtimes import ContainerTrainer, ProcessTrainer

    return ContainerTrainer.parse_status if runtime == "docker" else ProcessTrainer.parse_status
