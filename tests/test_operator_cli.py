"""The operator's make targets: ``make status``, ``make logs JOB=...``, ``make validate``
(``python -m gpu_training.cli status|logs|validate``), on a real results DB, real local instances
with running trainers, the fake Lambda cloud and the test machine's Docker."""

from __future__ import annotations

import io
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from gpu_training import cli, lifecycle
from gpu_training.providers.base import Offer
from gpu_training.providers.local import LocalProvider
from gpu_training.results.migrate import upgrade
from gpu_training.results.store import ResultsStore
from tests.fakeclouds.lambda_cloud import FakeLambda

REPO = Path(__file__).resolve().parents[1]
#: A trainer that prints a line every 0.1 s until it is told to stop (a file appears).
TALKER = (
    "import os, sys, time\n"
    "name = sys.argv[1]\n"
    "for i in range(1, 100000):\n"
    "    print(f'{name} line {i}', flush=True)\n"
    "    if os.path.exists(sys.argv[2]):\n"
    "        break\n"
    "    time.sleep(0.1)\n"
)


def new_job(store: ResultsStore, **params: Any) -> str:
    return store.create_job(
        project_id=params.pop("project_id", "ops"),
        provider="local",
        runtime="process",
        params={"project_id": "ops", **params},
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )


def test_status_lists_recent_jobs_with_state_instance_nodes_and_cost(store: ResultsStore) -> None:
    done = new_job(store, project_id="vision")
    store.record_instance_intent(
        done, provider="lambda", name="i-done", instance_type="gpu_1x_a100", price_per_hour=1.29
    )
    store.update_instance("i-done", instance_id="abc", state="terminated", cost_usd=0.43)
    store.update_job(done, cost_usd=0.43, time_taken=1200.0)
    store.finish(done, "completed")
    failed = new_job(store, project_id="nlp", num_nodes=2)
    store.record_failure(failed, "sense_progress: node 1 (gpujob-x-n1): trainer vanished\nlast log lines: ...")
    store.finish(failed, "failed")

    lines = cli.status_lines(store)
    assert lines[0].startswith("job") and "cost USD" in lines[0]
    by_uuid = {line.split()[0]: line for line in lines[1:]}
    assert set(by_uuid) == {done, failed}
    assert lines[1].startswith(failed)  # newest first
    assert "vision" in by_uuid[done] and "completed" in by_uuid[done] and "gpu_1x_a100" in by_uuid[done]
    assert "0.4300" in by_uuid[done] and "20m00s" in by_uuid[done]
    assert " 2 " in by_uuid[failed] and "node 1 (gpujob-x-n1): trainer vanished" in by_uuid[failed]
    assert "last log lines" not in by_uuid[failed]  # the reason's first line only
    assert [line.split()[0] for line in cli.status_lines(store, project="nlp")[1:]] == [failed]


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalProvider:
    monkeypatch.setenv("GPU_TRAINING_LOCAL_ROOT", str(tmp_path / "instances"))
    return LocalProvider()


def running_nodes(store: ResultsStore, local: LocalProvider, tmp_path: Path, count: int) -> tuple[str, Path]:
    """A job whose ``count`` local nodes each run TALKER; returns the job and the stop file."""
    job = new_job(store, num_nodes=count)
    stop = tmp_path / "stop"
    offer = Offer("local", "local-cpu", 0.0, "localhost")
    group = f"gpujob-ops-{time.monotonic_ns()}"
    for rank in range(count):
        name = group if rank == 0 else f"{group}-n{rank}"
        store.record_instance_intent(
            job, provider="local", name=name, node_rank=rank, node_group=group if count > 1 else None
        )
        info = local.launch(offer, name)
        store.update_instance(name, instance_id=info.instance_id, state="running")
        host = local.host(info)
        (Path(host.workdir) / "talker.py").write_text(TALKER)
        host.start_trainer(
            [sys.executable, host.path("talker.py"), f"rank{rank}", str(stop)], {"PATH": "/usr/bin:/bin"}
        )
    store.set_status(job, "running")
    return job, stop


def follow_in_thread(store: ResultsStore, job: str) -> tuple[threading.Thread, io.StringIO, list[int]]:
    out, result = io.StringIO(), []
    thread = threading.Thread(target=lambda: result.append(cli.follow_logs(store, job, out=out, interval=0.2)))
    thread.start()
    return thread, out, result


def wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_logs_follows_the_trainer_live_and_ends_with_the_job(
    store: ResultsStore, local: LocalProvider, tmp_path: Path
) -> None:
    job, stop = running_nodes(store, local, tmp_path, 1)
    thread, out, result = follow_in_thread(store, job)
    wait_for(lambda: "rank0 line 12" in out.getvalue())  # lines written after following began
    assert thread.is_alive()  # still following: the job runs
    stop.touch()
    store.finish(job, "completed")
    thread.join(20)
    assert result == [0]
    text = out.getvalue()
    assert "[node" not in text  # one node: lines as they are
    numbers = [int(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("rank0 line")]
    assert numbers == list(range(numbers[0], numbers[-1] + 1))  # nothing lost, nothing twice
    assert text.rstrip().endswith(f"-- job {job} completed")
    lifecycle.teardown(store, job)


def test_logs_of_a_multi_node_job_shows_every_node_by_rank(
    store: ResultsStore, local: LocalProvider, tmp_path: Path
) -> None:
    job, stop = running_nodes(store, local, tmp_path, 2)
    thread, out, result = follow_in_thread(store, job)
    wait_for(lambda: "[node 0] rank0 line 5" in out.getvalue() and "[node 1] rank1 line 5" in out.getvalue())
    stop.touch()
    store.finish(job, "failed")
    thread.join(20)
    assert result == [0]
    lifecycle.teardown(store, job)


def test_logs_of_a_finished_job_points_at_its_uploaded_log(store: ResultsStore) -> None:
    from gpu_training.results.store import ArtifactRecord

    job = new_job(store)
    store.record_artifacts(job, [ArtifactRecord("logs/trainer.log", "s3://bucket/out/logs/trainer.log", 10, "0" * 64)])
    store.finish(job, "completed")
    out = io.StringIO()
    assert cli.follow_logs(store, job, out=out) == 0
    assert "no live instance" in out.getvalue() and "s3://bucket/out/logs/trainer.log" in out.getvalue()
    assert cli.follow_logs(store, "00000000-0000-0000-0000-000000000000", out=out) == 2


@pytest.fixture
def lambda_cloud() -> Iterator[FakeLambda]:
    fake = FakeLambda()
    yield fake
    fake.stop()


@pytest.fixture
def results_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A migrated results DB as the training_results connection (what validate reads)."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade(create_engine(url))
    monkeypatch.setenv(
        "AIRFLOW_CONN_TRAINING_RESULTS", json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": url}})
    )
    for conn in ("LAMBDA_DEFAULT", "RUNPOD_DEFAULT", "VAST_DEFAULT", "AWS_DEFAULT"):
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn}", raising=False)
    return url


def checks_by_name(**kwargs: Any) -> dict[str, tuple[str, str]]:
    return {what: (result, detail) for result, what, detail in cli.validate_checks(**kwargs)}


def test_validate_says_which_cloud_answered_and_which_refused_the_credentials(
    results_env: str, lambda_cloud: FakeLambda, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", lambda_cloud.connection(retry_attempts=1))
    checks = checks_by_name()
    assert checks["results DB"][0] == "ok" and "at schema" in checks["results DB"][1]
    assert checks["cloud lambda"][0] == "ok" and "offers listed" in checks["cloud lambda"][1]
    assert checks["cloud runpod"] == ("skipped", "no connection runpod_default")
    bad = json.loads(lambda_cloud.connection(retry_attempts=1))
    bad["password"] = "not-the-key"
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", json.dumps(bad))
    result, detail = checks_by_name()["cloud lambda"]
    assert result == "FAIL" and detail.startswith("lambda_default:") and "not-the-key" not in detail
    out = io.StringIO()
    assert cli.validate(out=out) == 1
    assert "FAIL     cloud lambda" in out.getvalue()


def test_validate_fails_on_an_unmigrated_results_db_saying_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv(
        "AIRFLOW_CONN_TRAINING_RESULTS", json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": url}})
    )
    result, detail = checks_by_name()["results DB"]
    assert result == "FAIL" and "make migrate" in detail


def test_validate_checks_the_trainer_image_in_docker(results_env: str, docker_engine: str) -> None:
    assert checks_by_name(image=docker_engine)[f"trainer image {docker_engine}"][0] == "ok"
    result, detail = checks_by_name(image="gpu-trainer:no-such-tag")["trainer image gpu-trainer:no-such-tag"]
    assert result == "FAIL" and "docker build -t gpu-trainer:latest include/trainer" in detail


def test_the_make_targets_run_the_commands() -> None:
    import subprocess

    text = (REPO / "Makefile").read_text()
    for target, command in (("status", "cli status"), ("logs", "cli logs"), ("validate", "cli validate")):
        assert f"\n{target}: " in text and command in text
    usage = subprocess.run(["make", "-s", "logs"], cwd=REPO, capture_output=True, text=True)
    assert usage.returncode == 2 and "usage: make logs JOB=<job uuid>" in usage.stderr
