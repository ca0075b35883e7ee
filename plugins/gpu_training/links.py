"""Where a training job is shown, from Airflow: the "Training job" button on each of its tasks.

An operator extra link registered by the plugin (``operator_extra_links``): the api-server builds it
from the task instance's key alone when the task page asks (no XCom, so it is there while the task
runs, and after a retry). It opens the Training jobs page in the Airflow UI at the dag run's job
(``#/runs/<dag_id>/<run_id>?stage=&map_index=``): a pipeline stage's tasks live in the task group
named after the stage, a sweep trial is the mapped task's index.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

import attrs
from airflow.sdk import BaseOperatorLink

#: The Training jobs page inside the Airflow UI (the plugin's nav entry ``training-jobs``).
NAV_PAGE = "/plugin/training-jobs/training/ui/"


def airflow_base_url() -> str:
    """``[api] base_url`` without its trailing slash; empty (links relative to the UI) when unset."""
    from airflow.configuration import conf

    return (conf.get("api", "base_url", fallback="") or "").rstrip("/")


def run_view_url(dag_id: str, run_id: str, *, stage: str = "", map_index: int = -1) -> str:
    """The Training jobs page at the job(s) of one dag run, inside the Airflow UI."""
    query = {k: v for k, v in (("stage", stage), ("map_index", map_index if map_index >= 0 else "")) if v != ""}
    fragment = f"#/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"
    return f"{airflow_base_url()}{NAV_PAGE}{fragment}" + (f"?{urlencode(query)}" if query else "")


def stage_of(task_id: str) -> str:
    """The stage a job's task belongs to: its task group (``sft.provision`` -> ``sft``); "" for a
    single job's tasks."""
    return task_id.rpartition(".")[0]


@attrs.define
class TrainingJobLink(BaseOperatorLink):
    """ "Training job" on every task of a training job: its page in the Training jobs view."""

    name = "Training job"

    @property
    def operators(self) -> list[type[Any]]:  # type: ignore[override]
        # Read only where links are resolved (the api-server): importing the operators there, not
        # wherever the plugin is loaded, keeps the plugin's import cheap for the other components.
        from gpu_training.operators import RegisterTrainingJobOperator, TrainingJobStepOperator

        found: list[type[Any]] = [RegisterTrainingJobOperator]
        todo = list(TrainingJobStepOperator.__subclasses__())
        while todo:
            cls = todo.pop()
            found.append(cls)
            todo.extend(cls.__subclasses__())
        return found

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        map_index = getattr(ti_key, "map_index", -1)
        return run_view_url(
            ti_key.dag_id,
            ti_key.run_id,
            stage=stage_of(ti_key.task_id),
            map_index=-1 if map_index is None else map_index,
        )
