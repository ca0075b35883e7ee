"""Real servers for the tests, on 127.0.0.1: moto's S3 server, Docker's dockerd, a Docker registry
(Debian's docker-registry with htpasswd auth), the trainer image built without Docker Hub, a
private PostgreSQL server, and the results databases of the tests on SQLite or PostgreSQL
(``RESULTS_DB``)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TRAINER_DIR = REPO / "include" / "trainer"
TRAINER_IMAGE = "gpu-trainer:latest"
BASE_IMAGE = "gpu-trainer-base:bookworm"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


# --- S3 ------------------------------------------------------------------------------------------


@dataclass
class MotoServer:
    endpoint: str
    proc: subprocess.Popen

    def aws_connection(self) -> str:
        """An Airflow ``aws`` connection (JSON form) to this server."""
        return json.dumps(
            {
                "conn_type": "aws",
                "login": "testing",
                "password": "testing",
                "extra": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
            }
        )

    def client(self):  # type: ignore[no-untyped-def]
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_moto() -> MotoServer:
    port = free_port()
    moto = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen(
        [str(moto), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, proc)
    return MotoServer(f"http://127.0.0.1:{port}", proc)


# --- Docker --------------------------------------------------------------------------------------


def docker_ok() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode == 0


def ensure_dockerd() -> subprocess.Popen | None:
    """A usable Docker engine: the running one, or a dockerd started here (returned, to stop).

    The default data root is kept, so built images stay cached between test runs.
    """
    if docker_ok():
        return None
    if os.geteuid() != 0 or shutil.which("dockerd") is None:
        raise RuntimeError("no running Docker engine and no way to start dockerd (needs root and docker.io)")
    log = open("/tmp/gpu-training-dockerd.log", "ab")  # noqa: SIM115 - lives as long as dockerd
    proc = subprocess.Popen(["dockerd"], stdout=log, stderr=log, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if docker_ok():
            return proc
        if proc.poll() is not None:
            raise RuntimeError("dockerd exited; see /tmp/gpu-training-dockerd.log")
        time.sleep(0.5)
    raise RuntimeError("dockerd did not answer within 60 s; see /tmp/gpu-training-dockerd.log")


def image_exists(image: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0


def image_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gpu-training" / "base-image.tar"


def ensure_trainer_image() -> str:
    """The reference trainer image, built locally (base image from Debian's mirror, no Docker Hub).

    The base image is kept in Docker and saved to ``~/.cache/gpu-training`` so a later run, even
    on a wiped Docker data root, does not debootstrap again. The trainer layer is always rebuilt
    (seconds), so the image tested is the one in this checkout.
    """
    if not image_exists(BASE_IMAGE):
        cache = image_cache()
        if cache.exists():
            subprocess.run(["docker", "load", "-q", "-i", str(cache)], check=True, capture_output=True)
        if not image_exists(BASE_IMAGE):
            subprocess.run(["bash", str(TRAINER_DIR / "build_base_image.sh"), BASE_IMAGE], check=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(["docker", "save", "-o", str(cache), BASE_IMAGE], check=True)
    subprocess.run(["docker", "build", "-q", "-t", TRAINER_IMAGE, str(TRAINER_DIR)], check=True, capture_output=True)
    return TRAINER_IMAGE


@dataclass
class Registry:
    """Debian's docker-registry with one htpasswd user."""

    address: str  # 127.0.0.1:PORT (Docker trusts plain HTTP on loopback)
    username: str
    password: str
    proc: subprocess.Popen
    docker_config: Path

    def connection(self, password: str | None = None) -> str:
        host, port = self.address.split(":")
        return json.dumps(
            {
                "conn_type": "generic",
                "host": host,
                "port": int(port),
                "login": self.username,
                "password": self.password if password is None else password,
            }
        )

    def docker(self, *args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "DOCKER_CONFIG": str(self.docker_config)}
        return subprocess.run(["docker", *args], env=env, capture_output=True, text=True, check=True)

    def push(self, local_image: str, name: str) -> str:
        """Push ``local_image`` as ``name``; the registry tag is then removed locally, so using it
        means pulling it."""
        ref = f"{self.address}/{name}"
        self.docker("tag", local_image, ref)
        self.docker("push", "--quiet", ref)
        self.docker("image", "rm", ref)
        return ref

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start_registry(root: Path, username: str = "trainer", password: str = "s3cret-registry-pw") -> Registry:
    import bcrypt

    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=5)).decode()
    (root / "htpasswd").write_text(f"{username}:{hashed}\n")
    (root / "config.yml").write_text(
        "\n".join(
            [
                "version: 0.1",
                "log:",
                "  level: error",
                "storage:",
                "  filesystem:",
                f"    rootdirectory: {root / 'data'}",
                "http:",
                f"  addr: 127.0.0.1:{port}",
                "auth:",
                "  htpasswd:",
                "    realm: gpu-training-tests",
                f"    path: {root / 'htpasswd'}",
                "",
            ]
        )
    )
    binary = shutil.which("docker-registry") or "/usr/bin/docker-registry"
    proc = subprocess.Popen(
        [binary, "serve", str(root / "config.yml")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_port(port, proc)
    registry = Registry(f"127.0.0.1:{port}", username, password, proc, root / "docker-config")
    registry.docker_config.mkdir(exist_ok=True)
    subprocess.run(
        ["docker", "login", "--username", username, "--password-stdin", registry.address],
        input=password,
        text=True,
        env={**os.environ, "DOCKER_CONFIG": str(registry.docker_config)},
        capture_output=True,
        check=True,
    )
    return registry


# --- PostgreSQL ----------------------------------------------------------------------------------


def _pg_bin_dirs() -> list[str]:
    """Debian's versioned directories (newest first), then the usual ones."""
    versioned = [p for p in Path("/usr/lib/postgresql").glob("*/bin") if p.parent.name.isdigit()]
    versioned.sort(key=lambda p: int(p.parent.name), reverse=True)
    return [str(p) for p in versioned] + ["/usr/local/bin", "/usr/bin"]


def pg_binary(name: str) -> str:
    dirs = _pg_bin_dirs()
    for directory in dirs:
        candidate = Path(directory) / name
        if candidate.exists():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"PostgreSQL's {name} not found (looked in {', '.join(dirs)} and PATH; apt-get install postgresql)"
        )
    return found


@dataclass
class PostgresServer:
    """A throwaway PostgreSQL cluster: trust auth for ``user`` on 127.0.0.1, one database."""

    port: int
    user: str
    database: str
    data_dir: Path
    proc: subprocess.Popen

    def url(self, driver: str = "psycopg2") -> str:
        return f"postgresql+{driver}://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: PostgreSQL's fast shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_postgres(
    root: Path,
    *,
    user: str = "airflow",
    database: str = "airflow",
    max_connections: int = 300,
    settings: dict[str, str] | None = None,
) -> PostgresServer:
    """initdb in ``root`` and start ``postgres`` on a free port (as the ``postgres`` system user when
    run as root: the server refuses to run as root). Logs to ``root/postgres.log``. ``settings``:
    more ``-c name=value`` server settings."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    uid: int | None = None
    gid: int | None = None
    extra_groups: list[int] | None = None
    if os.geteuid() == 0:
        import pwd

        entry = pwd.getpwnam("postgres")  # KeyError: no such user; create one or run as non-root
        os.chown(root, entry.pw_uid, entry.pw_gid)
        uid, gid, extra_groups = entry.pw_uid, entry.pw_gid, []
    subprocess.run(
        [pg_binary("initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        user=uid,
        group=gid,
        extra_groups=extra_groups,
    )
    port = free_port()
    log = open(root / "postgres.log", "ab")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [
            pg_binary("postgres"),
            "-D",
            str(data),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            f"max_connections={max_connections}",
            *(arg for name, value in (settings or {}).items() for arg in ("-c", f"{name}={value}")),
        ],
        stdout=log,
        stderr=log,
        start_new_session=True,
        user=uid,
        group=gid,
        extra_groups=extra_groups,
    )
    wait_for_port(port, proc, timeout=60)
    deadline = time.monotonic() + 30
    while True:
        created = subprocess.run(
            [pg_binary("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database], capture_output=True
        )
        if created.returncode == 0:
            break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"createdb failed: {created.stderr.decode(errors='replace')}")
        time.sleep(0.5)
    return PostgresServer(port, user, database, data, proc)


# --- Redis ---------------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A throwaway Redis (Debian's redis-server) on 127.0.0.1, nothing persisted."""

    port: int
    proc: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_redis(root: Path) -> RedisServer:
    """``redis-server`` on a free port, working (and logging) in ``root``; no RDB/AOF files."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise RuntimeError("redis-server not found (apt-get install redis-server; .ci/system-deps does)")
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root), "--save", "", "--appendonly", "no"]
    argv += ["--logfile", str(root / "redis.log"), "--daemonize", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for_port(port, proc, timeout=30)
    return RedisServer(port, proc)


# --- results databases: SQLite or PostgreSQL ----------------------------------------------------

#: The results DB backends the suite runs against (``RESULTS_DB``: one of these, or ``both``).
RESULTS_BACKENDS = ("sqlite", "postgresql")


def results_db_setting() -> str:
    """``RESULTS_DB`` (``sqlite``, ``postgresql`` or ``both``; default ``both``)."""
    value = os.environ.get("RESULTS_DB", "").strip().lower() or "both"
    if value not in (*RESULTS_BACKENDS, "both"):
        raise ValueError(f"RESULTS_DB={value!r}: expected sqlite, postgresql or both")
    return value


def chosen_results_backends() -> list[str]:
    """The backends every test of the store runs on: ``RESULTS_DB``, both by default."""
    setting = results_db_setting()
    return list(RESULTS_BACKENDS) if setting == "both" else [setting]


def single_results_backend() -> str:
    """The one backend of the tests that run a whole Airflow (end to end): SQLite unless
    ``RESULTS_DB=postgresql``."""
    return "postgresql" if results_db_setting() == "postgresql" else "sqlite"


#: A test server keeps nothing worth a crash: nothing is flushed to disk.
_THROWAWAY_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


class PostgresResults:
    """A PostgreSQL server for results databases. The schema is migrated once, into the template
    database ``results_template``; :meth:`fresh_database` copies it (``CREATE DATABASE ...
    TEMPLATE``: milliseconds, where migrating takes a second) or makes an empty one, and
    :meth:`drop_database` drops it, connections and all."""

    TEMPLATE = "results_template"

    def __init__(self, server: PostgresServer) -> None:
        self.server = server
        self._numbers = itertools.count(1)
        self._admin_conn: Any = None

    @classmethod
    def start(cls, root: Path) -> PostgresResults:
        from gpu_training.hooks.results import create_results_engine
        from gpu_training.results.migrate import upgrade

        server = start_postgres(root, user="results", database=cls.TEMPLATE, settings=_THROWAWAY_SETTINGS)
        try:
            engine = create_results_engine(f"postgresql://{server.user}@127.0.0.1:{server.port}/{cls.TEMPLATE}")
            upgrade(engine)
            engine.dispose()
        except BaseException:
            server.stop()
            raise
        return cls(server)

    def url(self, database: str) -> str:
        """The URL of one of its databases (psycopg2; a URI Airflow connections take as is)."""
        return f"postgresql://{self.server.user}@127.0.0.1:{self.server.port}/{database}"

    def _admin(self, sql: str) -> None:
        import psycopg2

        if self._admin_conn is None or self._admin_conn.closed:
            self._admin_conn = psycopg2.connect(
                host="127.0.0.1", port=self.server.port, user=self.server.user, dbname="postgres"
            )
            self._admin_conn.autocommit = True
        with self._admin_conn.cursor() as cur:
            cur.execute(sql)

    def fresh_database(self, *, migrated: bool = True) -> str:
        """A new database, at the schema's head (a copy of the template) or empty; its URL."""
        name = f"t_{next(self._numbers)}"
        self._admin(f"CREATE DATABASE {name} TEMPLATE {self.TEMPLATE if migrated else 'template0'}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        assert name and name.startswith("t_"), f"not a database of fresh_database: {url}"
        self._admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def stop(self) -> None:
        if self._admin_conn is not None:
            self._admin_conn.close()
        self.server.stop()


_sqlite_template: Path | None = None


def sqlite_results_template() -> Path:
    """A SQLite results DB migrated to head once per process: a migrated SQLite DB is a copy of it
    (a file copy, where migrating takes a few hundred ms)."""
    global _sqlite_template
    if _sqlite_template is None:
        import atexit
        import tempfile

        from gpu_training.hooks.results import create_results_engine
        from gpu_training.results.migrate import upgrade

        directory = Path(tempfile.mkdtemp(prefix="results-sqlite-template-"))
        atexit.register(shutil.rmtree, directory, True)
        path = directory / "results.db"
        engine = create_results_engine(f"sqlite:///{path}")
        upgrade(engine)
        engine.dispose()  # the last connection closed: the WAL is checkpointed into the file
        assert not path.with_name("results.db-wal").exists(), "the template's WAL was not checkpointed"
        _sqlite_template = path
    return _sqlite_template


class ResultsDatabases:
    """The results databases of one test (or one module): SQLite files in ``directory`` (a migrated
    one is a copy of :func:`sqlite_results_template`), or databases of a shared
    :class:`PostgresResults` (``postgres`` is called, so the server starts, only when one is asked
    for). :meth:`close` disposes of the engines made here and drops the PostgreSQL databases."""

    def __init__(self, directory: Path, postgres: Callable[[], PostgresResults]) -> None:
        self.directory = directory
        self._start_postgres = postgres
        self._server: PostgresResults | None = None
        self._databases: list[str] = []
        self._engines: list[Any] = []
        self._files = itertools.count()

    def url(self, backend: str, *, migrated: bool = True) -> str:
        """A new database on ``backend``, migrated to head or empty; its SQLAlchemy URL."""
        if backend == "sqlite":
            number = next(self._files)
            path = self.directory / ("results.db" if number == 0 else f"results-{number}.db")
            if migrated:
                shutil.copyfile(sqlite_results_template(), path)
            return f"sqlite:///{path}"
        if backend == "postgresql":
            if self._server is None:
                self._server = self._start_postgres()
            url = self._server.fresh_database(migrated=migrated)
            self._databases.append(url)
            return url
        raise ValueError(f"unknown results DB backend {backend!r}")

    def engine(self, backend: str, *, migrated: bool = True) -> Any:
        """An engine (``create_results_engine``, as the plugin makes them) on a new database."""
        return self.engine_for(self.url(backend, migrated=migrated))

    def engine_for(self, url: str) -> Any:
        """An engine on ``url``, disposed of by :meth:`close`."""
        from gpu_training.hooks.results import create_results_engine

        engine = create_results_engine(url)
        self._engines.append(engine)
        return engine

    def close(self) -> None:
        for engine in self._engines:
            engine.dispose()
        self._engines.clear()
        for url in self._databases:
            assert self._server is not None
            self._server.drop_database(url)
        self._databases.clear()


def results_connection(url: str) -> str:
    """``AIRFLOW_CONN_TRAINING_RESULTS`` for a results URL: the JSON form of a ``sqlite`` connection
    (host: the file), else the URL itself."""
    if url.startswith("sqlite:///"):
        return json.dumps({"conn_type": "sqlite", "host": url[len("sqlite:///") :]})
    return url


def results_url_of(env: dict[str, str]) -> str:
    """The results DB of the Airflow that runs in ``env``, as the plugin finds it and connects to it
    (driver included): the connection ``training_results`` from ``AIRFLOW_CONN_TRAINING_RESULTS``,
    else the SQLite default in ``AIRFLOW_HOME``."""
    from gpu_training.hooks.results import engine_url, url_from_connection

    value = env.get("AIRFLOW_CONN_TRAINING_RESULTS")
    if not value:
        return f"sqlite:///{env['AIRFLOW_HOME']}/training_results.db"
    from airflow.models.connection import Connection

    if value.lstrip().startswith("{"):
        conn = Connection.from_json(value, conn_id="training_results")
    else:
        conn = Connection(conn_id="training_results", uri=value)
    return engine_url(url_from_connection(conn)).render_as_string(hide_password=False)
