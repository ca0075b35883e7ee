"""One Airflow deployment for every test of this package (api-server, scheduler, dag-processor and
triggerer as separate processes, ``tests/airflow_cluster.py``), started once and stopped after the
package's last test: starting one costs ~40 s on 2 cores.

It has real users (``USERS``) and the fake Lambda cloud's connection (with SSH to the test sshd),
so jobs can run on the local provider or on a rented instance. Tests that kill components restart
them before they end.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster
from tests.fakeclouds.rigs import STARTERS, Rig
from tests.servers import single_results_backend

from . import DAG_ID, TOKEN_HOOK_URL, USERS


@pytest.fixture(scope="package")
def cloud(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = STARTERS["lambda"](sshd_server, tmp_path_factory.mktemp("cluster-lambda-boxes"))
    yield rig
    rig.stop()


@pytest.fixture(scope="package")
def retraining_dir(tmp_path_factory: pytest.TempPathFactory, cloud: Rig) -> Path:
    """The deployment's retraining specs (``test_retraining_cluster.py``), written before it starts."""
    from .test_retraining_cluster import write_specs

    directory = tmp_path_factory.mktemp("retraining")
    write_specs(directory, cloud)
    return directory


@pytest.fixture(scope="package")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, cloud: Rig, retraining_dir: Path, request: pytest.FixtureRequest
) -> Iterator[AirflowCluster]:
    env = {
        **cloud.env,
        "GPU_TRAINING_RETRAINING_DIR": str(retraining_dir),
        # New data arrives as file:// under incoming/ (test_retraining_cluster.py): the deployment's policy.
        "AIRFLOW__GPU_TRAINING__ALLOWED_FILE_ROOTS": str(retraining_dir / "incoming"),
        # A webhook whose URL holds its token and answers nothing (test_airflow_views.py).
        "AIRFLOW_CONN_TOKEN_HOOK": json.dumps({"conn_type": "http", "host": TOKEN_HOOK_URL, "extra": {"timeout": 2}}),
    }
    # The results DB: SQLite in the deployment's home, or with RESULTS_DB=postgresql a PostgreSQL
    # database (empty: the deployment's own migration step creates the schema).
    results_url = None
    if single_results_backend() == "postgresql":
        results_url = request.getfixturevalue("postgres_results").fresh_database(migrated=False)
    airflow = AirflowCluster(
        tmp_path_factory.mktemp("airflow_cluster"), parallelism=8, users=USERS, extra_env=env, results_url=results_url
    )
    try:
        seconds = airflow.start()
        print(f"\ncluster started in {seconds:.1f} s")
        airflow.wait_dag_parsed(DAG_ID, timeout=120)
        yield airflow
    finally:
        airflow.stop()


@pytest.fixture(scope="package")
def store(cluster: AirflowCluster) -> Iterator[ResultsStore]:
    results = cluster.results_store()
    yield results
    results.engine.dispose()
