"""GPU training orchestrator: hooks, operators, providers and the results schema for Airflow 3.

Installed as the ``gpu-training-orchestrator`` distribution (``pip install``; ``pyproject.toml``), an
Airflow provider; in a checkout, the package also lives in Airflow's plugins folder, which every
Airflow process puts on ``sys.path``, so ``import gpu_training`` works in the scheduler, workers,
triggerer and api-server alike.
"""

__version__ = "0.1.0"
#: The distribution's name (``pyproject.toml``), as Airflow lists the provider.
DISTRIBUTION = "gpu-training-orchestrator"
