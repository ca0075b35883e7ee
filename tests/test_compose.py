"""The production deployment as its users rely on it: docker-compose.yaml rendered by the real compose
tool (`docker compose` v2, else `docker-compose` 1.29; .ci/system-deps installs one) with the .env
that `make up` writes, and include/deploy/Dockerfile read against requirements.txt and the code.

No image is built or pulled here; `config` interpolates .env, resolves anchors and merges and
validates the file the way `up` does.
"""

from __future__ import annotations

import functools
import os
import posixpath
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.fernet import Fernet
from sqlalchemy import make_url

from gpu_training.hooks.results import DEFAULT_CONN_ID as RESULTS_CONN_ID
from gpu_training.params import DEFAULT_IMAGE
from gpu_training.policy import OPTIONS, SECTION, Policy
from gpu_training.retraining.spec import DEFAULT_POOL
from gpu_training.storage import AWS_CONN_ID
from tests.airflow_cluster import API_SECRET_KEY, COMPONENT_SECRETS, FERNET_KEY, JWT_SECRET

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yaml"
DOCKERFILE = REPO / "include" / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "include" / "deploy" / "Dockerfile.dockerignore"

#: The secrets a deployment must not run without (each ``${VAR:?message}`` in the compose file).
SECRETS = (
    "POSTGRES_PASSWORD",
    "MINIO_ROOT_PASSWORD",
    "AIRFLOW_FERNET_KEY",
    "AIRFLOW_JWT_SECRET",
    "AIRFLOW_API_SECRET_KEY",
    "AIRFLOW_ADMIN_PASSWORD",
)
#: Airflow's components in the deployment; each runs the image of include/deploy/Dockerfile.
AIRFLOW_SERVICES = (
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-init",
    "flower",
)
LONG_RUNNING = tuple(name for name in AIRFLOW_SERVICES if name != "airflow-init")
#: Which Airflow secret each service gets: only those its component uses (docs/security.md
#: "Secrets", measured by tests/e2e/celery/secrets_matrix.py), by the .env variable holding it.
SERVICE_SECRETS: dict[str, set[str]] = {
    "airflow-apiserver": {FERNET_KEY, JWT_SECRET, API_SECRET_KEY},
    "airflow-scheduler": {JWT_SECRET},
    "airflow-dag-processor": set(),
    "airflow-triggerer": {FERNET_KEY, API_SECRET_KEY},
    "airflow-worker": {API_SECRET_KEY},
    "airflow-init": {FERNET_KEY},
    "flower": set(),
}
#: The component (tests/airflow_cluster.py COMPONENT_SECRETS, what `make cluster` runs) of each service.
SERVICE_ROLES = {
    "airflow-apiserver": "api-server",
    "airflow-scheduler": "scheduler",
    "airflow-dag-processor": "dag-processor",
    "airflow-triggerer": "triggerer",
    "airflow-worker": "worker",
    "airflow-init": "init",
}
#: The .env variable of each Airflow secret.
SECRET_SOURCES = {
    FERNET_KEY: "AIRFLOW_FERNET_KEY",
    JWT_SECRET: "AIRFLOW_JWT_SECRET",
    API_SECRET_KEY: "AIRFLOW_API_SECRET_KEY",
}


@functools.cache
def compose_tool() -> list[str]:
    """`docker compose` v2 when it answers, else `docker-compose`; a failure (not a skip) without either."""
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    pytest.fail(
        "neither `docker compose` (v2) nor `docker-compose` is installed, so docker-compose.yaml cannot be "
        "validated: run .ci/system-deps as root (it installs Debian's docker-compose) or install Compose v2"
    )


def compose_vars() -> set[str]:
    return set(re.findall(r"\$\{(\w+)", COMPOSE_FILE.read_text()))


def run_config(env_file: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    """``config`` of docker-compose.yaml with this env file; the caller's shell cannot leak a value in."""
    env = {k: v for k, v in os.environ.items() if k not in compose_vars()}
    env.update(overrides)
    cmd = [*compose_tool(), "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "--profile", "flower", "config"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return dict(pairs)


@pytest.fixture(scope="module")
def env_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .env that `make up` writes (its `.env` target), in a directory of its own."""
    workdir = tmp_path_factory.mktemp("compose")
    subprocess.run(["make", "-s", "-C", str(workdir), "-f", str(REPO / "Makefile"), ".env"], check=True, timeout=60)
    return workdir / ".env"


@pytest.fixture(scope="module")
def secrets(env_file: Path) -> dict[str, str]:
    return read_env_file(env_file)


@pytest.fixture(scope="module")
def services(env_file: Path) -> dict[str, Any]:
    result = run_config(env_file)
    assert result.returncode == 0, f"config failed with the .env of make up:\n{result.stderr}"
    return dict(yaml.safe_load(result.stdout)["services"])


def command_text(service: dict[str, Any]) -> str:
    """A service's command as one string (v2 renders a string command as a list), `$$` unescaped."""
    command = service.get("command") or ""
    text = command if isinstance(command, str) else " ".join(command)
    return text.replace("$$", "$")


def healthcheck_text(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test") or ""
    return (test if isinstance(test, str) else " ".join(test)).replace("$$", "$")


def bind_mounts(service: dict[str, Any]) -> list[str]:
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("type") == "bind":
                mounts.append(str(volume.get("source")))
        elif volume.split(":", 1)[0].startswith(("/", ".", "~")):
            mounts.append(volume)
    return mounts


def volume_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of each volume (v2 renders dicts, 1.29 ``source:target:mode`` strings)."""
    mounts = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts.append((str(volume.get("source")), str(volume.get("target"))))
        else:
            source, target = volume.split(":")[:2]
            mounts.append((source, target))
    return mounts


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in deps.items()}


# --- .env and secrets ---------------------------------------------------------------------------


def test_make_writes_every_required_secret_once(env_file: Path, secrets: dict[str, str]) -> None:
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE_FILE.read_text()))
    assert required == set(SECRETS)
    assert set(SECRETS) <= set(secrets), f"make .env wrote {sorted(secrets)}"
    assert all(secrets[name] for name in SECRETS)
    assert len({secrets[name] for name in SECRETS}) == len(SECRETS), "every secret is a value of its own"
    for name in SECRETS:  # they go into database URLs unquoted
        assert re.fullmatch(r"[A-Za-z0-9_=-]+", secrets[name]), name
    Fernet(secrets["AIRFLOW_FERNET_KEY"].encode())  # raises on a malformed key
    assert env_file.stat().st_mode & 0o077 == 0, "the secrets file is private to its owner"
    before = env_file.read_text()
    subprocess.run(["make", "-s", "-C", str(env_file.parent), "-f", str(REPO / "Makefile"), ".env"], check=True)
    assert env_file.read_text() == before, "a second make up keeps the secrets (databases were created with them)"


@pytest.mark.parametrize("missing", SECRETS)
def test_config_fails_naming_a_missing_secret(env_file: Path, tmp_path: Path, missing: str) -> None:
    partial = tmp_path / ".env"
    kept = [line for line in env_file.read_text().splitlines() if not line.startswith(f"{missing}=")]
    partial.write_text("\n".join(kept) + "\n")
    result = run_config(partial)
    assert result.returncode != 0
    assert f"set {missing} in .env (make up writes one)" in result.stderr


def test_env_file_is_never_committed() -> None:
    assert "/.env" in (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in DOCKERIGNORE.read_text().split(), "the build context must not carry .env into a layer"


def test_each_airflow_service_gets_only_the_secrets_its_component_uses(
    services: dict[str, Any], secrets: dict[str, str]
) -> None:
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        given = {var for var in SECRET_SOURCES if var in env}
        assert given == SERVICE_SECRETS[name], f"{name} gets {sorted(given)}"
        for var in given:
            assert env[var] == secrets[SECRET_SOURCES[var]], (name, var)
        assert f":{secrets['POSTGRES_PASSWORD']}@" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
    # `make cluster` runs the same split (the e2e tests run what compose ships).
    assert {SERVICE_ROLES[name]: frozenset(SERVICE_SECRETS[name]) for name in SERVICE_ROLES} == COMPONENT_SECRETS
    # Flower runs no Airflow component: nothing of Airflow's to sign or decrypt.
    assert SERVICE_SECRETS["flower"] == set()
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == secrets["POSTGRES_PASSWORD"]
    assert services["minio"]["environment"]["MINIO_ROOT_PASSWORD"] == secrets["MINIO_ROOT_PASSWORD"]
    assert services["airflow-apiserver"]["environment"]["AIRFLOW_ADMIN_PASSWORD"] == secrets["AIRFLOW_ADMIN_PASSWORD"]
    dockerfile = DOCKERFILE.read_text()
    assert not any(secrets[name] in dockerfile for name in SECRETS)


def test_each_secret_is_said_where_it_is_given(services: dict[str, Any]) -> None:
    """Every secret comes from one anchor, whose comment names the components that use it."""
    text = COMPOSE_FILE.read_text()
    for anchor, var, users in (
        ("fernet-key", FERNET_KEY, ("api-server", "triggerer", "airflow-init")),
        ("jwt-secret", JWT_SECRET, ("scheduler", "api-server")),
        ("api-secret-key", API_SECRET_KEY, ("api-server", "worker", "triggerer")),
    ):
        assert text.count(f"{var}:") == 1, f"{var} is set once, in x-{anchor}"
        block = text[: text.index(f"x-{anchor}: &{anchor}")]
        comment = block[block.rstrip().rfind("\n\n") :]
        assert all(user in comment for user in users), (anchor, comment)


# --- the Airflow services -----------------------------------------------------------------------


def test_every_airflow_service_runs_celery_from_the_one_baked_image(services: dict[str, Any]) -> None:
    built = {name for name, service in services.items() if service.get("build")}
    assert built == set(AIRFLOW_SERVICES)
    images = {services[name]["image"] for name in AIRFLOW_SERVICES}
    assert len(images) == 1, f"one image for every Airflow service, got {images}"
    for name in AIRFLOW_SERVICES:
        service = services[name]
        assert Path(service["build"]["context"]).resolve() == REPO, name
        assert (REPO / service["build"]["dockerfile"]).resolve() == DOCKERFILE, name
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert make_url(env["AIRFLOW__CELERY__BROKER_URL"]).host == "redis", name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql"), name
        assert bind_mounts(service) == [], f"{name}: the code is baked into the image, not mounted"


def test_two_celery_workers_by_default(services: dict[str, Any], env_file: Path) -> None:
    worker = services["airflow-worker"]
    assert command_text(worker) == "celery worker"
    assert worker["deploy"]["replicas"] == 2
    scaled = run_config(env_file, AIRFLOW_WORKER_REPLICAS="5")
    assert scaled.returncode == 0, scaled.stderr
    assert yaml.safe_load(scaled.stdout)["services"]["airflow-worker"]["deploy"]["replicas"] == 5


def test_workers_reach_the_execution_api_of_the_api_server(services: dict[str, Any]) -> None:
    for name in AIRFLOW_SERVICES:
        url = make_url(services[name]["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
        assert url.host == "airflow-apiserver" and url.database == "execution/", name
        ports = {str(port.get("target")) if isinstance(port, dict) else str(port).rsplit(":", 1)[-1]
                 for port in services["airflow-apiserver"].get("ports", [])}  # fmt: skip
        assert str(url.port) in ports, name
    assert "airflow api-server" in command_text(services["airflow-apiserver"])
    assert depends_on(services["airflow-worker"])["airflow-apiserver"] == "service_healthy"


def test_every_long_running_service_has_a_healthcheck(services: dict[str, Any]) -> None:
    checks = {name: healthcheck_text(services[name]) for name in (*LONG_RUNNING, "postgres", "redis", "minio")}
    assert all(checks.values()), [name for name, check in checks.items() if not check]
    assert "/api/v2/monitor/health" in checks["airflow-apiserver"]
    assert "inspect ping" in checks["airflow-worker"]
    assert '"celery@${HOSTNAME}"' in checks["airflow-worker"], "each replica pings itself"
    assert "8974/health" in checks["airflow-scheduler"]
    assert "--job-type DagProcessorJob" in checks["airflow-dag-processor"]
    assert "--job-type TriggererJob" in checks["airflow-triggerer"]
    for name in LONG_RUNNING:
        assert depends_on(services[name])["airflow-init"] == "service_completed_successfully", name


def test_flower_only_with_its_profile(services: dict[str, Any]) -> None:
    assert services["flower"]["profiles"] == ["flower"]
    assert command_text(services["flower"]) == "celery flower"
    assert not any(services[name].get("profiles") for name in services if name != "flower")


# --- airflow-init: databases, connections, pool ------------------------------------------------


def test_results_db_is_a_database_of_its_own(services: dict[str, Any]) -> None:
    init = services["airflow-init"]
    metadata = make_url(init["environment"]["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    results = make_url(init["environment"]["TRAINING_RESULTS_URL"])
    assert (results.host, results.port) == (metadata.host, metadata.port) and results.host in services
    assert results.database and results.database != metadata.database
    script = command_text(init)
    assert f"CREATE DATABASE {results.database}" in script
    assert 'gpu_training.results.migrate upgrade --url "${TRAINING_RESULTS_URL}"' in script
    assert script.index("airflow db migrate") < script.index(f"airflow pools get {DEFAULT_POOL}")


def test_init_creates_every_connection_the_code_uses(services: dict[str, Any]) -> None:
    init = services["airflow-init"]
    script = command_text(init)
    for conn_id in (RESULTS_CONN_ID, AWS_CONN_ID):
        assert re.search(rf"connections get {conn_id}\b[^|]*\|\| airflow connections add {conn_id}\s", script), (
            f"airflow-init does not create connection {conn_id!r} (once: what an operator changed is kept)"
        )
    assert re.search(rf"connections add {RESULTS_CONN_ID} --conn-uri \"\$\{{TRAINING_RESULTS_URL\}}\"", script)
    aws = script[script.index(f"connections add {AWS_CONN_ID}") :]
    assert r"\"endpoint_url\": \"${S3_ENDPOINT_URL}\"" in aws
    endpoint = make_url(init["environment"]["S3_ENDPOINT_URL"])
    assert endpoint.host == "minio" and endpoint.host in services
    assert re.search(rf"airflow pools set {DEFAULT_POOL} 4 .*--include-deferred", script)
    deps = depends_on(init)
    assert deps["postgres"] == deps["redis"] == "service_healthy"
    assert deps["minio-init"] == "service_completed_successfully"
    assert depends_on(services["minio-init"])["minio"] == "service_healthy"
    assert "mc mb --ignore-existing" in command_text(services["minio-init"])


# --- the deployment's policy ([gpu_training]) ----------------------------------------------------


def policy_of(service: dict[str, Any]) -> Policy:
    env = service["environment"]
    prefix = f"AIRFLOW__{SECTION.upper()}__"
    return Policy.from_values({key: env[prefix + key.upper()] for key in OPTIONS if prefix + key.upper() in env})


def test_the_deployment_ships_without_the_local_provider(services: dict[str, Any]) -> None:
    policies = {name: policy_of(services[name]) for name in AIRFLOW_SERVICES}
    assert len(set(policies.values())) == 1, "one policy in every Airflow container"
    policy = policies["airflow-worker"]
    assert not policy.allows_provider("local"), "local runs trainers on the workers themselves"
    assert policy.allowed_providers == ("ssh", "lambda", "runpod", "vast", "ec2")
    # file:// only inside the image's storage folder, the volume every worker and the api-server share.
    assert policy.allowed_file_roots == ("/opt/airflow/storage",)
    for name in AIRFLOW_SERVICES:
        assert ("gpu-training-storage", "/opt/airflow/storage") in volume_mounts(services[name]), name
    # The README's examples fit; the deployment's own connections cannot be named by a job.
    assert all(policy.allows_connection(c) for c in ("gpu_box", "gpu_instance_ssh", "trainer_registry", "team_mail"))
    for conn_id in (AWS_CONN_ID, RESULTS_CONN_ID, "lambda_default", "runpod_default", "vast_default"):
        assert not policy.allows_connection(conn_id), conn_id
    assert policy.allows_image(DEFAULT_IMAGE) and not policy.allows_image("docker.io/library/alpine:latest")


def test_init_needs_no_local_provider(services: dict[str, Any]) -> None:
    """airflow-init creates databases, connections and a pool: nothing it creates or runs is a job
    (a `dags trigger` on the default params would be refused: their provider is local)."""
    script = command_text(services["airflow-init"])
    assert "dags trigger" not in script and "dags test" not in script and "local" not in script


# --- the image -----------------------------------------------------------------------------------


def dockerfile_lines() -> list[str]:
    return [line.strip() for line in DOCKERFILE.read_text().replace("\\\n", " ").splitlines() if line.strip()]


def test_image_is_the_airflow_version_of_requirements() -> None:
    pin = re.search(r"^apache-airflow==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert pin, "requirements.txt pins apache-airflow"
    final = [line for line in dockerfile_lines() if line.upper().startswith("FROM ")][-1]
    tag = re.fullmatch(r"FROM apache/airflow:(\S+)-python(\S+)", final)
    assert tag, f"the final stage is the official image, got {final!r}"
    assert tag.group(1) == pin.group(1)
    assert tag.group(2) == "3.11"


def test_image_installs_requirements_and_bakes_the_code() -> None:
    lines = dockerfile_lines()
    assert any(re.fullmatch(r"COPY requirements\.txt (\S+)", line) for line in lines)
    pip = [line for line in lines if line.startswith("RUN pip install")]
    assert any("-r /requirements.txt" in line and '"apache-airflow==${AIRFLOW_VERSION}"' in line for line in pip)
    for folder in ("dags", "plugins", "include"):
        assert any(re.fullmatch(rf"COPY (--chown=\S+ )?{folder}/ /opt/airflow/{folder}/", line) for line in lines)
    assert "ENV PYTHONPATH=/opt/airflow/plugins" in lines


def test_image_installs_the_provider_distribution_from_the_baked_code() -> None:
    """pip builds the distribution from the files the image holds (pyproject.toml beside the copied
    dags/, plugins/ and include/), after them, without touching the pinned dependencies."""
    lines = dockerfile_lines()
    copy = next(
        i
        for i, line in enumerate(lines)
        if re.fullmatch(r"COPY (--chown=\S+ )?pyproject\.toml README\.md /opt/airflow/", line)
    )
    install = next(
        i for i, line in enumerate(lines) if line.startswith("RUN pip install --no-cache-dir --no-deps /opt/airflow")
    )
    plugins = next(
        i for i, line in enumerate(lines) if re.fullmatch(r"COPY (--chown=\S+ )?plugins/ /opt/airflow/plugins/", line)
    )
    assert plugins < copy < install


def test_image_builds_the_ui_where_the_plugin_serves_it() -> None:
    lines = dockerfile_lines()
    stage = lines.index("FROM node:20-bookworm-slim AS ui")
    workdir = next(line.split()[1] for line in lines[stage:] if line.startswith("WORKDIR "))
    assert workdir.endswith("/include/ui")
    assert "RUN npm ci --no-audit --no-fund --loglevel=error" in lines and "RUN npm run build" in lines
    out_dir = re.search(r'outDir: fileURLToPath\(new URL\("([^"]+)"', (REPO / "include/ui/vite.config.js").read_text())
    assert out_dir
    built = posixpath.normpath(posixpath.join(workdir, out_dir.group(1)))
    copy = next(line for line in lines if line.startswith("COPY --from=ui "))
    source, dest = copy.split()[-2:]
    assert source.rstrip("/") == built
    assert dest.rstrip("/") == "/opt/airflow/plugins/gpu_training/ui_dist"


def test_build_context_leaves_local_state_out() -> None:
    patterns = {line for line in DOCKERIGNORE.read_text().splitlines() if line and not line.startswith("#")}
    for needed in (".venv", "**/node_modules", "airflow_home", ".git", ".env", ".pytest-shards", "**/__pycache__"):
        assert needed in patterns, needed
