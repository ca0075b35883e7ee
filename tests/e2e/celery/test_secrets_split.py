"""The Airflow secrets split as docker-compose.yaml ships them, on the package's ``make cluster``
deployment: each component holds only the secrets it uses (``COMPONENT_SECRETS``: the Fernet key
for the api-server, the triggerer and init; the JWT secret for the scheduler and the api-server; the
API secret key for the api-server, the workers and the triggerer; the dag-processor none), and a
``gpu_training`` job on the fake Lambda cloud runs end to end on it with every connection in the
metadata DB, encrypted: its tasks read the cloud's API key and the SSH key through the api-server,
its ``sense_progress`` trigger reads the SSH and results connections in the triggerer. The live log
of the deferred ``sense_progress`` comes from the triggerer's log server and that of the running
``teardown`` from its worker's, both through the REST API, and so do the finished logs. Signing in
(REST and Chromium) on the same deployment: ``test_fresh_deployment.py``. Which secret each
component needs, and what breaks without it: ``secrets_matrix.py``, docs/security.md "Secrets".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import create_engine, select, text

from gpu_training.results.models import EpochTrain, Instance, TrainingJob
from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AIRFLOW_SECRETS, COMPONENT_SECRETS, FERNET_KEY, AirflowCluster

from .conftest import LambdaJob, lambda_job_or_skip

pytestmark = pytest.mark.e2e

DAG_ID = "gpu_training"
#: What the api-server's log reader says among a log's sources when a log server refused its
#: request (a log server without the api-server's ``[api] secret_key``).
REFUSED = "!!!! Please make sure"


def proc_environ(pid: int) -> dict[str, str]:
    """A process's environment as the kernel shows it: empty where the process renamed itself (the
    api-server and the Celery workers set a title over the memory that held it)."""
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode(errors="replace").split("=", 1) for item in items if b"=" in item)


def test_each_component_holds_only_the_secrets_it_uses(cluster: AirflowCluster) -> None:
    assert cluster.component_secrets == COMPONENT_SECRETS
    shown = 0
    for name in cluster.components:
        wanted = COMPONENT_SECRETS[cluster.role(name)]
        started = cluster.started_env[name]
        assert {var for var in AIRFLOW_SECRETS if var in started} == wanted, name
        assert all(started[var] == cluster.env[var] for var in wanted), f"{name}: the deployment's values"
        kernel = proc_environ(cluster.pid(name))
        if kernel:  # the kernel's copy says the same where the process left it readable
            shown += 1
            assert {var: kernel[var] for var in AIRFLOW_SECRETS if var in kernel} == {v: started[v] for v in wanted}
    assert shown >= 3, "scheduler, dag-processor and triggerer keep /proc/PID/environ readable"


def test_connections_in_the_metadata_db_are_encrypted(cluster: AirflowCluster, lambda_job: Any) -> None:
    job = lambda_job_or_skip(lambda_job)
    engine = create_engine(cluster.sql_alchemy_conn)
    try:
        with engine.connect() as conn:
            query = text("SELECT conn_id, password, is_encrypted, extra, is_extra_encrypted FROM connection")
            rows = {row.conn_id: row for row in conn.execute(query)}
    finally:
        engine.dispose()
    fernet = Fernet(cluster.env[FERNET_KEY].encode())
    # Stored by init (the deployment's own) and by the fixture, as airflow-init does.
    for conn_id in ("training_results", "aws_default", *job.connections):
        row = rows[conn_id]
        assert row.is_extra_encrypted and row.extra and "{" not in row.extra, conn_id
        assert json.loads(fernet.decrypt(row.extra.encode())), conn_id
    api_key = json.loads(job.connections["lambda_default"])["password"]
    row = rows["lambda_default"]
    assert row.is_encrypted and api_key not in row.password
    assert fernet.decrypt(row.password.encode()).decode() == api_key


def live_log(cluster: AirflowCluster, run_id: str, task_id: str) -> tuple[list[str], str]:
    """(sources, text) of a task's log as the UI reads it now: where the api-server read it from
    (the "Log message source details" group), and the lines."""
    sources, lines, inside = [], [], False
    for entry in cluster.task_log_entries(DAG_ID, run_id, task_id):
        event = str(entry.get("event", "")) if isinstance(entry, dict) else str(entry)
        if event == "::group::Log message source details":
            inside = True
        elif event == "::endgroup::":
            inside = False
        elif inside:
            sources.append(event)
        else:
            lines.append(event)
    return sources, "\n".join(lines)


def test_a_job_reading_them_runs_end_to_end_with_live_and_finished_logs(
    cluster: AirflowCluster, lambda_job: Any, store: ResultsStore
) -> None:
    job: LambdaJob = lambda_job_or_skip(lambda_job)
    run_id = job.run_id
    # The trainer waits after epoch 1: the trigger follows it in the triggerer, which read the SSH
    # and results connections from the metadata DB with its Fernet key.
    cluster.wait_task_state(DAG_ID, run_id, "sense_progress", {"deferred"}, timeout=300)
    trigger_server = f":{cluster.env['AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT']}/log/"

    def trigger_log() -> tuple[list[str], str] | None:
        sources, lines = live_log(cluster, run_id, "sense_progress")
        return (sources, lines) if "[trainer] epoch 1 done" in lines else None

    sources, lines = cluster.wait_until("the trigger to log epoch 1", trigger_log, 120, components=["triggerer"])
    assert not any(REFUSED in s for s in sources), sources
    assert any(s.startswith("http://") and trigger_server in s for s in sources), (
        f"the deferred task's live log does not come from the triggerer's log server: {sources}"
    )
    assert "following outputs/global.json" in lines

    job.release.touch()
    cluster.wait_task_state(DAG_ID, run_id, "teardown", {"running"}, timeout=180)
    ti = cluster.task_instance(DAG_ID, run_id, "teardown")
    worker_server = f"http://127.0.0.1:{cluster.worker_log_ports[ti['hostname']]}/log/"

    def teardown_log() -> tuple[list[str], str] | None:
        sources, lines = live_log(cluster, run_id, "teardown")
        return (sources, lines) if any(s.startswith("http://") for s in sources) else None

    sources, lines = cluster.wait_until("teardown's log from its worker", teardown_log, 60, components=[ti["hostname"]])
    assert not any(REFUSED in s for s in sources), sources
    assert any(s.startswith(worker_server) for s in sources), (
        f"the running task's live log does not come from {ti['hostname']}'s log server: {sources}"
    )
    job.rig.fake.faults.terminate_seconds = 0.0  # the cloud finishes terminating: teardown ends

    assert cluster.wait_run(DAG_ID, run_id, timeout=240) == "success", cluster.task_states(DAG_ID, run_id)
    for ti in cluster.task_instances(DAG_ID, run_id):
        sources, lines = live_log(cluster, run_id, ti["task_id"])
        assert ti["state"] == "success", ti
        assert sources and not any(REFUSED in s for s in sources), (ti["task_id"], sources)
        assert lines.strip(), f"{ti['task_id']}: empty log"
    _, lines = live_log(cluster, run_id, "sense_progress")
    assert "[trainer] epoch 3 done" in lines
    with store.session() as s:
        record = s.scalars(select(TrainingJob).where(TrainingJob.dag_id == DAG_ID, TrainingJob.run_id == run_id)).one()
        epochs = sorted(s.scalars(select(EpochTrain.epoch).where(EpochTrain.job_id == record.id)))
        instances = list(s.scalars(select(Instance.state).where(Instance.job_id == record.id)))
        assert (record.status, epochs, instances) == ("completed", [1, 2, 3], ["terminated"])
