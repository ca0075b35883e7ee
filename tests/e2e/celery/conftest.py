"""One ``make cluster`` deployment for the package, started by the function the Makefile's entry
point calls (``tests/airflow_cluster.py`` :func:`start_make_cluster`) on a free port: PostgreSQL for
Airflow's metadata and the results DB, Redis, moto's S3 server, two ``airflow celery worker``
processes, api-server, scheduler, dag-processor and triggerer, sign-in required (user ``admin``, the
password it printed; the harness's own calls carry that user's token); about 30 s to start. As
docker-compose.yaml ships it, each component holds only the Airflow secrets it uses and the
connections are stored in the metadata DB, encrypted (``COMPONENT_SECRETS``, docs/security.md).

:func:`lambda_job` (``test_secrets_split.py``) is a job on the fake Lambda cloud whose connections
are stored there too; the first module's batch starts it, so that it runs beside the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
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


@dataclasses.dataclass
class LambdaJob:
    """A ``gpu_training`` run on the fake Lambda cloud whose trainer waits after epoch 1 until
    ``release`` exists, and whose instance the cloud terminates only once ``rig.fake.faults.
    terminate_seconds`` is lowered: the test sees ``sense_progress`` deferred and ``teardown``
    running for as long as it needs."""

    rig: Rig
    run_id: str
    release: Path
    #: conn_id -> the connection (JSON) stored in the metadata DB by init's environment.
    connections: dict[str, str]


@pytest.fixture(scope="package")
def lambda_job(
    deployment: CeleryDeployment, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LambdaJob | None]:
    """The fake Lambda's ``lambda_default`` (its API key as the password) and the SSH connections
    (the instances' key in the extra) stored in the metadata DB as docker-compose.yaml's airflow-init
    stores connections: ``airflow connections ...`` with init's environment (the Fernet key only).
    None where the test sshd cannot run (not root): the tests that need it skip."""
    try:
        sshd = request.getfixturevalue("sshd_server")
    except pytest.skip.Exception:
        yield None
        return
    cluster = deployment.airflow
    work = tmp_path_factory.mktemp("celery-lambda")
    rig = STARTERS["lambda"](sshd, work / "boxes")
    rig.fake.faults.terminate_seconds = 600.0  # until the test has seen teardown's live log
    try:
        connections = {key.removeprefix("AIRFLOW_CONN_").lower(): value for key, value in rig.env.items()}
        # The cloud's as the README has it added in a compose container; the SSH ones in one go.
        cloud = json.loads(connections["lambda_default"])
        cluster.airflow_cli(
            *("connections", "add", "lambda_default", "--conn-type", cloud["conn_type"]),
            *("--conn-host", cloud["host"], "--conn-password", cloud["password"]),
            *("--conn-extra", json.dumps(cloud["extra"])),
            component="init",
        )
        path = work / "connections.json"
        ssh = {conn_id: json.loads(value) for conn_id, value in connections.items() if conn_id != "lambda_default"}
        path.write_text(json.dumps(ssh))
        path.chmod(0o600)
        cluster.airflow_cli("connections", "import", str(path), component="init")
        path.unlink()
        release = work / "release"
        run_id = cluster.trigger(
            "gpu_training",
            {
                "project_id": "celery-split-secrets",
                "provider": "lambda",
                "gpu": rig.gpu,
                "command": ["{python}", str(SCRIPTED), "gate", "3", str(release), "0.2"],
                "poll_interval_seconds": 1,
            },
        )
        yield LambdaJob(rig, run_id, release, connections)
        release.touch()  # whatever the tests did: let the run end before the rig goes
        rig.fake.faults.terminate_seconds = 0.0
        with contextlib.suppress(ClusterError):
            cluster.wait_run("gpu_training", run_id, timeout=120)
    finally:
        rig.stop()


def lambda_job_or_skip(job: Any) -> LambdaJob:
    if job is None:
        pytest.skip("the fake Lambda's instances are the test sshd, which needs root")
    assert isinstance(job, LambdaJob)
    return job
