"""The operator's make targets: ``make status``, ``make logs JOB=...``, ``make validate``
(``python -m gpu_training.cli status|logs|validate``), on a real results DB, real local instances
with running trainers, the fake Lambda cloud and the test machine's Docker."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from gpu_training import cli, lifecycle
from gpu_training.providers.base import Offer
from gpu_training.providers.local import LocalProvider
from gpu_training.results.migrate import upgrade
from gpu_training.results.models import utcnow
from gpu_training.results.store import ArtifactRecord, ResultsStore
from tests.fakeclouds.lambda_cloud import FakeLambda

REPO = Path(__file__).resolve().parents[1]
#: A trainer that prints ``BURST`` numbered lines at once, then one every 0.1 s until its stop file
#: appears: ``talker.py NAME STOP_FILE BURST``.
TALKER = (
    "import os, sys, time\n"
    "name, stop, burst = sys.argv[1], sys.argv[2], int(sys.argv[3])\n"
    "for i in range(1, 100000):\n"
    "    print(f'{name} line {i}', flush=True)\n"
    "    if os.path.exists(stop):\n"
    "        break\n"
    "    if i >= burst:\n"
    "        time.sleep(0.1)\n"
)
CLOUD_CONNECTIONS = ("LAMBDA_DEFAULT", "RUNPOD_DEFAULT", "VAST_DEFAULT", "AWS_DEFAULT")


def new_job(store: ResultsStore, provider: str = "local", **params: Any) -> str:
    return store.create_job(
        project_id=params.pop("project_id", "ops"),
        provider=provider,
        runtime="process",
        params={"project_id": "ops", **params},
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )


def results_connection(url: str) -> str:
    return json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": url}})


def cli_env(store: ResultsStore) -> dict[str, str]:
    """The environment of a ``make``/CLI subprocess: this test's results DB, no cloud connections."""
    env = {k: v for k, v in os.environ.items() if k.removeprefix("AIRFLOW_CONN_") not in CLOUD_CONNECTIONS}
    env["AIRFLOW_CONN_TRAINING_RESULTS"] = results_connection(store.engine.url.render_as_string(hide_password=False))
    env["PYTHONPATH"] = str(REPO / "plugins")
    return env


def numbers(text: str, name: str, prefix: str = "") -> list[int]:
    """The line numbers of ``name``'s lines in ``text``, in the order printed."""
    pattern = re.compile(rf"^{re.escape(prefix)}{re.escape(name)} line (\d+)$")
    return [int(m.group(1)) for line in text.splitlines() if (m := pattern.match(line))]


# --- make status -----------------------------------------------------------------------------------


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
    running = new_job(store, provider="cloud", project_id="vision", gpu="H100")
    store.record_instance_intent(
        running, provider="lambda", name="i-running", instance_type="gpu_1x_h100", price_per_hour=2.0
    )
    store.update_instance("i-running", instance_id="def", state="running", launched_at=utcnow() - timedelta(hours=1))
    store.set_status(running, "running")

    lines = cli.status_lines(store)
    assert lines[0].startswith("job") and "cost USD" in lines[0]
    by_uuid = {line.split()[0]: line for line in lines[1:]}
    assert set(by_uuid) == {done, failed, running}
    assert [line.split()[0] for line in lines[1:]] == [running, failed, done]  # newest first
    assert "vision" in by_uuid[done] and "completed" in by_uuid[done] and "gpu_1x_a100" in by_uuid[done]
    assert " 0.4300 " in by_uuid[done] and "20m00s" in by_uuid[done]
    assert " 2 " in by_uuid[failed] and "node 1 (gpujob-x-n1): trainer vanished" in by_uuid[failed]
    assert "last log lines" not in by_uuid[failed]  # the reason's first line only
    # A running job: its cost so far (1 h at 2 USD/h), the cloud it runs on, not "cloud".
    live = by_uuid[running]
    assert "running" in live and " lambda " in live and "gpu_1x_h100" in live
    cost = re.search(r" (\d+\.\d{4})  \d{4}-\d\d-\d\d \d\d:\d\d ", live)
    assert cost and 2.0 <= float(cost.group(1)) < 2.01, live
    assert [line.split()[0] for line in cli.status_lines(store, project="nlp")[1:]] == [failed]
    assert cli.status_lines(store, project="nobody")[1:] == ["(no jobs of project nobody)"]
    assert len(cli.status_lines(store, limit=2)) == 3


def test_make_status_passes_limit_and_project(store: ResultsStore) -> None:
    older = new_job(store, project_id="speech")
    newer = new_job(store, project_id="speech")
    other = new_job(store, project_id="other")
    store.finish(older, "completed")
    proc = subprocess.run(
        ["make", "-s", "status", "LIMIT=1", "PROJECT=speech"],
        cwd=REPO,
        env=cli_env(store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("job ") and "cost USD" in lines[0]  # no log lines before the table
    assert [line.split()[:3] for line in lines[1:]] == [[newer, "speech", "pending"]]
    assert other not in proc.stdout and older not in proc.stdout


# --- make logs -------------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LocalProvider:
    monkeypatch.setenv("GPU_TRAINING_LOCAL_ROOT", str(tmp_path / "instances"))
    return LocalProvider()


def start_node(
    store: ResultsStore,
    local: LocalProvider,
    job: str,
    name: str,
    *,
    rank: int = 0,
    group: str | None = None,
    stop: Path,
    burst: int = 1,
) -> Path:
    """Launch local instance ``name`` for the job (its row as the orchestrator writes it) and start
    TALKER on it, printing as ``name``; returns its trainer log."""
    store.record_instance_intent(job, provider="local", name=name, node_rank=rank, node_group=group)
    info = local.launch(Offer("local", "local-cpu", 0.0, "localhost"), name)
    store.update_instance(name, instance_id=info.instance_id, state="running", launched_at=utcnow())
    host = local.host(info)
    (Path(host.workdir) / "talker.py").write_text(TALKER)
    host.start_trainer([sys.executable, host.path("talker.py"), name, str(stop), str(burst)], {"PATH": "/usr/bin:/bin"})
    return Path(host.workdir) / "logs" / "trainer.log"


def running_nodes(
    store: ResultsStore, local: LocalProvider, tmp_path: Path, count: int, *, burst: int = 1
) -> tuple[str, list[str], Path]:
    """A running job whose ``count`` local nodes each run TALKER (node N as ``rankN``); returns the
    job, its instance names and the stop file."""
    job = new_job(store, num_nodes=count)
    stop = tmp_path / "stop"
    group = f"gpujob-ops-{time.monotonic_ns()}"
    names = [group if rank == 0 else f"{group}-n{rank}" for rank in range(count)]
    for rank, name in enumerate(names):
        log = start_node(store, local, job, name, rank=rank, group=group if count > 1 else None, stop=stop, burst=burst)
        wait_for(lambda log=log: log.exists() and log.read_text().count("\n") >= burst)
    store.set_status(job, "running")
    return job, names, stop


def follow_in_thread(store: ResultsStore, job: str) -> tuple[threading.Thread, io.StringIO, list[int]]:
    out, result = io.StringIO(), []
    thread = threading.Thread(target=lambda: result.append(cli.follow_logs(store, job, out=out, interval=0.2)))
    thread.start()
    return thread, out, result


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_logs_shows_the_last_lines_then_follows_live_and_ends_with_the_job(
    store: ResultsStore, local: LocalProvider, tmp_path: Path
) -> None:
    job, (name,), stop = running_nodes(store, local, tmp_path, 1, burst=120)
    thread, out, result = follow_in_thread(store, job)
    wait_for(lambda: max(numbers(out.getvalue(), name), default=0) >= 140)  # written after following began
    assert thread.is_alive()  # still following: the job runs
    stop.touch()
    time.sleep(0.3)
    store.finish(job, "completed")
    thread.join(30)
    assert result == [0]
    text = out.getvalue()
    assert "[node" not in text  # one node: lines as they are
    seen = numbers(text, name)
    assert 71 <= seen[0] <= 121  # the tail: at most the last 50 of the 120+ lines already there
    assert seen == list(range(seen[0], seen[-1] + 1))  # then nothing lost, nothing twice
    written = numbers((local.root / name / "logs" / "trainer.log").read_text(), name)
    assert seen[-1] == written[-1]  # read once more after the job finished
    assert text.splitlines()[-1] == f"-- job {job} completed"

    # Once finished (instance still there): the last 50 lines, and done.
    out = io.StringIO()
    assert cli.follow_logs(store, job, out=out) == 0
    assert numbers(out.getvalue(), name) == written[-50:]
    lifecycle.teardown(store, job)


def test_logs_of_a_multi_node_job_shows_every_node_by_rank(
    store: ResultsStore, local: LocalProvider, tmp_path: Path
) -> None:
    job, names, stop = running_nodes(store, local, tmp_path, 2)
    thread, out, result = follow_in_thread(store, job)
    wait_for(lambda: all(len(numbers(out.getvalue(), n, f"[node {r}] ")) >= 10 for r, n in enumerate(names)))
    stop.touch()
    time.sleep(0.3)
    store.finish(job, "failed")
    thread.join(30)
    assert result == [0]
    lines = out.getvalue().splitlines()
    assert all(line.startswith(("[node 0] ", "[node 1] ")) for line in lines[:-1])
    assert lines[-1] == f"-- job {job} failed"
    for rank, name in enumerate(names):
        seen = numbers(out.getvalue(), name, f"[node {rank}] ")
        assert seen == list(range(seen[0], seen[-1] + 1))  # each node's lines in order, none lost
        assert not numbers(out.getvalue(), name, f"[node {1 - rank}] ")  # never under the other rank
    lifecycle.teardown(store, job)


def test_logs_waits_for_the_instance_and_follows_its_replacement(
    store: ResultsStore, local: LocalProvider, tmp_path: Path
) -> None:
    job = new_job(store)
    store.set_status(job, "provisioning")
    thread, out, result = follow_in_thread(store, job)
    wait_for(lambda: "waiting for its instance" in out.getvalue())
    first = f"gpujob-ops-{time.monotonic_ns()}"
    start_node(store, local, job, first, stop=tmp_path / "stop-first")
    store.set_status(job, "running")
    wait_for(lambda: len(numbers(out.getvalue(), first)) >= 5)
    # Interrupted: the instance is gone, the job goes on on another one, whose log starts anew.
    (tmp_path / "stop-first").touch()
    store.update_instance(first, state="terminated", terminated_at=utcnow())
    second = f"{first}-r1"
    start_node(store, local, job, second, stop=tmp_path / "stop-second")
    wait_for(lambda: len(numbers(out.getvalue(), second)) >= 5)
    (tmp_path / "stop-second").touch()
    time.sleep(0.3)
    store.finish(job, "completed")
    thread.join(30)
    assert result == [0]
    text = out.getvalue()
    assert f"-- job {job} now on {second}" in text
    assert numbers(text, second)[0] == 1  # the new log from its first line
    assert text.index(f"{first} line") < text.index(f"now on {second}") < text.index(f"{second} line 1")
    lifecycle.teardown(store, job)


def test_logs_of_a_job_whose_instance_is_gone_points_at_its_uploaded_log(store: ResultsStore) -> None:
    job = new_job(store)
    store.record_instance_intent(job, provider="local", name=f"gone-{time.monotonic_ns()}")
    store.record_artifacts(job, [ArtifactRecord("logs/trainer.log", "s3://bucket/out/logs/trainer.log", 10, "0" * 64)])
    store.record_failure(job, "trainer exited with code 3\nlast log lines: ...")
    store.finish(job, "failed")
    out = io.StringIO()
    assert cli.follow_logs(store, job, out=out) == 0
    text = out.getvalue()
    assert f"job {job} is failed and its instance is gone" in text
    assert "reason: trainer exited with code 3" in text
    assert "its trainer log was uploaded with the outputs: s3://bucket/out/logs/trainer.log" in text

    never = new_job(store)
    store.finish(never, "cancelled")
    out = io.StringIO()
    assert cli.follow_logs(store, never, out=out) == 0
    assert f"job {never} is cancelled and it never had an instance" in out.getvalue()


def test_logs_of_an_unknown_job_is_an_error(store: ResultsStore) -> None:
    unknown = "00000000-0000-0000-0000-000000000000"
    proc = subprocess.run(
        [sys.executable, "-m", "gpu_training.cli", "logs", unknown],
        env=cli_env(store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert f"error: no job {unknown} in the results DB" in proc.stderr and "Traceback" not in proc.stderr


def test_logs_follows_until_ctrl_c_and_exits_quietly(store: ResultsStore, local: LocalProvider, tmp_path: Path) -> None:
    job, (name,), stop = running_nodes(store, local, tmp_path, 1)
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpu_training.cli", "logs", job, "--interval", "0.2"],
        env=cli_env(store),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal, though the suite runs in the background (where a shell without job
        # control starts its commands with SIGINT ignored, and Python keeps it ignored).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert proc.stdout is not None
        seen: list[str] = []
        while len(numbers("\n".join(seen), name)) < 5:  # live lines reach the process's stdout
            line = proc.stdout.readline()
            assert line, proc.stderr.read() if proc.stderr else ""
            seen.append(line.rstrip("\n"))
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        stop.touch()
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lifecycle.teardown(store, job)


# --- make validate ---------------------------------------------------------------------------------


@pytest.fixture
def lambda_cloud() -> Iterator[FakeLambda]:
    fake = FakeLambda()
    yield fake
    fake.stop()


@pytest.fixture
def results_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A migrated results DB as the training_results connection (what validate reads), no clouds."""
    url = f"sqlite:///{tmp_path / 'results.db'}"
    upgrade(create_engine(url))
    monkeypatch.setenv("AIRFLOW_CONN_TRAINING_RESULTS", results_connection(url))
    for conn in CLOUD_CONNECTIONS:
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
    for cloud, conn_id in (("runpod", "runpod_default"), ("vast", "vast_default"), ("ec2", "aws_default")):
        assert checks[f"cloud {cloud}"] == ("skipped", f"no connection {conn_id}")
    bad = json.loads(lambda_cloud.connection(retry_attempts=1))
    bad["password"] = "not-the-key"
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", json.dumps(bad))
    result, detail = checks_by_name()["cloud lambda"]
    assert result == "FAIL" and detail.startswith("lambda_default:") and "not-the-key" not in detail
    assert "401" in detail and "API key was invalid" in detail  # the cloud's own words
    out = io.StringIO()
    assert cli.validate(out=out) == 1
    assert re.search(r"^FAIL +cloud lambda +lambda_default: ", out.getvalue(), re.M)


def test_validate_fails_on_an_unmigrated_results_db_saying_what_to_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_TRAINING_RESULTS", results_connection(f"sqlite:///{tmp_path / 'empty.db'}"))
    result, detail = checks_by_name()["results DB"]
    assert result == "FAIL" and "make migrate" in detail and "schema revision none" in detail


def test_validate_checks_the_trainer_image_in_docker(results_env: str, docker_engine: str) -> None:
    assert checks_by_name(image=docker_engine)[f"trainer image {docker_engine}"][0] == "ok"
    result, detail = checks_by_name(image="gpu-trainer:no-such-tag")["trainer image gpu-trainer:no-such-tag"]
    assert result == "FAIL" and detail.startswith("not present")
    assert "docker build -t gpu-trainer:no-such-tag include/trainer" in detail


def test_make_validate_prints_one_line_per_check_and_fails_on_a_missing_image(
    store: ResultsStore, docker_engine: str
) -> None:
    proc = subprocess.run(
        ["make", "-s", "validate", "TRAINER_IMAGE=gpu-trainer:no-such-tag"],
        cwd=REPO,
        env=cli_env(store),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stdout.splitlines()
    results = [line.split()[0] for line in lines[:-1]]
    assert results[:6] == ["ok", "skipped", "skipped", "skipped", "skipped", "FAIL"]
    assert lines[5].startswith("FAIL     trainer image gpu-trainer:no-such-tag")
    assert results[6:13] == ["policy"] * 7  # the [gpu_training] policy in force
    warned = results[13:] == ["WARN"]  # as root, with provider 'local' allowed (the default)
    assert warned == (os.geteuid() == 0)
    assert lines[-1] == ("7 checks, 1 failed, 1 warnings" if warned else "6 checks, 1 failed")


def test_validate_prints_the_policy_in_force_and_warns_when_local_trainers_run_as_root(
    results_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIRFLOW__GPU_TRAINING__ALLOWED_PROVIDERS", "ssh, lambda")
    monkeypatch.setenv("AIRFLOW__GPU_TRAINING__ALLOWED_CONNECTIONS", "gpu_box_*")
    checks = checks_by_name()
    assert checks["allowed_providers"] == ("policy", "ssh, lambda")
    assert checks["allowed_connections"] == ("policy", "gpu_box_*")
    assert checks["local_run_as_user"] == ("policy", "(the worker's own user)")
    assert "local trainers run as root" not in checks  # 'local' is not allowed
    monkeypatch.delenv("AIRFLOW__GPU_TRAINING__ALLOWED_PROVIDERS")
    if os.geteuid() == 0:
        result, detail = checks_by_name()["local trainers run as root"]
        assert result == "WARN" and "local_run_as_user" in detail
    monkeypatch.setenv("AIRFLOW__GPU_TRAINING__LOCAL_RUN_AS_USER", "nobody-here-xyz")
    assert checks_by_name()["local_run_as_user"][0] == "FAIL"


def test_the_make_targets_are_listed_and_logs_needs_a_job() -> None:
    text = (REPO / "Makefile").read_text()
    usage = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True).stdout
    for target in ("status", "logs", "validate"):
        assert re.search(rf"^\.PHONY:.* {target}\b", text, re.M) and f"\n{target}: " in text
        assert f"#   make {target}" in usage
    proc = subprocess.run(["make", "-s", "logs"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "usage: make logs JOB=<job uuid>" in proc.stderr


def test_validate_says_whether_the_runpod_key_may_create_pods(
    results_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing offers needs read access only: a read-only key would show up later as every launch
    refused, so validate probes a create (one the API refuses as a body: no pod is made)."""
    from tests.fakeclouds.runpod import FakeRunPod

    fake = FakeRunPod()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_RUNPOD_DEFAULT", fake.connection(retry_attempts=1))
        checks = checks_by_name()
        assert checks["cloud runpod"][0] == "ok"
        assert checks["cloud runpod: create pods"][0] == "ok", checks["cloud runpod: create pods"]
        fake.read_only = True
        result, detail = checks_by_name()["cloud runpod: create pods"]
        assert result == "FAIL" and detail.startswith("runpod_default: "), detail
        assert fake.launched() == []
    finally:
        fake.stop()
