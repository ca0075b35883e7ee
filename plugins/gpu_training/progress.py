"""Reading ``global.json`` by byte offset, and judging whether a job has ended.

:func:`judge` decides from the job's row and the trainer's status: ``PROJECT end``, a cancel, a
trainer that exited without it, a stall, ``max_runtime``. The triggerer's follower
(:mod:`gpu_training.follow`) calls it on every check. :func:`ingest_new_bytes` and
:func:`poll_progress` are the synchronous one-shot form (read only what was appended since the
offset stored in the results DB, so a 100 MB file costs no more than a 1 MB one; store events and
the new offset in one transaction), for scripts, benchmarks and tests.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

from gpu_training.events import GLOBAL_JSON, MalformedLine, parse_chunk
from gpu_training.hosts.base import OUTPUT_DIR, Host, TrainerStatus
from gpu_training.results.models import utcnow
from gpu_training.results.store import ResultsStore
from gpu_training.runtimes import ProcessTrainer, Trainer

GLOBAL_JSON_PATH = f"{OUTPUT_DIR}/{GLOBAL_JSON}"
CHUNK_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class PollOutcome:
    """``done`` when the job ended; then ``succeeded`` and ``reason`` say how."""

    done: bool
    succeeded: bool = False
    reason: str = ""
    events: int = 0
    errors: int = 0
    offset: int = 0


def ingest_new_bytes(store: ResultsStore, host: Host, job_uuid: str, *, writer_done: bool) -> tuple[int, int, int]:
    """Ingest everything appended since the stored offset; returns (events, errors, offset).

    ``writer_done`` (the trainer has exited) lets an unterminated last line count as complete.
    """
    offset = store.job(job_uuid).ingest_offset
    n_events = n_errors = 0
    while True:
        chunk = host.read_chunk(GLOBAL_JSON_PATH, offset, CHUNK_BYTES)
        if not chunk:
            break
        full = len(chunk) == CHUNK_BYTES
        events, errors, consumed = parse_chunk(chunk, offset, final=writer_done and not full)
        if consumed == 0:
            if not full:
                break  # a partial last line: complete it next poll
            # One line longer than a whole chunk: record it as an error and skip past it.
            consumed = _skip_long_line(host, offset)
            errors = [MalformedLine(offset, f"line longer than {CHUNK_BYTES} bytes", "")]
            if consumed == 0:
                break
        result = store.ingest(
            job_uuid, expected_offset=offset, new_offset=offset + consumed, events=events, errors=errors
        )
        if result.conflict:  # someone else ingested this range; continue from where they are
            offset = result.offset
            continue
        offset += consumed
        n_events += result.events
        n_errors += result.errors
        if not full:
            break
    return n_events, n_errors, offset


def _skip_long_line(host: Host, offset: int) -> int:
    pos = offset + CHUNK_BYTES
    while True:
        chunk = host.read_chunk(GLOBAL_JSON_PATH, pos, CHUNK_BYTES)
        if not chunk:
            return 0  # still being written
        newline = chunk.find(b"\n")
        if newline >= 0:
            return pos + newline + 1 - offset
        pos += len(chunk)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """How a job ended: ``kind`` is machine-readable, ``reason`` is for people."""

    kind: str  # project_end, cancelled, not_started, trainer_exit, max_runtime, max_cost, stall, non_finite_loss,
    # unreachable
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
        return Verdict("project_end", True, "PROJECT end")
    if job.status == "cancelled":
        by = getattr(job, "cancelled_by", None)
        return Verdict("cancelled", False, "the job was cancelled" + (f" by {by}" if by else ""))
    if status is not None and not status.started:
        return Verdict("not_started", False, "the trainer is not running: it was never started on the instance")
    if status is not None and not status.running:
        return Verdict("trainer_exit", False, f"trainer {exit_description(status)} without PROJECT end")
    started = job.trainer_started_at or job.created_at
    if now - started > max_runtime:
        return Verdict("max_runtime", False, f"exceeded max_runtime_minutes ({_minutes(max_runtime)})")
    if cost_deadline is not None and now >= cost_deadline:
        return Verdict("max_cost", False, f"reached max_cost_usd ({max_cost_usd:g} USD): the instance was stopped")
    last = job.last_progress_at or started
    if now - last > stall_timeout:
        return Verdict(
            "stall",
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


def poll_progress(
    store: ResultsStore,
    host: Host,
    job_uuid: str,
    *,
    stall_timeout: timedelta,
    max_runtime: timedelta,
    now: datetime | None = None,
    trainer: Trainer | None = None,
) -> PollOutcome:
    """One poll: ingest, then judge whether the job has ended and how."""
    # Status first: bytes written before the trainer exited are then surely read below.
    status = (trainer or ProcessTrainer(host)).status()
    n_events, n_errors, offset = ingest_new_bytes(store, host, job_uuid, writer_done=not status.running)
    job = store.job(job_uuid)
    counts: dict[str, Any] = {"events": n_events, "errors": n_errors, "offset": offset}
    verdict = judge(job, status, now=now or utcnow(), stall_timeout=stall_timeout, max_runtime=max_runtime)
    if verdict is None:
        return PollOutcome(False, **counts)
    reason = verdict.reason
    if verdict.kind == "trainer_exit":
        if status.exit_code is not None:
            store.update_job(job_uuid, trainer_exit_code=status.exit_code)
        reason = with_log_tail(reason, host.log_tail(20))
    return PollOutcome(True, verdict.succeeded, reason, **counts)


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g} min"
