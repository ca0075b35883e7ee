"""The reaper against the fake Lambda and Vast.ai servers and a real results DB: what it terminates
(ended jobs, deleted or finished dag runs, unclaimed instances of ours past the grace), what it never
touches (others' instances, running jobs, anything in a dry run), records it settles, a cloud that is
down; and the ``gpu_instance_reaper`` DAG run by ``airflow dags test``."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gpu_training.providers.base import NAME_PREFIX, ComputeProvider, GpuRequest, InstanceInfo
from gpu_training.providers.lambda_cloud import LambdaProvider
from gpu_training.providers.vast import VastProvider
from gpu_training.reaper import ReapReport, first_seen_from_json, first_seen_to_json, reap
from gpu_training.results.models import Instance, utcnow
from gpu_training.results.store import ResultsStore
from tests.fakeclouds.base import FakeCloud
from tests.fakeclouds.lambda_cloud import FakeLambda
from tests.fakeclouds.vast import FakeVast
from tests.servers import ResultsDatabases, results_connection

REPO = Path(__file__).resolve().parents[1]
FAST = {"retry_initial_seconds": 0.05, "retry_max_wait_seconds": 1, "retry_attempts": 2}
GRACE = timedelta(minutes=15)
#: A cloud connection to a port where nothing listens: the API is down.
DOWN = json.dumps({"conn_type": "http", "host": "http://127.0.0.1:9", "password": "k", "extra": FAST})
LATER = timedelta(minutes=20)  # past the grace for everything created in a test


@pytest.fixture(scope="module")
def lambda_server() -> Iterator[FakeLambda]:
    fake = FakeLambda(ssh_host="127.0.0.1", ssh_port=2222)
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def vast_server() -> Iterator[FakeVast]:
    fake = FakeVast(ssh_host="127.0.0.1", ssh_port=2222)
    yield fake
    fake.stop()


@pytest.fixture
def clouds(
    lambda_server: FakeLambda, vast_server: FakeVast, monkeypatch: pytest.MonkeyPatch
) -> dict[str, ComputeProvider]:
    for fake in (lambda_server, vast_server):
        fake.reset()
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", lambda_server.connection(ssh_key_name="test-key", **FAST))
    monkeypatch.setenv("AIRFLOW_CONN_VAST_DEFAULT", vast_server.connection(**FAST))
    return {"lambda": LambdaProvider(), "vast": VastProvider()}


def launch(provider: ComputeProvider, name: str) -> InstanceInfo:
    offer = next(o for o in provider.list_offers(GpuRequest()) if o.available and o.region)
    return provider.launch(offer, name)


def job_with_instance(
    store: ResultsStore, provider: ComputeProvider, info: InstanceInfo | None, *, status: str, name: str = ""
) -> str:
    """A job of ``status`` whose recorded instance is ``info`` (or a launch that never happened)."""
    run_id = f"manual__{name or (info.name if info else 'x')}"
    job = store.create_job(
        project_id="reaper", provider=provider.name, runtime="process", params={}, dag_id="gpu_training", run_id=run_id
    )
    record = info.name if info else name
    store.record_instance_intent(job, provider=provider.name, name=record, price_per_hour=1.2)
    if info is not None:
        store.update_instance(record, instance_id=info.instance_id, state="running", launched_at=utcnow())
    store.set_status(job, status)
    if status in ("completed", "failed", "cancelled"):
        store.update_job(job, completed_at=utcnow())
    return job


def run_states(**states: str | None) -> Any:
    """A dag run lookup answering by run id (``manual__<name>``); unknown runs are running."""

    def lookup(dag_id: str, run_id: str) -> str | None:
        assert dag_id == "gpu_training"
        return states.get(run_id.removeprefix("manual__"), "running")

    return lookup


def live_ids(fake: FakeCloud) -> set[str]:
    return {i.id for i in fake.live()}


def run_reap(store: ResultsStore, providers: dict[str, ComputeProvider], **kwargs: Any) -> ReapReport:
    kwargs.setdefault("now", utcnow() + LATER)
    kwargs.setdefault("grace", GRACE)
    kwargs.setdefault("dag_run_state", run_states())
    report = reap(store, providers, **kwargs)
    print("\n".join(report.lines()))
    json.dumps(report.to_dict())  # the XCom must serialize
    return report


def record_of(store: ResultsStore, name: str) -> Instance:
    record = store.instance(name)
    assert record is not None, name
    return record


def names(actions: list[Any]) -> list[str]:
    return sorted(a.name for a in actions)


# --- what is terminated --------------------------------------------------------------------------


def test_an_ended_jobs_live_instance_is_terminated_after_the_grace(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda
) -> None:
    provider = clouds["lambda"]
    info = launch(provider, NAME_PREFIX + "ended-1")
    job = job_with_instance(store, provider, info, status="failed")

    early = run_reap(store, clouds, now=utcnow())  # its own teardown may still be running
    assert names(early.providers["lambda"].left_alone) == [info.name]
    assert "within the grace" in early.providers["lambda"].left_alone[0].reason
    assert info.instance_id in live_ids(lambda_server)

    report = run_reap(store, clouds)
    part = report.providers["lambda"]
    assert (part.listed, part.ours, names(part.terminated), part.errors) == (1, 1, [info.name], [])
    assert f"job {job} failed" in part.terminated[0].reason
    assert report.all_errors == [] and report.providers["vast"].listed == 0
    lambda_server.assert_all_terminated()
    record = store.instance(info.name)
    assert record is not None and record.state == "terminated" and record.terminated_at is not None
    assert (record.state_reason or "").startswith("reaped: job") and (record.billable_seconds or 0) > 0
    assert record.cost_usd is not None and store.job(job).cost_usd == pytest.approx(record.cost_usd)


def test_a_failed_job_still_uploading_keeps_its_instance_while_its_run_runs(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda
) -> None:
    """A step's failure marks the job failed at once, but upload_outputs and teardown still run
    (finalize settles ``completed_at``): the running dag run protects the instance."""
    provider = clouds["lambda"]
    info = launch(provider, NAME_PREFIX + "uploading-1")
    job = job_with_instance(store, provider, info, status="running")
    store.record_failure(job, "sense_progress: trainer exited with code 3")
    assert store.job(job).status == "failed" and store.job(job).completed_at is None
    report = run_reap(store, clouds)
    assert names(report.providers["lambda"].left_alone) == [info.name]
    assert "running" in report.providers["lambda"].left_alone[0].reason
    assert info.instance_id in live_ids(lambda_server)
    provider.terminate(info.instance_id)


def test_an_unclaimed_instance_of_ours_is_terminated_once_older_than_the_grace(
    store: ResultsStore, clouds: dict[str, ComputeProvider], vast_server: FakeVast
) -> None:
    info = launch(clouds["vast"], NAME_PREFIX + "stray-1")
    start = utcnow()
    first = run_reap(store, clouds, now=start)
    assert names(first.providers["vast"].left_alone) == [info.name]
    assert "no record claims it" in first.providers["vast"].left_alone[0].reason
    key = f"vast:{info.instance_id}"
    assert first.first_seen == {key: start}
    carried = first_seen_from_json(json.loads(json.dumps(first_seen_to_json(first.first_seen))))

    young = run_reap(store, clouds, now=start + timedelta(minutes=10), first_seen=carried)
    assert names(young.providers["vast"].left_alone) == [info.name] and young.first_seen[key] == start
    # Without its first sighting the reaper cannot date it: it counts as just seen.
    assert names(run_reap(store, clouds).providers["vast"].left_alone) == [info.name]
    assert info.instance_id in live_ids(vast_server)

    old = run_reap(store, clouds, now=start + timedelta(minutes=16), first_seen=young.first_seen)
    assert names(old.providers["vast"].terminated) == [info.name]
    assert "first seen 16.0 min ago" in old.providers["vast"].terminated[0].reason
    vast_server.assert_all_terminated()
    assert run_reap(store, clouds, first_seen=old.first_seen).first_seen == {}  # gone: forgotten


def test_the_reaper_sees_vast_instances_on_every_page(
    store: ResultsStore, clouds: dict[str, ComputeProvider], vast_server: FakeVast
) -> None:
    """Vast lists 25 instances a page (GET /api/v1/instances/): strays of ours on pages 1 and 3 of an
    account with 55 others are both seen and, once older than the grace, terminated."""
    early = launch(clouds["vast"], NAME_PREFIX + "paged-stray-1")
    others = vast_server.add_foreign_instances(55)
    late = launch(clouds["vast"], NAME_PREFIX + "paged-stray-2")
    start = utcnow()
    first = run_reap(store, clouds, now=start)
    assert first.providers["vast"].listed == 57
    assert names(first.providers["vast"].left_alone) == [early.name, late.name]
    old = run_reap(store, clouds, now=start + timedelta(minutes=16), first_seen=first.first_seen)
    assert names(old.providers["vast"].terminated) == [early.name, late.name]
    assert set(others) <= live_ids(vast_server)  # not ours (no gpujob- label): never touched
    for instance_id in others:
        vast_server.instances[instance_id].terminated_at = time.time()
    vast_server.assert_all_terminated()


@pytest.mark.parametrize("run_state", [None, "failed"], ids=["run-deleted", "run-finished"])
def test_a_job_whose_dag_run_is_gone_or_finished_loses_its_instance(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda, run_state: str | None
) -> None:
    provider = clouds["lambda"]
    info = launch(provider, NAME_PREFIX + "orphan-1")
    job_with_instance(store, provider, info, status="running")
    report = run_reap(store, clouds, dag_run_state=run_states(**{info.name: run_state}))
    part = report.providers["lambda"]
    assert names(part.terminated) == [info.name]
    gone = "no longer exists" if run_state is None else "ended failed"
    assert f"dag run gpu_training/manual__{info.name} {gone}" in part.terminated[0].reason
    lambda_server.assert_all_terminated()
    record = store.instance(info.name)
    assert record is not None and record.state == "terminated"


# --- what is left alone --------------------------------------------------------------------------


def test_instances_that_are_not_ours_are_never_touched(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda, vast_server: FakeVast
) -> None:
    others = [launch(clouds["lambda"], "someone-elses-box"), launch(clouds["vast"], "gpujob_lookalike")]
    before = {fake: len(fake.calls) for fake in (lambda_server, vast_server)}
    report = run_reap(store, clouds, now=utcnow() + timedelta(days=30), grace=timedelta(0))
    for name in ("lambda", "vast"):
        part = report.providers[name]
        assert (part.listed, part.ours, part.terminated, part.left_alone, part.errors) == (1, 0, [], [], [])
    assert live_ids(lambda_server) | live_ids(vast_server) == {i.instance_id for i in others}
    for fake, start in before.items():
        assert {method for method, _, _ in fake.calls[start:]} == {"GET"}  # the reaper only looked


def test_a_running_jobs_instance_is_left_alone(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda
) -> None:
    provider = clouds["lambda"]
    info = launch(provider, NAME_PREFIX + "busy-1")
    job_with_instance(store, provider, info, status="running")
    report = run_reap(store, clouds, dag_run_state=run_states(**{info.name: "running"}))
    (left,) = report.providers["lambda"].left_alone
    assert left.name == info.name and left.reason.endswith(f"dag run gpu_training/manual__{info.name} running")
    assert report.all_errors == []

    def unreachable(dag_id: str, run_id: str) -> str | None:
        raise RuntimeError("API server error 503")

    blind = run_reap(store, clouds, dag_run_state=unreachable)  # cannot tell: leave it, say so
    assert names(blind.providers["lambda"].left_alone) == [info.name]
    assert blind.errors == [
        f"could not get the state of dag run gpu_training/manual__{info.name}: API server error 503"
    ]
    assert live_ids(lambda_server) == {info.instance_id}


def test_a_dry_run_terminates_and_settles_nothing(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda, vast_server: FakeVast
) -> None:
    ended = launch(clouds["lambda"], NAME_PREFIX + "dry-ended-1")
    job_with_instance(store, clouds["lambda"], ended, status="completed")
    stray = launch(clouds["vast"], NAME_PREFIX + "dry-stray-1")
    job_with_instance(store, clouds["vast"], None, status="cancelled", name=NAME_PREFIX + "dry-never-1")
    start = utcnow()
    seen = run_reap(store, clouds, now=start, dry_run=True).first_seen
    report = run_reap(store, clouds, now=start + LATER, first_seen=seen, dry_run=True)
    assert names(report.providers["lambda"].terminated) == [ended.name]
    assert names(report.providers["vast"].terminated) == [stray.name]
    assert names(report.providers["vast"].settled) == [NAME_PREFIX + "dry-never-1"]
    assert any(line.startswith("lambda: would terminate " + ended.name) for line in report.lines())
    assert live_ids(lambda_server) == {ended.instance_id} and live_ids(vast_server) == {stray.instance_id}
    assert [record_of(store, n).state for n in (ended.name, NAME_PREFIX + "dry-never-1")] == ["running", "requested"]


# --- records and failures ------------------------------------------------------------------------


class HidingLambda(LambdaProvider):
    """Lambda whose listing misses some instances (as an eventually consistent API may)."""

    hidden: frozenset[str] = frozenset()

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        return [i for i in super().list_instances(name_prefix) if i.name not in self.hidden]


def test_records_of_ended_jobs_are_settled_when_the_cloud_no_longer_lists_their_instance(
    store: ResultsStore, clouds: dict[str, ComputeProvider], lambda_server: FakeLambda
) -> None:
    provider = HidingLambda()
    gone = launch(provider, NAME_PREFIX + "gone-1")
    provider.terminate(gone.instance_id)  # terminated, but teardown never recorded it
    job_with_instance(store, provider, gone, status="failed")
    job_with_instance(store, provider, None, status="failed", name=NAME_PREFIX + "never-1")
    hidden = launch(provider, NAME_PREFIX + "hidden-1")
    job_with_instance(store, provider, hidden, status="completed")
    not_ours = launch(provider, "borrowed-box")
    job_with_instance(store, provider, not_ours, status="completed")  # a record claims it, its name does not
    running = launch(provider, NAME_PREFIX + "busy-2")
    job_with_instance(store, provider, running, status="running")
    provider.hidden = frozenset({hidden.name, not_ours.name, running.name})

    report = run_reap(store, {"lambda": provider})
    part = report.providers["lambda"]
    assert names(part.settled) == [gone.name, NAME_PREFIX + "never-1"]
    assert names(part.terminated) == [hidden.name]
    assert names(part.left_alone) == [running.name]
    assert part.errors == [f"{not_ours.name} ({not_ours.instance_id}) is live but not named as ours: not touched"]
    assert live_ids(lambda_server) == {not_ours.instance_id, running.instance_id}
    records = {n: store.instance(n) for n in (gone.name, NAME_PREFIX + "never-1", hidden.name)}
    assert {n: r.state for n, r in records.items() if r} == {
        gone.name: "terminated",
        NAME_PREFIX + "never-1": "failed",
        hidden.name: "terminated",
    }
    assert "gone at the cloud" in (record_of(store, gone.name).state_reason or "")
    assert run_reap(store, {"lambda": provider}).providers["lambda"].settled == []  # settled once
    for info in (not_ours, running):
        provider.terminate(info.instance_id)


def test_a_cloud_that_is_down_does_not_stop_the_others(
    store: ResultsStore, clouds: dict[str, ComputeProvider], vast_server: FakeVast, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = launch(clouds["vast"], NAME_PREFIX + "vast-ended-1")
    job_with_instance(store, clouds["vast"], info, status="completed")
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DOWN", DOWN)
    down = LambdaProvider("lambda_down")
    remembered = {"lambda:abc": utcnow() - timedelta(hours=1)}
    report = run_reap(store, {"lambda": down, "vast": clouds["vast"]}, first_seen=remembered)
    assert names(report.providers["vast"].terminated) == [info.name]
    vast_server.assert_all_terminated()
    (error,) = report.all_errors
    assert error.startswith("lambda: listing instances failed: lambda: GET /instances: no answer")
    assert report.first_seen == remembered  # kept for when Lambda answers again
    assert "lambda: ERROR listing instances failed" in "\n".join(report.lines())


# --- the DAG ---------------------------------------------------------------------------------------


def test_the_reaper_dag_reaps_a_deleted_runs_instance_and_fails_on_a_cloud_error(
    tmp_path: Path,
    lambda_server: FakeLambda,
    monkeypatch: pytest.MonkeyPatch,
    results_url: str,
    results_databases: ResultsDatabases,
) -> None:
    """``airflow dags test``: the dag run lookup through the Task SDK finds the job's run deleted
    (it never existed), the instance is terminated, another's box is left, Vast being down fails
    the run after that, and the summary is still in XCom."""
    lambda_server.reset()
    home = tmp_path / "airflow_home"
    home.mkdir()
    lambda_conn = lambda_server.connection(ssh_key_name="test-key", **FAST)
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", lambda_conn)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("AIRFLOW_CONN_RUNPOD_DEFAULT", "AIRFLOW_CONN_AWS_DEFAULT")
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "PYTHONPATH": str(REPO / "plugins"),
            "AIRFLOW_CONN_VAST_DEFAULT": DOWN,
            "AIRFLOW_CONN_TRAINING_RESULTS": results_connection(results_url),
        }
    )
    migrate = subprocess.Popen(
        [sys.executable, "-m", "airflow", "db", "migrate"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    engine = results_databases.engine_for(results_url)
    results = ResultsStore(engine)
    provider = LambdaProvider()
    orphan = launch(provider, NAME_PREFIX + "dag-orphan-1")
    other = launch(provider, "not-a-job")
    job_with_instance(results, provider, orphan, status="running")
    assert migrate.wait(timeout=120) == 0, migrate.stderr.read() if migrate.stderr else ""

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "airflow",
            "dags",
            "test",
            "gpu_instance_reaper",
            "-f",
            str(REPO / "dags" / "gpu_instance_reaper.py"),
            "--conf",
            '{"grace_minutes": 0}',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    assert f"dag run gpu_training/manual__{orphan.name} no longer exists" in output, output[-4000:]
    assert live_ids(lambda_server) == {other.instance_id}
    record = results.instance(orphan.name)
    assert record is not None and record.state == "terminated"
    with sqlite3.connect(home / "airflow.db") as db:
        (value,) = db.execute(
            "SELECT value FROM xcom WHERE dag_id = 'gpu_instance_reaper' AND key = 'return_value'"
        ).fetchone()
    summary = json.loads(value)
    assert [a["name"] for a in summary["providers"]["lambda"]["terminated"]] == [orphan.name]
    assert summary["providers"]["vast"]["errors"] and summary["dry_run"] is False
    provider.terminate(other.instance_id)
