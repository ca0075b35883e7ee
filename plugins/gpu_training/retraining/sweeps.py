"""A sweep's report: every trial of a run with its hyperparameters, status, metric and cost."""

from __future__ import annotations

import math
from typing import Any

from sqlalchemy import select

from gpu_training.results.models import TrainingJob
from gpu_training.results.states import JobStatus
from gpu_training.results.store import ResultsStore
from gpu_training.retraining.promotion import job_metric


def sweep_report(
    store: ResultsStore, dag_id: str, run_id: str, *, stage: str = "trial", metric: str = "f1", mode: str = "max"
) -> dict[str, Any]:
    """``{"metric", "mode", "trials": [...], "best": trial | None, "cost_usd", "table": [lines]}``.

    The best is the completed trial with the highest (``max``) or lowest (``min``) metric; ties go
    to the lower map index.
    """
    with store.session() as s:
        jobs = list(
            s.scalars(
                select(TrainingJob)
                .where(TrainingJob.dag_id == dag_id, TrainingJob.run_id == run_id, TrainingJob.stage == stage)
                .order_by(TrainingJob.map_index)
            )
        )
    trials: list[dict[str, Any]] = []
    for job in jobs:
        value = job_metric(store, job.uuid, metric) if job.status == JobStatus.COMPLETED else None
        trials.append(
            {
                "map_index": job.map_index,
                "job_uuid": job.uuid,
                "status": job.status,
                "config": dict((job.params or {}).get("config") or {}),
                "value": value,
                "cost_usd": job.cost_usd or 0.0,
                "failure_reason": job.failure_reason,
            }
        )
    ranked = [t for t in trials if t["value"] is not None and not math.isnan(t["value"])]
    sign = -1 if mode == "max" else 1
    ranked.sort(key=lambda t: (sign * t["value"], t["map_index"]))
    best = ranked[0] if ranked else None
    table = [f"{'trial':>5}  {'status':<10} {metric:>8}  {'cost USD':>9}  config"]
    for t in trials:
        shown = f"{t['value']:.4f}" if t["value"] is not None else "-"
        mark = "  <- best" if best is not None and t is best else ""
        table.append(f"{t['map_index']:>5}  {t['status']:<10} {shown:>8}  {t['cost_usd']:>9.4f}  {t['config']}{mark}")
        if t["failure_reason"]:
            table.append(f"{'':>5}  {t['failure_reason']}")
    return {
        "metric": metric,
        "mode": mode,
        "trials": trials,
        "best": best,
        "cost_usd": sum(t["cost_usd"] for t in trials),
        "table": table,
    }
