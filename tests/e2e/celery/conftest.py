"""One CeleryExecutor deployment for the package (``tests/airflow_cluster.py`` ``CeleryDeployment``):
PostgreSQL for Airflow's metadata and the results DB, Redis, moto's S3 server, two ``airflow celery
worker`` processes, api-server, scheduler, dag-processor and triggerer; about 30 s to start."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster, CeleryDeployment


@pytest.fixture(scope="package")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CeleryDeployment]:
    with CeleryDeployment(tmp_path_factory.mktemp("celery"), workers=2, worker_concurrency=8, parallelism=32) as dep:
        dep.airflow.wait_dag_parsed("gpu_training", timeout=120)
        yield dep


@pytest.fixture(scope="package")
def cluster(deployment: CeleryDeployment) -> AirflowCluster:
    return deployment.airflow


@pytest.fixture(scope="package")
def store(cluster: AirflowCluster) -> Iterator[ResultsStore]:
    results = cluster.results_store()
    yield results
    results.engine.dispose()
