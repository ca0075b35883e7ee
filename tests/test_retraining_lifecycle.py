"""The lifecycle's part in retraining: a run's budget across its jobs, a stage starting from an earlier
stage's checkpoint, and finalize for a budget-cancelled job or a mapped trial (no Airflow scheduler:
the functions and operators directly, against a real results DB)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from gpu_training import lifecycle
from gpu_training.errors import JobCancelledError, JobParamsError, StorageError
from gpu_training.hosts.local import LocalHost
from gpu_training.job_config import build_job_config
from gpu_training.operators import FinalizeJobOperator
from gpu_training.params import parse_job_params
from gpu_training.results.models import utcnow
from gpu_training.results.store import ArtifactRecord, ResultsStore

DAG = "retrain_digits"
RUN = "scheduled__2026-11-23"


def new_job(store: ResultsStore, *, run_id: str = RUN, stage: str = "", map_index: int = -1, **params: Any) -> str:
    full = {"project_id": "digits", "provider": "local", **params}
    return store.create_job(
        project_id="digits",
        provider="local",
        runtime="process",
        params=parse_job_params(full).to_dict(),
        dag_id=DAG,
        run_id=run_id,
        map_index=map_index,
        stage=stage,
    )


def add_instance(
    store: ResultsStore,
    job_uuid: str,
    name: str,
    *,
    price: float,
    hours: float = 0.0,
    state: str = "running",
    cost_usd: float | None = None,
    launched: bool = True,
) -> None:
    """An instance row as a launch leaves it: ``hours`` since its launch, at ``price`` USD/h."""
    store.record_instance_intent(job_uuid, provider="local", name=name, price_per_hour=price)
    if launched:
        store.update_instance(
            name,
            instance_id=f"i-{name}",
            state=state,
            launched_at=utcnow() - timedelta(hours=hours),
            cost_usd=cost_usd,
        )
    else:
        store.update_instance(name, state="failed", state_reason="no capacity: sold out")


# --- the run's budget ----------------------------------------------------------------------------


@pytest.fixture
def spent_run(store: ResultsStore) -> dict[str, str]:
    """A sweep run that has spent about 2.75 USD: a live trial and a settled one."""
    live = new_job(store, stage="trial", map_index=0)
    add_instance(store, live, "live", price=1.0, hours=2.0)  # ~2 USD so far
    settled = new_job(store, stage="trial", map_index=1)
    add_instance(store, settled, "settled", price=3.0, hours=5.0, state="terminated", cost_usd=0.75)
    add_instance(store, settled, "refused", price=50.0, launched=False)  # never ran: costs nothing
    other_run = new_job(store, run_id="scheduled__2026-11-22", stage="trial", map_index=0)
    add_instance(store, other_run, "elsewhere", price=100.0, hours=1.0)
    return {"live": live, "settled": settled, "other_run": other_run}


def test_run_cost_adds_up_every_job_of_the_run_only(store: ResultsStore, spent_run: dict[str, str]) -> None:
    assert lifecycle.run_cost(store, DAG, RUN) == pytest.approx(2.75, abs=0.01)
    assert lifecycle.run_cost(store, DAG, "scheduled__2026-11-22") == pytest.approx(100.0, abs=0.1)
    assert lifecycle.run_cost(store, DAG, "no-such-run") == 0


def test_a_job_is_not_launched_once_its_runs_budget_is_spent(store: ResultsStore, spent_run: dict[str, str]) -> None:
    job = new_job(store, stage="trial", map_index=2, run_budget_usd=2.5)
    spec = lifecycle.job_spec(store, job)
    with pytest.raises(JobCancelledError, match=r"not launched: the run budget of 2\.5 USD spent \(2\.75"):
        lifecycle.ensure_within_run_budget(store, job, spec)
    cancelled = store.job(job)
    assert cancelled.status == "cancelled" and cancelled.cancel_requested_at is not None
    assert cancelled.cancelled_by is not None and cancelled.cancelled_by.startswith(lifecycle.BUDGET_CANCELLER)
    # Nothing else of the job starts, and it ends cancelled, saying why.
    with pytest.raises(JobCancelledError, match="run budget"):
        lifecycle.build_config(store, job)
    assert lifecycle.finalize(store, job, failed_tasks=["provision"]) == "cancelled"
    assert "run budget of 2.5 USD spent" in (store.job(job).failure_reason or "")
    # The trials already under way are not the budget's to stop.
    assert {store.job(spent_run[k]).status for k in ("live", "settled")} == {"pending"}


def test_a_run_within_its_budget_or_without_one_launches(store: ResultsStore, spent_run: dict[str, str]) -> None:
    roomy = new_job(store, stage="trial", map_index=2, run_budget_usd=3)
    lifecycle.ensure_within_run_budget(store, roomy, lifecycle.job_spec(store, roomy))
    unlimited = new_job(store, stage="trial", map_index=3)  # run_budget_usd 0: no budget
    lifecycle.ensure_within_run_budget(store, unlimited, lifecycle.job_spec(store, unlimited))
    assert store.job(roomy).status == store.job(unlimited).status == "pending"


# --- finalize ------------------------------------------------------------------------------------


class FakeTI:
    """What finalize reads of its task instance; remembers how the task states were asked for."""

    def __init__(self, run_id: str, map_index: int, states: dict[str, str]) -> None:
        self.dag_id, self.run_id, self.map_index, self.states = DAG, run_id, map_index, states
        self.asked: list[dict[str, Any]] = []

    def get_task_states(self, **kwargs: Any) -> dict[str, dict[str, str]]:
        self.asked.append(kwargs)
        return {self.run_id: dict(self.states)}


def finalize_op(store: ResultsStore, monkeypatch: pytest.MonkeyPatch, *, stage: str = "") -> FinalizeJobOperator:
    prefix = f"{stage}." if stage else ""
    op = FinalizeJobOperator(
        task_id=f"{prefix}finalize",
        stage=stage,
        watched_task_ids=[f"{prefix}{t}" for t in ("register_job", "provision", "teardown")],
    )
    monkeypatch.setattr(FinalizeJobOperator, "store", lambda self: store)
    return op


def test_finalize_skips_a_job_the_run_budget_cancelled(store: ResultsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    add_instance(store, new_job(store, stage="trial", map_index=0), "spender", price=10.0, hours=1.0)
    job = new_job(store, stage="trial", map_index=1, run_budget_usd=1)
    with pytest.raises(JobCancelledError):
        lifecycle.ensure_within_run_budget(store, job, lifecycle.job_spec(store, job))
    ti = FakeTI(RUN, 1, {"trial.register_job_1": "success", "trial.provision_1": "failed"})
    with pytest.raises(AirflowSkipException, match="run budget"):
        finalize_op(store, monkeypatch, stage="trial").execute({"ti": ti})
    assert store.job(job).status == "cancelled"
    assert ti.asked[0]["map_index"] == 1


def test_finalize_still_fails_a_job_someone_cancelled(store: ResultsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    job = new_job(store)
    store.request_cancel(job, by="alice")
    with pytest.raises(AirflowFailException, match="cancelled"):
        finalize_op(store, monkeypatch).execute({"ti": FakeTI(RUN, -1, {"provision": "failed"})})


def test_a_mapped_trials_task_states_lose_their_map_index_suffix(
    store: ResultsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = finalize_op(store, monkeypatch, stage="trial")
    ti = FakeTI(RUN, 12, {"trial.register_job_12": "success", "trial.provision_12": "failed"})
    assert op._task_states({"ti": ti}) == {"trial.register_job": "success", "trial.provision": "failed"}
    assert ti.asked == [
        {
            "dag_id": DAG,
            "run_ids": [RUN],
            "task_ids": ["trial.register_job", "trial.provision", "trial.teardown"],
            "map_index": 12,
        }
    ]
    single = FakeTI(RUN, -1, {"register_job": "success", "provision_1": "failed"})
    assert finalize_op(store, monkeypatch)._task_states({"ti": single}) == {
        "register_job": "success",
        "provision_1": "failed",  # not mapped: an id is what it is
    }
    assert single.asked[0]["map_index"] is None


def test_a_stage_that_was_never_registered_is_skipped_after_an_upstream_failure(
    store: ResultsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    op = finalize_op(store, monkeypatch, stage="ppo")
    upstream_failed = FakeTI(RUN, -1, {"ppo.register_job": "upstream_failed"})
    with pytest.raises(AirflowSkipException, match="an upstream stage did not complete"):
        op.execute({"ti": upstream_failed})
    with pytest.raises(AirflowFailException, match="never registered"):
        op.execute({"ti": FakeTI(RUN, -1, {"ppo.register_job": "failed"})})
    # Skipped: the run was marked failed before the job started; finalize fails (so does the run).
    with pytest.raises(AirflowFailException, match="never registered"):
        op.execute({"ti": FakeTI(RUN, -1, {"ppo.register_job": "skipped"})})


# --- a stage starting from an earlier stage's checkpoint -------------------------------------------

MODEL_URI = "s3://training-outputs/digits/sft-job/model_final.npz"


def completed_stage(
    store: ResultsStore, stage: str = "sft", *, artifacts: tuple[str, ...] = ("model_final.npz",)
) -> str:
    job = new_job(store, stage=stage)
    store.record_artifacts(
        job,
        [
            ArtifactRecord(name, f"s3://training-outputs/digits/{stage}-job/{name}", 1024, "0" * 64)
            for name in artifacts
        ],
    )
    store.finish(job, "completed")
    return job


def test_stage_checkpoint_uri_is_the_uploaded_artifact_of_the_completed_stage(store: ResultsStore) -> None:
    completed_stage(store, artifacts=("metrics.json", "model_final.npz", "checkpoints/iter001_epoch004_model.npz"))
    assert lifecycle.stage_checkpoint_uri(store, DAG, RUN, "sft", "model_final.npz") == MODEL_URI
    assert lifecycle.stage_checkpoint_uri(store, DAG, RUN, "sft", "checkpoints/iter001_epoch004_model.npz") == (
        "s3://training-outputs/digits/sft-job/checkpoints/iter001_epoch004_model.npz"
    )


def test_stage_checkpoint_uri_errors_say_which_stage_and_why(store: ResultsStore) -> None:
    with pytest.raises(JobParamsError) as caught:
        lifecycle.stage_checkpoint_uri(store, DAG, RUN, "sft", "model_final.npz")
    assert caught.value.param == "init_checkpoint_uri"
    assert f"stage 'sft' has no job in run {RUN}" in str(caught.value)

    running = new_job(store, stage="sft")
    store.set_status(running, "running")
    with pytest.raises(JobParamsError, match=rf"stage 'sft' \(job {running}\) is running, not completed"):
        lifecycle.stage_checkpoint_uri(store, DAG, RUN, "sft", "model_final.npz")

    done = completed_stage(store, "dpo", artifacts=("metrics.json",))
    with pytest.raises(JobParamsError, match=rf"stage 'dpo' \(job {done}\) uploaded no 'model_final.npz'"):
        lifecycle.stage_checkpoint_uri(store, DAG, RUN, "dpo", "model_final.npz")
    # Another run's stage is not this run's.
    with pytest.raises(JobParamsError, match="has no job in run other-run"):
        lifecycle.stage_checkpoint_uri(store, DAG, "other-run", "dpo", "model_final.npz")


def test_register_job_of_a_stage_starts_from_its_init_from_stages_model(store: ResultsStore) -> None:
    completed_stage(store)
    params = {"project_id": "digits", "provider": "local", "config": {"epochs": 1}}
    job = lifecycle.register_job(
        store, params, dag_id=DAG, run_id=RUN, stage="ppo", init_from=("sft", "model_final.npz")
    )
    row = store.job(job)
    assert row.stage == "ppo" and row.params["init_checkpoint_uri"] == MODEL_URI
    assert store.job_uuid_for_run(DAG, RUN, -1, stage="ppo") == job
    # Idempotent: a retried register_job gets the same job.
    again = lifecycle.register_job(
        store, params, dag_id=DAG, run_id=RUN, stage="ppo", init_from=("sft", "model_final.npz")
    )
    assert again == job
    config = build_job_config(job, lifecycle.job_spec(store, job))
    assert config["init_checkpoint_path"] == "init/model_final.npz"
    assert config["init_checkpoint_uri"] == MODEL_URI
    assert "init_checkpoint_path" not in build_job_config("x", parse_job_params(params))


def test_register_job_refuses_a_stage_whose_upstream_has_no_model(store: ResultsStore) -> None:
    params = {"project_id": "digits", "provider": "local"}
    with pytest.raises(JobParamsError, match="stage 'sft' has no job"):
        lifecycle.register_job(store, params, dag_id=DAG, run_id=RUN, stage="ppo", init_from=("sft", "model_final.npz"))
    assert store.job_uuid_for_run(DAG, RUN, -1, stage="ppo") is None  # nothing registered


def test_the_initial_checkpoint_lands_in_the_work_dirs_init(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__GPU_TRAINING__ALLOWED_FILE_ROOTS", str(tmp_path))
    model = tmp_path / "outputs" / "model_final.npz"
    model.parent.mkdir()
    model.write_bytes(b"weights")
    host = LocalHost(tmp_path / "instance")
    host.prepare()
    spec = parse_job_params({"project_id": "p", "init_checkpoint_uri": model.as_uri()})
    assert lifecycle.fetch_init_checkpoint(spec, host) == 1
    assert Path(host.path("init/model_final.npz")).read_bytes() == b"weights"
    missing = parse_job_params({"project_id": "p", "init_checkpoint_uri": (tmp_path / "nope.npz").as_uri()})
    with pytest.raises(StorageError, match=r"^init_checkpoint_uri: .*nope\.npz does not exist"):
        lifecycle.fetch_init_checkpoint(missing, host)


# --- the run's instance slots (run_max_instances) ------------------------------------------------


def test_a_run_holds_at_most_run_max_instances_and_a_waiting_launch_is_not_an_attempt(store: ResultsStore) -> None:
    from gpu_training.errors import RunSlotBusyError

    first, second, third = (new_job(store, map_index=i, run_max_instances=2) for i in range(3))
    spec = parse_job_params(store.job(third).params)
    add_instance(store, first, "i-first", price=1.0)
    lifecycle.ensure_run_slot(store, third, spec)  # one holder: a slot is free
    add_instance(store, second, "i-second", price=1.0)
    with pytest.raises(RunSlotBusyError, match=r"already hold 2 instances \(run_max_instances\)"):
        lifecycle.ensure_run_slot(store, third, spec)
    # A holder being terminated still holds its slot; once terminated, the slot is free.
    store.update_instance("i-first", state="stopping")
    with pytest.raises(RunSlotBusyError):
        lifecycle.ensure_run_slot(store, third, spec)
    store.update_instance("i-first", state="terminated")
    lifecycle.ensure_run_slot(store, third, spec)
    # Unlimited runs never wait.
    lifecycle.ensure_run_slot(store, new_job(store, map_index=9), parse_job_params({"project_id": "digits"}))


def test_of_two_launches_racing_for_the_last_slot_the_older_intent_wins(store: ResultsStore) -> None:
    from gpu_training.errors import RunSlotBusyError

    holder, a, b = (new_job(store, map_index=i, run_max_instances=2) for i in range(3))
    spec = parse_job_params(store.job(a).params)
    add_instance(store, holder, "i-holder", price=1.0)
    # Both passed the check before listing offers; both committed their intent.
    store.record_instance_intent(a, provider="local", name="i-a")
    store.record_instance_intent(b, provider="local", name="i-b")
    lifecycle.ensure_run_slot(store, a, spec, intent="i-a")
    with pytest.raises(RunSlotBusyError):
        lifecycle.ensure_run_slot(store, b, spec, intent="i-b")
    assert [r.name for r in store.instances_for_job(b)] == []  # forgotten: not a launch attempt
    assert [r.name for r in store.instances_for_job(a)] == ["i-a"]


def test_an_intent_written_while_an_older_one_is_not_yet_committed_waits_for_it(
    store: ResultsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The older intent's row is written but not committed when the newer one commits and checks:
    exactly one of them gets the last slot. (On PostgreSQL ids come at insert, not commit: the
    newer one saw no older intent and launched, then the older one saw itself first and launched
    too, until a run's intents were written one at a time.)"""
    import threading

    from gpu_training.errors import RunSlotBusyError
    from gpu_training.results import store as store_module

    holder, a, b = (new_job(store, map_index=i, run_max_instances=2) for i in range(3))
    spec = parse_job_params(store.job(a).params)
    add_instance(store, holder, "i-holder", price=1.0)
    written, go = threading.Event(), threading.Event()
    insert_ignore = store_module.insert_ignore

    def slow_insert(conn: Any, table: Any, rows: Any) -> None:
        insert_ignore(conn, table, rows)
        if rows and rows[0].get("name") == "i-a":
            written.set()
            assert go.wait(30)

    monkeypatch.setattr(store_module, "insert_ignore", slow_insert)
    got: dict[str, str] = {}

    def launch(job: str, intent: str) -> None:
        store.record_instance_intent(job, provider="local", name=intent)
        try:
            lifecycle.ensure_run_slot(store, job, spec, intent=intent)
            got[intent] = "slot"
        except RunSlotBusyError:
            got[intent] = "busy"

    older = threading.Thread(target=launch, args=(a, "i-a"))
    older.start()
    assert written.wait(30)
    newer = threading.Thread(target=launch, args=(b, "i-b"))
    newer.start()
    newer.join(1.0)  # it waits for the older intent's transaction
    go.set()
    older.join(60)
    newer.join(60)
    assert got == {"i-a": "slot", "i-b": "busy"}


def test_a_busy_run_reschedules_provision_instead_of_failing_it(
    store: ResultsStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from airflow.sdk.exceptions import AirflowRescheduleException

    from gpu_training.operators import ProvisionInstanceOperator

    holders = [new_job(store, map_index=i, run_max_instances=1, poll_interval_seconds=3) for i in range(2)]
    add_instance(store, holders[0], "i-holder", price=1.0)
    op = ProvisionInstanceOperator(task_id="provision")
    monkeypatch.setattr(op, "store", lambda: store)
    ti = SimpleNamespace(dag_id=DAG, run_id=RUN, map_index=1, try_number=1, max_tries=2)
    before = utcnow()
    with pytest.raises(AirflowRescheduleException) as raised:
        op.execute({"ti": ti})  # type: ignore[arg-type]
    assert before + timedelta(seconds=2.5) <= raised.value.reschedule_date <= utcnow() + timedelta(seconds=3.5)
    job = store.job(holders[1])
    assert job.failure_reason is None and job.status == "provisioning" and store.instances_for_job(holders[1]) == []
