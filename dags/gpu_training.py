"""One training job per run: provision a GPU, train, sense global.json, upload, always tear down.

Wiring only; the steps live in the ``gpu_training`` plugin package.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG

from gpu_training.params import airflow_params
from gpu_training.taskgroup import training_job_tasks

with DAG(
    dag_id="gpu_training",
    description="Train a model on a rented GPU (or locally) and store every metric.",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    params=airflow_params(),
    tags=["training", "gpu"],
    doc_md=__doc__,
    max_active_runs=64,
    default_args={"owner": "ml-platform", "retries": 0},
    render_template_as_native_obj=True,
):
    training_job_tasks()
