"""Operators of retraining DAGs: plan a sweep, report its best trial, promote a champion.

Thin: the decisions live in :mod:`gpu_training.retraining.promotion` and
:mod:`gpu_training.retraining.sweeps`; what must survive a retry is in the results DB.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator, Context, TriggerRule
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from gpu_training.hooks.results import DEFAULT_CONN_ID, ResultsDbHook


class PlanSweepOperator(BaseOperator):
    """Expands the run's ``sweep_configs`` and ``sweep_grid`` params into one job-params override
    per trial (the mapped ``trial`` group's input)."""

    ui_color = "#fff4e5"

    def execute(self, context: Context) -> list[dict[str, Any]]:
        from gpu_training.errors import JobParamsError, fail_unless_retryable
        from gpu_training.params import parse_job_params
        from gpu_training.retraining.spec import merge_job_params, sweep_trials

        params = dict(context["params"])
        try:
            trials = sweep_trials(params.get("sweep_grid") or {}, params.get("sweep_configs") or [])
        except (ValueError, TypeError) as err:
            raise AirflowFailException(f"invalid sweep: {err}") from err
        if not trials:
            raise AirflowFailException("invalid sweep: sweep_grid and sweep_configs are both empty")
        for i, trial in enumerate(trials):
            try:
                parse_job_params(merge_job_params(params, {"config": trial}))
            except JobParamsError as err:  # not retryable: the task fails without Airflow's retries
                fail_unless_retryable(err, f"invalid sweep trial {i} {trial}: {err}")
                raise
        for i, trial in enumerate(trials):
            self.log.info("trial %d: %s", i, trial)
        return [{"config": trial} for trial in trials]


class SweepReportOperator(BaseOperator):
    """Reports every trial (status, hyperparameters, metric, cost) and the best by the metric.

    Runs whatever the trials' outcome (``all_done``); fails only when no trial completed with the
    metric. Returns the report, also the task's XCom.
    """

    ui_color = "#fff4e5"

    def __init__(
        self, *, metric: str, mode: str = "max", stage: str = "trial", results_conn_id: str = DEFAULT_CONN_ID, **kw: Any
    ) -> None:
        kw.setdefault("trigger_rule", TriggerRule.ALL_DONE)
        super().__init__(**kw)
        self.metric, self.mode, self.stage, self.results_conn_id = metric, mode, stage, results_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from gpu_training.retraining.sweeps import sweep_report

        ti = context["ti"]
        store = ResultsDbHook(self.results_conn_id).get_store()
        report = sweep_report(store, ti.dag_id, ti.run_id, stage=self.stage, metric=self.metric, mode=self.mode)
        for line in report["table"]:
            self.log.info("%s", line)
        if report["best"] is None:
            raise AirflowFailException(f"no trial completed with a {self.metric}: nothing to report as best")
        best = report["best"]
        self.log.info(
            "best trial: %d (job %s) %s=%.4f with %s",
            best["map_index"],
            best["job_uuid"],
            self.metric,
            best["value"],
            best["config"],
        )
        return report


class PromoteModelOperator(BaseOperator):
    """Compares the run's model with the champion of ``model_name`` and records the decision.

    The candidate is the job of ``stage`` (a pipeline's last stage, or the single job), or the best
    trial of a sweep (``from_sweep``, from the ``report_sweep`` task). Not promoting is a success:
    the decision and its reason are in the ``models`` table either way.
    """

    ui_color = "#e6f4ea"

    def __init__(
        self,
        *,
        model_name: str,
        rule: dict[str, Any],
        stage: str = "",
        from_sweep: bool = False,
        results_conn_id: str = DEFAULT_CONN_ID,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.model_name, self.rule, self.stage = model_name, dict(rule), stage
        self.from_sweep, self.results_conn_id = from_sweep, results_conn_id

    def execute(self, context: Context) -> dict[str, Any]:
        from gpu_training.retraining.promotion import promote
        from gpu_training.retraining.spec import Promotion

        ti = context["ti"]
        store = ResultsDbHook(self.results_conn_id).get_store()
        if self.from_sweep:
            report = ti.xcom_pull(task_ids="report_sweep") or {}
            best = report.get("best")
            if not best:
                raise AirflowSkipException("the sweep has no best trial: nothing to promote")
            job_uuid = best["job_uuid"]
        else:
            job_uuid = store.job_uuid_for_run(ti.dag_id, ti.run_id, -1, stage=self.stage)
            if job_uuid is None:
                raise AirflowFailException(f"no job of stage {self.stage or '(single job)'} in run {ti.run_id}")
        decision = promote(store, self.model_name, job_uuid, Promotion(**self.rule), dag_id=ti.dag_id, run_id=ti.run_id)
        self.log.info("%s: job %s %s", self.model_name, job_uuid, decision.reason)
        return decision.as_dict()
