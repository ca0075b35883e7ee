"""Ingestion rules of global.json: each rule of the contract has its own test.

Real files in a real work directory (``LocalHost``), a real migrated results DB (SQLite and
PostgreSQL: ``RESULTS_DB``, see ``tests/conftest.py``), and the path production ingests by: the
triggerer's follower (:class:`~gpu_training.follow.JobFollower`: its reader from the offset the
results DB holds, its batched writer). Each ``ingest`` is a new follower, as after a restart.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from gpu_training.follow import FollowResult, FollowSettings, JobFollower, LocalSource, Source
from gpu_training.hosts.base import TRAINER_STATUS_SCRIPT
from gpu_training.hosts.local import LocalHost
from gpu_training.progress import GLOBAL_JSON_PATH, FollowOutcome
from gpu_training.results.models import EpochTrain, Eval, IngestError, JobEvent, TrainingIteration, TrainingStep
from gpu_training.results.store import ResultsStore

from .conftest import event_line


@pytest.fixture
def host(tmp_path: Path) -> LocalHost:
    h = LocalHost(tmp_path / "instance")
    h.prepare()
    return h


def append(host: LocalHost, data: bytes) -> None:
    path = Path(host.path(GLOBAL_JSON_PATH))
    with path.open("ab") as fh:
        fh.write(data)


def count(store: ResultsStore, model: type) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def new_follower(
    store: ResultsStore, host: LocalHost, job_uuid: str, source: Source | None = None, **kw: Any
) -> JobFollower:
    settings = FollowSettings(
        job_uuid=job_uuid,
        target=host.follow_target(),
        status_command=(TRAINER_STATUS_SCRIPT, host.workdir),
        poll_interval=0.2,
        **kw,
    )
    return JobFollower(settings, source or LocalSource(host.workdir), log=logging.getLogger("test.ingest"), store=store)


def ingest(
    store: ResultsStore, host: LocalHost, job_uuid: str, *, writer_done: bool = False, source: Source | None = None
) -> tuple[int, int, int]:
    """What a new follower stores of what the file holds past the stored offset: (events, errors,
    offset). ``writer_done``: the trainer exited, an unterminated last line counts."""
    follower = new_follower(store, host, job_uuid, source)
    asyncio.run(follower.ingest_to_end(final=writer_done))
    return follower.writer.events, follower.writer.errors, follower.offset


def test_missing_file_is_not_an_error(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    assert ingest(store, host, job_uuid) == (0, 0, 0)
    assert store.job(job_uuid).ingest_offset == 0


def test_partial_last_line_is_completed_on_the_next_poll(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    line = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.7})
    append(host, line[:25])
    assert ingest(store, host, job_uuid) == (0, 0, 0)
    append(host, line[25:])
    assert ingest(store, host, job_uuid) == (1, 0, len(line))
    assert count(store, EpochTrain) == 1
    assert count(store, IngestError) == 0


def test_unterminated_last_line_counts_once_the_trainer_exited(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    line = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.7})
    append(host, line.rstrip(b"\n"))
    assert ingest(store, host, job_uuid)[0] == 0
    assert ingest(store, host, job_uuid, writer_done=True)[0] == 1


def test_malformed_line_is_recorded_with_its_offset_and_skipped(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    first = event_line("ITERATION", "start", iteration=1)
    bad = b'{"ts": "2026-11-22T15:04:05", "phase": "TRAINING", oops}\n'
    last = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.5})
    append(host, first + bad + last)
    assert ingest(store, host, job_uuid) == (2, 1, len(first + bad + last))
    with store.session() as s:
        error = s.scalars(select(IngestError)).one()
    assert error.byte_offset == len(first)
    assert "not valid JSON" in error.error
    assert "oops" in (error.line_excerpt or "")
    assert count(store, EpochTrain) == 1


def test_nul_characters_are_stored_as_replacement_characters(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    """U+0000 (``\\u0000`` in JSON, or raw NUL bytes as a crash can leave in a file) is stored as
    U+FFFD: PostgreSQL's ``text`` and ``jsonb`` cannot hold it, and the batch failed there."""
    epoch = event_line(
        "TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.5, "model_path": "m\u0000.npz"}
    )
    custom = event_line("CUSTOM\u0000", "note", data={"msg": "a\u0000b", "k\u0000": ["\u0000"]})
    zeros = b"\x00" * 8 + b"\n"
    append(host, epoch + custom + zeros)
    assert ingest(store, host, job_uuid) == (2, 1, len(epoch + custom + zeros))
    with store.session() as s:
        stored = s.scalars(select(EpochTrain)).one()
        kept = s.scalars(select(JobEvent)).one()
        error = s.scalars(select(IngestError)).one()
    assert stored.model_path == "m\ufffd.npz"
    assert (kept.phase, kept.data) == ("CUSTOM\ufffd", {"msg": "a\ufffdb", "k\ufffd": ["\ufffd"]})
    assert error.byte_offset == len(epoch + custom) and error.line_excerpt == "\ufffd" * 8


@pytest.mark.parametrize("field", ["iteration", "epoch"])
def test_iteration_or_epoch_beyond_32_bits_is_a_malformed_line(
    store: ResultsStore, host: LocalHost, job_uuid: str, field: str
) -> None:
    """The columns are 32-bit on PostgreSQL (64 on SQLite): a larger number is refused the same on
    both, as an ingestion error, instead of failing the batch (PostgreSQL: integer out of range)."""
    numbers = {"iteration": 1, "epoch": 1}
    lines = [
        event_line("TRAINING", "epoch_complete", **{**numbers, field: value}, data={"avg_loss": 0.5})
        for value in (2**31 - 1, 2**31, -(2**31) - 1, 2**63)
    ]
    append(host, b"".join(lines))
    assert ingest(store, host, job_uuid)[:2] == (1, 3)
    with store.session() as s:
        assert getattr(s.scalars(select(EpochTrain)).one(), field) == 2**31 - 1
        errors = s.scalars(select(IngestError).order_by(IngestError.byte_offset)).all()
    assert [e.byte_offset for e in errors] == [len(lines[0]), len(lines[0] + lines[1]), len(b"".join(lines[:3]))]
    assert all(f"{field} must be an integer from -2147483648 to 2147483647" in e.error for e in errors)


def test_duplicated_event_makes_no_second_row(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    epoch = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.5})
    evaluation = event_line("EVAL_MODEL", "metrics", iteration=1, epoch=1, data={"accuracy": 0.9})
    append(host, epoch + evaluation + epoch)
    ingest(store, host, job_uuid)
    append(host, epoch + evaluation)  # and again in a later poll
    ingest(store, host, job_uuid)
    assert count(store, EpochTrain) == 1
    assert count(store, Eval) == 1
    assert count(store, TrainingIteration) == 1


def test_epoch_before_its_iteration_start_lands_under_the_right_iteration(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(host, event_line("TRAINING", "epoch_complete", iteration=2, epoch=1, data={"avg_loss": 0.4}))
    ingest(store, host, job_uuid)
    append(host, event_line("ITERATION", "start", ts="2026-11-22T15:00:00+05:30", iteration=2, data={"lr": 0.1}))
    append(host, event_line("ITERATION", "end", ts="2026-11-22T15:01:30+05:30", iteration=2))
    ingest(store, host, job_uuid)
    with store.session() as s:
        it = s.scalars(select(TrainingIteration)).one()
        ep = s.scalars(select(EpochTrain)).one()
    assert (it.iteration, ep.iteration) == (2, 2)
    assert it.started_at == datetime(2026, 11, 22, 9, 30, tzinfo=UTC)
    assert it.time_taken == 90.0
    assert it.config == {"lr": 0.1}


def test_steps_without_iteration_go_to_the_current_iteration(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(host, event_line("ITERATION", "start", iteration=3))
    ingest(store, host, job_uuid)
    append(host, event_line("TRAJECTORY", "start", ts="2026-11-22T15:04:00+05:30", data={"n": 5}))
    append(host, event_line("TRAJECTORY", "end", ts="2026-11-22T15:04:05+05:30"))
    append(host, event_line("EVAL_TRAINING", "end", data={"duration_seconds": 2.5}))
    ingest(store, host, job_uuid)
    with store.session() as s:
        steps = {st.step_type: st for st in s.scalars(select(TrainingStep))}
    assert steps["traj_gen"].iteration == 3
    assert steps["traj_gen"].duration == 5.0
    assert steps["traj_gen"].config == {"n": 5}
    assert steps["evaluation"].duration == 2.5


def test_end_in_a_later_poll_than_its_start_takes_the_stored_start(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(host, event_line("ITERATION", "start", ts="2026-11-22T15:00:00+05:30", iteration=1))
    append(host, event_line("TRAINING", "start", ts="2026-11-22T15:00:10+05:30", iteration=1))
    ingest(store, host, job_uuid)
    append(host, event_line("TRAINING", "end", ts="2026-11-22T15:01:10+05:30", iteration=1))
    append(host, event_line("ITERATION", "end", ts="2026-11-22T15:02:00+05:30", iteration=1))
    append(host, event_line("EVAL_TRAINING", "end", ts="2026-11-22T15:03:00+05:30", iteration=1))  # never started
    ingest(store, host, job_uuid)
    with store.session() as s:
        it = s.scalars(select(TrainingIteration)).one()
        steps = {st.step_type: st for st in s.scalars(select(TrainingStep))}
    assert it.time_taken == 120.0
    assert it.completed_at == datetime(2026, 11, 22, 9, 32, tzinfo=UTC)
    assert steps["training"].duration == 60.0
    assert steps["evaluation"].started_at is None and steps["evaluation"].duration is None


def test_unknown_phase_is_kept_not_fatal(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    append(host, event_line("CUSTOM_PHASE", "checkpoint_uploaded", data={"bytes": 12}))
    append(host, event_line("TRAINING", "lr_changed", iteration=1, data={"lr": 0.01}))
    append(host, event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 1.0}))
    assert ingest(store, host, job_uuid)[:2] == (3, 0)
    with store.session() as s:
        kept = [(e.phase, e.event, e.data) for e in s.scalars(select(JobEvent).order_by(JobEvent.byte_offset))]
    assert kept == [("CUSTOM_PHASE", "checkpoint_uploaded", {"bytes": 12}), ("TRAINING", "lr_changed", {"lr": 0.01})]
    assert count(store, EpochTrain) == 1


def test_project_end_completes_the_job_with_time_taken(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    append(host, event_line("PROJECT", "start", ts="2026-11-22T15:00:00+05:30"))
    ingest(store, host, job_uuid)
    assert store.job(job_uuid).status == "running"
    append(host, event_line("PROJECT", "end", ts="2026-11-22T15:02:03.500+05:30"))
    ingest(store, host, job_uuid)
    job = store.job(job_uuid)
    assert job.status == "completed"
    assert job.project_ended
    assert job.time_taken == 123.5
    assert job.completed_at == datetime(2026, 11, 22, 9, 32, 3, 500000, tzinfo=UTC)


def test_project_end_duration_in_event_wins(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    append(host, event_line("PROJECT", "start", ts="2026-11-22T15:00:00+05:30"))
    append(host, event_line("PROJECT", "end", ts="2026-11-22T15:10:00+05:30", data={"duration_seconds": 42.0}))
    ingest(store, host, job_uuid)
    assert store.job(job_uuid).time_taken == 42.0


def test_group_iteration_start_sets_training_config(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    append(host, event_line("GROUP_ITERATION", "start", data={"training_config": {"epochs": 3, "lr": 0.01}}))
    ingest(store, host, job_uuid)
    assert store.job(job_uuid).training_config == {"epochs": 3, "lr": 0.01}


def test_eval_metrics_are_stored_in_columns(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    data = {
        "accuracy": 0.95,
        "precision": 0.94,
        "recall": 0.93,
        "f1": 0.935,
        "auc": 0.99,
        "loss": 0.2,
        "confusion_matrix": [[5, 1], [0, 6]],
        "num_samples": 12,
    }
    append(host, event_line("EVAL_MODEL", "metrics", iteration=1, epoch=4, data=data))
    ingest(store, host, job_uuid)
    with store.session() as s:
        ev = s.scalars(select(Eval)).one()
    assert (ev.accuracy, ev.precision, ev.recall, ev.f1, ev.auc, ev.loss) == (0.95, 0.94, 0.93, 0.935, 0.99, 0.2)
    assert ev.confusion_matrix == [[5, 1], [0, 6]]
    assert ev.metrics == {"num_samples": 12}
    assert ev.epoch == 4


def test_nan_loss_is_recorded_without_breaking_ingestion(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    append(
        host,
        b'{"ts": "2026-11-22T15:04:05Z", "phase": "TRAINING", "event": "epoch_complete", '
        b'"iteration": 1, "epoch": 1, "data": {"avg_loss": NaN, "grad_norm": Infinity}}\n',
    )
    ingest(store, host, job_uuid)
    with store.session() as s:
        ep = s.scalars(select(EpochTrain)).one()
    assert ep.avg_loss is None
    assert ep.metrics == {"grad_norm": "Infinity"}


def test_offset_lives_in_the_db_and_a_new_poller_resumes_there(
    store: ResultsStore, results_engine, host: LocalHost, job_uuid: str
) -> None:
    first = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.5})
    append(host, first)
    ingest(store, host, job_uuid)
    second = event_line("TRAINING", "epoch_complete", iteration=1, epoch=2, data={"avg_loss": 0.4})
    append(host, second)
    reads: list[int] = []

    class Spy(LocalSource):
        async def read(self, relpath: str, offset: int, max_bytes: int) -> bytes:
            reads.append(offset)
            return await super().read(relpath, offset, max_bytes)

    fresh = ResultsStore(results_engine)  # as after a task retry: nothing but the DB survives
    assert ingest(fresh, host, job_uuid, source=Spy(host.workdir)) == (1, 0, len(first) + len(second))
    assert reads[0] == len(first)
    assert count(store, EpochTrain) == 2


def test_concurrent_ingestion_of_the_same_range_stores_it_once(store: ResultsStore, job_uuid: str) -> None:
    from gpu_training.events import parse_chunk

    chunk = event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.5})
    events, errors, consumed = parse_chunk(chunk, 0)
    first = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
    second = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
    assert not first.conflict and second.conflict
    assert second.offset == consumed
    assert count(store, EpochTrain) == 1


# --- judging the job after a poll ----------------------------------------------------------------

LIMITS = {"stall_timeout": timedelta(minutes=15), "max_runtime": timedelta(minutes=120)}


def start_script(host: LocalHost, script: str) -> None:
    import sys

    Path(host.path("t.py")).write_text(script)
    host.start_trainer([sys.executable, host.path("t.py")], {"PATH": "/usr/bin:/bin"})


def wait_exit(host: LocalHost) -> None:
    import time

    for _ in range(200):
        if not host.trainer_status().running:
            return
        time.sleep(0.05)
    raise AssertionError("trainer did not exit")


def follow(store: ResultsStore, host: LocalHost, job_uuid: str, **kw: Any) -> FollowResult:
    """Follow the job until it ends, as the trigger does."""
    return asyncio.run(asyncio.wait_for(new_follower(store, host, job_uuid, **LIMITS, **kw).run(), 30))


def test_trainer_exit_without_project_end_fails_with_code_and_log(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    start_script(
        host, "import sys\nprint('loading data')\nprint('CUDA error: out of memory', file=sys.stderr)\nsys.exit(3)\n"
    )
    wait_exit(host)
    store.update_job(job_uuid, trainer_started_at=datetime.now(UTC))
    outcome = follow(store, host, job_uuid)
    assert (outcome.kind, outcome.succeeded) == (FollowOutcome.TRAINER_EXIT, False)
    assert "exited with code 3 without PROJECT end" in outcome.reason
    assert "CUDA error: out of memory" in outcome.reason
    assert store.job(job_uuid).trainer_exit_code == 3


def test_project_end_succeeds_even_if_written_just_before_exit(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    line = event_line("PROJECT", "end").decode().strip()
    start_script(host, f"open('outputs/global.json','a').write({line!r})\n")  # no trailing newline
    wait_exit(host)
    store.update_job(job_uuid, trainer_started_at=datetime.now(UTC))
    outcome = follow(store, host, job_uuid)
    assert (outcome.kind, outcome.succeeded, outcome.reason) == (FollowOutcome.PROJECT_END, True, "PROJECT end")


def test_no_new_bytes_for_the_stall_timeout_is_a_stall(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    start_script(host, "import time\ntime.sleep(30)\n")
    try:
        now = datetime.now(UTC)
        store.update_job(
            job_uuid, trainer_started_at=now - timedelta(minutes=20), last_progress_at=now - timedelta(minutes=16)
        )
        outcome = follow(store, host, job_uuid)
        assert (outcome.kind, outcome.succeeded) == (FollowOutcome.STALL, False)
        assert outcome.reason.startswith("stalled: no new bytes in global.json for 16")
        store.update_job(job_uuid, last_progress_at=datetime.now(UTC) - timedelta(minutes=1))
        with pytest.raises(TimeoutError):  # still running: following goes on
            asyncio.run(asyncio.wait_for(new_follower(store, host, job_uuid, **LIMITS).run(), 1.5))
    finally:
        host.stop_trainer(grace_seconds=2)


def test_max_runtime(store: ResultsStore, host: LocalHost, job_uuid: str) -> None:
    start_script(host, "import time\ntime.sleep(30)\n")
    try:
        now = datetime.now(UTC)
        store.update_job(job_uuid, trainer_started_at=now - timedelta(minutes=121), last_progress_at=now)
        outcome = follow(store, host, job_uuid)
        assert (outcome.kind, outcome.succeeded) == (FollowOutcome.MAX_RUNTIME, False)
        assert "exceeded max_runtime_minutes (120 min)" in outcome.reason
    finally:
        host.stop_trainer(grace_seconds=2)


# --- non-finite losses ------------------------------------------------------------------------------


def raw_line(ts: str, phase: str, event: str, fields: str) -> bytes:
    """A line with NaN/Infinity literals, which json.dumps of the tests' helper would not write."""
    return f'{{"ts": "{ts}", "phase": "{phase}", "event": "{event}", {fields}}}\n'.encode()


def test_non_finite_losses_are_recorded_once_with_the_first(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(host, event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.7}))
    append(
        host,
        raw_line(
            "2026-11-22T15:04:05",  # naive: IST
            "TRAINING",
            "epoch_complete",
            '"iteration": 1, "epoch": 2, "data": {"avg_loss": NaN, "grad_norm": Infinity}',
        ),
    )
    append(
        host,
        raw_line(
            "2026-11-22T15:05:00Z",
            "EVAL_MODEL",
            "metrics",
            '"iteration": 1, "epoch": 2, "data": {"loss": Infinity, "val_loss": -Infinity}',
        ),
    )
    ingest(store, host, job_uuid)
    job = store.job(job_uuid)
    assert job.non_finite_loss == "iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN"
    assert job.non_finite_loss_at == datetime(2026, 11, 22, 9, 34, 5, tzinfo=UTC)
    # A later non-finite loss does not replace the first one.
    append(
        host,
        raw_line(
            "2026-11-22T15:06:00Z",
            "TRAINING",
            "epoch_complete",
            '"iteration": 1, "epoch": 3, "data": {"train_loss": Infinity}',
        ),
    )
    ingest(store, host, job_uuid)
    job = store.job(job_uuid)
    assert job.non_finite_loss == "iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN"
    assert job.non_finite_loss_at == datetime(2026, 11, 22, 9, 34, 5, tzinfo=UTC)
    # The rows are stored as ever: NULL in typed columns, the names in JSON.
    with store.session() as s:
        epochs = {ep.epoch: ep for ep in s.scalars(select(EpochTrain))}
        ev = s.scalars(select(Eval)).one()
    assert (epochs[1].avg_loss, epochs[2].avg_loss, epochs[3].avg_loss) == (0.7, None, None)
    assert epochs[2].metrics == {"grad_norm": "Infinity"}
    assert epochs[3].metrics == {"train_loss": "Infinity"}
    assert ev.loss is None
    assert ev.metrics == {"val_loss": "-Infinity"}


def test_infinite_loss_without_iteration_or_epoch_is_described_without_them(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(host, event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.7}))
    append(host, raw_line("2026-11-22T15:04:05Z", "CUSTOM", "checkpoint", '"data": {"eval_loss": -Infinity, "n": 3}'))
    assert ingest(store, host, job_uuid)[:2] == (2, 0)
    job = store.job(job_uuid)
    assert job.non_finite_loss == "CUSTOM/checkpoint: eval_loss=-Infinity"
    assert job.non_finite_loss_at == datetime(2026, 11, 22, 15, 4, 5, tzinfo=UTC)


def test_non_finite_values_that_are_not_losses_are_not_recorded(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(
        host,
        raw_line(
            "2026-11-22T15:04:05Z",
            "TRAINING",
            "epoch_complete",
            '"iteration": 1, "epoch": 1, "data": {"avg_loss": 0.5, "grad_norm": NaN, "lossy": Infinity}',
        ),
    )
    ingest(store, host, job_uuid)
    job = store.job(job_uuid)
    assert (job.non_finite_loss, job.non_finite_loss_at) == (None, None)


def test_ingest_result_reports_a_non_finite_loss_only_for_its_batch(store: ResultsStore, job_uuid: str) -> None:
    from gpu_training.events import parse_chunk

    batches = [
        event_line("TRAINING", "epoch_complete", iteration=1, epoch=1, data={"avg_loss": 0.5}),
        raw_line(
            "2026-11-22T15:04:05Z",
            "TRAINING",
            "epoch_complete",
            '"iteration": 1, "epoch": 2, "data": {"val_loss": NaN}',
        )
        + raw_line(
            "2026-11-22T15:04:06Z",
            "TRAINING",
            "epoch_complete",
            '"iteration": 1, "epoch": 3, "data": {"avg_loss": NaN}',
        ),
        event_line("TRAINING", "epoch_complete", iteration=1, epoch=4, data={"avg_loss": 0.4}),
        raw_line("2026-11-22T15:04:08Z", "ITERATION", "end", '"iteration": 1, "data": {"loss": Infinity}'),
    ]
    offset, reported = 0, []
    for chunk in batches:
        events, errors, consumed = parse_chunk(chunk, offset)
        result = store.ingest(
            job_uuid, expected_offset=offset, new_offset=offset + consumed, events=events, errors=errors
        )
        assert not result.conflict
        reported.append(result.non_finite_loss)
        offset += consumed
    assert reported == [
        None,
        "iteration 1 epoch 2 TRAINING/epoch_complete: val_loss=NaN",
        None,
        "iteration 1 ITERATION/end: loss=Infinity",
    ]
    job = store.job(job_uuid)
    assert job.non_finite_loss == "iteration 1 epoch 2 TRAINING/epoch_complete: val_loss=NaN"
    assert job.non_finite_loss_at == datetime(2026, 11, 22, 15, 4, 5, tzinfo=UTC)


def test_reapplying_a_batch_with_a_non_finite_loss_changes_nothing(
    store: ResultsStore, results_engine, job_uuid: str
) -> None:
    from gpu_training.events import parse_chunk
    from gpu_training.results.ingest import MetricsWriter

    chunk = raw_line(
        "2026-11-22T15:04:05Z", "TRAINING", "epoch_complete", '"iteration": 2, "epoch": 1, "data": {"avg_loss": NaN}'
    )
    events, errors, consumed = parse_chunk(chunk, 0)
    first = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
    assert first.non_finite_loss == "iteration 2 epoch 1 TRAINING/epoch_complete: avg_loss=NaN"
    before = store.job(job_uuid)
    # The same range again: another poller's conflict, nothing written, nothing reported.
    again = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
    assert again.conflict and again.non_finite_loss is None
    # The same events applied again (as by a writer that does not check the offset), even with a later ts.
    later = [dataclasses.replace(ev, ts=ev.ts + timedelta(days=1)) for ev in events]
    with results_engine.begin() as conn:
        assert MetricsWriter(conn, before.id).apply(later) == first.non_finite_loss
    after = store.job(job_uuid)
    assert (after.non_finite_loss, after.non_finite_loss_at) == (before.non_finite_loss, before.non_finite_loss_at)
    assert count(store, EpochTrain) == 1


def test_a_finite_run_leaves_the_non_finite_loss_columns_null(
    store: ResultsStore, host: LocalHost, job_uuid: str
) -> None:
    append(host, event_line("PROJECT", "start"))
    append(host, event_line("ITERATION", "start", iteration=1))
    for epoch in range(1, 4):
        append(host, event_line("TRAINING", "epoch_complete", iteration=1, epoch=epoch, data={"avg_loss": 1 / epoch}))
    append(host, event_line("EVAL_MODEL", "metrics", iteration=1, epoch=3, data={"loss": 0.2, "val_loss": 0.3}))
    append(host, event_line("ITERATION", "end", iteration=1))
    append(host, event_line("PROJECT", "end"))
    assert ingest(store, host, job_uuid)[:2] == (8, 0)
    job = store.job(job_uuid)
    assert job.status == "completed"
    assert (job.non_finite_loss, job.non_finite_loss_at) == (None, None)
