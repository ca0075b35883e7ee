"""Champion promotion: compare a retrained model with the champion of its name and record why.

The rule comes from the spec (``promotion: {metric: f1, mode: max, min_delta: 0.005}``); the
candidate's metric is its last evaluation in the results DB (``evals``: the columns, or any other
key the trainer put in ``EVAL_MODEL metrics``). Every decision is a row of ``models``, promoted or
not, and promoting moves the champion flag in the same transaction.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from gpu_training.results.models import Eval, Model, TrainingJob, utcnow
from gpu_training.results.store import ResultsStore
from gpu_training.retraining.spec import Promotion

EVAL_COLUMNS = ("accuracy", "precision", "recall", "f1", "auc", "loss")


@dataclasses.dataclass(frozen=True)
class Decision:
    name: str
    job_uuid: str
    metric: str
    value: float | None
    promoted: bool
    reason: str
    previous_job_uuid: str | None = None
    previous_value: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def decide(
    rule: Promotion, value: float | None, champion_value: float | None, *, has_champion: bool
) -> tuple[bool, str]:
    """Whether ``value`` beats the champion under ``rule``, and why, in words."""
    m = rule.metric
    if value is None or math.isnan(value):
        return False, f"not promoted: the job reported no {m}"
    better_or_equal = (lambda a, b: a >= b) if rule.mode == "max" else (lambda a, b: a <= b)
    sign = "+" if rule.mode == "max" else "-"
    if rule.min_value is not None and not better_or_equal(value, rule.min_value):
        cmp = "<" if rule.mode == "max" else ">"
        return False, f"not promoted: {m} {value:.4f} {cmp} min_value {rule.min_value:g}"
    if not has_champion:
        return True, f"promoted: first champion ({m} {value:.4f})"
    if champion_value is None or math.isnan(champion_value):
        return True, f"promoted: the champion has no {m} ({m} {value:.4f})"
    threshold = champion_value + rule.min_delta if rule.mode == "max" else champion_value - rule.min_delta
    rule_text = f"champion {champion_value:.4f} {sign} {rule.min_delta:g}"
    # Equal to the threshold promotes: as written in the spec, not as float arithmetic rounds it
    # (0.803 + 0.01 is 0.8130000000000001).
    if better_or_equal(value, threshold) or math.isclose(value, threshold, rel_tol=1e-9, abs_tol=1e-12):
        return True, f"promoted: {m} {value:.4f} {'>=' if rule.mode == 'max' else '<='} {rule_text}"
    return False, f"not promoted: {m} {value:.4f} {'<' if rule.mode == 'max' else '>'} {rule_text}"


def job_metric(store: ResultsStore, job_uuid: str, metric: str) -> float | None:
    """The metric of the job's last evaluation (highest iteration, then epoch); None if absent."""
    with store.session() as s:
        row = s.scalar(
            select(Eval)
            .join(TrainingJob, TrainingJob.id == Eval.job_id)
            .where(TrainingJob.uuid == job_uuid)
            .order_by(Eval.iteration.desc(), Eval.epoch.desc())
            .limit(1)
        )
    if row is None:
        return None
    value = getattr(row, metric) if metric in EVAL_COLUMNS else (row.metrics or {}).get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def promote(store: ResultsStore, name: str, job_uuid: str, rule: Promotion, *, dag_id: str, run_id: str) -> Decision:
    """Decide for a completed job and record it; a retry returns the decision already recorded."""
    value = job_metric(store, job_uuid, rule.metric)
    for attempt in range(3):
        try:
            return _promote_once(store, name, job_uuid, rule, value, dag_id=dag_id, run_id=run_id)
        except IntegrityError:  # another promotion of this name committed first: decide again
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _promote_once(
    store: ResultsStore, name: str, job_uuid: str, rule: Promotion, value: float | None, *, dag_id: str, run_id: str
) -> Decision:
    with store.session() as s, s.begin():
        job_id = s.scalar(select(TrainingJob.id).where(TrainingJob.uuid == job_uuid))
        if job_id is None:
            raise ValueError(f"no training job {job_uuid}")
        done = s.scalar(select(Model).where(Model.name == name, Model.job_id == job_id))
        if done is not None:
            return _decision(s, done, job_uuid)
        champ = s.scalar(select(Model).where(Model.name == name, Model.is_champion.is_(True)).with_for_update())
        champion_value = champ.value if champ else None
        if champ is not None and champ.metric != rule.metric:
            # The rule's metric changed since the champion was chosen: compare like with like.
            champ_uuid = s.scalar(select(TrainingJob.uuid).where(TrainingJob.id == champ.job_id))
            champion_value = job_metric(store, str(champ_uuid), rule.metric)
        promoted, reason = decide(rule, value, champion_value, has_champion=champ is not None)
        now = utcnow()
        if promoted and champ is not None:
            s.execute(update(Model).where(Model.id == champ.id).values(is_champion=False, retired_at=now))
            s.flush()
        row = Model(
            name=name,
            job_id=job_id,
            metric=rule.metric,
            value=value,
            previous_champion_job_id=champ.job_id if champ else None,
            previous_value=champion_value,
            promoted=promoted,
            is_champion=promoted,
            reason=reason,
            rule=rule.as_dict(),
            dag_id=dag_id,
            run_id=run_id,
            decided_at=now,
        )
        s.add(row)
        s.flush()
        return _decision(s, row, job_uuid)


def _decision(s: Any, row: Model, job_uuid: str) -> Decision:
    previous = None
    if row.previous_champion_job_id is not None:
        previous = s.scalar(select(TrainingJob.uuid).where(TrainingJob.id == row.previous_champion_job_id))
    return Decision(
        name=row.name,
        job_uuid=job_uuid,
        metric=row.metric,
        value=row.value,
        promoted=row.promoted,
        reason=row.reason,
        previous_job_uuid=previous,
        previous_value=row.previous_value,
    )
