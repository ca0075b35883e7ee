"""Cancel and hard limits at every step of a job, against a fake cloud: nothing new starts once a job is cancelled,
a launch racing its teardown never leaves an instance behind, and the job ends ``cancelled``.

The Airflow side (the UI / REST marking the run failed, the results API's cancel) is in
``tests/e2e/test_cancel_cluster.py``; here are the lifecycle's own guarantees.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from gpu_training import lifecycle, listener
from gpu_training.errors import HostError, JobCancelledError, JobLimitError, TrainerFailedError
from gpu_training.job import following as job_following
from gpu_training.job import outputs as job_outputs
from gpu_training.job import teardown as job_teardown
from gpu_training.job import terminate as job_terminate
from gpu_training.operators import NOT_RETRYABLE
from gpu_training.params import parse_job_params
from gpu_training.providers.base import ComputeProvider
from gpu_training.results.store import ResultsStore
from gpu_training.storage import parse_uri
from tests.fakeclouds.rigs import STARTERS, Rig

from .test_cloud_jobs import new_job


@pytest.fixture(scope="module")
def lambda_rig(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = STARTERS["lambda"](sshd_server, tmp_path_factory.mktemp("cancel-boxes"))
    yield rig
    rig.stop()


@pytest.fixture
def rig(lambda_rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Rig:
    lambda_rig.fake.reset()
    for key, value in lambda_rig.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(job_teardown, "LAUNCH_SETTLE_POLL_SECONDS", 0.1)
    return lambda_rig


def launches(rig: Rig) -> int:
    return sum(1 for method, path, _ in rig.fake.calls if method == "POST" and "launch" in path)


def test_a_cancelled_job_starts_no_step(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig)
    assert store.request_cancel(job, by="alice") is True
    assert store.request_cancel(job, by="bob") is False  # once; the first requester is kept
    steps = [
        lifecycle.build_config,
        lifecycle.provision,
        lifecycle.transfer_inputs,
        lifecycle.start_trainer,
        lifecycle.follow_kwargs,
    ]
    for step in steps:
        with pytest.raises(JobCancelledError, match="cancelled by alice"):
            step(store, job)
    assert rig.fake.launched() == [] and launches(rig) == 0
    assert lifecycle.finalize(store, job, failed_tasks=["provision"]) == "cancelled"
    ended = store.job(job)
    assert ended.status == "cancelled" and ended.cancelled_by == "alice" and ended.completed_at
    assert ended.failure_reason == f"job {job} was cancelled by alice"


def test_cancel_while_booting_stops_the_boot_wait_and_teardown_terminates(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.boot_seconds = 30
    job = new_job(store, rig)
    lifecycle.provision(store, job)
    assert lifecycle.check_ready(store, job) is False
    store.request_cancel(job, by="alice")
    with pytest.raises(JobCancelledError):
        lifecycle.check_ready(store, job)
    assert [r.state for r in store.instances_for_job(job)] != ["terminated"]
    assert len(lifecycle.teardown(store, job)) == 1
    rig.fake.assert_all_terminated()
    assert lifecycle.finalize(store, job, failed_tasks=["wait_until_ready"]) == "cancelled"


def test_a_launch_after_teardown_began_is_never_made(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig)
    assert lifecycle.teardown(store, job) == []  # a cancelled run's teardown, before provision ran
    with pytest.raises(JobCancelledError, match="being torn down"):
        lifecycle.provision(store, job)
    assert launches(rig) == 0 and rig.fake.launched() == []


def test_teardown_waits_for_a_launch_in_flight_and_terminates_what_it_created(
    store: ResultsStore, rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a cancel: teardown starts while the launch call is still out (Airflow starts
    teardown before the killed launch task stops). The instance the cloud creates is terminated."""
    job = new_job(store, rig)
    in_call = threading.Event()
    provider_cls = type(lifecycle.get_provider(rig.name))
    real_launch = provider_cls.launch

    def slow_launch(self: ComputeProvider, offer: Any, name: str) -> Any:
        in_call.set()
        time.sleep(1.0)  # the cloud is still answering when teardown starts
        return real_launch(self, offer, name)

    monkeypatch.setattr(provider_cls, "launch", slow_launch)
    errors: list[BaseException] = []

    def provision() -> None:
        try:
            lifecycle.provision(store, job)
        except BaseException as err:
            errors.append(err)

    thread = threading.Thread(target=provision)
    thread.start()
    assert in_call.wait(10)
    terminated = lifecycle.teardown(store, job, settle=timedelta(seconds=20))
    thread.join(20)
    assert len(terminated) == 1
    assert errors and isinstance(errors[0], JobCancelledError)
    rig.fake.assert_all_terminated()
    assert [r.state for r in store.instances_for_job(job)] == ["terminated"]


def test_teardown_finds_an_instance_created_by_a_launch_that_died(store: ResultsStore, rig: Rig) -> None:
    """A launch task SIGKILLed after the cloud created the instance, before it recorded the id."""
    job = new_job(store, rig)
    provider = lifecycle.get_provider(rig.name)
    offer = provider.list_offers(lifecycle.request_from(rig.gpu))[0]
    name = "gpujob-killed-launch-1"
    store.record_instance_intent(job, provider=rig.name, name=name, instance_type=offer.instance_type)
    provider.launch(offer, name)  # the cloud acted; the task died before update_instance
    assert lifecycle.teardown(store, job, settle=timedelta(seconds=5)) == [name]
    rig.fake.assert_all_terminated()


def test_an_old_unsettled_intent_is_not_waited_for(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig)
    store.record_instance_intent(job, provider=rig.name, name="gpujob-never-launched-1")
    started = time.monotonic()
    assert lifecycle.teardown(store, job, settle=timedelta(0)) == []
    assert time.monotonic() - started < 5
    assert store.instances_for_job(job)[0].state == "failed"


def test_a_run_marked_failed_ends_the_job_cancelled_unless_it_completed(store: ResultsStore, rig: Rig) -> None:
    running = new_job(store, rig)
    store.set_status(running, "running")
    assert lifecycle.finalize(store, running, failed_tasks=["sense_progress"], run_marked_failed=True) == "cancelled"
    assert store.job(running).cancelled_by == "airflow (the dag run was marked failed)"

    done = new_job(store, rig)
    store.update_job(done, project_ended=True)
    assert lifecycle.finalize(store, done, failed_tasks=[], run_marked_failed=True) == "completed"


def test_the_listener_cancels_the_jobs_of_a_run_marked_failed_by_someone(
    store: ResultsStore, rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("gpu_training.hooks.results.ResultsDbHook.get_store", lambda self: store)
    job = new_job(store, rig)
    run = SimpleNamespace(dag_id="gpu_training", run_id=store.job(job).run_id)
    listener.on_dag_run_failed(dag_run=run, msg="task_failure")  # failed on its own: not a cancel
    assert store.job(job).status == "pending"
    listener.on_dag_run_failed(dag_run=run, msg="Dag Run's state was manually set to `failed`.")
    assert store.job(job).status == "cancelled" and store.job(job).cancel_requested_at is not None


def test_the_listener_never_breaks_airflow(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The results DB down when a run is marked failed: Airflow's request goes on (no exception out
    of the listener), and the log says which run's cancel was not recorded, and why."""

    def broken(self: Any) -> Any:
        raise RuntimeError("results DB down")

    monkeypatch.setattr("gpu_training.hooks.results.ResultsDbHook.get_store", broken)
    run = SimpleNamespace(dag_id="gpu_training", run_id="manual__x")
    with caplog.at_level(logging.ERROR, logger=listener.log.name):
        assert listener.on_dag_run_failed(dag_run=run, msg="Dag Run's state was manually set to `failed`.") is None
    [record] = [r for r in caplog.records if r.name == listener.log.name]
    assert record.getMessage() == "could not record the cancel of gpu_training/manual__x in the results DB"
    assert record.exc_info and "results DB down" in str(record.exc_info[1])


def test_finalize_after_cancel_keeps_cancelled_whatever_failed(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig)
    store.request_cancel(job, by="alice")
    store.record_failure(job, "sense_progress: job cancelled")
    assert store.job(job).status == "cancelled"
    assert lifecycle.finalize(store, job, failed_tasks=["sense_progress"]) == "cancelled"


def test_max_cost_is_a_deadline_on_the_current_instance(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig, max_cost_usd=0.5)
    lifecycle.provision(store, job)
    record = store.instances_for_job(job)[0]
    spec = lifecycle.job_spec(store, job)
    deadline = lifecycle.cost_deadline(store, job, spec)
    assert deadline is not None and record.price_per_hour
    hours = (deadline - record.launched_at).total_seconds() / 3600
    assert hours * record.price_per_hour == pytest.approx(0.5, rel=1e-3)
    kwargs = lifecycle.follow_kwargs(store, job)
    assert kwargs["max_cost_usd"] == 0.5
    handed = datetime.fromisoformat(kwargs["cost_deadline"])  # to the trigger, as ISO 8601
    assert abs((handed - deadline).total_seconds()) < 5
    lifecycle.teardown(store, job)


def test_max_cost_reached_while_booting_stops_the_job(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.boot_seconds = 60
    job = new_job(store, rig, max_cost_usd=0.000001)
    lifecycle.provision(store, job)
    time.sleep(0.1)
    with pytest.raises(JobLimitError, match="max_cost_usd"):
        lifecycle.check_ready(store, job)
    with pytest.raises(JobLimitError, match="before launching another"):
        lifecycle.launch_next(store, job)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()
    assert store.job(job).cost_usd and store.job(job).cost_usd > 0.000001


def test_the_trigger_judges_max_cost() -> None:
    from datetime import UTC

    from gpu_training.progress import judge

    now = datetime.now(UTC)
    job = SimpleNamespace(
        project_ended=False, status="running", trainer_started_at=now, created_at=now, last_progress_at=now
    )
    limits = {"stall_timeout": timedelta(hours=1), "max_runtime": timedelta(hours=1), "max_cost_usd": 2.0}
    assert judge(job, None, now=now, cost_deadline=now + timedelta(seconds=1), **limits) is None
    verdict = judge(job, None, now=now, cost_deadline=now, **limits)
    assert verdict is not None and verdict.kind == "max_cost" and "max_cost_usd (2 USD)" in verdict.reason


class StopFailing:
    """A trainer whose first ``failures`` stops fail as a stop over a dropped SSH connection does."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.stops = 0

    def stop(self, grace_seconds: float = 10.0) -> None:
        self.stops += 1
        if self.stops <= self.failures:
            raise HostError("127.0.0.1: running 'bash' failed: [Errno 104] Connection reset by peer")


@pytest.fixture
def stop_failing(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], StopFailing]:
    monkeypatch.setattr(job_following, "STOP_BACKOFF_SECONDS", 0.01)

    def make(failures: int) -> StopFailing:
        trainer = StopFailing(failures)
        monkeypatch.setattr(job_following, "stop_trainers", lambda ctx: trainer.stop())
        context = SimpleNamespace(spec=parse_job_params({"project_id": "p"}))
        monkeypatch.setattr(job_following, "load_context", lambda store, job_uuid: context)
        return trainer

    return make


@pytest.mark.parametrize("failures", [0, lifecycle.STOP_ATTEMPTS - 1])
def test_a_failed_stop_of_a_cancelled_trainer_is_tried_again(
    stop_failing: Callable[[int], StopFailing], failures: int
) -> None:
    """Tried again right there: a retry of the task would refuse to start for a cancelled job."""
    trainer = stop_failing(failures)
    lifecycle.after_follow(None, "job", {"kind": "cancelled", "reason": "the job was cancelled by alice"})  # type: ignore[arg-type]
    assert trainer.stops == failures + 1


def test_a_trainer_that_cannot_be_stopped_fails_the_step_saying_why_it_ended_and_why(
    stop_failing: Callable[[int], StopFailing],
) -> None:
    trainer = stop_failing(99)
    result = {"kind": "stall", "reason": "stalled: no new bytes in global.json for 2 min"}
    with pytest.raises(TrainerFailedError) as failed:  # not retried: teardown's termination stops it
        lifecycle.after_follow(None, "job", result)  # type: ignore[arg-type]
    assert trainer.stops == lifecycle.STOP_ATTEMPTS
    assert str(failed.value).startswith("stalled: no new bytes in global.json for 2 min; the trainer could not")
    assert "Connection reset by peer" in str(failed.value)
    assert isinstance(failed.value, NOT_RETRYABLE)


@pytest.mark.parametrize("kind", ["project_end", "trainer_exit", "not_started", "unreachable"])
def test_nothing_is_stopped_after_a_trainer_that_ended_or_an_unreachable_host(
    stop_failing: Callable[[int], StopFailing], kind: str
) -> None:
    trainer = stop_failing(0)
    lifecycle.after_follow(None, "job", {"kind": kind, "reason": "..."})  # type: ignore[arg-type]
    assert trainer.stops == 0


# --- a cancelled job keeps what exists -----------------------------------------------------------


def local_job(store: ResultsStore) -> str:
    """A job on the local provider, launched and ready, its trainer's files written by the test."""
    job = lifecycle.register_job(
        store, {"project_id": "salvage", "provider": "local"}, dag_id="gpu_training", run_id=f"manual__{time.time_ns()}"
    )
    lifecycle.provision(store, job)
    assert lifecycle.check_ready(store, job)
    host = lifecycle.host_for(store, job)
    files = {
        "logs/trainer.log": b"epoch 1 done\nepoch 2 done\n",
        "outputs/checkpoints/iter001_epoch001_model.npz": b"old model",
        "outputs/checkpoints/iter001_epoch002_model.npz": b"model 2" * 100,
        "outputs/checkpoints/iter001_epoch002_optimizer.npz": b"optimizer 2" * 100,
        "outputs/checkpoints/latest.json": json.dumps(
            {
                "iteration": 1,
                "epoch": 2,
                "model_path": "checkpoints/iter001_epoch002_model.npz",
                "optimizer_path": "checkpoints/iter001_epoch002_optimizer.npz",
            }
        ).encode(),
        "outputs/model_final.npz": b"not written by a cancelled trainer, and not kept",
    }
    for rel, data in files.items():
        Path(host.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        Path(host.path(rel)).write_bytes(data)
    return job


def test_a_cancelled_jobs_log_and_latest_checkpoint_are_kept_before_its_instance_is_terminated(
    store: ResultsStore,
) -> None:
    job = local_job(store)
    host_dir = Path(lifecycle.host_for(store, job).path("."))
    store.request_cancel(job, by="alice")
    assert len(lifecycle.teardown(store, job)) == 1
    assert not host_dir.exists()  # terminated: the local instance's directory is gone
    kept = {a.name: a for a in store.artifacts(job)}
    assert sorted(kept) == [
        "MANIFEST.sha256",
        "checkpoints/iter001_epoch002_model.npz",
        "checkpoints/iter001_epoch002_optimizer.npz",
        "checkpoints/latest.json",
        "logs/trainer.log",
    ]
    log_file = Path(parse_uri(kept["logs/trainer.log"].uri).path)
    assert log_file.read_bytes() == b"epoch 1 done\nepoch 2 done\n"
    assert kept["logs/trainer.log"].sha256 == hashlib.sha256(log_file.read_bytes()).hexdigest()
    assert lifecycle.finalize(store, job, failed_tasks=["sense_progress"]) == "cancelled"
    assert lifecycle.salvage_cancelled(store, job) == []  # a retried teardown keeps nothing twice


def test_keeping_a_cancelled_jobs_files_never_holds_its_termination_past_the_budget(
    store: ResultsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = local_job(store)
    release = threading.Event()

    def stuck_upload(*args: Any, **kwargs: Any) -> Any:
        release.wait(30)  # an instance that accepts the connection and then never answers
        raise HostError("the instance stopped answering")

    monkeypatch.setattr(job_outputs, "upload_outputs", stuck_upload)
    monkeypatch.setattr(job_outputs, "SALVAGE_BUDGET", timedelta(seconds=1))
    store.request_cancel(job, by="alice")
    started = time.monotonic()
    try:
        assert len(lifecycle.teardown(store, job)) == 1
        assert time.monotonic() - started < 10
    finally:
        release.set()
    assert store.artifacts(job) == []
    assert [r.state for r in store.instances_for_job(job)] == ["terminated"]


def test_only_a_cancelled_job_is_salvaged(store: ResultsStore) -> None:
    job = local_job(store)
    assert lifecycle.salvage_cancelled(store, job) == []  # failed or completed: upload_outputs' job
    lifecycle.teardown(store, job)
    assert store.artifacts(job) == []


def test_the_runs_note_says_who_cancelled_which_job(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig)
    run_id = store.job(job).run_id
    assert listener.cancel_note(store, "gpu_training", run_id) is None  # nothing cancelled yet
    store.request_cancel(job, by="alice")
    note = listener.cancel_note(store, "gpu_training", run_id)
    assert note is not None and note.startswith(f"Cancelled by alice: training job {job} (cloudjob). ")

    class Run:  # the note proxy of an ORM dag run: a value, appended to
        dag_run_note = None
        note = "found a bad batch, stopping it"

    run = Run()
    listener.note_on_run(run, note)
    listener.note_on_run(run, note)  # once
    assert run.note == f"found a bad batch, stopping it\n\n{note}"


@pytest.mark.parametrize("kind", ["not_regular_file", "max_metric_rows"])
def test_a_contained_hostile_trainer_is_stopped(stop_failing: Callable[[int], StopFailing], kind: str) -> None:
    """A job failed for a hostile global.json (a symlink, too many rows) stops its trainer at once:
    it would otherwise keep writing until teardown."""
    trainer = stop_failing(0)
    lifecycle.after_follow(None, "job", {"kind": kind, "reason": "..."})  # type: ignore[arg-type]
    assert trainer.stops == 1
