"""The orchestrator's ``AirflowPlugin``, registered one of two ways, never both.

- **Installed** (``pip install gpu-training-orchestrator``, or ``make install``'s editable install):
  the distribution's ``airflow.plugins`` entry point names :class:`GpuTrainingPlugin`; Airflow loads
  it with nothing in its plugins folder. The provider info lists it too (``get_provider_info.py``).
- **From the plugins folder** (a checkout whose ``plugins/`` is Airflow's plugins folder and the
  distribution not installed): ``plugins/gpu_training_plugin.py`` exposes the class. When the
  distribution is installed as well, that file exposes nothing (:func:`registered_by_entry_point`),
  since Airflow reports a second plugin of the same name as a plugin import error.

Every Airflow process (scheduler, workers, triggerer, dag-processor) imports this module, but only
the api-server reads ``fastapi_apps``: the results API app is built on that first read, so importing
the plugin stays cheap and touches no database. ``external_views`` puts the app's Training jobs page
(``/training/ui/``) in the Airflow UI's nav bar and a "Training" tab on every dag run (that run's
jobs); ``operator_extra_links`` a "Training job" button on each task of a job
(``gpu_training/links.py``). ``listeners`` turns a dag run marked failed into a cancel of its jobs,
noted on the run (``gpu_training/listener.py``).
"""

from __future__ import annotations

from importlib.metadata import distributions
from typing import Any

from airflow.plugins_manager import AirflowPlugin

from gpu_training import DISTRIBUTION, __version__, listener
from gpu_training.get_provider_info import PLUGIN_NAME
from gpu_training.links import TrainingJobLink

#: The distribution's ``airflow.plugins`` entry point (``pyproject.toml``).
ENTRY_POINT = "gpu_training.plugin:GpuTrainingPlugin"


def registered_by_entry_point() -> bool:
    """Whether the installed distribution registers :class:`GpuTrainingPlugin` through its entry
    point. Looked up by the distribution's name: scanning every installed distribution's entry points
    would cost each Airflow process ~0.1 s more."""
    return any(
        ep.group == "airflow.plugins" and ep.value == ENTRY_POINT
        for dist in distributions(name=DISTRIBUTION)
        for ep in dist.entry_points
    )


class _ResultsApiApps:
    """``fastapi_apps``, built when first read (by the api-server), then kept."""

    def __init__(self) -> None:
        self._apps: list[dict[str, Any]] | None = None

    def __get__(self, obj: object, owner: type | None = None) -> list[dict[str, Any]]:
        if self._apps is None:
            from gpu_training.api import URL_PREFIX
            from gpu_training.api.app import TITLE, create_app

            self._apps = [{"name": TITLE, "app": create_app(), "url_prefix": URL_PREFIX}]
        return self._apps


#: The Training jobs page (``gpu_training/api/ui.py``), served by the results API app and shown by
#: the Airflow UI in an iframe under "Training jobs" in the nav bar (URL ``/plugin/training-jobs``).
TRAINING_JOBS_VIEW: dict[str, Any] = {
    "name": "Training jobs",
    "href": "/training/ui/",
    "url_route": "training-jobs",
    "destination": "nav",
}

#: A "Training" tab on each dag run's page: the run's training job(s) in place. Airflow shows a
#: dag_run view on every DAG's runs; the page says when a run has no job.
TRAINING_RUN_VIEW: dict[str, Any] = {
    "name": "Training",
    "href": "/training/ui/#/runs/{DAG_ID}/{RUN_ID}",
    "url_route": "training-run",
    "destination": "dag_run",
}


class GpuTrainingPlugin(AirflowPlugin):
    """Registers the orchestrator with Airflow: the results REST API under ``/training`` and its page."""

    name = PLUGIN_NAME
    version = __version__
    fastapi_apps = _ResultsApiApps()
    external_views = [TRAINING_JOBS_VIEW, TRAINING_RUN_VIEW]
    operator_extra_links = [TrainingJobLink()]
    # A dag run marked failed (UI or REST) cancels its training jobs.
    listeners = [listener]
