"""Property-based tests of the results API against its own OpenAPI document (schemathesis).

Schemathesis generates requests for every operation of ``/training/openapi.json`` (valid and
invalid parameters, other HTTP methods) and checks every answer: no 5xx, a documented status code,
content type and headers, a body valid against the documented schema, invalid input rejected (4xx),
valid input not rejected, 401 without credentials.

The app runs in-process (ASGI) over a real migrated results DB (SQLite and PostgreSQL) holding the jobs of
``tests.test_api.World`` (two iterations of epochs and evaluations, a file artifact and one that is
gone, an instance; jobs in two DAGs) and its promotion decisions (``World.decide_models``: a model
of each DAG). Generated job uuids, iteration numbers, artifact ids, model ids and model names are
often swapped for real ones, so the 200 answers are checked too, not only 404s. The
``/stream`` operation only gets jobs that already ended (or unknown ones): every stream ends at once.

Authentication: as in ``tests/test_api.py`` the user is injected instead of verified from a JWT, but
only for requests that carry ``Authorization: Bearer <TOKEN>`` (else 401, as Airflow answers), so
the ``ignored_auth`` check holds too. Per-DAG access is the real ``DagAccess``: the user may read
and edit the runs of ``gpu_training`` and has no access to ``other_dag`` (403).

``API_SCHEMA_MAX_EXAMPLES`` (default 40) sets the examples per operation; 300 runs in about a minute.
The ``/cancel`` operation is sent as the api-server's own page sends it when cookie-authenticated
(its ``Origin``); with the Bearer token it needs none anyway.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
from airflow.api_fastapi.core_api.security import get_user
from fastapi import FastAPI, HTTPException, Request, status
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.config import SchemathesisConfig

from gpu_training.api.app import create_app
from gpu_training.api.db import get_store
from gpu_training.api.queries import MODEL_ID_PATTERN
from gpu_training.api.routes import INT64_MAX
from gpu_training.api.stream import StreamSettings
from gpu_training.errors import ResultsDbError
from gpu_training.results.models import TERMINAL_STATUSES
from gpu_training.results.store import ResultsStore

from .test_api import PerDagAuthManager, World

TOKEN = "schemathesis-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_EXAMPLES = int(os.environ.get("API_SCHEMA_MAX_EXAMPLES", "40"))
_MODEL_ID = re.compile(MODEL_ID_PATTERN.removeprefix("^").removesuffix("$"))


def bearer_user(request: Request) -> SimpleAuthManagerUser:
    """Stands in for Airflow's ``get_user``: a user for the test's token, 401 without one."""
    if request.headers.get("authorization") != AUTH["Authorization"]:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "Not authenticated")
    return SimpleAuthManagerUser(username="tester", role="USER")


@dataclasses.dataclass
class Db:
    """What the app serves and the hooks pick from, per test (the ``db`` fixture)."""

    world: World
    jobs: list[str]  # every job
    ended: list[str]  # those that already ended
    artifact_ids: list[int]
    model_ids: list[str]
    model_names: list[str]  # of promotion decisions


CURRENT: list[Db] = []  # the test's Db: the app and the schema are built once, at import


def current() -> Db:
    assert CURRENT, "the db fixture did not run"
    return CURRENT[-1]


API = create_app(stream_settings=StreamSettings(poll_interval=0.01, keepalive=1.0))
API.state.auth_manager = PerDagAuthManager()
API.state.auth_manager.rules = {"gpu_training": {"GET", "PUT"}}  # nothing of other_dag: 403
API.dependency_overrides[get_store] = lambda: current().world.store
API.dependency_overrides[get_user] = bearer_user
ROOT_APP = FastAPI()
ROOT_APP.mount("/training", API)  # as the api-server mounts plugin apps

# Loaded at import: ``schemathesis.pytest.from_fixture`` (a schema per test) fails under pytest 9.2
# (AttributeError: 'Function' object has no attribute '_nodeid' in schemathesis/pytest/lazy.py).
schema = schemathesis.openapi.from_asgi(
    "/training/openapi.json",
    ROOT_APP,
    config=SchemathesisConfig.from_dict(
        {
            "operations": [
                {
                    # 400 "already ended" is the documented answer to a well-formed cancel of an
                    # ended job (positive_data_acceptance expects 2xx/401/403/404/409 otherwise).
                    "include-path": "/v1/jobs/{job_uuid}/cancel",
                    "checks": {"positive_data_acceptance": {"expected-statuses": [202, 400, 401, 403, 404]}},
                }
            ]
        }
    ),
)


@pytest.fixture(autouse=True)
def db(store: ResultsStore, tmp_path: Path) -> Iterator[Db]:
    world = World(store, tmp_path)
    world.decide_models()
    jobs = [world.old, world.failed, world.other_project, world.other_dag, world.full]
    ended = [u for u in jobs if store.job(u).status in TERMINAL_STATUSES]
    assert ended, "the stream operation needs jobs that already ended"
    model_ids = [world.full, f"{world.full}/1", f"{world.full}/1/2", f"{world.full}/2/1", world.other_dag]
    artifact_ids = [a.id for a in store.artifacts(world.full)]
    CURRENT.append(Db(world, jobs, ended, artifact_ids, model_ids, ["digits", "other"]))
    yield CURRENT[-1]
    CURRENT.pop()


def is_db_int(value: Any) -> bool:
    return type(value) is int and -INT64_MAX - 1 <= value <= INT64_MAX


def sometimes(values: list[Any], generated: Any) -> st.SearchStrategy[Any]:
    """A real value most of the time, else the generated one."""
    return st.one_of(st.sampled_from(values), st.just(generated))


# Only a value the schema accepts is swapped (for another one it accepts): a negative case (a value
# the schema rejects, which must be answered 4xx) stays negative.


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    """Real job uuids, iteration numbers, artifact ids and model names, often."""
    if not path_parameters:
        return st.just(path_parameters)
    db = current()
    path = context.operation.path if context.operation is not None else ""
    if path.endswith("/stream"):
        jobs = db.ended  # a running job's stream would not end
    elif "{iteration}" in path or "{artifact_id}" in path:
        jobs = [db.world.full] * 3 + db.jobs  # the job that has iterations and artifacts, mostly
    else:
        jobs = db.jobs
    strategies: dict[str, st.SearchStrategy[Any]] = {}
    for name, value in path_parameters.items():
        if name == "job_uuid" and isinstance(value, str):
            strategies[name] = sometimes(jobs, value)
        elif name == "iteration" and is_db_int(value):
            strategies[name] = sometimes([1, 2], value)
        elif name == "artifact_id" and is_db_int(value):
            strategies[name] = sometimes(db.artifact_ids, value)
        elif name == "name" and isinstance(value, str):
            strategies[name] = sometimes(db.model_names, value)
        else:
            strategies[name] = st.just(value)
    return st.fixed_dictionaries(strategies)


#: Query parameters whose every value is one constrained scalar. A list or object generated for one
#: (negative testing) reaches the app as repeated keys or as nothing, which can be a valid value
#: (``model_id=[]`` is no model_id, ``limit=[3, 4]`` is limit 4): schemathesis then expects a 4xx
#: for a request the app rightly answers 200. Such a value is sent as a scalar no schema accepts.
SCALAR_QUERY_PARAMS = (
    "model_id", "status", "since", "limit", "offset", "map_index", "lines", "iteration", "metric", "points", "after",
    "epochs_limit", "epochs_offset", "evals_limit", "evals_offset",
)  # fmt: skip


@schema.hook
def flatmap_query(context: Any, query: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    """Real model ids, often; unsendable negative values made plainly invalid."""
    if query is not None:
        bad = {k: "!not-a-value!" for k in SCALAR_QUERY_PARAMS if isinstance(query.get(k), (list, dict))}
        query = {**query, **bad}
    model_id = query.get("model_id") if query is not None else None
    if isinstance(model_id, str) and _MODEL_ID.fullmatch(model_id):
        return sometimes(current().model_ids, model_id).map(lambda m: {**(query or {}), "model_id": m})
    return st.just(query)


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.function_scoped_fixture],
)
def test_api_conforms_to_its_openapi(case: Any) -> None:
    case.call_and_validate(headers=AUTH)


def test_every_operation_is_tested() -> None:
    """The property test runs for every operation, the stream included."""
    operations = {(op.method.upper(), op.path) for op in (r.ok() for r in schema.get_all_operations())}
    assert operations == {
        ("GET", "/v1/jobs"),
        ("GET", "/v1/jobs/{job_uuid}"),
        ("GET", "/v1/jobs/{job_uuid}/details"),
        ("GET", "/v1/jobs/{job_uuid}/log"),
        ("GET", "/v1/jobs/{job_uuid}/iterations/{iteration}/epochs"),
        ("GET", "/v1/jobs/{job_uuid}/epochs"),
        ("GET", "/v1/jobs/{job_uuid}/evaluations"),
        ("GET", "/v1/jobs/{job_uuid}/series"),
        ("GET", "/v1/evaluations"),
        ("GET", "/v1/jobs/{job_uuid}/artifacts/{artifact_id}"),
        ("POST", "/v1/jobs/{job_uuid}/cancel"),
        ("GET", "/v1/jobs/{job_uuid}/stream"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{name}"),
    }


def known_cases(db: Db) -> list[tuple[str, str, dict[str, Any], dict[str, Any], int]]:
    """(method, path, path parameters, query, expected status): each operation's answers, the
    successful one first, whatever the generated examples happened to hit."""
    w = db.world
    gone, model = w.artifact_id("gone.txt"), w.artifact_id("model.npz")
    return [
        ("GET", "/v1/jobs", {}, {"status": "running", "limit": 2}, 200),
        ("GET", "/v1/jobs", {}, {"since": "2026-11-20T13:00:00+05:30"}, 200),
        ("GET", "/v1/jobs", {}, {"since": "1700000000"}, 422),  # a number is not a date
        ("GET", "/v1/jobs", {}, {"dag_id": "gpu_training", "run_id": "r-full", "stage": "", "map_index": -1}, 200),
        ("GET", "/v1/jobs", {}, {"map_index": -2}, 422),
        ("GET", "/v1/jobs/{job_uuid}", {"job_uuid": w.full}, {}, 200),
        ("GET", "/v1/jobs/{job_uuid}", {"job_uuid": w.other_dag}, {}, 403),
        ("GET", "/v1/jobs/{job_uuid}/details", {"job_uuid": w.full}, {}, 200),
        ("GET", "/v1/jobs/{job_uuid}/log", {"job_uuid": w.full}, {"lines": 20}, 200),
        ("GET", "/v1/jobs/{job_uuid}/log", {"job_uuid": w.full}, {"lines": 0}, 422),
        ("GET", "/v1/jobs/{job_uuid}/log", {"job_uuid": w.other_dag}, {}, 403),
        ("GET", "/v1/jobs/{job_uuid}/iterations/{iteration}/epochs", {"job_uuid": w.full, "iteration": 1}, {}, 200),
        ("GET", "/v1/jobs/{job_uuid}/iterations/{iteration}/epochs", {"job_uuid": w.full, "iteration": 9}, {}, 404),
        ("GET", "/v1/jobs/{job_uuid}/iterations/{iteration}/epochs", {"job_uuid": w.full, "iteration": 2**63}, {}, 422),
        ("GET", "/v1/jobs/{job_uuid}/details", {"job_uuid": w.full}, {"epochs_limit": 1, "epochs_offset": 2}, 200),
        ("GET", "/v1/jobs/{job_uuid}/details", {"job_uuid": w.full}, {"epochs_limit": 5001}, 422),
        ("GET", "/v1/jobs/{job_uuid}/epochs", {"job_uuid": w.full}, {"iteration": 1, "limit": 1}, 200),
        ("GET", "/v1/jobs/{job_uuid}/epochs", {"job_uuid": w.full}, {"limit": 0}, 422),
        ("GET", "/v1/jobs/{job_uuid}/epochs", {"job_uuid": w.other_dag}, {}, 403),
        ("GET", "/v1/jobs/{job_uuid}/evaluations", {"job_uuid": w.full}, {"offset": 1}, 200),
        ("GET", "/v1/jobs/{job_uuid}/evaluations", {"job_uuid": "not-a-uuid"}, {}, 404),
        ("GET", "/v1/jobs/{job_uuid}/series", {"job_uuid": w.full}, {"metric": "val_loss", "points": 3}, 200),
        ("GET", "/v1/jobs/{job_uuid}/series", {"job_uuid": w.full}, {"metric": 'a"b'}, 422),
        ("GET", "/v1/jobs/{job_uuid}/stream", {"job_uuid": w.old}, {"after": "0-0"}, 200),
        ("GET", "/v1/jobs/{job_uuid}/stream", {"job_uuid": w.old}, {"after": "x"}, 422),
        ("GET", "/v1/evaluations", {}, {"model_id": f"{w.full}/1/2"}, 200),
        ("GET", "/v1/evaluations", {}, {"model_id": w.full.replace("-", "")}, 200),
        ("GET", "/v1/evaluations", {}, {}, 200),
        ("GET", "/v1/evaluations", {}, {"model_id": f"{w.full}/x"}, 422),
        ("GET", "/v1/evaluations", {}, {"model_id": w.other_dag}, 403),
        ("GET", "/v1/jobs/{job_uuid}/artifacts/{artifact_id}", {"job_uuid": w.full, "artifact_id": model}, {}, 200),
        ("GET", "/v1/jobs/{job_uuid}/artifacts/{artifact_id}", {"job_uuid": w.full, "artifact_id": gone}, {}, 404),
        ("GET", "/v1/jobs/{job_uuid}/artifacts/{artifact_id}", {"job_uuid": w.full, "artifact_id": 2**63}, {}, 422),
        ("GET", "/v1/jobs/{job_uuid}/stream", {"job_uuid": w.old}, {}, 200),
        ("POST", "/v1/jobs/{job_uuid}/cancel", {"job_uuid": w.full}, {}, 202),
        ("POST", "/v1/jobs/{job_uuid}/cancel", {"job_uuid": w.full}, {}, 400),
        ("POST", "/v1/jobs/{job_uuid}/cancel", {"job_uuid": "not-a-uuid"}, {}, 404),
        ("GET", "/v1/models", {}, {}, 200),
        ("GET", "/v1/models/{name}", {"name": "digits"}, {"limit": 2, "offset": 1}, 200),
        ("GET", "/v1/models/{name}", {"name": "other"}, {}, 404),  # its DAG is not readable
        ("GET", "/v1/models/{name}", {"name": "nope"}, {}, 404),
        ("GET", "/v1/models/{name}", {"name": "digits"}, {"offset": 2**63}, 422),
    ]


def test_known_answers_conform(db: Db) -> None:
    """Every operation's successful answer and its documented errors, each validated against the
    schema (status code, content type, body)."""
    for method, path, path_parameters, query, expected in known_cases(db):
        case = schema[path][method].Case(path_parameters=path_parameters, query=query, headers=AUTH)
        response = case.call()
        assert response.status_code == expected, (method, path, path_parameters, query, response.text)
        case.validate_response(response)


def test_results_db_unavailable_is_a_documented_503(db: Db) -> None:
    """Every operation answers 503 when the results DB is unreachable or not migrated, as documented."""

    def unavailable() -> ResultsStore:
        raise ResultsDbError("results DB not migrated")

    API.dependency_overrides[get_store] = unavailable
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            params = {"job_uuid": db.world.full, "iteration": 1, "artifact_id": 1, "name": "digits"}
            case = operation.Case(
                path_parameters={p.name: params[p.name] for p in operation.path_parameters}, headers=AUTH
            )
            response = case.call()
            assert response.status_code == 503, (operation.label, response.text)
            assert response.json() == {"detail": "the results database is unavailable"}  # no location
            # A 5xx is what is tested here: every other check applies.
            case.validate_response(response, excluded_checks=[schemathesis.checks.not_a_server_error])
    finally:
        API.dependency_overrides[get_store] = lambda: current().world.store
