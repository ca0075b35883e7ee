"""Champion promotion and sweep reports, against a real results DB: the decision rule, the ``models``
table (at most one champion per name, one decision per job), a job's last evaluation, a sweep's best."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from gpu_training.events import parse_chunk
from gpu_training.results.models import Model
from gpu_training.results.store import ResultsStore
from gpu_training.retraining.promotion import decide, job_metric, promote
from gpu_training.retraining.spec import Promotion
from gpu_training.retraining.sweeps import sweep_report

from .conftest import event_line

DAG = "retrain_digits"
MAX = Promotion(metric="f1", mode="max", min_delta=0.005)
MIN = Promotion(metric="loss", mode="min", min_delta=0.01)


# --- the rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "value", "champion", "promoted", "reason"),
    [
        (MAX, 0.92, 0.90, True, "promoted: f1 0.9200 >= champion 0.9000 + 0.005"),
        (MAX, 0.903, 0.90, False, "not promoted: f1 0.9030 < champion 0.9000 + 0.005"),
        (MAX, 0.80, 0.90, False, "not promoted: f1 0.8000 < champion 0.9000 + 0.005"),
        (MIN, 0.20, 0.25, True, "promoted: loss 0.2000 <= champion 0.2500 - 0.01"),
        (MIN, 0.245, 0.25, False, "not promoted: loss 0.2450 > champion 0.2500 - 0.01"),
        (MIN, 0.30, 0.25, False, "not promoted: loss 0.3000 > champion 0.2500 - 0.01"),
        (Promotion(metric="f1"), 0.90, 0.90, True, "promoted: f1 0.9000 >= champion 0.9000 + 0"),
    ],
)
def test_decide_against_a_champion(rule: Promotion, value: float, champion: float, promoted: bool, reason: str) -> None:
    assert decide(rule, value, champion, has_champion=True) == (promoted, reason)


@pytest.mark.parametrize(
    ("rule", "value", "champion"),
    [
        (Promotion(metric="f1", min_delta=0.005), 0.905, 0.90),
        (Promotion(metric="f1", min_delta=0.01), 0.813, 0.803),  # 0.803 + 0.01 is 0.8130000000000001
        (Promotion(metric="loss", mode="min", min_delta=0.1), 0.2, 0.3),  # 0.3 - 0.1 is 0.19999999999999998
        (Promotion(metric="loss", mode="min", min_delta=0.05), 0.2, 0.25),
    ],
)
def test_exactly_the_threshold_promotes(rule: Promotion, value: float, champion: float) -> None:
    promoted, reason = decide(rule, value, champion, has_champion=True)
    assert promoted, reason


def test_just_short_of_the_threshold_does_not_promote() -> None:
    assert decide(Promotion(metric="f1", min_delta=0.005), 0.9049, 0.90, has_champion=True)[0] is False
    assert decide(Promotion(metric="loss", mode="min", min_delta=0.1), 0.2001, 0.3, has_champion=True)[0] is False


def test_min_value_is_a_floor_even_for_the_first_champion() -> None:
    rule = Promotion(metric="f1", min_value=0.8)
    assert decide(rule, 0.79, None, has_champion=False) == (False, "not promoted: f1 0.7900 < min_value 0.8")
    assert decide(rule, 0.8, None, has_champion=False) == (True, "promoted: first champion (f1 0.8000)")
    assert decide(rule, 0.79, 0.5, has_champion=True)[0] is False
    ceiling = Promotion(metric="loss", mode="min", min_value=0.5)
    assert decide(ceiling, 0.6, None, has_champion=False) == (False, "not promoted: loss 0.6000 > min_value 0.5")
    assert decide(ceiling, 0.5, None, has_champion=False)[0] is True


def test_a_missing_metric_never_promotes() -> None:
    assert decide(MAX, None, None, has_champion=False) == (False, "not promoted: the job reported no f1")
    assert decide(MAX, float("nan"), 0.5, has_champion=True) == (False, "not promoted: the job reported no f1")


def test_the_first_model_is_the_champion_and_a_champion_without_the_metric_is_replaced() -> None:
    assert decide(MAX, 0.1, None, has_champion=False) == (True, "promoted: first champion (f1 0.1000)")
    assert decide(MAX, 0.1, None, has_champion=True) == (True, "promoted: the champion has no f1 (f1 0.1000)")


# --- the results DB ------------------------------------------------------------------------------


def ingest_lines(store: ResultsStore, job_uuid: str, *lines: bytes) -> None:
    """Store global.json lines as the trainer's poller does."""
    chunk = b"".join(lines)
    offset = store.job(job_uuid).ingest_offset
    events, errors, consumed = parse_chunk(chunk, offset)
    result = store.ingest(job_uuid, expected_offset=offset, new_offset=offset + consumed, events=events, errors=errors)
    assert not result.conflict and not errors


def evaluation(iteration: int, epoch: int, **metrics: Any) -> bytes:
    return event_line("EVAL_MODEL", "metrics", iteration=iteration, epoch=epoch, data=metrics)


def new_job(
    store: ResultsStore,
    run_id: str,
    *,
    f1: float | None = None,
    status: str = "completed",
    stage: str = "",
    map_index: int = -1,
    config: dict[str, Any] | None = None,
    cost_usd: float | None = None,
) -> str:
    job = store.create_job(
        project_id="digits",
        provider="local",
        runtime="process",
        params={"project_id": "digits", "config": config or {}},
        dag_id=DAG,
        run_id=run_id,
        map_index=map_index,
        stage=stage,
    )
    if f1 is not None:
        ingest_lines(store, job, evaluation(1, 4, f1=f1, loss=1 - f1, accuracy=f1))
    if cost_usd is not None:
        store.update_job(job, cost_usd=cost_usd)
    store.finish(job, status)
    return job


def models(store: ResultsStore) -> list[Model]:
    with store.session() as s:
        return list(s.scalars(select(Model).order_by(Model.id)))


def test_job_metric_is_the_last_evaluation(store: ResultsStore) -> None:
    job = new_job(store, "r1")
    # Written out of order: the last is the highest iteration, then epoch, not the last stored.
    ingest_lines(
        store,
        job,
        evaluation(2, 3, f1=0.7, num_samples=360, bleu=31.5, flag=True),
        evaluation(1, 8, f1=0.5),
        evaluation(2, 1, f1=0.6),
    )
    assert job_metric(store, job, "f1") == 0.7
    assert job_metric(store, job, "loss") is None  # a column the evaluation left empty
    assert job_metric(store, job, "bleu") == 31.5  # any other key of the metrics
    assert job_metric(store, job, "num_samples") == 360.0
    assert job_metric(store, job, "flag") is None  # not a number
    assert job_metric(store, job, "nope") is None
    assert job_metric(store, new_job(store, "r2"), "f1") is None  # no evaluation at all
    assert job_metric(store, "no-such-job", "f1") is None


def test_promotions_keep_one_champion_and_record_every_decision(store: ResultsStore) -> None:
    first = new_job(store, "r1", f1=0.90)
    decision = promote(store, "digits", first, MAX, dag_id=DAG, run_id="r1")
    assert decision.promoted and decision.reason == "promoted: first champion (f1 0.9000)"
    assert (decision.value, decision.previous_job_uuid, decision.previous_value) == (0.90, None, None)

    worse = new_job(store, "r2", f1=0.903)
    decision = promote(store, "digits", worse, MAX, dag_id=DAG, run_id="r2")
    assert not decision.promoted
    assert decision.reason == "not promoted: f1 0.9030 < champion 0.9000 + 0.005"
    assert (decision.previous_job_uuid, decision.previous_value) == (first, 0.90)
    rows = models(store)
    assert [(r.promoted, r.is_champion, r.retired_at is None) for r in rows] == [
        (True, True, True),
        (False, False, True),
    ]
    assert rows[1].reason == decision.reason and rows[1].rule == MAX.as_dict()
    assert (rows[1].dag_id, rows[1].run_id, rows[1].metric, rows[1].value) == (DAG, "r2", "f1", 0.903)

    better = new_job(store, "r3", f1=0.95)
    decision = promote(store, "digits", better, MAX, dag_id=DAG, run_id="r3")
    assert decision.promoted and decision.previous_job_uuid == first and decision.previous_value == 0.90
    rows = models(store)
    assert [r.is_champion for r in rows] == [False, False, True]
    assert rows[0].retired_at is not None and rows[0].promoted  # promoted once, retired now
    assert rows[2].previous_value == 0.90


def test_promoting_the_same_job_again_returns_the_recorded_decision(store: ResultsStore) -> None:
    champion = new_job(store, "r1", f1=0.90)
    promote(store, "digits", champion, MAX, dag_id=DAG, run_id="r1")
    job = new_job(store, "r2", f1=0.80)
    first = promote(store, "digits", job, MAX, dag_id=DAG, run_id="r2")
    # A retried task, even under another rule, finds the decision already made.
    again = promote(store, "digits", job, Promotion(metric="f1", min_delta=0.0, mode="min"), dag_id=DAG, run_id="r2")
    assert again == first and not again.promoted
    assert promote(store, "digits", champion, MAX, dag_id=DAG, run_id="r1").promoted
    assert len(models(store)) == 2
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Model).where(Model.is_champion.is_(True))) == 1


def test_a_job_without_the_metric_is_recorded_as_not_promoted(store: ResultsStore) -> None:
    job = new_job(store, "r1")
    decision = promote(store, "digits", job, MAX, dag_id=DAG, run_id="r1")
    assert not decision.promoted and decision.value is None
    assert decision.reason == "not promoted: the job reported no f1"
    assert [(r.value, r.is_champion) for r in models(store)] == [(None, False)]
    # The next job with the metric is the first champion.
    assert promote(store, "digits", new_job(store, "r2", f1=0.5), MAX, dag_id=DAG, run_id="r2").promoted


def test_each_model_name_has_its_own_champion(store: ResultsStore) -> None:
    a = new_job(store, "r1", f1=0.9)
    b = new_job(store, "r2", f1=0.5)
    assert promote(store, "model-a", a, MAX, dag_id=DAG, run_id="r1").promoted
    assert promote(store, "model-b", b, MAX, dag_id=DAG, run_id="r2").promoted
    assert {(r.name, r.is_champion) for r in models(store)} == {("model-a", True), ("model-b", True)}


def test_promoting_an_unknown_job_is_an_error(store: ResultsStore) -> None:
    with pytest.raises(ValueError, match="no training job nope"):
        promote(store, "digits", "nope", MAX, dag_id=DAG, run_id="r1")


# --- sweep reports -------------------------------------------------------------------------------


def test_the_sweep_report_picks_the_best_completed_trial(store: ResultsStore) -> None:
    run = "manual__sweep"
    trials = [
        new_job(store, run, stage="trial", map_index=0, f1=0.80, config={"learning_rate": 0.1}, cost_usd=0.5),
        new_job(store, run, stage="trial", map_index=1, f1=0.91, config={"learning_rate": 0.01}, cost_usd=0.25),
        # Better, but failed: its evaluation does not count.
        new_job(store, run, stage="trial", map_index=2, f1=0.99, status="failed", config={"learning_rate": 1.0}),
        new_job(store, run, stage="trial", map_index=3, f1=0.91, config={"learning_rate": 0.001}, cost_usd=0.25),
        new_job(store, run, stage="trial", map_index=4, status="cancelled", config={"learning_rate": 2.0}),
    ]
    store.record_failure(trials[2], "job did not complete: sense_progress")
    # Not trials of this sweep: another run, another stage.
    new_job(store, "manual__other", stage="trial", map_index=0, f1=1.0)
    new_job(store, run, stage="", f1=1.0)

    report = sweep_report(store, DAG, run, stage="trial", metric="f1", mode="max")
    assert [t["map_index"] for t in report["trials"]] == [0, 1, 2, 3, 4]
    assert [t["value"] for t in report["trials"]] == [0.80, 0.91, None, 0.91, None]
    assert [t["status"] for t in report["trials"]] == ["completed", "completed", "failed", "completed", "cancelled"]
    best = report["best"]
    assert best is not None and best["map_index"] == 1  # ties go to the lower map index
    assert best["job_uuid"] == trials[1] and best["config"] == {"learning_rate": 0.01}
    assert report["cost_usd"] == pytest.approx(1.0)
    assert report["table"][0].split() == ["trial", "status", "f1", "cost", "USD", "config"]
    marked = [line for line in report["table"] if line.endswith("<- best")]
    assert len(marked) == 1 and marked[0].split()[0] == "1"
    assert any("job did not complete: sense_progress" in line for line in report["table"])

    lowest = sweep_report(store, DAG, run, stage="trial", metric="loss", mode="min")
    assert lowest["best"] is not None and lowest["best"]["map_index"] == 1
    assert lowest["best"]["value"] == pytest.approx(0.09)


def test_a_sweep_without_a_completed_trial_has_no_best(store: ResultsStore) -> None:
    run = "manual__sweep"
    new_job(store, run, stage="trial", map_index=0, f1=0.9, status="failed")
    new_job(store, run, stage="trial", map_index=1, status="completed")  # completed, no evaluation
    report = sweep_report(store, DAG, run, stage="trial", metric="f1", mode="max")
    assert report["best"] is None and len(report["trials"]) == 2
    assert not any("<- best" in line for line in report["table"])
    empty = sweep_report(store, DAG, "manual__nothing", stage="trial")
    assert (empty["trials"], empty["best"], empty["cost_usd"]) == ([], None, 0)


def test_a_changed_rule_metric_compares_the_champions_own_value_of_it(store: ResultsStore) -> None:
    champion = new_job(store, "r1", f1=0.90)  # accuracy 0.90 too (see new_job)
    promote(store, "digits", champion, MAX, dag_id=DAG, run_id="r1")
    by_accuracy = Promotion(metric="accuracy", min_delta=0.01)
    # The champion was chosen on f1; its accuracy (0.90) is looked up, not its f1 row value reused.
    candidate = new_job(store, "r2", f1=0.905)
    decision = promote(store, "digits", candidate, by_accuracy, dag_id=DAG, run_id="r2")
    assert not decision.promoted and decision.previous_value == pytest.approx(0.90)
    assert decision.reason == "not promoted: accuracy 0.9050 < champion 0.9000 + 0.01"


def test_an_asset_event_names_the_dataset_the_run_trains_on() -> None:
    import types

    from gpu_training.operators import dataset_of_asset_events

    def event(ts: int, **extra: Any) -> Any:
        return types.SimpleNamespace(timestamp=ts, extra=extra)

    assert dataset_of_asset_events({}) is None  # type: ignore[arg-type]
    assert dataset_of_asset_events({"triggering_asset_events": {"a": [event(1, other=1)]}}) is None  # type: ignore[arg-type]
    context = {
        "triggering_asset_events": {
            "a": [event(1, dataset_uri="s3://d/batch-1.csv"), event(3, dataset_uri="s3://d/batch-3.csv")],
            "b": [event(2, dataset_uri="s3://d/batch-2.csv")],
        }
    }
    assert dataset_of_asset_events(context) == "s3://d/batch-3.csv"  # type: ignore[arg-type]
