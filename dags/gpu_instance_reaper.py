"""Every 5 minutes, terminate GPU instances that no live training job needs.

At every configured cloud (Lambda, RunPod, Vast.ai, EC2: those whose Airflow connection exists) the
reaper lists our instances (name prefix ``gpujob-``; others are never touched) and terminates any
whose job has ended, whose dag run is gone or finished, or that no record in the results DB claims,
once it is older than the grace period (param ``grace_minutes``, default 15). Instance records of
ended jobs that still claim a live instance are checked at the cloud and settled. ``dry_run`` only
reports. The summary is logged and returned; the run fails when a cloud or a lookup failed, after
everything else was done.

Wiring only; the logic is ``gpu_training.reaper``.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import DAG, Param

from gpu_training.reaper_operator import GpuInstanceReaperOperator

with DAG(
    dag_id="gpu_instance_reaper",
    description="Terminate GPU instances left running by ended, deleted or unknown jobs.",
    schedule="*/5 * * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    dagrun_timeout=timedelta(minutes=30),
    params={
        "dry_run": Param(False, type="boolean", description="Report what would be terminated; terminate nothing."),
        "grace_minutes": Param(
            15,
            type="number",
            minimum=0,
            description="Leave alone instances younger than this, and those of jobs that ended less long ago.",
        ),
    },
    tags=["training", "gpu", "maintenance"],
    doc_md=__doc__,
    default_args={"owner": "ml-platform", "retries": 0},
):
    GpuInstanceReaperOperator(task_id="reap_instances", execution_timeout=timedelta(minutes=25))
