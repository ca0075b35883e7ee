"""Shared fixtures: a migrated results DB per test and helpers to write global.json events."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

# Tests never touch the developer's Airflow home: a fresh one per session, set before Airflow loads.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="airflow-home-tests-")
atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = os.path.join(_REPO, "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = os.path.join(_REPO, "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.pop("AIRFLOW_CONN_TRAINING_RESULTS", None)
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine

from gpu_training.hooks.results import create_results_engine
from gpu_training.results.migrate import upgrade
from gpu_training.results.store import ResultsStore


@pytest.fixture
def results_engine(tmp_path: Path) -> Iterator[Engine]:
    engine = create_results_engine(f"sqlite:///{tmp_path / 'results.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def store(results_engine: Engine) -> ResultsStore:
    return ResultsStore(results_engine)


@pytest.fixture
def job_uuid(store: ResultsStore) -> str:
    return store.create_job(
        project_id="unit",
        provider="local",
        runtime="process",
        params={"project_id": "unit", "config": {}},
        dag_id="gpu_training",
        run_id="manual__unit",
    )


def event_line(phase: str, event: str, ts: str = "2026-11-22T15:04:05.000+05:30", **fields: Any) -> bytes:
    """One global.json line, newline included."""
    payload: dict[str, Any] = {"ts": ts, "phase": phase, "event": event}
    payload.update(fields)
    return (json.dumps(payload) + "\n").encode()


# --- real servers shared by a session (see tests/servers.py and tests/sshd.py) ----------------------


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{what} needs root (CI runs the suite as root)")


@pytest.fixture(scope="session")
def moto_server() -> Iterator[Any]:
    from tests.servers import start_moto

    server = start_moto()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    _need_root("sshd with root login")
    from tests.sshd import start_sshd

    server = start_sshd(tmp_path_factory.mktemp("sshd-session"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[str]:
    """A running dockerd with the trainer image built; yields the image name."""
    _need_root("dockerd")
    from tests.servers import ensure_dockerd, ensure_trainer_image

    proc = ensure_dockerd()
    try:
        yield ensure_trainer_image()
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)


@pytest.fixture(scope="session")
def registry(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.servers import start_registry

    server = start_registry(tmp_path_factory.mktemp("registry"))
    yield server
    server.stop()
