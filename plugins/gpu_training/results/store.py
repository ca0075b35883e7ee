"""``ResultsStore``: every read and write of the orchestrator's state in the results database.

State that must survive a task retry (the job, its instances, the byte offset of ``global.json``)
lives here rather than in XCom. Each method is one short transaction.
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid as uuidlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Table, delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from gpu_training.errors import JobNotFoundError
from gpu_training.events import MalformedLine, TrainingEvent, without_nul
from gpu_training.results.ingest import EVENTS as JOB_EVENTS
from gpu_training.results.ingest import INSTANCES, JOBS, MetricsWriter, insert_ignore, store_lines
from gpu_training.results.models import (
    JOB_STATUSES,
    TERMINAL_STATUSES,
    Artifact,
    EpochTrain,
    Eval,
    Instance,
    JobEvent,
    Notification,
    TrainingJob,
    utcnow,
)
from gpu_training.results.states import InstanceState, JobStatus

NOTIFICATIONS: Table = Notification.__table__  # type: ignore[assignment]


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    name: str
    uri: str
    size_bytes: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class SkippedOutput:
    """An output the upload skipped, and why; ``name`` is printable (control characters escaped)."""

    name: str
    reason: str


#: ``job_events`` of skipped outputs: no line of global.json, so a negative ``byte_offset``.
SKIPPED_OUTPUT_EVENT = ("OUTPUTS", "skipped")


@dataclasses.dataclass(frozen=True)
class IngestResult:
    """What one ingestion did; ``conflict`` means another poller advanced the offset first.

    ``non_finite_loss`` describes the first NaN/infinite loss of this batch (None if it had none),
    e.g. ``iteration 1 epoch 2 TRAINING/epoch_complete: avg_loss=NaN``, so the caller can stop the
    job; the job's ``non_finite_loss`` column keeps the first one ever seen.
    """

    events: int
    errors: int
    offset: int
    conflict: bool = False
    non_finite_loss: str | None = None
    #: The job's metric rows once this batch was stored (``training_jobs.metric_rows``).
    metric_rows: int = 0
    #: ``max_rows`` stopped the batch: ``offset`` is where the first line that did not fit starts,
    #: and nothing from there on was stored.
    row_limit_reached: bool = False


class _OffsetMoved(Exception):
    """Another poller advanced the offset between our read and our update."""


class ResultsStore:
    """Reads and writes jobs, instances, metrics and artifacts."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    def session(self) -> Session:
        return self._sessions()

    def check_schema(self) -> None:
        from gpu_training.results.db import check_at_head

        check_at_head(self.engine)

    # --- jobs ---------------------------------------------------------------------------------

    def create_job(
        self,
        *,
        project_id: str,
        provider: str,
        runtime: str,
        params: dict[str, Any],
        dag_id: str,
        run_id: str,
        map_index: int = -1,
        stage: str = "",
        outputs_uri: str | None = None,
    ) -> str:
        """Create the job of a dag run (idempotent: a retry gets the same uuid back)."""
        existing = self.job_uuid_for_run(dag_id, run_id, map_index, stage=stage)
        if existing:
            return existing
        job = TrainingJob(
            uuid=str(uuidlib.uuid4()),
            project_id=project_id,
            provider=provider,
            runtime=runtime,
            params=params,
            training_config=params.get("config"),
            dag_id=dag_id,
            run_id=run_id,
            map_index=map_index,
            stage=stage,
            outputs_uri=outputs_uri,
            status=JobStatus.PENDING,
        )
        try:
            with self.session() as s, s.begin():
                s.add(job)
        except IntegrityError:  # a concurrent attempt of the same task won the race
            existing = self.job_uuid_for_run(dag_id, run_id, map_index, stage=stage)
            if existing:
                return existing
            raise
        return job.uuid

    def job_uuid_for_run(self, dag_id: str, run_id: str, map_index: int = -1, *, stage: str = "") -> str | None:
        """The job of one dag run, pipeline stage and map index (None if not registered)."""
        with self.session() as s:
            return s.scalar(
                select(TrainingJob.uuid).where(
                    TrainingJob.dag_id == dag_id,
                    TrainingJob.run_id == run_id,
                    TrainingJob.stage == stage,
                    TrainingJob.map_index == map_index,
                )
            )

    def job(self, job_uuid: str) -> TrainingJob:
        with self.session() as s:
            job = s.scalar(select(TrainingJob).where(TrainingJob.uuid == job_uuid))
            if job is None:
                raise JobNotFoundError(f"no training job {job_uuid!r} in the results DB")
            return job

    def update_job(self, job_uuid: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(JOBS).where(JOBS.c.uuid == job_uuid).values(updated_at=utcnow(), **values))

    def set_status(self, job_uuid: str, status: str, *, from_statuses: Sequence[str] | None = None) -> bool:
        """Move the job to ``status``; with ``from_statuses`` only from one of those."""
        stmt = update(JOBS).where(JOBS.c.uuid == job_uuid)
        if from_statuses is not None:
            stmt = stmt.where(JOBS.c.status.in_(tuple(from_statuses)))
        with self.engine.begin() as conn:
            return conn.execute(stmt.values(status=status, updated_at=utcnow())).rowcount == 1

    def record_failure(self, job_uuid: str, reason: str) -> None:
        """Keep the first failure reason (later ones are consequences) and mark the job failed.

        A reason can quote the trainer's log: a U+0000 in it is stored as U+FFFD (PostgreSQL's
        ``text`` cannot hold it)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(JOBS)
                .where((JOBS.c.uuid == job_uuid) & JOBS.c.failure_reason.is_(None))
                .values(failure_reason=without_nul(reason[:4000]), updated_at=utcnow())
            )
            conn.execute(
                update(JOBS)
                .where((JOBS.c.uuid == job_uuid) & JOBS.c.status.not_in((JobStatus.FAILED, JobStatus.CANCELLED)))
                .values(status=JobStatus.FAILED, updated_at=utcnow())
            )

    def request_cancel(self, job_uuid: str, *, by: str) -> bool:
        """Cancel a job that has not ended: status ``cancelled`` now (the trigger following it stops
        at its next status check, every later step refuses to start), who asked and when. False if
        the job had already ended; asking twice keeps the first requester."""
        active = tuple(s for s in JOB_STATUSES if s not in TERMINAL_STATUSES)
        now = utcnow()
        with self.engine.begin() as conn:
            changed = conn.execute(
                update(JOBS)
                .where((JOBS.c.uuid == job_uuid) & JOBS.c.status.in_(active))
                .values(status=JobStatus.CANCELLED, cancel_requested_at=now, cancelled_by=by[:250], updated_at=now)
            ).rowcount
        return changed == 1

    def jobs_for_run(self, dag_id: str, run_id: str) -> list[str]:
        """Uuids of every job of a dag run (one, or one per mapped job of a sweep)."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(TrainingJob.uuid)
                    .where(TrainingJob.dag_id == dag_id, TrainingJob.run_id == run_id)
                    .order_by(TrainingJob.stage, TrainingJob.map_index)
                )
            )

    def begin_teardown(self, job_uuid: str) -> None:
        """Record that teardown started (first time only): a launch still in flight checks this
        after recording its instance, and terminates what it created."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                update(JOBS)
                .where((JOBS.c.uuid == job_uuid) & JOBS.c.teardown_started_at.is_(None))
                .values(teardown_started_at=now, updated_at=now)
            )

    def begin_recovery(self, job_uuid: str) -> None:
        """A recovery starts: one more in ``recovery_count``; the new instance's ``global.json``
        starts at the job-wide offset ingested so far; progress counts from now (no false stall)."""
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(
                update(JOBS)
                .where(JOBS.c.uuid == job_uuid)
                .values(
                    recovery_count=JOBS.c.recovery_count + 1,
                    ingest_base=JOBS.c.ingest_offset,
                    last_progress_at=now,
                    updated_at=now,
                )
            )

    def finish(self, job_uuid: str, status: str, *, completed_at: datetime | None = None) -> None:
        """Set the final status; ``completed_at`` and ``time_taken`` are kept if already known."""
        job = self.job(job_uuid)
        end = job.completed_at or completed_at or utcnow()
        values: dict[str, Any] = {"status": status, "completed_at": end}
        if job.time_taken is None and job.started_at is not None:
            values["time_taken"] = (end - job.started_at).total_seconds()
        self.update_job(job_uuid, **values)

    # --- instances ----------------------------------------------------------------------------

    def record_instance_intent(
        self,
        job_uuid: str,
        *,
        provider: str,
        name: str,
        instance_type: str | None = None,
        region: str | None = None,
        price_per_hour: float | None = None,
        spot: bool = False,
        node_rank: int = 0,
        node_group: str | None = None,
        gpu_name: str | None = None,
        gpu_count: int = 0,
    ) -> None:
        """Write the instance row *before* the launch call, so a crash still leaves a trace.

        The intents of one dag run are written one at a time, so their ids grow in commit order
        (``ensure_run_slot``: the older intent wins). SQLite has one writer at a time anyway; on
        PostgreSQL an id is handed out at insert, and a run's job rows are locked until commit."""
        job = self.job(job_uuid)
        with self.engine.begin() as conn:
            if conn.dialect.name != "sqlite":  # there a read first would only risk SQLITE_BUSY
                conn.execute(
                    select(JOBS.c.id)
                    .where((JOBS.c.dag_id == job.dag_id) & (JOBS.c.run_id == job.run_id))
                    .order_by(JOBS.c.id)
                    .with_for_update()
                )
            insert_ignore(
                conn,
                INSTANCES,
                [
                    {
                        "job_id": job.id,
                        "provider": provider,
                        "name": name,
                        "instance_type": instance_type,
                        "region": region,
                        "price_per_hour": price_per_hour,
                        "spot": spot,
                        "state": "requested",
                        "created_at": utcnow(),
                        "node_rank": node_rank,
                        "node_group": node_group,
                        "gpu_name": (gpu_name or None) and gpu_name[:64],
                        "gpu_count": gpu_count,
                    }
                ],
            )

    def live_instances_of_run(self, dag_id: str, run_id: str) -> list[Instance]:
        """Instances of every job of a dag run not yet terminated (or failed), oldest row first."""
        with self.session() as s:
            return list(
                s.scalars(
                    select(Instance)
                    .join(TrainingJob, TrainingJob.id == Instance.job_id)
                    .where(
                        TrainingJob.dag_id == dag_id,
                        TrainingJob.run_id == run_id,
                        Instance.state.not_in((InstanceState.TERMINATED, InstanceState.FAILED)),
                    )
                    .order_by(Instance.id)
                )
            )

    def delete_instance_intent(self, name: str) -> None:
        """Forget an intent whose launch never happened (no instance id): it was not an attempt."""
        with self.engine.begin() as conn:
            conn.execute(delete(INSTANCES).where((INSTANCES.c.name == name) & INSTANCES.c.instance_id.is_(None)))

    def update_instance(self, name: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(INSTANCES).where(INSTANCES.c.name == name).values(**values))

    def instance(self, name: str) -> Instance | None:
        with self.session() as s:
            return s.scalar(select(Instance).where(Instance.name == name))

    def instances_for_job(self, job_uuid: str) -> list[Instance]:
        job = self.job(job_uuid)
        with self.session() as s:
            return list(s.scalars(select(Instance).where(Instance.job_id == job.id).order_by(Instance.id)))

    # --- progress -----------------------------------------------------------------------------

    def ingest(
        self,
        job_uuid: str,
        *,
        expected_offset: int,
        new_offset: int,
        events: Sequence[TrainingEvent],
        errors: Sequence[MalformedLine] = (),
        now: datetime | None = None,
        max_rows: int | None = None,
    ) -> IngestResult:
        """Store events and advance the byte offset in one transaction (exactly once).

        The offset moves only from ``expected_offset``: if another poller got there first nothing
        is written and ``conflict`` is set, so no event is stored twice. A line that cannot be
        stored (the database refuses a value) becomes an ingestion error and the others are stored
        (:func:`~gpu_training.results.ingest.store_lines`). With ``max_rows`` the job's rows
        (``metric_rows``, kept with the offset) never exceed it: the batch stops at the first line
        that does not fit, the offset moves only up to it, and ``row_limit_reached`` is set.
        """
        now = now or utcnow()
        try:
            return self._ingest(job_uuid, expected_offset, new_offset, events, errors, now, max_rows)
        except _OffsetMoved:
            return IngestResult(0, 0, expected_offset, conflict=True)

    def _ingest(
        self,
        job_uuid: str,
        expected_offset: int,
        new_offset: int,
        events: Sequence[TrainingEvent],
        errors: Sequence[MalformedLine],
        now: datetime,
        max_rows: int | None,
    ) -> IngestResult:
        with self.engine.begin() as conn:
            row = conn.execute(select(JOBS.c.id, JOBS.c.ingest_offset).where(JOBS.c.uuid == job_uuid)).one_or_none()
            if row is None:
                raise JobNotFoundError(f"no training job {job_uuid!r} in the results DB")
            if row.ingest_offset != expected_offset:
                return IngestResult(0, 0, row.ingest_offset, conflict=True)
            values: dict[str, Any] = {"ingest_offset": new_offset, "updated_at": now}
            if new_offset > expected_offset:
                values["last_progress_at"] = now
            moved = conn.execute(
                update(JOBS).where((JOBS.c.id == row.id) & (JOBS.c.ingest_offset == expected_offset)).values(**values)
            ).rowcount
            if moved != 1:
                raise _OffsetMoved  # rolls the transaction back
            # Read once the row is ours (the update above holds it): no other batch moves it now.
            rows = int(conn.execute(select(JOBS.c.metric_rows).where(JOBS.c.id == row.id)).scalar_one())
            room = None if max_rows is None else max(0, max_rows - rows)
            stored = store_lines(MetricsWriter(conn, row.id), events, errors, room=room)
            after: dict[str, Any] = {"metric_rows": rows + stored.rows}
            if stored.stopped_at is not None:
                after["ingest_offset"] = new_offset = stored.stopped_at
            if stored.rows or stored.stopped_at is not None:
                conn.execute(update(JOBS).where(JOBS.c.id == row.id).values(**after))
        return IngestResult(
            stored.events,
            stored.errors,
            new_offset,
            non_finite_loss=stored.non_finite_loss,
            metric_rows=rows + stored.rows,
            row_limit_reached=stored.stopped_at is not None,
        )

    # --- artifacts ----------------------------------------------------------------------------

    def record_artifacts(self, job_uuid: str, artifacts: Sequence[ArtifactRecord]) -> None:
        """Upsert artifacts by name: a re-upload replaces the row of the same file."""
        job = self.job(job_uuid)
        with self.session() as s, s.begin():
            existing = {a.name: a for a in s.scalars(select(Artifact).where(Artifact.job_id == job.id))}
            for rec in artifacts:
                row = existing.get(rec.name)
                if row is None:
                    s.add(Artifact(job_id=job.id, **dataclasses.asdict(rec)))
                else:
                    row.uri, row.size_bytes, row.sha256 = rec.uri, rec.size_bytes, rec.sha256

    def record_skipped_outputs(self, job_uuid: str, skipped: Sequence[SkippedOutput]) -> None:
        """Outputs the upload skipped, where the job page can show them: ``job_events`` rows (phase
        ``OUTPUTS``, event ``skipped``, ``data`` its name and the reason). Their ``byte_offset`` is
        negative, as no line of ``global.json`` has one: a key made from the name, so an upload
        tried again records each output once. They do not count as metric rows."""
        if not skipped:
            return
        job = self.job(job_uuid)
        now = utcnow()
        phase, event = SKIPPED_OUTPUT_EVENT
        rows = {
            _skipped_key(output.name): {
                "job_id": job.id,
                "byte_offset": _skipped_key(output.name),
                "ts": now,
                "phase": phase,
                "event": event,
                "iteration": None,
                "epoch": None,
                "data": {"name": without_nul(output.name), "reason": without_nul(output.reason)},
            }
            for output in skipped
        }
        with self.engine.begin() as conn:
            insert_ignore(conn, JOB_EVENTS, list(rows.values()))

    def skipped_outputs(self, job_uuid: str) -> list[SkippedOutput]:
        """What :meth:`record_skipped_outputs` recorded, by name."""
        job = self.job(job_uuid)
        phase, event = SKIPPED_OUTPUT_EVENT
        with self.session() as s:
            rows = s.scalars(
                select(JobEvent.data).where(JobEvent.job_id == job.id, JobEvent.phase == phase, JobEvent.event == event)
            )
            return sorted((SkippedOutput(str(d["name"]), str(d["reason"])) for d in rows if d), key=lambda o: o.name)

    def artifacts(self, job_uuid: str) -> list[Artifact]:
        job = self.job(job_uuid)
        with self.session() as s:
            return list(s.scalars(select(Artifact).where(Artifact.job_id == job.id).order_by(Artifact.name)))

    # --- notifications ---------------------------------------------------------------------------

    def claim_notification(self, job_uuid: str, event: str, key: str, target: str) -> bool:
        """Claim the sending of one notification (False: it was claimed before, by this or another
        try); the row says ``sending`` until :meth:`finish_notification`."""
        job = self.job(job_uuid)
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    NOTIFICATIONS.insert().values(
                        job_id=job.id, event=event, event_key=key, target=target, status="sending", created_at=utcnow()
                    )
                )
        except IntegrityError:
            return False
        return True

    def finish_notification(self, job_uuid: str, event: str, key: str, target: str, *, error: str | None) -> None:
        job = self.job(job_uuid)
        table = NOTIFICATIONS
        values: dict[str, Any] = {"status": "failed", "error": error[:4000]} if error else {"status": "sent"}
        with self.engine.begin() as conn:
            conn.execute(
                update(table)
                .where(
                    (table.c.job_id == job.id)
                    & (table.c.event == event)
                    & (table.c.event_key == key)
                    & (table.c.target == target)
                )
                .values(sent_at=utcnow(), **values)
            )

    def notifications(self, job_uuid: str) -> list[Notification]:
        job = self.job(job_uuid)
        with self.session() as s:
            return list(s.scalars(select(Notification).where(Notification.job_id == job.id).order_by(Notification.id)))

    def notified_targets(self, job_uuid: str, event: str, key: str) -> set[str]:
        """Targets already claimed for this notification (being sent, sent or failed)."""
        with self.session() as s:
            return set(
                s.scalars(
                    select(Notification.target)
                    .join(TrainingJob, TrainingJob.id == Notification.job_id)
                    .where(TrainingJob.uuid == job_uuid, Notification.event == event, Notification.event_key == key)
                )
            )

    def epoch_count(self, job_uuid: str) -> int:
        """Epochs stored for the job (rows of ``epoch_train``, every iteration's)."""
        with self.session() as s:
            count = s.scalar(
                select(func.count())
                .select_from(EpochTrain)
                .join(TrainingJob, TrainingJob.id == EpochTrain.job_id)
                .where(TrainingJob.uuid == job_uuid)
            )
        return int(count or 0)

    def latest_epoch_and_eval(self, job_uuid: str) -> tuple[EpochTrain | None, Eval | None]:
        """The job's last stored epoch and last evaluation (None when it has none yet)."""
        job = self.job(job_uuid)
        with self.session() as s:
            epoch = s.scalars(
                select(EpochTrain).where(EpochTrain.job_id == job.id).order_by(EpochTrain.id.desc()).limit(1)
            ).first()
            evaluation = s.scalars(select(Eval).where(Eval.job_id == job.id).order_by(Eval.id.desc()).limit(1)).first()
        return epoch, evaluation


def _skipped_key(name: str) -> int:
    """A negative ``byte_offset`` made from an output's name: never a line's, stable across tries."""
    return -1 - int.from_bytes(hashlib.sha256(name.encode("utf-8", "backslashreplace")).digest()[:7], "big")


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES
