"""The chain of tasks of one training job, built in the current DAG (or task group).

``dags/gpu_training.py`` wires it as the whole DAG; retraining, pipelines and sweeps reuse it, so
the job logic exists once.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import TriggerRule

from gpu_training.operators import (
    BuildJobConfigOperator,
    FinalizeJobOperator,
    GlobalJsonSensor,
    ProvisionInstanceOperator,
    RegisterTrainingJobOperator,
    StartTrainerOperator,
    TeardownInstanceOperator,
    TransferInputsOperator,
    UploadOutputsOperator,
    WaitForInstanceOperator,
)

RETRY_DELAY = timedelta(seconds=10)

# Task ids are part of the contract (tests, the UI, the API read task states by them).
STEP_TASK_IDS = (
    "register_job",
    "build_config",
    "provision",
    "wait_until_ready",
    "transfer_inputs",
    "start_trainer",
    "sense_progress",
    "upload_outputs",
    "teardown",
    "finalize",
)


#: Steps that hold an instance, in order: with a pool they take one slot each, later steps with a
#: higher priority, so a job that holds an instance gets the slot it frees before a new job can
#: launch. Teardown never waits for a slot.
INSTANCE_STEPS = STEP_TASK_IDS[STEP_TASK_IDS.index("provision") : STEP_TASK_IDS.index("teardown")]


def training_job_tasks(
    *,
    results_conn_id: str = "training_results",
    stage: str = "",
    job_params: Any = None,
    init_from: tuple[str, str] | None = None,
    pool: str | None = None,
) -> dict[str, Any]:
    """Create the job's tasks in the current DAG context (or task group) and wire them; returns
    them by step id (without the group's prefix).

    ``provision`` is the setup and ``teardown`` its teardown. Teardown runs when anything before
    it failed, and also when provisioning itself failed (its trigger rule is widened to
    ``all_done``), because a launch can fail after the cloud created the instance.

    ``stage`` names the job in its run (a pipeline stage); ``job_params`` go over the run's params
    (a dict, or a mapped task group's argument); ``init_from`` is ``(stage, checkpoint path)`` of an
    earlier stage whose model this job starts from; ``pool`` (e.g. ``gpu_instances``, with
    ``include_deferred``) limits how many jobs hold an instance at once.
    """
    # Every step is idempotent and keeps its state in the results DB, so a retry is always safe; a
    # short delay matters for the two that defer: on a loaded scheduler Airflow 3.3.2 can fail a
    # task just resumed from a deferral when the executor's late "success" of the deferring try
    # arrives after the task was queued again (seen by bench/soak.py). A retry picks it up.
    common: dict[str, Any] = {"results_conn_id": results_conn_id, "retry_delay": RETRY_DELAY, "stage": stage}

    def slot(step: str) -> dict[str, Any]:
        if not pool:
            return {}
        return {"pool": pool, "priority_weight": 10 + INSTANCE_STEPS.index(step), "weight_rule": "absolute"}

    register = RegisterTrainingJobOperator(task_id="register_job", job_params=job_params, init_from=init_from, **common)
    build = BuildJobConfigOperator(task_id="build_config", **common)
    provision = ProvisionInstanceOperator(task_id="provision", retries=2, **slot("provision"), **common)
    wait = WaitForInstanceOperator(task_id="wait_until_ready", retries=2, **slot("wait_until_ready"), **common)
    transfer = TransferInputsOperator(task_id="transfer_inputs", retries=2, **slot("transfer_inputs"), **common)
    start = StartTrainerOperator(task_id="start_trainer", retries=1, **slot("start_trainer"), **common)
    sense = GlobalJsonSensor(task_id="sense_progress", retries=2, **slot("sense_progress"), **common)
    upload = UploadOutputsOperator(
        task_id="upload_outputs", retries=2, trigger_rule=TriggerRule.ALL_DONE, **slot("upload_outputs"), **common
    )
    # Teardown outranks every step of every job (it frees money), and never waits for a pool slot.
    first: dict[str, Any] = {"priority_weight": 100, "weight_rule": "absolute"} if pool else {}
    teardown = TeardownInstanceOperator(task_id="teardown", retries=3, **first, **common)
    steps = (register, build, provision, wait, transfer, start, sense, upload, teardown)
    finalize = FinalizeJobOperator(task_id="finalize", watched_task_ids=[t.task_id for t in steps], **common)

    register >> build >> provision >> wait >> transfer >> start >> sense >> upload >> teardown >> finalize
    teardown.as_teardown(setups=provision)
    teardown.trigger_rule = TriggerRule.ALL_DONE
    # finalize is a teardown too: it must run when the run is marked failed (a cancel), when
    # Airflow skips every ordinary task that has not run yet.
    finalize.as_teardown(setups=provision, on_failure_fail_dagrun=True)
    finalize.trigger_rule = TriggerRule.ALL_DONE
    return dict(zip(STEP_TASK_IDS, (*steps, finalize), strict=True))
