"""Shared fixtures: a migrated results DB per test and helpers to write global.json events.

The results DB of the store-level tests (``results_engine``, ``store``, ``job_uuid``) is SQLite or
PostgreSQL, chosen by ``RESULTS_DB``: ``sqlite``, ``postgresql`` or ``both`` (the default: each
such test runs once per backend, ids ``[sqlite]`` and ``[postgresql]``). PostgreSQL is one server
per session, the schema migrated once into a template database that every test gets a copy of.
Tests that run a whole Airflow use one backend (``results_url``; SQLite unless ``RESULTS_DB=postgresql``).
"""

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

from gpu_training.results.store import ResultsStore
from tests.servers import (
    PostgresResults,
    ResultsDatabases,
    chosen_results_backends,
    single_results_backend,
)

RESULTS_BACKENDS = chosen_results_backends()  # raises on a bad RESULTS_DB, before any test runs


@pytest.fixture(scope="session")
def postgres_results() -> Iterator[PostgresResults]:
    """The session's PostgreSQL server of results databases (started on first use). Its directory is
    not under pytest's tmp dirs: those are private to root, and the server runs as ``postgres``."""
    root = Path(tempfile.mkdtemp(prefix="results-postgres-"))
    try:
        server = PostgresResults.start(root)
        yield server
        server.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def results_databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ResultsDatabases]:
    """New results databases for this test, on either backend, dropped after it."""
    databases = ResultsDatabases(tmp_path, lambda: request.getfixturevalue("postgres_results"))
    yield databases
    databases.close()


@pytest.fixture(params=RESULTS_BACKENDS)
def results_backend(request: pytest.FixtureRequest) -> str:
    """``sqlite`` or ``postgresql``: a test using it runs on each backend of ``RESULTS_DB``."""
    return str(request.param)


@pytest.fixture
def results_engine(results_backend: str, results_databases: ResultsDatabases) -> Engine:
    """A migrated results DB of its own, on each backend of ``RESULTS_DB``."""
    return results_databases.engine(results_backend)


@pytest.fixture
def results_url(results_databases: ResultsDatabases) -> str:
    """A migrated results DB for a test that runs Airflow itself: one backend, SQLite unless
    ``RESULTS_DB=postgresql``."""
    return results_databases.url(single_results_backend())


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
