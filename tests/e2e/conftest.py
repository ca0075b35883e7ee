"""Fixtures of the end-to-end tests: a private Airflow home (metadata DB and results DB) per module.

The results DB is SQLite in the Airflow home (the embedded default, no connection) unless
``RESULTS_DB=postgresql``: then a fresh PostgreSQL database named by ``AIRFLOW_CONN_TRAINING_RESULTS``
in the environment of every ``airflow dags test``. Tests read it through ``results_url_of(env)``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import ResultsDatabases, results_connection, single_results_backend

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def airflow_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("airflow_home")
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": str(REPO / "plugins"),
        }
    )
    env.pop("AIRFLOW_CONN_TRAINING_RESULTS", None)
    databases = ResultsDatabases(home, lambda: request.getfixturevalue("postgres_results"))
    try:
        if single_results_backend() == "postgresql":
            # An empty database: the migration below runs on PostgreSQL as `make migrate` would.
            env["AIRFLOW_CONN_TRAINING_RESULTS"] = results_connection(databases.url("postgresql", migrated=False))
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env, check=True, capture_output=True)
        subprocess.run(
            [sys.executable, "-m", "gpu_training.results.migrate", "upgrade"], env=env, check=True, capture_output=True
        )
        yield env
    finally:
        databases.close()
