"""The orchestrator's plugin for an Airflow whose plugins folder is this ``plugins/`` directory.

Airflow imports every ``.py`` file of the plugins folder as a top-level module, so the package
itself is listed in ``.airflowignore`` and its plugin exposed from here. When the distribution is
installed too (``make install`` installs it editable), its ``airflow.plugins`` entry point registers
the same plugin and this module exposes none: Airflow would report the second ``gpu_training``
plugin as a plugin import error (``gpu_training/plugin.py``).
"""

from __future__ import annotations

from gpu_training.plugin import registered_by_entry_point

if not registered_by_entry_point():
    from gpu_training.plugin import GpuTrainingPlugin

    __all__ = ["GpuTrainingPlugin"]
