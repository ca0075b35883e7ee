"""The deployment's policy (``[gpu_training]`` in Airflow's config): one test per control.

A triggering user's job is refused by each key, naming the param and the key, with nothing created
or provisioned; ``file://`` paths are resolved (symlinks included) when registered and again when
read; a local trainer under ``local_run_as_user`` cannot read the worker's environment or files.
The policy is set as a deployment sets it: ``AIRFLOW__GPU_TRAINING__<KEY>`` environment variables,
read through Airflow's configuration.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from gpu_training import lifecycle
from gpu_training.errors import JobParamsError
from gpu_training.policy import OPTIONS, JobPolicyError, Policy
from gpu_training.providers.base import GpuRequest
from gpu_training.providers.local import LocalProvider
from gpu_training.results.models import Instance, TrainingJob
from gpu_training.results.store import ResultsStore
from gpu_training.storage import embedded_storage_root

TRAINER_USER = "gpu-trainer-test"
SSH_KEY = json.dumps({"conn_type": "ssh", "login": "u", "extra": {"private_key": "k"}})


@pytest.fixture
def policy_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Set ``[gpu_training]`` keys; the others keep their defaults."""
    for key in OPTIONS:
        monkeypatch.delenv(f"AIRFLOW__GPU_TRAINING__{key.upper()}", raising=False)
    yield monkeypatch


def set_policy(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for key, value in values.items():
        assert key in OPTIONS, key
        monkeypatch.setenv(f"AIRFLOW__GPU_TRAINING__{key.upper()}", value)


def register(store: ResultsStore, **params: object) -> str:
    return lifecycle.register_job(
        store, {"project_id": "p", **params}, dag_id="gpu_training", run_id=f"manual__{time.time_ns()}"
    )


def rows(store: ResultsStore) -> tuple[int, int]:
    with store.session() as s:
        jobs = s.scalar(select(func.count()).select_from(TrainingJob))
        instances = s.scalar(select(func.count()).select_from(Instance))
    return int(jobs or 0), int(instances or 0)


def refused(store: ResultsStore, **params: object) -> JobPolicyError:
    with pytest.raises(JobPolicyError) as info:
        register(store, **params)
    assert rows(store) == (0, 0), "a refused job created something"
    return info.value


def test_the_defaults_are_a_single_users_machine(policy_env: pytest.MonkeyPatch) -> None:
    policy = Policy.current()
    assert policy == Policy()
    assert policy.allows_provider("local") and policy.allow_custom_command
    assert policy.allows_connection("anything") and policy.allows_image("any/image:1")
    assert policy.file_roots() == (Path(os.path.realpath(embedded_storage_root())),)
    assert policy.local_run_as_user == "" and policy.max_metric_rows_per_job == 1_000_000
    with pytest.raises(ValueError, match=r"\[gpu_training\] max_metric_rows_per_job = 'many'"):
        Policy.from_values({"max_metric_rows_per_job": "many"})


def test_a_provider_outside_allowed_providers_is_refused(store: ResultsStore, policy_env: pytest.MonkeyPatch) -> None:
    set_policy(policy_env, allowed_providers="ssh, lambda")
    err = refused(store)  # the default provider, local
    assert err.param == "provider"
    assert str(err) == (
        "invalid param 'provider' (Provider): provider 'local' is not allowed here "
        "([gpu_training] allowed_providers = ssh, lambda)"
    )
    err = refused(store, provider="cloud", providers=["lambda", "vast"])
    assert err.param == "providers" and "provider 'vast' is not allowed here" in str(err)


def test_provider_cloud_uses_only_allowed_clouds(store: ResultsStore, policy_env: pytest.MonkeyPatch) -> None:
    policy_env.setenv("AIRFLOW_CONN_VAST_DEFAULT", json.dumps({"conn_type": "http", "password": "k"}))
    policy_env.setenv("AIRFLOW_CONN_GPU_INSTANCE_SSH", SSH_KEY)
    set_policy(policy_env, allowed_providers="local, lambda")
    err = refused(store, provider="cloud")
    assert "of the clouds with a connection, vast, none) is not allowed here" in str(err)
    set_policy(policy_env, allowed_providers="vast")
    assert register(store, provider="cloud")


def test_a_custom_command_is_refused_unless_allowed(store: ResultsStore, policy_env: pytest.MonkeyPatch) -> None:
    set_policy(policy_env, allow_custom_command="false")
    err = refused(store, command=["bash", "-c", "id"])
    assert err.param == "command"
    assert "a command of the job's own is not allowed here ([gpu_training] allow_custom_command = False)" in str(err)
    assert register(store)  # the reference trainer's command


def test_file_params_must_resolve_inside_the_allowed_roots(
    store: ResultsStore, policy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path / "datasets"
    (root / "digits").mkdir(parents=True)
    (root / "digits" / "train.csv").write_text("x,y\n1,2\n")
    (root / "escape.csv").symlink_to("/etc/passwd")
    set_policy(policy_env, allowed_file_roots=str(root))
    # The worker's own files (its airflow.cfg, the JWT secret in it) stay out of reach.
    err = refused(store, dataset_uri="file:///etc/passwd")
    embedded = os.path.realpath(embedded_storage_root())
    assert err.param == "dataset_uri"
    assert f"[gpu_training] allowed_file_roots = {root.resolve()}, {embedded})" in str(err)
    err = refused(store, dataset_uri=f"file://{root}/escape.csv")  # a symlink out: resolved first
    assert "(resolved: /etc/passwd)" in str(err)
    err = refused(store, dataset_uri=f"file://{root}/../datasets/../../")  # .. is resolved too
    assert err.param == "dataset_uri"
    assert refused(store, init_checkpoint_uri="file:///root/model.npz").param == "init_checkpoint_uri"
    assert refused(store, outputs_uri=f"file://{tmp_path}/dags/").param == "outputs_uri"
    assert register(store, dataset_uri=f"file://{root}/digits/", outputs_uri=f"file://{root}/outputs/")


def test_a_symlink_planted_after_registration_is_refused_when_read(
    store: ResultsStore, policy_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    root = tmp_path / "datasets"
    (root / "digits").mkdir(parents=True)
    (root / "digits" / "train.csv").write_text("x,y\n1,2\n")
    set_policy(policy_env, allowed_file_roots=str(root))
    job = register(store, dataset_uri=f"file://{root}/digits/")
    lifecycle.build_config(store, job)
    lifecycle.provision(store, job)
    assert lifecycle.check_ready(store, job)
    (root / "digits" / "secret.cfg").symlink_to("/etc/shadow")
    with pytest.raises(JobPolicyError, match=r"'dataset_uri'.*\(resolved: /etc/shadow\) is not allowed here"):
        lifecycle.transfer_inputs(store, job)
    assert not Path(lifecycle.host_for(store, job).path("data/secret.cfg")).exists()
    lifecycle.teardown(store, job)


@pytest.mark.parametrize(
    ("params", "param", "conn_id"),
    [
        ({"provider": "ssh", "ssh_conn_id": "prod_db_box"}, "ssh_conn_id", "prod_db_box"),
        ({"runtime": "docker", "registry_conn_id": "aws_default"}, "registry_conn_id", "aws_default"),
        ({"notify": ["webhook://payments_api"]}, "notify", "payments_api"),
        ({"aws_conn_id": "prod_aws"}, "aws_conn_id", "prod_aws"),
    ],
)
def test_a_connection_outside_allowed_connections_is_refused(
    store: ResultsStore, policy_env: pytest.MonkeyPatch, params: dict[str, object], param: str, conn_id: str
) -> None:
    set_policy(policy_env, allowed_connections="gpu_box_*, team_*")
    err = refused(store, **params)
    assert err.param == param
    assert (
        f"connection {conn_id!r} is not allowed here ([gpu_training] allowed_connections = gpu_box_*, team_*)"
        in str(err)
    )


def test_the_deployments_own_aws_default_is_not_the_jobs_choice(
    store: ResultsStore, policy_env: pytest.MonkeyPatch
) -> None:
    set_policy(policy_env, allowed_connections="gpu_box_*")
    assert register(store)  # aws_conn_id left at aws_default: nothing the trigger named


def test_an_image_outside_allowed_images_is_refused(store: ResultsStore, policy_env: pytest.MonkeyPatch) -> None:
    set_policy(policy_env, allowed_images="registry.example.com:5000/team/*")
    err = refused(store, runtime="docker", image="evil/miner:latest")
    assert err.param == "image" and "image 'evil/miner:latest' is not allowed here" in str(err)
    assert isinstance(err, JobParamsError)  # not retried: the operators fail such a job at once


# --- local_run_as_user ----------------------------------------------------------------------------

PROBE = """
import json, os, sys
out = {"uid": os.getuid()}
for name, path in (("environ", f"/proc/{sys.argv[1]}/environ"), ("cfg", sys.argv[2])):
    try:
        with open(path, "rb") as fh:
            out[name] = fh.read().decode("latin-1")
    except OSError as err:
        out[name] = f"refused: {type(err).__name__}"
with open(os.path.join(os.environ["TRAINING_OUTPUT_DIR"], "probe.json"), "w") as fh:
    json.dump(out, fh)
"""


@pytest.fixture
def trainer_user() -> str:
    if os.geteuid() != 0:
        pytest.fail("local_run_as_user needs root to switch users: run the suite as root (CI does)")
    try:
        pwd.getpwnam(TRAINER_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", TRAINER_USER], check=True
        )
    return TRAINER_USER


@pytest.fixture
def reachable_root() -> Iterator[Path]:
    """Local instances under a folder the trainer's user may enter (pytest's tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="gpu-local-instances-"))
    root.chmod(0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def probe(provider: LocalProvider, worker_pid: int, secret_file: Path) -> dict[str, object]:
    host = provider.host(provider.launch(provider.list_offers(GpuRequest())[0], f"gpujob-probe-{time.time_ns()}"))
    host.prepare()
    Path(host.path("probe.py")).write_text(PROBE)
    python = shutil.which("python3", path="/usr/bin") or sys.executable
    env = {
        "PATH": "/usr/bin:/bin",
        "TRAINING_OUTPUT_DIR": host.path("outputs"),
        "TRAINING_CONFIG": host.path("config/c"),
    }
    try:
        host.start_trainer([python, host.path("probe.py"), str(worker_pid), str(secret_file)], env)
        result = Path(host.path("outputs/probe.json"))
        deadline = time.monotonic() + 20
        while not result.exists():
            assert time.monotonic() < deadline, Path(host.path("logs/trainer.log")).read_text()
            time.sleep(0.05)
        time.sleep(0.1)
        return dict(json.loads(result.read_text()))
    finally:
        host.destroy()


@pytest.fixture
def worker_process() -> Iterator[int]:
    """A process started as Airflow starts a worker: a connection's secret in its environment."""
    env = {"PATH": "/usr/bin:/bin", "AIRFLOW_CONN_LAMBDA_DEFAULT": '{"conn_type": "http", "password": "the-api-key"}'}
    proc = subprocess.Popen(["sleep", "120"], env=env)
    yield proc.pid
    proc.kill()
    proc.wait()


def test_a_local_trainer_under_local_run_as_user_cannot_read_the_workers_environment_or_files(
    trainer_user: str, reachable_root: Path, worker_process: int
) -> None:
    secret_file = reachable_root / "airflow.cfg"  # a worker file the trainer could reach by path
    secret_file.write_text("[api_auth]\njwt_secret = the-jwt-secret\n")
    secret_file.chmod(0o600)
    # Without the control the trainer is the worker: it reads both (this is what the policy stops).
    as_worker = probe(LocalProvider(reachable_root), worker_process, secret_file)
    assert as_worker["uid"] == os.getuid() and "the-api-key" in str(as_worker["environ"])
    assert "the-jwt-secret" in str(as_worker["cfg"])

    contained = probe(LocalProvider(reachable_root, run_as=trainer_user), worker_process, secret_file)
    assert contained["uid"] == pwd.getpwnam(trainer_user).pw_uid
    assert contained["environ"] == "refused: PermissionError"
    assert contained["cfg"] == "refused: PermissionError"


def test_local_run_as_user_is_read_from_the_policy_by_the_local_provider(
    trainer_user: str, policy_env: pytest.MonkeyPatch
) -> None:
    set_policy(policy_env, local_run_as_user=trainer_user)
    assert lifecycle.get_provider("local").run_as == trainer_user  # type: ignore[attr-defined]
    set_policy(policy_env, local_run_as_user="nobody-here-xyz")
    provider = LocalProvider(run_as="nobody-here-xyz")
    host = provider.host(provider.launch(provider.list_offers(GpuRequest())[0], f"gpujob-nouser-{time.time_ns()}"))
    try:
        with pytest.raises(Exception, match=r"local_run_as_user = 'nobody-here-xyz' is not a user on this machine"):
            host.start_trainer(["true"], {"PATH": "/usr/bin:/bin"})
    finally:
        host.destroy()
