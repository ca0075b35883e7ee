"""GPU training orchestrator: hooks, operators, providers and the results schema for Airflow 3.

The package lives in Airflow's plugins folder, which every Airflow process puts on ``sys.path``,
so ``import gpu_training`` works in the scheduler, workers, triggerer and api-server alike.
"""

__version__ = "0.1.0"
