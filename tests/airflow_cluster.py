"""A real Airflow 3 deployment on 127.0.0.1, one OS process per component, for tests and benchmarks.

``AirflowCluster(home)`` prepares an Airflow home (LocalExecutor, the repo's ``dags/`` and
``plugins/``, SQLite metadata DB in ``home`` unless ``sql_alchemy_conn`` is given, the results DB at
``home/training_results.db``), migrates both databases and starts ``airflow api-server``,
``scheduler``, ``dag-processor`` and ``triggerer`` as subprocesses, each leading its own process
group (so a kill takes the component with its children, e.g. the LocalExecutor's workers) and
logging to ``home/logs/<component>.log``. Everything talks to the REST API on a free port; with
``[core] simple_auth_manager_all_admins`` no token is needed. ``users={"admin": ("ADMIN", "pw"),
...}`` instead configures real SimpleAuthManager users (role ``""``: a user without any access) with
their passwords; the harness then calls the API with a token of the first ``ADMIN`` user, got from
``POST /auth/token`` (:meth:`AirflowCluster.token`).

Failure detection is tuned for tests (a killed scheduler's tasks are reset after ~20 s instead of
5 min, a killed triggerer's triggers are re-assigned after ~10 s instead of 30 s); pass
``extra_env`` to override any setting. Every wait raises :class:`ClusterError` with the tail of the
component logs that matter, and :meth:`AirflowCluster.stop` (also registered with ``atexit``) leaves
no process behind: the components' groups, and any process still working in ``home`` (trainers of
the local provider run detached in their own session there).

    with AirflowCluster(tmp_path / "airflow") as cluster:
        cluster.wait_dag_parsed("gpu_training")
        run_id = cluster.trigger("gpu_training", {"project_id": "x"})
        assert cluster.wait_run("gpu_training", run_id, timeout=300) == "success"

Each component runs with :meth:`AirflowCluster.env_for` its name: the shared environment, less the
Airflow secrets its role does not get when ``component_secrets`` is given (:data:`COMPONENT_SECRETS`,
what docker-compose.yaml gives each service), plus ``component_env`` overrides; ``db_connections``
are stored in the metadata DB by the init step rather than set as ``AIRFLOW_CONN_*``.

``python tests/airflow_cluster.py HOME`` starts one and keeps it up until Ctrl-C; with ``--celery``
(``make cluster``, :func:`start_make_cluster`) the compose topology on port 8080 (``--port``), where
signing in is required: user ``admin``, password generated once per HOME and printed at start; its
components hold only their secrets and its connections are in the metadata DB, as with compose.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script (bench/, ``python tests/airflow_cluster.py``)
    sys.path.insert(0, str(REPO))

from tests.servers import free_port, wait_for_port  # noqa: E402

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# The /api/v2/monitor/health key of each component that heartbeats.
_HEALTH_KEYS = {"scheduler": "scheduler", "dag-processor": "dag_processor", "triggerer": "triggerer"}
FINISHED_RUN_STATES = ("success", "failed")
FINISHED_TI_STATES = ("success", "failed", "skipped", "upstream_failed", "removed")

#: Airflow's three deployment secrets, by the environment variable that sets each.
FERNET_KEY = "AIRFLOW__CORE__FERNET_KEY"
JWT_SECRET = "AIRFLOW__API_AUTH__JWT_SECRET"
API_SECRET_KEY = "AIRFLOW__API__SECRET_KEY"
AIRFLOW_SECRETS = (FERNET_KEY, JWT_SECRET, API_SECRET_KEY)
#: Which of them each component of the CeleryExecutor deployment uses, measured on a running
#: deployment (``tests/e2e/celery/secrets_matrix.py``; the table and the failures: docs/security.md
#: "Secrets"). docker-compose.yaml gives each service the same; ``make cluster`` runs with it.
#: Roles: ``init`` is the one-off setup (``airflow db migrate``, ``airflow connections add``),
#: ``worker`` every ``airflow celery worker``.
#: - Fernet key: where stored connections and variables are read or written: the api-server (the
#:   execution API serves them to tasks), the triggerer (connections its triggers read) and init.
#:   Not the dag-processor: no DAG file here reads one while parsed.
#: - JWT secret: the scheduler signs each task's token, the api-server validates it (and signs and
#:   validates users' tokens).
#: - API secret key: the api-server signs its requests for a running task's log to the log servers
#:   of the workers and the triggerer, which check them.
COMPONENT_SECRETS: dict[str, frozenset[str]] = {
    "api-server": frozenset({FERNET_KEY, JWT_SECRET, API_SECRET_KEY}),
    "scheduler": frozenset({JWT_SECRET}),
    "dag-processor": frozenset(),
    "triggerer": frozenset({FERNET_KEY, API_SECRET_KEY}),
    "worker": frozenset({API_SECRET_KEY}),
    "init": frozenset({FERNET_KEY}),
}


class ClusterError(RuntimeError):
    """A wait timed out or a component misbehaved; the message carries the relevant log tails."""


def _log(msg: str) -> None:
    print(f"[airflow-cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _proc_stat(pid: int | str) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _all_pids() -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            yield int(entry)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    out = []
    for pid in _all_pids():
        fields = _proc_stat(pid)
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(pid)
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid in _all_pids():
        fields = _proc_stat(pid)
        if fields and fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        if _proc_stat(pid) is None:
            continue
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def cpu_seconds(pids: Collection[int]) -> float:
    """utime + stime of these processes (their own, not their reaped children's), in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = _proc_stat(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
    return total / ticks


def tail(path: Path, lines: int = 60) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 256 * 1024))
            text = fh.read().decode(errors="replace")
    except OSError as err:
        return f"({path}: {err})"
    return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path``, readable by this user only (mode 0600), whatever the umask."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


class PortInUse(ClusterError):
    """The api-server's port is taken; the message says by which process when it can."""


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes listening on TCP ``port`` (IPv4 and IPv6, any address), from /proc/net."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is ADDR:PORT in hex; state 0A is LISTEN.
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on ``port``, if this user can see it."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not sockets:
        return None
    for pid in _all_pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target in sockets:
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
                except OSError:
                    cmdline = "?"
                return f"pid {pid} ({cmdline[:200]})"
    return None


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise :class:`PortInUse` naming the process that listens on ``host:port``, if one does."""
    with socket.socket() as sock:
        # As uvicorn binds: SO_REUSEADDR, so only a listener (not a closing connection) counts.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            return
        except OSError as err:
            reason = err.strerror or str(err)
    holder = port_holder(port)
    who = f"it is taken by {holder}" if holder else f"{reason} (`ss -ltnp 'sport = :{port}'` shows who holds it)"
    raise PortInUse(f"port {port} on {host} is not free for the api-server: {who}; stop that, or choose another port")


def _fernet_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


class AirflowCluster:
    """An Airflow deployment with separate api-server, scheduler, dag-processor and triggerer."""

    def __init__(
        self,
        home: Path,
        *,
        parallelism: int = 32,
        extra_env: dict[str, str] | None = None,
        sql_alchemy_conn: str | None = None,
        startup_timeout: float = 240.0,
        users: dict[str, tuple[str, str]] | None = None,
        executor: str = "LocalExecutor",
        broker_url: str | None = None,
        celery_workers: int = 2,
        worker_concurrency: int = 8,
        results_url: str | None = None,
        port: int | None = None,
        component_secrets: Mapping[str, Collection[str]] | None = None,
        component_env: Mapping[str, Mapping[str, str | None]] | None = None,
        db_connections: Mapping[str, str] | None = None,
    ) -> None:
        if executor not in ("LocalExecutor", "CeleryExecutor"):
            raise ValueError(f"executor {executor!r}: LocalExecutor or CeleryExecutor")
        if executor == "CeleryExecutor" and (not broker_url or not sql_alchemy_conn or "sqlite" in sql_alchemy_conn):
            raise ValueError("CeleryExecutor needs broker_url and a PostgreSQL sql_alchemy_conn (celery_deployment())")
        self.home = Path(home).resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.logs = self.home / "logs"
        self.logs.mkdir(exist_ok=True)
        self.parallelism = parallelism
        self.startup_timeout = startup_timeout
        # A port of the caller's (make cluster: 8080) is checked before anything starts; without
        # one, a free port.
        self.fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.sql_alchemy_conn = sql_alchemy_conn or f"sqlite:///{self.home / 'airflow.db'}"
        # The results DB: the embedded default (SQLite in the home) unless a URL is given, which the
        # tasks then get as the ``training_results`` connection.
        self.results_url = results_url or f"sqlite:///{self.home / 'training_results.db'}"
        self.executor = executor
        self.broker_url = broker_url
        self.worker_concurrency = worker_concurrency
        self.workers = tuple(f"celery-worker-{i}" for i in range(1, celery_workers + 1)) if broker_url else ()
        self.components = COMPONENTS + self.workers
        # Each worker's log server has a port of its own (all of them listen on this one host), kept
        # across restarts, which the api-server reaches it at (tests/cluster_logs.py).
        self.worker_log_ports = {name: free_port() for name in self.workers}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        #: The environment each component was last started with (:meth:`env_for` then).
        self.started_env: dict[str, dict[str, str]] = {}
        self.startup_seconds: float | None = None
        self._migrated = False
        self._http = requests.Session()
        self.users = dict(users or {})
        # Connections that init stores in the metadata DB (encrypted with its Fernet key), as
        # docker-compose.yaml's airflow-init does, instead of AIRFLOW_CONN_* variables.
        self.db_connections = dict(db_connections or {})
        #: Which of :data:`AIRFLOW_SECRETS` each role (:meth:`role`) gets; None: every process gets
        #: all three (as before there was a split). See :data:`COMPONENT_SECRETS`.
        self.component_secrets = (
            None if component_secrets is None else {role: frozenset(v) for role, v in component_secrets.items()}
        )
        #: Per role or component name, variables set (a value) or removed (None) last: experiments
        #: change it and :meth:`restart` a component to run it with one secret withheld.
        self.component_env: dict[str, dict[str, str | None]] = {k: dict(v) for k, v in (component_env or {}).items()}
        #: Every variable of every process but the per-component ones of :meth:`env_for`.
        self.env = self._build_env(extra_env or {})
        atexit.register(self.stop)

    # --- configuration ------------------------------------------------------------------------

    def _build_env(self, extra: dict[str, str]) -> dict[str, str]:
        # Nothing of the caller's Airflow setup leaks in (tests/conftest.py sets its own home).
        env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
        env.update(
            {
                "AIRFLOW_HOME": str(self.home),
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO / "plugins"), os.environ.get("PYTHONPATH")) if p),
                "PYTHONUNBUFFERED": "1",
                "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
                "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
                "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
                "AIRFLOW__CORE__EXECUTOR": self.executor,
                "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
                "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                "AIRFLOW__CORE__FERNET_KEY": _fernet_key(),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.base_url}/execution/",
                "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.sql_alchemy_conn,
                # One secret for every process: JWTs of the execution API, signed log-server requests.
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
                "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
                "AIRFLOW__API__HOST": "127.0.0.1",
                "AIRFLOW__API__PORT": str(self.port),
                "AIRFLOW__API__BASE_URL": self.base_url,
                "AIRFLOW__API__WORKERS": "1",
                # A database error answered with 500 names its cause (the API logs only the statement).
                "AIRFLOW__API__EXPOSE_STACKTRACE": "True",
                "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
                "AIRFLOW__LOGGING__LOGGING_LEVEL": "INFO",
                # Parse quickly, one process is enough for one DAG file.
                "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
                "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "600",
                # Heartbeats and failure detection fast enough for tests that kill components.
                "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
                "AIRFLOW__SCHEDULER__SCHEDULER_HEALTH_CHECK_THRESHOLD": "20",
                "AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL": "10",
                # 60 s: under CI's load a running task's heartbeat once arrived 42 s late (the
                # reaper's first run on a fresh Celery deployment was failed as a zombie).
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "60",
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "5",
                "AIRFLOW__TRIGGERER__JOB_HEARTBEAT_SEC": "2",
                "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            }
        )
        if self.results_url != f"sqlite:///{self.home / 'training_results.db'}" and (
            "training_results" not in self.db_connections
        ):
            env["AIRFLOW_CONN_TRAINING_RESULTS"] = json.dumps(
                {"conn_type": "generic", "extra": {"sqlalchemy_url": self.results_url}}
            )
        if self.broker_url:
            env.update(
                {
                    "AIRFLOW__CELERY__BROKER_URL": self.broker_url,
                    # Task states go to the metadata DB (as Airflow's docker-compose does): one less
                    # server to lose, and the scheduler reads them in bulk.
                    "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.sql_alchemy_conn.replace("+asyncpg", ""),
                    "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
                }
            )
        if self.users:
            passwords = self.home / "simple_auth_manager_passwords.json"
            _write_private(passwords, json.dumps({name: pw for name, (_role, pw) in self.users.items()}))
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"] = "False"
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"] = ",".join(
                f"{name}:{role}" for name, (role, _pw) in self.users.items()
            )
            env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"] = str(passwords)
        env.update(extra)
        for conn_id in self.db_connections:  # a variable would shadow the metadata DB's row
            env.pop(f"AIRFLOW_CONN_{conn_id.upper()}", None)
        return env

    @staticmethod
    def role(component: str) -> str:
        """The component's role in :data:`COMPONENT_SECRETS`: ``worker`` for every Celery worker."""
        return "worker" if component.startswith("celery-worker-") else component

    def env_for(self, component: str) -> dict[str, str]:
        """The environment of one component (a name of :attr:`components`, or ``init`` for the
        migrations and ``airflow connections add``): :attr:`env`, a Celery worker's own settings,
        without the secrets its role does not get (:attr:`component_secrets`), then
        :attr:`component_env` of its role and of its name."""
        role = self.role(component)
        env = dict(self.env)
        if role == "worker":
            env.update(self._worker_env(component))
        elif role == "api-server" and self.workers:
            # A running task's log from the log server of the worker that runs it.
            env["PYTHONPATH"] = os.pathsep.join((env["PYTHONPATH"], str(REPO)))
            env["AIRFLOW__LOGGING__LOGGING_CONFIG_CLASS"] = "tests.cluster_logs.LOGGING_CONFIG"
            env["AIRFLOW_CLUSTER_LOG_SERVERS"] = json.dumps(
                {name: f"http://127.0.0.1:{port}" for name, port in self.worker_log_ports.items()}
            )
        if self.component_secrets is not None:
            kept = self.component_secrets.get(role, frozenset())
            for var in AIRFLOW_SECRETS:
                if var not in kept:
                    env.pop(var, None)
        for key in dict.fromkeys((role, component)):
            for var, value in self.component_env.get(key, {}).items():
                if value is None:
                    env.pop(var, None)
                else:
                    env[var] = value
        return env

    def airflow_cli(self, *args: str, component: str = "init", timeout: float = 120.0) -> str:
        """``airflow ARGS`` with the environment of ``component`` (init: as docker-compose.yaml's
        airflow-init runs it); its output, or :class:`ClusterError` with it."""
        argv = [sys.executable, "-m", "airflow", *args]
        proc = subprocess.run(
            argv, env=self.env_for(component), cwd=self.home, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise ClusterError(f"airflow {' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc.stdout

    # --- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> AirflowCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def migrate(self) -> None:
        """``airflow db migrate``, the results DB's Alembic upgrade and :attr:`db_connections`
        stored in the metadata DB (once), with init's environment."""
        if self._migrated:
            return
        results = [sys.executable, "-m", "gpu_training.results.migrate", "upgrade"]
        if "training_results" in self.db_connections:  # not in the environment: named here
            results += ["--url", self.results_url]
        steps = [("db-migrate", [sys.executable, "-m", "airflow", "db", "migrate"]), ("results-migrate", results)]
        # All at once (one CLI start, not one per connection), from a file only this user reads.
        connections = self.home / "init-connections.json"
        if self.db_connections:
            _write_private(connections, json.dumps({k: json.loads(v) for k, v in self.db_connections.items()}))
            argv = [sys.executable, "-m", "airflow", "connections", "import", "--overwrite", str(connections)]
            steps.append(("connections", argv))
        env = self.env_for("init")
        try:
            for name, argv in steps:
                log = self.logs / f"{name}.log"
                with log.open("ab") as fh:
                    proc = subprocess.run(argv, env=env, cwd=self.home, stdout=fh, stderr=subprocess.STDOUT)
                if proc.returncode != 0:
                    raise ClusterError(f"{' '.join(argv[2:5])} failed ({proc.returncode}):\n{tail(log)}")
        finally:
            connections.unlink(missing_ok=True)
        self._migrated = True

    def start(self) -> float:
        """Migrate, start the four components and wait until each is up; returns the seconds taken."""
        t0 = time.monotonic()
        if self.fixed_port:
            check_port_free(self.port)
        self.migrate()
        t_migrated = time.monotonic()
        since = datetime.now(UTC)
        # What runs tasks starts only once the api-server answers: a task talks to the execution
        # API from its first step, and one started earlier fails after the task SDK's few retries
        # (`[workers] execution_api_retries`, 4-30 s in all) with "Connection refused", before any
        # of its own code ran (the reaper's first run on a fresh `make cluster`, as soon as its DAG
        # was parsed). That is the scheduler (the LocalExecutor's workers are its children; the
        # CeleryExecutor's tasks wait in the broker) and the Celery workers. The dag-processor and
        # the triggerer reach the execution API in process: they start beside the api-server, their
        # imports overlapping usefully on 2 cores.
        runs_tasks = ("scheduler", *self.workers)
        for name in self.components:
            if name not in runs_tasks:
                self.start_component(name, wait=False)
        self._wait_api()
        for name in runs_tasks:
            self.start_component(name, wait=False)
        self._login()
        self._wait_healthy(list(_HEALTH_KEYS), since)
        for name in self.workers:
            self._wait_worker(name, since)
        self.startup_seconds = time.monotonic() - t0
        _log(
            f"started in {self.startup_seconds:.1f} s (migrations {t_migrated - t0:.1f} s) at {self.base_url}, "
            f"home {self.home}"
        )
        return self.startup_seconds

    def start_component(self, name: str, *, wait: bool = True) -> None:
        """Start one component (in a new process group); with ``wait``, until it is up."""
        if name not in self.components:
            raise ValueError(f"unknown component {name!r}; one of {self.components}")
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise ClusterError(f"{name} is already running (pid {old.pid})")
        argv = [sys.executable, "-m", "airflow", name]
        env = self.env_for(name)
        if name == "api-server":
            argv += ["--port", str(self.port), "--host", "127.0.0.1"]
        elif name in self.workers:
            argv = [sys.executable, "-m", "airflow", "celery", "worker", "--celery-hostname", f"{name}@%h"]
            argv += ["--concurrency", str(self.worker_concurrency)]
        log = self.logs / f"{name}.log"
        since = datetime.now(UTC)
        self.started_env[name] = env
        with log.open("ab") as fh:
            fh.write(f"\n===== {since.isoformat()} harness: starting {' '.join(argv[1:])}\n".encode())
            fh.flush()
            self.procs[name] = subprocess.Popen(
                argv,
                env=env,
                cwd=self.home,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own session and process group: killed whole
            )
        if wait:
            if name == "api-server":
                self._wait_api()
            elif name in self.workers:
                self._wait_worker(name, since)
            else:
                self._wait_healthy([name], since)

    def _worker_env(self, name: str) -> dict[str, str]:
        """A Celery worker's own variables: its own log-server port (two on one host) and its name
        as the hostname task instances record (``tests/cluster_hostname.py``)."""
        return {
            "PYTHONPATH": os.pathsep.join((self.env["PYTHONPATH"], str(REPO))),
            "AIRFLOW_CLUSTER_HOSTNAME": name,
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": "tests.cluster_hostname.hostname",
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.worker_log_ports[name]),
        }

    def _wait_worker(self, name: str, since: datetime) -> None:
        """A Celery worker is up once it has connected to the broker and says ``ready``."""
        marker = f"===== {since.isoformat()}"

        def ready() -> bool:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            return " ready." in text[text.rfind(marker) if marker in text else 0 :]

        self.wait_until(f"{name} to connect to the broker", ready, self.startup_timeout, components=[name])

    def pid(self, name: str) -> int:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            raise ClusterError(f"{name} is not running")
        return proc.pid

    def pids(self, name: str) -> list[int]:
        """The component's process and every live process under it (its process tree)."""
        return tree_pids(self.pid(name))

    def groups(self, name: str) -> set[int]:
        """Process groups of the component: its own, and those of descendants that left it (the
        task runners a LocalExecutor worker's supervisor starts, each in a group of its own)."""
        proc = self.procs.get(name)
        if proc is None:
            return set()
        groups = {proc.pid}
        for pid in tree_pids(proc.pid):
            fields = _proc_stat(pid)
            if fields:
                groups.add(int(fields[2]))
        groups.discard(os.getpgrp())  # never the harness's own
        return groups

    def kill(self, name: str, sig: int = signal.SIGKILL, *, timeout: float = 30.0) -> None:
        """Send ``sig`` to the component's process groups (:meth:`groups`: the component, its
        workers and their task runners) and wait until every process of them is gone."""
        proc = self.procs.get(name)
        if proc is None:
            return
        groups = self.groups(name)
        for pgid in groups:
            self._signal_group(pgid, sig)

        def gone() -> bool:
            proc.poll()
            return proc.returncode is not None and not any(group_pids(g) for g in groups)

        deadline = time.monotonic() + timeout
        while not gone() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not gone() and sig != signal.SIGKILL:
            for pgid in groups:
                self._signal_group(pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if not gone():
            left = [pid for g in groups for pid in group_pids(g)]
            raise ClusterError(f"{name} (groups {sorted(groups)}) still has processes {left} after {sig!r}")
        del self.procs[name]  # stopped on purpose: not a crash for check_alive

    def restart(self, name: str, *, hard: bool = True, wait: bool = True) -> None:
        """SIGKILL (``hard``) or SIGTERM the component's process group, then start it again."""
        self.kill(name, signal.SIGKILL if hard else signal.SIGTERM)
        self.start_component(name, wait=wait)

    def stop(self) -> None:
        """SIGTERM every component's process groups, SIGKILL what is left after 15 s; then any
        process still working in ``home`` (detached trainers). Safe to call twice."""
        if not self.procs and not self._stray_pids():
            return
        groups = set().union(*(self.groups(name) for name in self.procs))
        for pgid in groups:
            self._signal_group(pgid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if all(p.poll() is not None for p in self.procs.values()) and not any(group_pids(g) for g in groups):
                break
            time.sleep(0.2)
        for pgid in groups:
            self._signal_group(pgid, signal.SIGKILL)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.procs.clear()
        for _ in range(3):
            strays = self._stray_pids()
            if not strays:
                break
            for pid in strays:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        self._http.close()

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def _stray_pids(self) -> list[int]:
        """Processes (not us) whose working directory is in ``home`` or whose AIRFLOW_HOME is it."""
        marker = f"AIRFLOW_HOME={self.home}\0".encode()
        home = str(self.home)
        ours = set()  # this process and its ancestors are never strays
        pid = os.getpid()
        while pid > 1 and pid not in ours:
            ours.add(pid)
            fields = _proc_stat(pid)
            pid = int(fields[1]) if fields else 0
        out = []
        for pid in _all_pids():
            if pid in ours:
                continue
            fields = _proc_stat(pid)
            if not fields or fields[0] == "Z":
                continue
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if cwd == home or cwd.startswith(home + "/") or marker in environ:
                out.append(pid)
        return out

    # --- waiting ------------------------------------------------------------------------------

    def log_tails(self, *names: str, lines: int = 60) -> str:
        names = names or self.components
        return "\n".join(
            f"----- {name}.log (last {lines} lines) -----\n{tail(self.logs / f'{name}.log', lines)}" for name in names
        )

    def fail(self, message: str, *components: str) -> ClusterError:
        return ClusterError(f"{message}\n{self.log_tails(*components)}")

    def check_alive(self, *names: str) -> None:
        """Raise :class:`ClusterError` (with its log tail) if a started component has exited."""
        for name in names or self.components:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise self.fail(f"{name} exited with {proc.returncode}", name)

    def wait_until(
        self,
        what: str,
        predicate: Callable[[], Any],
        timeout: float,
        *,
        components: Collection[str] | None = None,
        interval: float = 0.5,
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; raise with log tails on timeout."""
        components = self.components if components is None else components
        deadline = time.monotonic() + timeout
        last_error: BaseException | None = None
        while True:
            self.check_alive(*components)
            try:
                value = predicate()
                if value:
                    return value
            except (requests.RequestException, ValueError, KeyError) as err:
                last_error = err
            if time.monotonic() >= deadline:
                extra = f" (last error: {last_error!r})" if last_error else ""
                raise self.fail(f"timed out after {timeout:.0f} s waiting for {what}{extra}", *components)
            time.sleep(interval)

    def _wait_api(self) -> None:
        try:
            wait_for_port(self.port, self.procs["api-server"], timeout=self.startup_timeout)
        except RuntimeError as err:
            raise self.fail(str(err), "api-server") from err
        self.wait_until(
            "the api-server to answer",
            lambda: self._http.get(f"{self.base_url}/api/v2/monitor/health", timeout=10).ok,
            self.startup_timeout,
            components=["api-server"],
        )

    def token(self, username: str, password: str | None = None) -> str:
        """A JWT of a configured user, got from ``POST /auth/token`` as a user would."""
        body = {"username": username, "password": password if password is not None else self.users[username][1]}
        resp = self._http.post(f"{self.base_url}/auth/token", json=body, headers={"Authorization": None}, timeout=60)
        if resp.status_code != 201:
            raise ClusterError(f"POST /auth/token as {username} -> {resp.status_code}: {resp.text[:500]}")
        return str(resp.json()["access_token"])

    def _login(self) -> None:
        """With real users, the harness's own calls carry a token of the first ADMIN user."""
        admin = next((name for name, (role, _pw) in self.users.items() if role.upper() == "ADMIN"), None)
        if admin is not None:
            self._http.headers["Authorization"] = f"Bearer {self.token(admin)}"

    def health(self) -> dict[str, Any]:
        return dict(self.api("GET", "/monitor/health").json())

    def _wait_healthy(self, names: list[str], since: datetime) -> None:
        """Wait until each component's job heartbeats healthy after ``since``."""

        def fresh() -> bool:
            health = self.health()
            for name in names:
                entry = health[_HEALTH_KEYS[name]]
                beat = entry.get(f"latest_{_HEALTH_KEYS[name]}_heartbeat")
                if entry.get("status") != "healthy" or not beat or datetime.fromisoformat(beat) < since:
                    return False
            return True

        self.wait_until(f"{', '.join(names)} to heartbeat", fresh, self.startup_timeout, components=names)

    # --- REST API -----------------------------------------------------------------------------

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        """A request to ``/api/v2{path}`` (or ``path`` as is when it starts with ``/api``/``/auth``)."""
        url = self.base_url + (path if path.startswith(("/api/", "/auth/", "/execution/")) else f"/api/v2{path}")
        kw.setdefault("timeout", 60)
        return self._http.request(method, url, **kw)

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        resp = self.api(method, path, **kw)
        if not resp.ok:
            raise ClusterError(f"{method} {path} -> {resp.status_code}: {resp.text[:2000]}")
        return resp.json()

    def wait_dag_parsed(self, dag_id: str, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until the dag-processor has serialized ``dag_id`` (and it is unpaused)."""

        def parsed() -> dict[str, Any] | None:
            resp = self.api("GET", f"/dags/{dag_id}")
            if resp.status_code == 404:
                return None
            resp.raise_for_status()
            dag = resp.json()
            if dag.get("is_paused"):
                self._json("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
                return None
            return dict(dag)

        try:
            return dict(self.wait_until(f"dag {dag_id} to be parsed", parsed, timeout, components=["dag-processor"]))
        except ClusterError as err:
            errors = self.api("GET", "/importErrors").text[:3000]
            raise ClusterError(f"{err}\nimport errors: {errors}") from err

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        body = {"logical_date": None, "conf": conf or {}}
        return str(self._json("POST", f"/dags/{dag_id}/dagRuns", json=body)["dag_run_id"])

    def run_state(self, dag_id: str, run_id: str) -> str:
        return str(self._json("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"])

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300.0) -> str:
        """Wait until the dag run is finished; returns its state (``success``/``failed``)."""
        try:
            return str(
                self.wait_until(
                    f"dag run {run_id} to finish",
                    lambda: (s := self.run_state(dag_id, run_id)) in FINISHED_RUN_STATES and s,
                    timeout,
                    components=("scheduler", "triggerer", *self.workers),
                    interval=1.0,
                )
            )
        except ClusterError as err:
            raise ClusterError(f"{err}\ntask states: {self.task_states(dag_id, run_id)}") from err

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        data = self._json("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        return list(data["task_instances"])

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        with contextlib.suppress(Exception):
            return {ti["task_id"]: ti["state"] for ti in self.task_instances(dag_id, run_id)}
        return {}

    def task_instance(self, dag_id: str, run_id: str, task_id: str) -> dict[str, Any]:
        return dict(self._json("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}"))

    def wait_task_state(
        self, dag_id: str, run_id: str, task_id: str, states: Collection[str], timeout: float = 120.0
    ) -> str:
        """Wait until ``task_id`` is in one of ``states``; fails early when it finishes otherwise."""

        def reached() -> str | None:
            state = self.task_instance(dag_id, run_id, task_id).get("state")
            if state in states:
                return str(state)
            if state in FINISHED_TI_STATES:
                raise ClusterError(
                    f"{task_id} of {run_id} finished {state} while waiting for {sorted(states)}; "
                    f"task states: {self.task_states(dag_id, run_id)}"
                )
            return None

        try:
            return str(
                self.wait_until(
                    f"{task_id} of {run_id} to be {'/'.join(states)}",
                    reached,
                    timeout,
                    components=("scheduler", "triggerer"),
                )
            )
        except ClusterError as err:
            raise ClusterError(f"{err}\ntask states: {self.task_states(dag_id, run_id)}") from err

    def task_log_entries(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> list[Any]:
        """The structured log of one try, as the UI reads it (every source: worker and triggerer)."""
        data = self._json(
            "GET",
            f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
            params={"full_content": "true"},
            headers={"Accept": "application/json"},
        )
        return list(data.get("content") or [])

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int = 1) -> str:
        """The log of one try as text, one line per entry (``timestamp level event``)."""
        lines = []
        for entry in self.task_log_entries(dag_id, run_id, task_id, try_number):
            if isinstance(entry, dict):
                head = " ".join(str(entry[k]) for k in ("timestamp", "level") if entry.get(k))
                text = f"{head} {entry.get('event', '')}".strip()
                if entry.get("sources"):
                    text += " " + " ".join(map(str, entry["sources"]))
                lines.append(text)
            else:
                lines.append(str(entry))
        return "\n".join(lines)

    # --- results DB ---------------------------------------------------------------------------

    def results_store(self) -> Any:
        """A ``ResultsStore`` on this deployment's results DB (same engine settings as the tasks)."""
        from gpu_training.hooks.results import create_results_engine
        from gpu_training.results.store import ResultsStore

        return ResultsStore(create_results_engine(self.results_url))


class CeleryDeployment:
    """The topology of ``docker-compose.yaml`` as native processes on 127.0.0.1 (``make cluster``).

    PostgreSQL (Debian's; Airflow's metadata DB ``airflow`` and the results DB ``training_results``
    as separate databases, as in the compose file), Redis as the Celery broker, moto's S3 server as
    the ``aws_default`` connection, and an :class:`AirflowCluster` on the CeleryExecutor with
    ``workers`` ``airflow celery worker`` processes beside the api-server, scheduler, dag-processor
    and triggerer. ``cluster_kw`` go to :class:`AirflowCluster` (``extra_env`` is merged).
    ``executor="LocalExecutor"``: the same databases, no broker, no S3, no workers (the scheduler's
    own worker processes), so ``bench/cluster.py`` compares executors and nothing else.
    ``compose=True`` (``make cluster``): also as docker-compose.yaml ships it, each component gets
    only the secrets it uses (:data:`COMPONENT_SECRETS`) and init stores the ``training_results``
    and ``aws_default`` connections in the metadata DB, encrypted, instead of ``AIRFLOW_CONN_*``.

        with CeleryDeployment(tmp_path) as deployment:
            run_id = deployment.cluster.trigger("gpu_training", {...})
    """

    def __init__(
        self,
        root: Path,
        *,
        workers: int = 2,
        worker_concurrency: int = 8,
        executor: str = "CeleryExecutor",
        compose: bool = False,
        **cluster_kw: Any,
    ) -> None:
        self.root = Path(root).resolve()
        self.executor = executor
        self.compose = compose
        self.workers = workers
        self.worker_concurrency = worker_concurrency
        self.cluster_kw = cluster_kw
        self.postgres: Any = None
        self.redis: Any = None
        self.s3: Any = None
        self.cluster: AirflowCluster | None = None
        self._pg_root: Path | None = None

    def __enter__(self) -> CeleryDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def airflow(self) -> AirflowCluster:
        if self.cluster is None:
            raise ClusterError("the deployment is not started")
        return self.cluster

    def start(self) -> float:
        from tests.servers import pg_binary, start_moto, start_postgres, start_redis

        t0 = time.monotonic()
        # Under /tmp, not ``root``: the server runs as the postgres user, who cannot enter pytest's
        # private temporary directories.
        self._pg_root = Path(tempfile.mkdtemp(prefix="celery-deployment-postgres-"))
        self.postgres = start_postgres(self._pg_root, max_connections=400)
        createdb = [pg_binary("createdb"), "-h", "127.0.0.1", "-p", str(self.postgres.port), "-U", self.postgres.user]
        subprocess.run([*createdb, "training_results"], check=True, capture_output=True)
        extra_env = dict(self.cluster_kw.pop("extra_env", {}))
        results_url = self.postgres.url().rsplit("/", 1)[0] + "/training_results"
        db_connections = dict(self.cluster_kw.pop("db_connections", {}))
        if self.executor == "CeleryExecutor":
            self.redis = start_redis(self.root / "redis")
            self.s3 = start_moto()
            if self.compose:
                db_connections.setdefault("aws_default", self.s3.aws_connection())
            else:
                extra_env.setdefault("AIRFLOW_CONN_AWS_DEFAULT", self.s3.aws_connection())
        if self.compose:
            db_connections.setdefault(
                "training_results", json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": results_url}})
            )
            self.cluster_kw.setdefault("component_secrets", COMPONENT_SECRETS)
        self.cluster = AirflowCluster(
            self.root / "airflow",
            executor=self.executor,
            sql_alchemy_conn=self.postgres.url(),
            results_url=results_url,
            db_connections=db_connections,
            broker_url=self.redis.url if self.redis is not None else None,
            celery_workers=self.workers,
            worker_concurrency=self.worker_concurrency,
            extra_env=extra_env,
            **self.cluster_kw,
        )
        self.cluster.start()
        seconds = time.monotonic() - t0
        _log(f"{self.executor} deployment up in {seconds:.1f} s (workers: {list(self.cluster.workers)})")
        return seconds

    def stop(self) -> None:
        """The Airflow components first (they hold connections), then the servers."""
        if self.cluster is not None:
            self.cluster.stop()
        for server in (self.s3, self.redis, self.postgres):
            if server is not None:
                with contextlib.suppress(Exception):
                    server.stop()
        if self._pg_root is not None:
            shutil.rmtree(self._pg_root, ignore_errors=True)

    def describe(self) -> dict[str, Any]:
        airflow = self.airflow
        return {
            "api": airflow.base_url,
            "home": str(airflow.home),
            "executor": airflow.executor,
            "workers": list(airflow.workers),
            "metadata_db": airflow.sql_alchemy_conn,
            "results_db": airflow.results_url,
            "broker": airflow.broker_url,
            "s3": self.s3.endpoint if self.s3 is not None else None,
            "logs": str(airflow.logs),
        }


# --- make cluster ----------------------------------------------------------------------------

#: ``make cluster``'s admin password, in CLUSTER_HOME: written once (mode 0600), reused while the
#: home is kept (``--fresh`` keeps it).
ADMIN_PASSWORD_FILE = "admin-password"
_PIDFILE = "cluster.pid"


def admin_password(home: Path) -> str:
    """The admin's password of this CLUSTER_HOME: read from its file, or generated and kept there."""
    import string

    path = Path(home) / ADMIN_PASSWORD_FILE
    with contextlib.suppress(FileNotFoundError):
        password = path.read_text().strip()
        if password:
            os.chmod(path, 0o600)
            return password
    # Letters and digits only: it goes into JSON bodies and shell commands as it is.
    password = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(20))
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_private(path, password + "\n")
    return password


def prepare_home(home: Path) -> None:
    """A fresh deployment in ``home``: refuse when one still runs from it, else remove what the last
    one left (``airflow/``: logs, config; ``redis/``); the admin's password and the rest stay."""
    home = Path(home).resolve()
    pidfile = home / _PIDFILE
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text())
        if pid != os.getpid() and b"airflow_cluster.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
            raise ClusterError(
                f"a deployment started from {home} still runs (pid {pid}): "
                "stop it (Ctrl-C), or use another CLUSTER_HOME"
            )
    for name in ("airflow", "redis"):
        shutil.rmtree(home / name, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{os.getpid()}\n")


def start_make_cluster(
    home: Path,
    *,
    port: int = 8080,
    workers: int = 2,
    out: Any = None,
    **cluster_kw: Any,
) -> CeleryDeployment:
    """What ``make cluster`` starts: the compose topology (:class:`CeleryDeployment`) on ``port``,
    as docker-compose.yaml ships it (``compose=True``: each component only its secrets, connections
    stored encrypted by init), signed in as SimpleAuthManager's ``admin`` (role ADMIN) with the
    password of :func:`admin_password`; prints the URL and the login to ``out`` (stdout) once
    ``gpu_training`` is parsed. The caller stops it."""
    out = out if out is not None else sys.stdout
    check_port_free(port)  # before anything starts: a clear error, not an api-server's crash later
    password = admin_password(home)
    cluster_kw.setdefault("compose", True)
    deployment = CeleryDeployment(home, workers=workers, port=port, users={"admin": ("ADMIN", password)}, **cluster_kw)
    try:
        deployment.start()
        deployment.airflow.wait_dag_parsed("gpu_training")
    except BaseException:
        deployment.stop()
        raise
    url = f"http://localhost:{port}"
    token_call = (
        f"curl -s -X POST {url}/auth/token -H 'Content-Type: application/json' "
        f"""-d '{{"username": "admin", "password": "{password}"}}'"""
    )
    print(json.dumps(deployment.describe(), indent=2), file=out)
    print(
        f"\nAirflow is ready: {url}\n"
        f"login with username: admin  password: {password}\n"
        f"(kept in {Path(home).resolve() / ADMIN_PASSWORD_FILE}, reused while this CLUSTER_HOME is kept)\n"
        f"REST API token: {token_call}\n"
        "Ctrl-C stops every process",
        file=out,
        flush=True,
    )
    return deployment


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Start a local Airflow deployment and keep it up until Ctrl-C.")
    parser.add_argument("home", type=Path)
    parser.add_argument("--parallelism", type=int, default=32)
    parser.add_argument(
        "--celery",
        action="store_true",
        help="make cluster: the docker-compose topology (CeleryExecutor, PostgreSQL, Redis, moto S3) "
        "with sign-in (user admin, password kept in HOME/admin-password)",
    )
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (with --celery)")
    parser.add_argument(
        "--port", type=int, default=None, help="the api-server's port (default: 8080 with --celery, else a free one)"
    )
    parser.add_argument(
        "--fresh", action="store_true", help="remove what the last deployment left in HOME (keeps admin-password)"
    )
    args = parser.parse_args()
    deployment: CeleryDeployment | None = None
    cluster: AirflowCluster | None = None
    try:
        if args.celery:
            port = args.port if args.port is not None else 8080
            check_port_free(port)  # before --fresh removes anything: the port may be a running deployment's
            if args.fresh:
                prepare_home(args.home)
            deployment = start_make_cluster(args.home, port=port, workers=args.workers, parallelism=args.parallelism)
        else:
            if args.fresh:
                prepare_home(args.home)
            cluster = AirflowCluster(args.home, parallelism=args.parallelism, port=args.port)
            cluster.start()
            cluster.wait_dag_parsed("gpu_training")
            print(json.dumps({"api": cluster.base_url, "home": str(cluster.home)}, indent=2), flush=True)
            print("up; Ctrl-C stops every process", flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except PortInUse as err:
        print(f"error: {err} (make cluster PORT=..., or --port)", file=sys.stderr, flush=True)
        sys.exit(1)
    except ClusterError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C while starting: what had started is stopped below
        sys.exit(130)
    finally:
        for running in (deployment, cluster):
            if running is not None:
                running.stop()
        with contextlib.suppress(OSError):
            pidfile = Path(args.home).resolve() / _PIDFILE
            if pidfile.read_text().strip() == str(os.getpid()):
                pidfile.unlink()


if __name__ == "__main__":
    main()
