"""Retrain the digits model every Monday: check the data, train on a GPU, report the model.

An example of a team's own DAG file on the ``gpu_training`` package (explained in
``docs/python-api.md``): its own params (learning rate, epochs, dataset) mapped into the job, the
rest of the job fixed here, a task before the training group and one after it that reads the
finished job from the results DB. Not shipped in ``dags/``: copy it into your DAGs folder.
"""

from __future__ import annotations

import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, TaskGroup, task
from airflow.sdk.exceptions import AirflowFailException

from gpu_training.errors import StorageError
from gpu_training.hooks.results import ResultsDbHook
from gpu_training.params import airflow_param
from gpu_training.storage import list_dataset_objects, parse_uri
from gpu_training.taskgroup import training_job_tasks

RESULTS_CONN_ID = "training_results"
#: The job's params that no trigger changes (any param of docs/params.md). To rent a GPU instead of
#: running on the worker: "provider": "cloud", "gpu": "A100", "max_price_per_hour": 2.5, and the
#: clouds' connections (docs/providers.md).
JOB = {
    "project_id": "digits-weekly",
    "provider": "local",
    "max_runtime_minutes": 60,
    "max_cost_usd": 20,
}
#: What the reference trainer writes as its model (include/trainer/train.py); your trainer's file here.
MODEL_FILE = "model_final.npz"

log = logging.getLogger(__name__)


@task
def check_dataset(dataset_uri: str | None) -> str:
    """Fail before anything is rented when the dataset is missing or empty; return the URI the job
    trains on ("" for the trainer's bundled data)."""
    if not dataset_uri:
        log.info("no dataset_uri: the job trains on the trainer's bundled data")
        return ""
    try:
        where = parse_uri(dataset_uri)
        if where.scheme == "s3":
            sizes = [o.size for o in list_dataset_objects(dataset_uri)]
        else:
            root = Path(where.path)
            files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
            sizes = [p.stat().st_size for p in files]
    except StorageError as err:
        raise AirflowFailException(str(err)) from err
    if not sum(sizes):
        raise AirflowFailException(f"dataset {dataset_uri} is missing or empty: nothing to train on")
    log.info("dataset %s: %d files, %d bytes", dataset_uri, len(sizes), sum(sizes))
    return dataset_uri


@task
def report_model(job_uuid: str) -> dict[str, Any]:
    """The finished job's last evaluation and its uploaded model, from the results DB; logged, and
    returned as this task's XCom (ids, numbers and a URI: nothing large)."""
    store = ResultsDbHook(RESULTS_CONN_ID).get_store()
    job = store.job(job_uuid)
    _, evaluation = store.latest_epoch_and_eval(job_uuid)
    model = next((a for a in store.artifacts(job_uuid) if a.name == MODEL_FILE), None)
    if evaluation is None or model is None:
        raise AirflowFailException(f"job {job_uuid} completed without an evaluation or without {MODEL_FILE}")
    report = {
        "job_uuid": job_uuid,
        "hyperparameters": job.training_config,
        "accuracy": evaluation.accuracy,
        "f1": evaluation.f1,
        "model_uri": model.uri,
        "model_sha256": model.sha256,
        "cost_usd": job.cost_usd,
    }
    log.info("model of job %s: %s", job_uuid, report)
    return report


with DAG(
    dag_id="weekly_training",
    description="Retrain the digits model every Monday and report where the model is.",
    schedule="0 3 * * 1",  # Mondays 03:00 UTC
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    params={
        "learning_rate": Param(
            0.01, type="number", exclusiveMinimum=0, maximum=1, title="Learning rate", description="Adam's step size."
        ),
        "epochs": Param(8, type="integer", minimum=1, maximum=200, title="Epochs", description="Epochs to train."),
        # One of the package's params, with its title, description and schema.
        "dataset_uri": airflow_param("dataset_uri"),
    },
    tags=["training", "example"],
    doc_md=__doc__,
    default_args={"owner": "ml-team", "retries": 0},
    # "{{ params.epochs }}" renders as the number 8, not the text "8".
    render_template_as_native_obj=True,
):
    dataset = check_dataset("{{ params.dataset_uri }}")
    with TaskGroup("train"):
        job = training_job_tasks(
            results_conn_id=RESULTS_CONN_ID,
            stage="train",  # the group's id: the Training job link finds the job by it
            job_params={
                **JOB,
                "dataset_uri": dataset,
                "config": {"learning_rate": "{{ params.learning_rate }}", "epochs": "{{ params.epochs }}"},
            },
        )
    # After finalize (it settles the job's status), not after the group: the group's leaves leave
    # out its teardown tasks. The job's uuid is register_job's return value.
    job["finalize"] >> report_model(job["register_job"].output)
