"""One ``make cluster`` deployment for the package, started by the function the Makefile's entry
point calls (``tests/airflow_cluster.py`` :func:`start_make_cluster`) on a free port: PostgreSQL for
Airflow's metadata and the results DB, Redis, moto's S3 server, two ``airflow celery worker``
processes, api-server, scheduler, dag-processor and triggerer, sign-in required (user ``admin``, the
password it printed; the harness's own calls carry that user's token); about 30 s to start."""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster, CeleryDeployment, start_make_cluster
from tests.servers import free_port


@dataclasses.dataclass
class MakeCluster:
    deployment: CeleryDeployment
    #: What it printed once up (the URL, the login, the token call), as `make cluster` shows it.
    printed: str


@pytest.fixture(scope="package")
def make_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MakeCluster]:
    out = io.StringIO()
    home = tmp_path_factory.mktemp("celery")
    dep = start_make_cluster(home, port=free_port(), workers=2, out=out, worker_concurrency=8, parallelism=32)
    try:
        yield MakeCluster(dep, out.getvalue())
    finally:
        dep.stop()


@pytest.fixture(scope="package")
def deployment(make_cluster: MakeCluster) -> CeleryDeployment:
    return make_cluster.deployment


@pytest.fixture(scope="package")
def cluster(deployment: CeleryDeployment) -> AirflowCluster:
    return deployment.airflow


@pytest.fixture(scope="package")
def store(cluster: AirflowCluster) -> Iterator[ResultsStore]:
    results = cluster.results_store()
    yield results
    results.engine.dispose()
