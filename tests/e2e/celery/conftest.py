"""One ``make cluster`` deployment for the package, started by the function the Makefile's entry
point calls (``tests/airflow_cluster.py`` :func:`start_make_cluster`) on a free port: PostgreSQL for
Airflow's metadata and the results DB, Redis, moto's S3 server, two ``airflow celery worker``
processes, api-server, scheduler, dag-processor and triggerer, sign-in required (user ``admin``, the
password it printed; the harness's own calls carry that user's token); about 30 s to start. As
docker-compose.yaml ships it, each component holds only the Airflow secrets it uses and the
connections are stored in the metadata DB, encrypted (``COMPONENT_SECRETS``, docs/security.md).

With root (the test sshd), the fake Lambda cloud's connections are stored there too, by the same
init step, and :func:`lambda_job` (``test_secrets_split.py``) is a job on it: the first module's
batch starts it, so that it runs beside the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster, CeleryDeployment, ClusterError, start_make_cluster
from tests.fakeclouds.rigs import STARTERS, Rig
from tests.servers import free_port

REPO = Path(__file__).resolve().parents[3]
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"


@dataclasses.dataclass
class MakeCluster:
    deployment: CeleryDeployment
    #: What it printed once up (the URL, the login, the token call), as `make cluster` shows it.
    printed: str


@pytest.fixture(scope="package")
def lambda_cloud(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig | None]:
    """The fake Lambda cloud, its instances boxes of the test sshd; None without root (no sshd)."""
    try:
        sshd = request.getfixturevalue("sshd_server")
    except pytest.skip.Exception:
        yield None
        return
    rig = STARTERS["lambda"](sshd, tmp_path_factory.mktemp("celery-lambda-boxes"))
    rig.fake.faults.terminate_seconds = 600.0  # until test_secrets_split has seen teardown's live log
    yield rig
    rig.stop()


def cloud_connections(rig: Rig | None) -> dict[str, str]:
    """conn_id -> connection (JSON) of the fake cloud: ``lambda_default`` (its API key as the
    password) and the SSH ones (the instances' key in the extra)."""
    return {} if rig is None else {key.removeprefix("AIRFLOW_CONN_").lower(): v for key, v in rig.env.items()}


@pytest.fixture(scope="package")
def make_cluster(tmp_path_factory: pytest.TempPathFactory, lambda_cloud: Rig | None) -> Iterator[MakeCluster]:
    out = io.StringIO()
    home = tmp_path_factory.mktemp("celery")
    # The cloud's connections go into the metadata DB with the deployment's own, by init (one step).
    dep = start_make_cluster(
        home,
        port=free_port(),
        workers=2,
        out=out,
        worker_concurrency=8,
        parallelism=32,
        db_connections=cloud_connections(lambda_cloud),
    )
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


@dataclasses.dataclass
class LambdaJob:
    """A ``gpu_training`` run on the fake Lambda cloud whose trainer waits after epoch 1 until
    ``release`` exists, and whose instance the cloud terminates only once ``rig.fake.faults.
    terminate_seconds`` is lowered: the test sees ``sense_progress`` deferred and ``teardown``
    running for as long as it needs."""

    rig: Rig
    run_id: str
    release: Path
    #: conn_id -> the cloud's connections (JSON), stored in the metadata DB by init.
    connections: dict[str, str]


@pytest.fixture(scope="package")
def lambda_job(
    deployment: CeleryDeployment, lambda_cloud: Rig | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LambdaJob | None]:
    """The job on the fake Lambda, triggered; None without root (the tests that need it skip)."""
    if lambda_cloud is None:
        yield None
        return
    cluster = deployment.airflow
    release = tmp_path_factory.mktemp("celery-lambda-job") / "release"
    run_id = cluster.trigger(
        "gpu_training",
        {
            "project_id": "celery-split-secrets",
            "provider": "lambda",
            "gpu": lambda_cloud.gpu,
            "command": ["{python}", str(SCRIPTED), "gate", "3", str(release), "0.2"],
            "poll_interval_seconds": 1,
        },
    )
    yield LambdaJob(lambda_cloud, run_id, release, cloud_connections(lambda_cloud))
    release.touch()  # whatever the tests did: the run ends before the deployment stops
    lambda_cloud.fake.faults.terminate_seconds = 0.0
    with contextlib.suppress(ClusterError):
        cluster.wait_run("gpu_training", run_id, timeout=120)


def lambda_job_or_skip(job: Any) -> LambdaJob:
    if job is None:
        pytest.skip("the fake Lambda's instances are the test sshd, which needs root")
    assert isinstance(job, LambdaJob)
    return job
