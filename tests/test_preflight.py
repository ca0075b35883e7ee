"""Refused before anything exists: a job whose connections are missing (``gpu_training.preflight``).

Real Airflow connection lookups (``AIRFLOW_CONN_*`` environment variables, as a deployment's
secrets backend would give them) and a real results DB: a refused job has no row and no instance.
"""

from __future__ import annotations

import json

import pytest
from sqlalchemy import func, select

from gpu_training import lifecycle
from gpu_training.errors import JobParamsError
from gpu_training.results.models import Instance, TrainingJob
from gpu_training.results.store import ResultsStore

SSH_KEY = json.dumps({"conn_type": "ssh", "login": "ubuntu", "extra": {"private_key": "not-a-real-key"}})
API_KEY = json.dumps({"conn_type": "http", "password": "secret-api-key"})


def register(store: ResultsStore, **params: object) -> str:
    return lifecycle.register_job(store, {"project_id": "p", **params}, dag_id="gpu_training", run_id="r1")


def rows(store: ResultsStore) -> tuple[int, int]:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(TrainingJob)), s.scalar(
            select(func.count()).select_from(Instance)
        )


@pytest.fixture(autouse=True)
def no_connections(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in list(os.environ):
        if key.startswith("AIRFLOW_CONN_") and key != "AIRFLOW_CONN_TRAINING_RESULTS":
            monkeypatch.delenv(key)


def test_a_cloud_without_its_connection_is_refused_saying_how_to_add_it(store: ResultsStore) -> None:
    with pytest.raises(JobParamsError) as info:
        register(store, provider="lambda")
    assert info.value.param == "provider"
    assert str(info.value) == (
        "invalid param 'provider' (Provider): provider 'lambda' (the Lambda Cloud API key) needs the Airflow "
        "connection 'lambda_default', which is not defined here: add it under Admin > Connections, or "
        "`airflow connections add lambda_default --conn-type lambda_cloud --conn-password <API key>`"
    )
    assert rows(store) == (0, 0)


def test_a_clouds_ssh_key_connection_is_checked_too(store: ResultsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_RUNPOD_DEFAULT",
        json.dumps({"conn_type": "http", "password": "k", "extra": {"ssh_conn_id": "team_key"}}),
    )
    with pytest.raises(JobParamsError, match="connection 'team_key', which is not defined here") as info:
        register(store, provider="runpod")
    assert "extra ssh_conn_id of 'runpod_default'" in str(info.value)
    monkeypatch.setenv("AIRFLOW_CONN_TEAM_KEY", SSH_KEY)
    assert register(store, provider="runpod")
    assert rows(store) == (1, 0)


@pytest.mark.parametrize(
    ("params", "param", "conn_id"),
    [
        ({"provider": "ssh", "ssh_conn_id": "my_box"}, "ssh_conn_id", "my_box"),
        ({"runtime": "docker", "registry_conn_id": "team_registry"}, "registry_conn_id", "team_registry"),
        ({"notify": ["slack://ml_alerts"]}, "notify", "ml_alerts"),
        ({"notify": ["smtp://mail/a@example.com"]}, "notify", "mail"),
        ({"provider": "cloud", "providers": ["lambda", "vast"]}, "providers", "lambda_default"),
        ({"provider": "ec2", "aws_conn_id": "team_aws"}, "aws_conn_id", "team_aws"),
        ({"dataset_uri": "s3://data/train.csv", "aws_conn_id": "team_s3"}, "aws_conn_id", "team_s3"),
    ],
)
def test_every_connection_a_param_names_must_exist(
    store: ResultsStore, params: dict[str, object], param: str, conn_id: str
) -> None:
    with pytest.raises(JobParamsError) as info:
        register(store, **params)
    assert info.value.param == param
    assert f"needs the Airflow connection {conn_id!r}, which is not defined here" in str(info.value)
    assert f"airflow connections add {conn_id} " in str(info.value)
    assert rows(store) == (0, 0)


def test_a_job_whose_connections_exist_registers(store: ResultsStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", API_KEY)
    monkeypatch.setenv("AIRFLOW_CONN_GPU_INSTANCE_SSH", SSH_KEY)
    monkeypatch.setenv("AIRFLOW_CONN_ML_ALERTS", json.dumps({"conn_type": "slackwebhook", "password": "https://h/x"}))
    job_uuid = register(store, provider="lambda", notify=["slack://ml_alerts"])
    assert store.job(job_uuid).provider == "lambda"
