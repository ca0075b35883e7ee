"""Build one DAG per retraining spec, wiring the same task group as ``gpu_training``.

Shapes (see :mod:`gpu_training.retraining.spec`):

- a single job: ``register_job >> ... >> finalize`` then ``promote`` when the spec has a rule;
- a pipeline: one task group per stage, a stage's ``register_job`` after the ``finalize`` of every
  stage it depends on (fan-out and fan-in are plain Airflow dependencies), each stage starting from
  the checkpoint of the stage named by ``init_from``;
- a sweep: ``plan_sweep`` expands the grid (from the run's params, so a trigger can change it) into
  a mapped task group ``trial`` of concurrent jobs whose instance-holding steps share the pool
  ``gpu_instances``; ``report_sweep`` names the best trial, ``promote`` compares it with the champion.

Every DAG has ``max_active_runs=1`` (a spec's runs never overlap) and ``catchup=False`` unless the
spec asks for it. Every DAG is **paused when first created** (``is_paused_upon_creation=True``,
whatever ``[core] dags_are_paused_at_creation`` says): a spec launches GPU jobs on its schedule, so
nothing runs until someone unpauses its DAG (UI toggle, or ``PATCH /api/v2/dags/{dag_id}``
``{"is_paused": false}``); Airflow keeps that choice across restarts and re-parses. The repo's
example specs thus start nothing in a fresh deployment. Building is cheap: no I/O beyond reading the
spec files.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from gpu_training.retraining.spec import RetrainingSpec, load_specs

OWNER = "ml-platform"


def _dag_params(spec: RetrainingSpec) -> dict[str, Any]:
    from airflow.sdk import Param

    from gpu_training.params import airflow_param, airflow_params

    params = airflow_params()
    for name, value in spec.params.items():
        params[name] = airflow_param(name, value)
    if spec.sweep is not None:
        params["sweep_grid"] = Param(
            dict(spec.sweep.grid),
            type="object",
            title="Sweep grid",
            description="Hyperparameter name -> list of values; every combination is one trial.",
            section="Sweep",
        )
        params["sweep_configs"] = Param(
            [dict(c) for c in spec.sweep.configs],
            type="array",
            items={"type": "object"},
            title="Sweep configs",
            description="Hyperparameter sets tried as they are, before the grid's combinations.",
            section="Sweep",
        )
        for name, value in (("run_budget_usd", spec.sweep.budget_usd), ("run_max_instances", spec.sweep.max_parallel)):
            params[name] = airflow_param(name, spec.params.get(name, value))
    return params


def _schedule(spec: RetrainingSpec) -> Any:
    if spec.asset_uri:
        from airflow.sdk import Asset

        return [Asset(spec.asset_uri)]
    return spec.schedule


def build_dag(spec: RetrainingSpec, *, results_conn_id: str = "training_results") -> Any:
    from airflow.sdk import DAG

    from gpu_training.retraining.operators import PromoteModelOperator
    from gpu_training.taskgroup import training_job_tasks

    doc = f"Retraining spec `{spec.path}`.\n\n{spec.description}".strip()
    with DAG(
        dag_id=spec.dag_id,
        description=(spec.description or f"Retraining {spec.name}")[:200],
        schedule=_schedule(spec),
        start_date=datetime.fromisoformat(spec.start_date[:10]),
        catchup=spec.catchup,
        max_active_runs=1,
        is_paused_upon_creation=True,
        params=_dag_params(spec),
        tags=["training", "retraining", *spec.tags],
        doc_md=doc,
        default_args={"owner": OWNER, "retries": 0},
        render_template_as_native_obj=True,
    ) as dag:
        promote = None
        if spec.promotion is not None:
            promote = PromoteModelOperator(
                task_id="promote",
                model_name=spec.name,
                rule=spec.promotion.as_dict(),
                stage=spec.promotion.stage if not spec.sweep else "trial",
                from_sweep=spec.sweep is not None,
                results_conn_id=results_conn_id,
            )
        if spec.stages:
            _pipeline(spec, results_conn_id, promote)
        elif spec.sweep is not None:
            _sweep(spec, results_conn_id, promote)
        else:
            tasks = training_job_tasks(results_conn_id=results_conn_id)
            if promote is not None:
                tasks["finalize"] >> promote
    return dag


def _pipeline(spec: RetrainingSpec, results_conn_id: str, promote: Any) -> None:
    from airflow.sdk import TaskGroup

    from gpu_training.taskgroup import training_job_tasks

    groups: dict[str, dict[str, Any]] = {}
    for stage in spec.stages:
        with TaskGroup(group_id=stage.name, tooltip=f"stage {stage.name}"):
            groups[stage.name] = training_job_tasks(
                results_conn_id=results_conn_id,
                stage=stage.name,
                job_params=dict(stage.params) or None,
                init_from=(stage.init_from, stage.checkpoint) if stage.init_from else None,
            )
        for dep in stage.depends_on:
            groups[dep]["finalize"] >> groups[stage.name]["register_job"]
    if promote is not None:
        groups[spec.promotion.stage]["finalize"] >> promote  # type: ignore[union-attr]


def _sweep(spec: RetrainingSpec, results_conn_id: str, promote: Any) -> None:
    from airflow.sdk import task_group

    from gpu_training.retraining.operators import PlanSweepOperator, SweepReportOperator
    from gpu_training.taskgroup import training_job_tasks

    sweep = spec.sweep
    assert sweep is not None
    plan = PlanSweepOperator(task_id="plan_sweep")

    @task_group(group_id="trial")
    def trial(job_params: Any) -> Any:
        tasks = training_job_tasks(
            results_conn_id=results_conn_id, stage="trial", job_params=job_params, pool=sweep.pool
        )
        # Returned, so the report waits for every trial's finalize (status and cost settled): the
        # group's own leaves leave teardowns out, which would make it wait for upload_outputs only.
        return tasks["finalize"]

    finalized = trial.expand(job_params=plan.output)
    report = SweepReportOperator(
        task_id="report_sweep", metric=sweep.metric, mode=sweep.mode, stage="trial", results_conn_id=results_conn_id
    )
    finalized >> report
    if promote is not None:
        report >> promote


def build_dags(directory: Any = None) -> dict[str, Any]:
    """Every spec's DAG by dag id; one clear error for bad specs (see :func:`load_specs`)."""
    return {spec.dag_id: build_dag(spec) for spec in load_specs(directory)}
