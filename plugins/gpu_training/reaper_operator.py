"""``GpuInstanceReaperOperator``: runs :func:`gpu_training.reaper.reap` over every configured cloud.

Thin: it supplies the clouds (those whose Airflow connection exists), the results store, the clock,
and the dag run lookup through the Task SDK; it logs and returns the summary, and fails the task
after everything else was done when a cloud or a lookup failed, so someone notices.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from airflow.sdk import BaseOperator, Context, Variable

from gpu_training.hooks.results import DEFAULT_CONN_ID, ResultsDbHook
from gpu_training.reaper import (
    DEFAULT_GRACE,
    REAP_TERMINATE_BUDGET,
    ReapError,
    cloud_providers,
    first_seen_from_json,
    first_seen_to_json,
    reap,
)
from gpu_training.results.models import utcnow

#: The Airflow Variable that dates unrecorded instances across runs (the clouds report no launch time).
FIRST_SEEN_VARIABLE = "gpu_instance_reaper_first_seen"


def dag_run_lookup(ti: Any) -> Callable[[str, str], str | None]:
    """A dag run's state through the running task's Task SDK; None when the run no longer exists.

    ``get_dagrun_state`` answers a deleted run with an API error (HTTP 404, logged as an error by the
    supervisor), so the count of runs with that id is asked first: 0 means deleted.
    """

    def lookup(dag_id: str, run_id: str) -> str | None:
        if ti.get_dr_count(dag_id=dag_id, run_ids=[run_id]) == 0:
            return None
        return str(ti.get_dagrun_state(dag_id=dag_id, run_id=run_id))

    return lookup


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class GpuInstanceReaperOperator(BaseOperator):
    """Terminates the GPU instances no live job needs, at every configured cloud (see ``reaper``).

    Reads the dag run's params ``dry_run`` (default false) and ``grace_minutes`` (default 15).
    """

    ui_color = "#fce8e6"

    def __init__(
        self,
        *,
        results_conn_id: str = DEFAULT_CONN_ID,
        terminate_budget: timedelta = REAP_TERMINATE_BUDGET,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.results_conn_id = results_conn_id
        self.terminate_budget = terminate_budget

    def execute(self, context: Context) -> dict[str, Any]:
        from gpu_training.providers.registry import configured_clouds

        params = context["params"]
        dry_run = _flag(params.get("dry_run", False))
        minutes = params.get("grace_minutes")
        grace = DEFAULT_GRACE if minutes is None else timedelta(minutes=float(minutes))
        clouds = configured_clouds()
        self.log.info("clouds configured here: %s", ", ".join(clouds) or "none")
        ti = context["ti"]
        report = reap(
            ResultsDbHook(self.results_conn_id).get_store(),
            cloud_providers(clouds),
            now=utcnow(),
            grace=grace,
            dag_run_state=dag_run_lookup(ti),
            dry_run=dry_run,
            first_seen=first_seen_from_json(Variable.get(FIRST_SEEN_VARIABLE, default=None, deserialize_json=True)),
            budget=self.terminate_budget,
        )
        for line in report.lines():
            self.log.info("%s", line)
        Variable.set(FIRST_SEEN_VARIABLE, first_seen_to_json(report.first_seen), serialize_json=True)
        summary = report.to_dict()
        errors = report.all_errors
        if errors:
            ti.xcom_push(key="return_value", value=summary)  # the summary, also when the task fails
            raise ReapError(f"the reaper did everything else but hit {len(errors)} error(s): " + "; ".join(errors))
        return summary
