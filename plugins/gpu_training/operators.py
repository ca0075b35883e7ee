"""Operators of the ``gpu_training`` DAG: thin wrappers around :mod:`gpu_training.lifecycle`.

Each finds its job in the results DB by (dag_id, run_id, map_index), so nothing depends on XCom
and every step survives its own retry. A step that fails for good records why on the job; errors
that a retry cannot fix (bad params, a trainer that crashed) fail without retrying. Waiting steps
defer between polls, so no worker slot is held while an instance boots or a model trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context
from airflow.sdk.exceptions import (
    AirflowFailException,
    AirflowRescheduleException,
    AirflowSkipException,
    AirflowTaskTimeout,
)

from gpu_training import lifecycle
from gpu_training.errors import (
    HostError,
    JobCancelledError,
    JobNotFoundError,
    RunSlotBusyError,
    TrainerFailedError,
    fail_unless_retryable,
    is_retryable,
    not_retryable_classes,
)
from gpu_training.follow.settings import FollowSettings
from gpu_training.hooks.results import DEFAULT_CONN_ID, ResultsDbHook
from gpu_training.progress import FollowOutcome
from gpu_training.results.models import utcnow
from gpu_training.results.states import JobStatus
from gpu_training.results.store import ResultsStore
from gpu_training.triggers import GlobalJsonTrigger, PollIntervalTrigger

#: The errors no Airflow retry helps (bad params, a rejected request, no offer, the trainer failed, a job
#: limit, a cancel, the results DB not there): ``errors.is_retryable`` decides, from the hierarchy's flags.
NOT_RETRYABLE = not_retryable_classes()


def _map_index(context: Context) -> int:
    map_index = getattr(context["ti"], "map_index", -1)
    return -1 if map_index is None else map_index


class TrainingJobStepOperator(BaseOperator):
    """Base of the job's steps: resolves the job and records a final failure on it.

    ``stage`` names the job within its dag run (a pipeline's stage; "" for a single job); with
    the task's map index (a sweep's trial) it finds the job's row.
    """

    ui_color = "#e8f0fe"

    def __init__(self, *, results_conn_id: str = DEFAULT_CONN_ID, stage: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results_conn_id = results_conn_id
        self.stage = stage

    def store(self) -> ResultsStore:
        return ResultsDbHook(self.results_conn_id).get_store()

    def job_uuid(self, store: ResultsStore, context: Context) -> str:
        ti = context["ti"]
        job_uuid = store.job_uuid_for_run(ti.dag_id, ti.run_id, _map_index(context), stage=self.stage)
        if job_uuid is None:
            where = f" (stage {self.stage})" if self.stage else ""
            raise JobNotFoundError(f"no training job registered for dag run {ti.dag_id}/{ti.run_id}{where}")
        return job_uuid

    def execute(self, context: Context) -> Any:
        store = self.store()
        job_uuid = self.job_uuid(store, context)
        return self._guarded(store, job_uuid, context, lambda: self.run_step(store, job_uuid, context))

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> Any:
        raise NotImplementedError

    def _guarded(self, store: ResultsStore, job_uuid: str, context: Context, step: Any) -> Any:
        try:
            return step()
        except (Exception, AirflowTaskTimeout) as err:
            if isinstance(err, RunSlotBusyError):
                # Wait for a slot without holding a worker or a pool slot (up_for_reschedule
                # counts in no pool, unlike a deferral), then provision again.
                interval = lifecycle.job_spec(store, job_uuid).poll_interval_seconds
                self.log.info("%s; trying again in %g s", err, interval)
                raise AirflowRescheduleException(utcnow() + timedelta(seconds=interval)) from err
            if isinstance(err, JobCancelledError) and lifecycle.budget_cancelled(store.job(job_uuid)):
                # Not launched because the run's budget is spent: what the run was told to do, so
                # the job's steps are skipped (its dag run still succeeds), not failed.
                raise AirflowSkipException(str(err)) from err
            ti = context["ti"]
            final = not is_retryable(err) or ti.try_number > (ti.max_tries or 0)
            if final:
                store.record_failure(job_uuid, f"{self.task_id}: {err}")
            fail_unless_retryable(err)
            raise


def dataset_of_asset_events(context: Context) -> str | None:
    """``dataset_uri`` from the extra of the newest asset event that triggered the run, if any: the
    producer of new data says which object is new (``{"dataset_uri": "s3://.../batch-42.csv"}``)."""
    try:
        by_asset = context.get("triggering_asset_events") or {}
        events = [e for found in by_asset.values() for e in found]
    except Exception:  # not an asset-triggered run
        return None
    named = [e for e in events if isinstance(getattr(e, "extra", None), dict) and e.extra.get("dataset_uri")]
    if not named:
        return None
    newest = max(named, key=lambda e: getattr(e, "timestamp", None) or 0)
    return str(newest.extra["dataset_uri"])


class RegisterTrainingJobOperator(BaseOperator):
    """Validates the params and creates the job row; returns the job uuid.

    The job's params are the run's params with ``job_params`` over them (a stage's or a sweep
    trial's own; ``config`` merged key by key). ``init_from`` is ``(stage, checkpoint path)``: the
    job starts from that output of an earlier stage of the run.
    """

    ui_color = "#e6f4ea"
    template_fields: Sequence[str] = ("job_params",)

    def __init__(
        self,
        *,
        results_conn_id: str = DEFAULT_CONN_ID,
        stage: str = "",
        job_params: Any = None,
        init_from: tuple[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.results_conn_id = results_conn_id
        self.stage = stage
        self.job_params = job_params
        self.init_from = tuple(init_from) if init_from else None

    def execute(self, context: Context) -> str:
        from gpu_training.retraining.spec import merge_job_params

        ti = context["ti"]
        params = dict(context["params"])
        conf = getattr(context.get("dag_run"), "conf", None) or {}
        if "dataset_uri" not in conf and (new_data := dataset_of_asset_events(context)):
            self.log.info("training on %s, named by the asset event that triggered this run", new_data)
            params["dataset_uri"] = new_data
        if self.job_params:
            params = merge_job_params(params, dict(self.job_params))
        try:
            job_uuid = lifecycle.register_job(
                ResultsDbHook(self.results_conn_id).get_store(),
                params,
                dag_id=ti.dag_id,
                run_id=ti.run_id,
                map_index=_map_index(context),
                stage=self.stage,
                init_from=self.init_from,  # type: ignore[arg-type]
            )
        except Exception as err:
            if not is_retryable(err):
                # Its own line in the task log, where the run's page shows it first (the traceback's
                # one-line header is cut at the window's width).
                self.log.error("the job is refused, nothing was created or provisioned: %s", err)
            fail_unless_retryable(err)
            raise
        self.log.info("training job %s registered for run %s", job_uuid, ti.run_id)
        return job_uuid


class BuildJobConfigOperator(TrainingJobStepOperator):
    """Renders the job's YAML config and stores it on the job row."""

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> None:
        text = lifecycle.build_config(store, job_uuid)
        self.log.info("job config:\n%s", text)


class ProvisionInstanceOperator(TrainingJobStepOperator):
    """Launches the job's instance (idempotently, by a deterministic name)."""

    ui_color = "#fef7e0"

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> str:
        # Names are fixed per job and attempt, not per try: a retried launch finds its instance.
        info = lifecycle.provision(store, job_uuid)
        self.log.info("instance %s (%s) is %s", info.name, info.instance_id, info.state)
        return info.name


class _PollingStepOperator(TrainingJobStepOperator):
    """Polls once per resume and defers in between: no worker slot is held while waiting."""

    def __init__(self, *, poll_interval_seconds: float | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.poll_interval_seconds = poll_interval_seconds
        #: Small state carried from one poll to the next through the deferral (display only:
        #: whatever must survive a retry lives in the results DB).
        self.poll_state: dict[str, Any] = {}

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> Any:
        done, value = self.poll_once(store, job_uuid, context)
        if not done:
            interval = self.poll_interval_seconds or lifecycle.job_spec(store, job_uuid).poll_interval_seconds
            self.defer(
                trigger=PollIntervalTrigger(float(interval), self.poll_state),
                method_name="execute_complete",
            )
        return value

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        self.poll_state = dict((event or {}).get("state") or {}) if isinstance(event, dict) else {}
        return self.execute(context)

    def poll_once(self, store: ResultsStore, job_uuid: str, context: Context) -> tuple[bool, Any]:
        raise NotImplementedError


class WaitForInstanceOperator(_PollingStepOperator):
    """Waits until the instance runs and its host answers."""

    def poll_once(self, store: ResultsStore, job_uuid: str, context: Context) -> tuple[bool, Any]:
        ready = lifecycle.check_ready(store, job_uuid)
        self.log.info("instance ready: %s", ready)
        return ready, None


class TransferInputsOperator(TrainingJobStepOperator):
    """Puts the config, the dataset and the trainer on the instance, each file verified."""

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> None:
        self.log.info("transferred: %s", lifecycle.transfer_inputs(store, job_uuid))


class StartTrainerOperator(TrainingJobStepOperator):
    """Starts the trainer in the background (re-attaching on retry)."""

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> None:
        pid = lifecycle.start_trainer(store, job_uuid)
        self.log.info("trainer running, pid %s", pid)


class GlobalJsonSensor(TrainingJobStepOperator):
    """Follows ``global.json`` until the job ends, entirely in the triggerer.

    It defers at once to :class:`~gpu_training.triggers.GlobalJsonTrigger`, which streams and
    stores every event and fires only when the job ended: no worker slot is held while the model
    trains. Back on a worker it stops a trainer that must not keep running (stalled, overdue,
    NaN loss, cancelled) and fails with the reason; an unreachable host is retried.

    A spot instance lost to an interruption is recovered here, up to ``max_recoveries``: a new
    offer is launched, its boot waited for (deferred), inputs and the last synced checkpoint put
    on it and the trainer restarted, then following goes on, all within this task. Where a try
    stands is read from the results DB, so a retry picks the recovery up where it was.
    """

    ui_color = "#f3e8fd"

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> Any:
        if lifecycle.awaiting_restart(store, job_uuid):
            return self._recovering(store, job_uuid)
        return self._follow(store, job_uuid)

    def _follow(self, store: ResultsStore, job_uuid: str) -> Any:
        kwargs = {**lifecycle.follow_kwargs(store, job_uuid), "results_conn_id": self.results_conn_id}
        settings = FollowSettings.from_kwargs(kwargs)
        self.log.info("following %s from the triggerer", dict(settings.target))
        self.defer(
            trigger=GlobalJsonTrigger.following(settings),
            method_name="execute_complete",
        )

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        store = self.store()
        job_uuid = self.job_uuid(store, context)
        return self._guarded(store, job_uuid, context, lambda: self._ended(store, job_uuid, dict(event or {})))

    def _ended(self, store: ResultsStore, job_uuid: str, result: dict[str, Any]) -> int:
        self.log.info(
            "ingested %s events, %s malformed lines; offset %s",
            result.get("events"),
            result.get("errors"),
            result.get("offset"),
        )
        reason = str(result.get("reason") or "the trigger fired without a reason")
        if result.get("succeeded"):
            self.log.info("job ended: %s", reason)
            return int(result.get("offset") or 0)
        if result.get("kind") in self.LOST_HOST and (interrupted := lifecycle.interruption(store, job_uuid)):
            self.log.warning("the instance was interrupted: %s; recovering", interrupted)
            info = lifecycle.recover(store, job_uuid, interrupted)
            self.log.info("recovery instance %s (%s) is %s", info.name, info.instance_id, info.state)
            return self._recovering(store, job_uuid)
        lifecycle.after_follow(store, job_uuid, result)
        if result.get("kind") == FollowOutcome.UNREACHABLE:
            raise HostError(reason)  # retried: following resumes where the results DB says
        raise TrainerFailedError(reason)

    #: Ends of following after which the instance itself may be gone (an interruption).
    LOST_HOST = frozenset(
        {FollowOutcome.UNREACHABLE, FollowOutcome.TRAINER_EXIT, FollowOutcome.NOT_STARTED, FollowOutcome.NODE_FAILED}
    )

    def _recovering(self, store: ResultsStore, job_uuid: str) -> Any:
        """Wait (deferred) for the recovery instance, then restart the trainer and follow again."""
        if not lifecycle.check_ready(store, job_uuid):
            interval = lifecycle.job_spec(store, job_uuid).poll_interval_seconds
            self.defer(trigger=PollIntervalTrigger(float(interval), {}), method_name="recovery_poll")
        pointer = lifecycle.restart_trainer(store, job_uuid)
        self.log.info("trainer restarted, resuming from %s", pointer or "the start (no checkpoint synced)")
        return self._follow(store, job_uuid)

    def recovery_poll(self, context: Context, event: Any = None) -> Any:
        store = self.store()
        job_uuid = self.job_uuid(store, context)
        return self._guarded(store, job_uuid, context, lambda: self._recovering(store, job_uuid))


class UploadOutputsOperator(TrainingJobStepOperator):
    """Uploads outputs with a SHA256 manifest; also after a failed training (logs, checkpoints)."""

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> None:
        stop = lifecycle.cancelled_reason(store.job(job_uuid))
        if stop:
            self.log.warning("%s: outputs are not uploaded, the instance is terminated at once", stop)
            return
        try:
            lifecycle.current_instance(store, job_uuid)
        except Exception:
            self.log.warning("no live instance for job %s: nothing to upload", job_uuid)
            return
        count = lifecycle.upload(store, job_uuid)
        self.log.info("uploaded %d files to %s", count, store.job(job_uuid).outputs_uri)


class TeardownInstanceOperator(TrainingJobStepOperator):
    """Terminates every instance of the job; runs whatever failed before it."""

    ui_color = "#fce8e6"

    def execute(self, context: Context) -> Any:
        store = self.store()
        try:
            job_uuid = self.job_uuid(store, context)
        except JobNotFoundError:
            self.log.info("no job was registered for this run: nothing to tear down")
            return None
        return self._guarded(store, job_uuid, context, lambda: self.run_step(store, job_uuid, context))

    def run_step(self, store: ResultsStore, job_uuid: str, context: Context) -> list[str]:
        names = lifecycle.teardown(store, job_uuid)
        self.log.info("terminated: %s", names or "nothing left running")
        return names


class FinalizeJobOperator(TrainingJobStepOperator):
    """Sets the job's final status; fails the dag run when the job did not complete."""

    def __init__(self, *, watched_task_ids: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.watched_task_ids = list(watched_task_ids)

    def execute(self, context: Context) -> str | None:
        store = self.store()
        states = self._task_states(context)
        try:
            job_uuid = self.job_uuid(store, context)
        except JobNotFoundError as err:
            register = next((s for t, s in states.items() if t.endswith("register_job")), None)
            # An earlier pipeline stage failed (its own finalize fails the run). A register_job that
            # was skipped means the run was marked failed before it started: fail, as for any job.
            if register == "upstream_failed":
                raise AirflowSkipException(f"not run: {err} (an upstream stage did not complete)") from err
            raise AirflowFailException(f"the job was never registered: {err}") from err
        failed = sorted(t for t, state in states.items() if state in ("failed", "upstream_failed"))
        # Nothing in this DAG skips a step, except Airflow when someone marks the run failed.
        marked_failed = any(state == "skipped" for state in states.values())
        status = lifecycle.finalize(store, job_uuid, failed_tasks=failed, run_marked_failed=marked_failed)
        job = store.job(job_uuid)
        self.log.info("job %s %s (cost %s USD)", job_uuid, status, job.cost_usd)
        if not lifecycle.budget_cancelled(job):  # a trial its run's budget never launched: nothing to say
            self._notify_end(store, job_uuid)
        if status == JobStatus.CANCELLED and lifecycle.budget_cancelled(job):
            # Not launched because the run's budget was spent: what the run was told to do.
            raise AirflowSkipException(f"training job {job_uuid} {status}: {job.failure_reason}")
        if status != JobStatus.COMPLETED:
            raise AirflowFailException(f"training job {job_uuid} {status}: {job.failure_reason}")
        return status

    def _notify_end(self, store: ResultsStore, job_uuid: str) -> None:
        """Tell the job's ``notify`` targets how it ended; nothing here may change the job's outcome."""
        try:
            from gpu_training.notify import notify_job_end

            for delivery in notify_job_end(store, job_uuid):
                self.log.info("notification %s to %s: %s", delivery.event, delivery.target, delivery.status)
        except Exception:
            self.log.exception("notifying the end of job %s failed (the job's status stands)", job_uuid)

    def _task_states(self, context: Context) -> dict[str, str]:
        """States of the watched tasks of this run (and of this map index, in a mapped group)."""
        ti = context["ti"]
        if not self.watched_task_ids:
            return {}
        map_index = _map_index(context)
        states = ti.get_task_states(
            dag_id=ti.dag_id,
            run_ids=[ti.run_id],
            task_ids=self.watched_task_ids,
            map_index=map_index if map_index >= 0 else None,
        )
        by_task: dict[str, Any] = states.get(ti.run_id, {}) if isinstance(states, dict) else {}
        suffix = f"_{map_index}"
        return {
            (task_id[: -len(suffix)] if map_index >= 0 and task_id.endswith(suffix) else task_id): str(state)
            for task_id, state in by_task.items()
        }
