"""Following ``global.json``: read new bytes by offset, ingest them, decide whether the job ended.

One :func:`poll_progress` call reads only what was appended since the offset stored in the results
DB (so a 100 MB file costs no more than a 1 MB one), stores events and the new offset in one
transaction, and then judges the job: ``PROJECT end`` seen, trainer exited without it, stalled, or
over its runtime.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta
from typing import Any

from gpu_training.events import GLOBAL_JSON, MalformedLine, parse_chunk
from gpu_training.hosts.base import LOG_PATH, OUTPUT_DIR, Host
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
    #: New complete lines of the trainer's log since the caller's log offset, and the next offset.
    log_text: str = ""
    log_offset: int = 0


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
    now = now or utcnow()
    counts: dict[str, Any] = {"events": n_events, "errors": n_errors, "offset": offset}
    if job.project_ended:
        return PollOutcome(True, True, "PROJECT end", **counts)
    if not status.started:
        return PollOutcome(True, False, "the trainer is not running: it was never started on the instance", **counts)
    if not status.running:
        if status.exit_code is not None:
            store.update_job(job_uuid, trainer_exit_code=status.exit_code)
        how = (
            f"exited with code {status.exit_code}"
            if status.exit_code is not None
            else "vanished (killed with its wrapper)"
        )
        if status.oom_killed:
            how += ": out of memory (the kernel's OOM killer ended it; raise container_memory or use less)"
        elif status.exit_code is not None and status.exit_code in (137, -9):
            how += " (SIGKILL: out of memory?)"
        tail = host.log_tail(20)
        return PollOutcome(
            True,
            False,
            f"trainer {how} without PROJECT end" + (f"; last log lines:\n{tail}" if tail else "; its log is empty"),
            **counts,
        )
    started = job.trainer_started_at or job.created_at
    if now - started > max_runtime:
        return PollOutcome(True, False, f"exceeded max_runtime_minutes ({_minutes(max_runtime)})", **counts)
    last = job.last_progress_at or started
    if now - last > stall_timeout:
        return PollOutcome(
            True,
            False,
            f"stalled: no new bytes in global.json for {_minutes(now - last)} "
            f"(stall_timeout_minutes={_minutes(stall_timeout)})",
            **counts,
        )
    return PollOutcome(False, **counts)


LOG_TAIL_ON_ATTACH = 64 * 1024
LOG_BYTES_PER_POLL = 1 << 20


def read_log_since(host: Host, offset: int | None) -> tuple[str, int]:
    """New complete lines of ``logs/trainer.log`` from ``offset``; returns (text, next offset).

    ``offset=None`` (a fresh task try) starts at the last 64 KiB, so a retry shows recent output
    without replaying a long log.
    """
    if offset is None:
        size = next((f.size for f in host.list_files("logs") if f.path == "trainer.log"), 0)
        offset = max(0, size - LOG_TAIL_ON_ATTACH)
    chunk = host.read_chunk(LOG_PATH, offset, LOG_BYTES_PER_POLL)
    if not chunk:
        return "", offset
    end = chunk.rfind(b"\n") + 1 if len(chunk) < LOG_BYTES_PER_POLL else len(chunk)
    return chunk[:end].decode("utf-8", "replace"), offset + end


def _minutes(delta: timedelta) -> str:
    return f"{delta.total_seconds() / 60:g} min"
