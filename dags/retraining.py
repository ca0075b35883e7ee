"""Retraining without anyone clicking: one Airflow DAG per spec in ``include/retraining/*.yaml``.

Wiring only: :mod:`gpu_training.retraining` parses the specs (cheap: a few small YAML files) and
builds each DAG on the same task group as ``gpu_training``. A bad spec is one import error naming
the file and the field. ``GPU_TRAINING_RETRAINING_DIR`` points at another spec directory.
"""

from __future__ import annotations

from gpu_training.retraining.dags import build_dags

globals().update(build_dags())
