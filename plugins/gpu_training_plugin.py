"""Airflow plugin entry point of the GPU training orchestrator.

Airflow imports every ``.py`` file of the plugins folder as a top-level module, so the package
itself is listed in ``.airflowignore`` and registered from here.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from gpu_training import __version__


class GpuTrainingPlugin(AirflowPlugin):
    """Registers the orchestrator with Airflow (API and UI views are added by later releases)."""

    name = "gpu_training"
    version = __version__
