"""Which Airflow component needs which of the three secrets, measured on a running deployment.

``python tests/e2e/celery/secrets_matrix.py [--only ROLE[:SECRET[:MODE]],...] [--json FILE]``

Starts the CeleryExecutor topology of docker-compose.yaml as native processes
(``tests/airflow_cluster.py`` :class:`CeleryDeployment`, one Celery worker) with every component
holding all three secrets (the Fernet key, ``[api_auth] jwt_secret``, ``[api] secret_key``), the
fake Lambda cloud (``tests/fakeclouds``) whose ``lambda_default`` and SSH connections, the
``training_results`` and ``aws_default`` connections, a connection and a Variable read while a DAG
file is parsed are all stored in the metadata DB, encrypted, by ``airflow connections add`` /
``variables set`` as the compose file's airflow-init runs them. Then, for one component (role) and
one secret at a time, that component is restarted with the secret withheld:

* ``unset``: no variable and no line in its own copy of ``airflow.cfg`` (``AIRFLOW_CONFIG``), so
  that Airflow's own fallback applies: no Fernet key (values are stored in plain text, encrypted
  ones cannot be read), a JWT secret or an ``[api] secret_key`` generated at random by the process;
* ``different``: a valid value of its own, as a container gets without the variable (its first
  ``airflow`` command writes an ``airflow.cfg`` with random secrets into the container);

and these run against it: signing in (``POST /auth/token``, then the REST API with the token as a
bearer and as the UI's ``_token`` cookie), the probe DAG file re-parsed (it reads the Variable and
the connection at parse time), a ``gpu_training`` job on the fake Lambda end to end (its tasks read
the cloud, SSH and results connections through the execution API; its ``sense_progress`` trigger
reads the SSH and results connections in the triggerer), the live log of the deferred
``sense_progress`` (the triggerer's log server) and of the running ``teardown`` (the worker's log
server; the fake cloud takes 12 s to terminate), and every task's log once finished. For ``init``
the connections and the Variable are stored again with init's environment so altered, then the
same checks run. Each scenario prints what broke with the errors seen; the table comes last.
Finally the split of :data:`COMPONENT_SECRETS` runs the same checks, also with each component's
own ``airflow.cfg`` (as in containers): all pass but the probe DAG's parse, which needs the Fernet
key the split gives no dag-processor (no DAG file of the repository reads a stored secret while
parsed). A Flower started without any secret is asked for its page. Needs root (sshd), PostgreSQL
and Redis; ~60 min on 2 cores (``--only api-server`` etc. for a part; ``--only none`` for the split).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

import requests  # noqa: E402
from cryptography.fernet import Fernet  # noqa: E402

from tests.airflow_cluster import (  # noqa: E402
    API_SECRET_KEY,
    COMPONENT_SECRETS,
    FERNET_KEY,
    JWT_SECRET,
    CeleryDeployment,
    ClusterError,
)
from tests.fakeclouds.rigs import STARTERS, Rig  # noqa: E402
from tests.servers import free_port  # noqa: E402
from tests.sshd import start_sshd  # noqa: E402

SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
DAG_ID = "gpu_training"
PROBE_DAG = "secrets_probe"
SECRETS = {"fernet": FERNET_KEY, "jwt": JWT_SECRET, "api": API_SECRET_KEY}
#: The airflow.cfg section and key of each secret.
CFG_KEYS = {
    FERNET_KEY: ("core", "fernet_key"),
    JWT_SECRET: ("api_auth", "jwt_secret"),
    API_SECRET_KEY: ("api", "secret_key"),
}
ROLES = ("api-server", "scheduler", "dag-processor", "triggerer", "worker", "init")
MODES = ("unset", "different")
PASSWORD = "matrix-admin-pw"
PROBE_VALUE = "probe-variable-value-5d1c"
PROBE_PASSWORD = "probe-conn-password-77ab"
FORBIDDEN = "!!!! Please make sure"
ERROR_PATTERN = re.compile(
    r"\[(error|warning|critical)\b|\b(ERROR|WARNING|CRITICAL|error|critical)\b|Traceback|InvalidToken|"
    r"Invalid auth token|[Ss]ignature|decrypt|Forbidden|status_code=(401|403|422|500)\b|Could not read served logs"
)
#: Noise of every run: not what a withheld secret breaks.
NOISE = ("Skipping masking", "secrets_masker", "DeprecationWarning", "RemovedInAirflow4Warning")

PROBE_SOURCE = f'''"""Reads a Variable and a connection of the metadata DB while parsed (secrets_matrix.py)."""
import hashlib
from datetime import datetime

from airflow.sdk import DAG, BaseHook, Variable, task

VALUE = Variable.get("secrets_probe") + BaseHook.get_connection("secrets_probe_conn").password

with DAG("{PROBE_DAG}", schedule=None, start_date=datetime(2026, 1, 1),
         description="parsed " + hashlib.sha256(VALUE.encode()).hexdigest()[:12]):

    @task
    def noop() -> None:
        pass

    noop()
'''
PROBE_DESCRIPTION = "parsed " + hashlib.sha256((PROBE_VALUE + PROBE_PASSWORD).encode()).hexdigest()[:12]


def log(msg: str) -> None:
    print(f"[secrets-matrix {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    role: str
    secret: str
    mode: str
    signin: str = "?"
    parse: str = "?"
    job: str = "?"
    live_trigger_log: str = "?"
    live_worker_log: str = "?"
    finished_logs: str = "?"
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    stored: str = ""

    def broken(self) -> list[str]:
        return [
            name
            for name in ("signin", "parse", "job", "live_trigger_log", "live_worker_log", "finished_logs")
            if not str(getattr(self, name)).startswith(("ok", "expected"))
        ]


class Matrix:
    def __init__(self, work: Path, workers: int = 1) -> None:
        self.work = work
        self.sshd = start_sshd(work / "sshd")
        self.rig: Rig = STARTERS["lambda"](self.sshd, work / "boxes")
        # teardown runs on a worker until the cloud reports the instance gone: its live log.
        self.rig.fake.faults.terminate_seconds = 12.0
        dags = work / "dags"
        dags.mkdir()
        (dags / "gpu_training.py").symlink_to(REPO / "dags" / "gpu_training.py")
        self.probe_file = dags / "secrets_probe.py"
        self.probe_file.write_text(PROBE_SOURCE)
        self.db_connections = {key.removeprefix("AIRFLOW_CONN_").lower(): value for key, value in self.rig.env.items()}
        self.db_connections["secrets_probe_conn"] = json.dumps(
            {"conn_type": "generic", "login": "probe", "password": PROBE_PASSWORD}
        )
        self.deployment = CeleryDeployment(
            work / "deployment",
            workers=workers,
            compose=True,
            component_secrets=None,  # every component holds every secret; scenarios withhold one
            db_connections=self.db_connections,
            users={"admin": ("ADMIN", PASSWORD)},
            parallelism=16,
            extra_env={
                "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
                "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
                "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            },
        )
        self.deployment.start()
        self.cluster = self.deployment.airflow
        self.cluster.airflow_cli("variables", "set", "secrets_probe", PROBE_VALUE)
        self.cluster.wait_dag_parsed(DAG_ID, timeout=180)
        self.cluster.wait_dag_parsed(PROBE_DAG, timeout=120)
        self.runs = 0

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.deployment.stop()
        with contextlib.suppress(Exception):
            self.rig.stop()
        with contextlib.suppress(Exception):
            self.sshd.stop()

    # --- withholding --------------------------------------------------------------------------

    def private_cfg(self, name: str, drop: list[str]) -> Path:
        """A copy of the deployment's airflow.cfg without the lines of ``drop`` (variables)."""
        shared = (self.cluster.home / "airflow.cfg").read_text().splitlines()
        unwanted = {CFG_KEYS[var] for var in drop}
        out, section = [], ""
        for line in shared:
            if line.startswith("[") and line.rstrip().endswith("]"):
                section = line.strip()[1:-1]
            key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
            if key and (section, key) in unwanted:
                continue
            out.append(line)
        path = self.work / "cfg" / f"{name}.cfg"
        path.parent.mkdir(exist_ok=True)
        path.write_text("\n".join(out) + "\n")
        return path

    def override(self, var: str, mode: str, name: str) -> dict[str, str | None]:
        if mode == "unset":
            return {var: None, "AIRFLOW_CONFIG": str(self.private_cfg(name, [var]))}
        value = Fernet.generate_key().decode() if var == FERNET_KEY else secrets.token_urlsafe(32)
        return {var: value}

    def components(self, role: str) -> list[str]:
        return list(self.cluster.workers) if role == "worker" else [role]

    def restart(self, role: str) -> None:
        """Restart the role's components with their environment now; the api-server first."""
        names = self.components(role)
        for name in names:
            self.cluster.restart(name, hard=False)
        if role == "api-server":
            self.cluster._login()

    def store_init_objects(self) -> None:
        """What airflow-init stores, again, with init's environment as it is now. The old rows go
        first, by SQL: loading a row encrypted with another key (``--overwrite``) fails."""
        from sqlalchemy import bindparam, create_engine, text

        engine = create_engine(self.cluster.sql_alchemy_conn)
        try:
            with engine.begin() as conn:
                delete = text("DELETE FROM connection WHERE conn_id IN :ids")
                conn.execute(delete.bindparams(bindparam("ids", expanding=True)), {"ids": list(self.db_connections)})
                conn.execute(text("DELETE FROM variable WHERE key = 'secrets_probe'"))
        finally:
            engine.dispose()
        path = self.work / "connections.json"
        path.write_text(json.dumps({k: json.loads(v) for k, v in self.db_connections.items()}))
        self.cluster.airflow_cli("connections", "import", str(path))
        self.cluster.airflow_cli("variables", "set", "secrets_probe", PROBE_VALUE)

    def stored_encrypted(self) -> str:
        """How the metadata DB holds the connections and the Variable: encrypted or in plain text."""
        from sqlalchemy import create_engine, text

        engine = create_engine(self.cluster.sql_alchemy_conn)
        try:
            with engine.connect() as conn:
                query = text("SELECT conn_id, is_encrypted, is_extra_encrypted, password, extra FROM connection")
                rows = list(conn.execute(query))
                var = conn.execute(text("SELECT is_encrypted FROM variable WHERE key = 'secrets_probe'")).scalar()
        finally:
            engine.dispose()
        plain = [r[0] for r in rows if (r[3] and not r[1]) or (r[4] and not r[2])]
        if plain or not var:
            return f"plain text: {plain}, variable encrypted: {var}"
        return "every connection and the variable encrypted"

    # --- checks -------------------------------------------------------------------------------

    def check_signin(self) -> str:
        base = self.cluster.base_url
        resp = requests.post(f"{base}/auth/token", json={"username": "admin", "password": PASSWORD}, timeout=30)
        if resp.status_code != 201:
            return f"POST /auth/token -> {resp.status_code} {resp.text[:200]}"
        token = resp.json()["access_token"]
        bearer = requests.get(f"{base}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}, timeout=30)
        cookie = requests.get(f"{base}/api/v2/dags", cookies={"_token": token}, timeout=30)
        if bearer.status_code != 200 or cookie.status_code != 200:
            return f"GET /api/v2/dags bearer -> {bearer.status_code}, cookie -> {cookie.status_code}"
        return "ok"

    def check_parse(self, since: datetime) -> str:
        """Touch the probe file; wait for its next parse: the DAG with the expected description,
        or an import error."""
        os.utime(self.probe_file)

        def parsed() -> str | None:
            errors = self.cluster._json("GET", "/importErrors", params={"limit": 100})["import_errors"]
            for error in errors:
                if (
                    error["filename"].endswith("secrets_probe.py")
                    and datetime.fromisoformat(error["timestamp"]) > since
                ):
                    text = error["stack_trace"].strip().splitlines()
                    return "import error: " + " | ".join(line.strip() for line in text[-3:])
            dag = self.cluster._json("GET", f"/dags/{PROBE_DAG}")
            stamp = dag.get("last_parsed_time")
            if stamp and datetime.fromisoformat(stamp) > since:
                got = dag.get("description")
                return "ok" if got == PROBE_DESCRIPTION else f"parsed with another value: {got!r}"
            return None

        try:
            return str(self.cluster.wait_until("the probe DAG to be parsed again", parsed, 90, components=[]))
        except ClusterError as err:
            return "not parsed again in 90 s: " + str(err).splitlines()[0]

    def live_log(self, run_id: str, task_id: str) -> str:
        entries = self.cluster.task_log_entries(DAG_ID, run_id, task_id)
        sources, inside = [], False
        for entry in entries:
            event = str(entry.get("event", "")) if isinstance(entry, dict) else str(entry)
            if event == "::group::Log message source details":
                inside = True
            elif event == "::endgroup::":
                inside = False
            elif inside:
                sources.append(event)
        served = [s for s in sources if s.startswith("http://")]
        if any(FORBIDDEN in s for s in sources):
            return "403 from the log server: " + next(s for s in sources if FORBIDDEN in s).splitlines()[0][:160]
        if not served:
            return "not served: " + " | ".join(s[:200] for s in sources)
        return f"ok (served by {served[0].split('/log/')[0]}, {len(entries)} entries)"

    def run_job(self, label: str, outcome: Outcome) -> None:
        cluster = self.cluster
        self.runs += 1
        conf = {
            "project_id": f"secrets-{self.runs}-{label}"[:60],
            "provider": "lambda",
            "gpu": self.rig.gpu,
            "command": ["{python}", str(SCRIPTED), "ok", "5", "2"],
            "poll_interval_seconds": 1,
        }
        run_id = cluster.trigger(DAG_ID, conf)
        deadline = time.monotonic() + 240
        state = "running"
        while time.monotonic() < deadline:
            state = cluster.run_state(DAG_ID, run_id)
            if state in ("success", "failed"):
                break
            states = cluster.task_states(DAG_ID, run_id)
            with contextlib.suppress(Exception):
                for attr, task_id, live in (
                    ("live_trigger_log", "sense_progress", "deferred"),
                    ("live_worker_log", "teardown", "running"),
                ):
                    if getattr(outcome, attr) == "?" and states.get(task_id) == live:
                        time.sleep(2)  # a few lines first
                        seen = self.live_log(run_id, task_id)
                        still = cluster.task_instance(DAG_ID, run_id, task_id).get("state")
                        # Only what was read while the task was still in that state says anything.
                        if still == live or seen.startswith("ok"):
                            setattr(outcome, attr, seen)
            time.sleep(0.5)
        else:
            cluster.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
            state = "timed out (marked failed)"
        states = cluster.task_states(DAG_ID, run_id)
        failed = [t for t, s in states.items() if s not in ("success", "skipped")]
        outcome.job = "ok" if state == "success" else f"{state}: " + ", ".join(f"{t}={states[t]}" for t in failed)
        if outcome.live_trigger_log == "?":
            outcome.live_trigger_log = f"not read while deferred (sense_progress {states.get('sense_progress')})"
        if outcome.live_worker_log == "?":
            outcome.live_worker_log = f"not read while running (teardown {states.get('teardown')})"
        # Finished logs, and the errors in those of the tasks that failed.
        empty = []
        for task_id, task_state in states.items():
            if task_state in (None, "upstream_failed", "skipped", "removed"):
                continue
            try:
                text = cluster.task_log(DAG_ID, run_id, task_id)
            except ClusterError as err:  # e.g. a task refused before its first try began
                outcome.errors.append(f"{task_id}: no log: {str(err)[:200]}")
                continue
            if FORBIDDEN in text or len(text.splitlines()) < 4:
                empty.append(task_id)
            if task_state != "success":
                for line in text.splitlines():
                    if ERROR_PATTERN.search(line) and not any(n in line for n in NOISE):
                        outcome.errors.append(f"{task_id}: {line.strip()[:300]}")
        outcome.finished_logs = "ok" if not empty else f"empty or 403: {empty}"

    def component_errors(self, names: list[str], marker_since: float) -> list[str]:
        """Lines of these components' logs since the scenario began that look like the breakage."""
        found: list[str] = []
        for name in names:
            path = self.cluster.logs / f"{name}.log"
            with contextlib.suppress(OSError), path.open("rb") as fh:
                fh.seek(int(marker_since))
                for raw in fh.read().decode(errors="replace").splitlines():
                    if ERROR_PATTERN.search(raw) and not any(n in raw for n in NOISE):
                        found.append(f"{name}.log: {raw.strip()[:300]}")
        seen: dict[str, None] = {}
        for line in found:
            seen.setdefault(re.sub(r"\d{4}-\d\d-\d\dT[\d:.]+Z?|\b[0-9a-f-]{36}\b", "", line))
        return list(seen)[:12]

    def log_offsets(self) -> dict[str, int]:
        return {
            name: (self.cluster.logs / f"{name}.log").stat().st_size
            for name in self.cluster.components
            if (self.cluster.logs / f"{name}.log").exists()
        }

    def checks(self, outcome: Outcome, label: str) -> None:
        t0 = time.monotonic()
        offsets = self.log_offsets()
        since = datetime.now(UTC)
        for name, check in (
            ("signin", self.check_signin),
            ("parse", lambda: self.check_parse(since)),
        ):
            try:
                setattr(outcome, name, check())
            except Exception as err:  # a check that cannot run says why
                setattr(outcome, name, f"check failed: {err!r}"[:300])
        try:
            self.run_job(label, outcome)
        except Exception as err:
            outcome.job = f"check failed: {err!r}"[:300]
        for name, offset in offsets.items():
            outcome.errors += self.component_errors([name], offset)
        outcome.seconds = time.monotonic() - t0


def scenarios(only: list[str]) -> Iterator[tuple[str, str, str]]:
    for role in ROLES:
        for secret in SECRETS:
            for mode in MODES:
                label = f"{role}:{secret}:{mode}"
                if not only or any(label.startswith(prefix) for prefix in only):
                    yield role, secret, mode


def check_flower(matrix: Matrix) -> str:
    """``airflow celery flower`` with none of the three secrets: does its page answer?"""
    cluster = matrix.cluster
    env = dict(cluster.env)
    for var in SECRETS.values():
        env.pop(var, None)
    env["AIRFLOW_CONFIG"] = str(matrix.private_cfg("flower", list(SECRETS.values())))
    port = free_port()
    logfile = cluster.logs / "flower.log"
    with logfile.open("ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "airflow", "celery", "flower", "--port", str(port)],
            env=env,
            cwd=cluster.home,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                resp = requests.get(f"http://127.0.0.1:{port}/workers", timeout=10)
                if resp.ok:
                    workers = set(re.findall(r"celery-worker-\d+@[\w.-]+", resp.text))
                    return f"ok: /workers answers 200, lists {sorted(workers)}"
            if proc.poll() is not None:
                return f"exited {proc.returncode}"
            time.sleep(1)
        return "no answer in 90 s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated ROLE[:SECRET[:MODE]] prefixes")
    parser.add_argument("--no-split", action="store_true", help="skip the split and flower checks")
    parser.add_argument("--json", type=Path, help="write the outcomes here (after each scenario)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    only = [p for p in args.only.split(",") if p]
    work = Path(tempfile.mkdtemp(prefix="secrets-matrix-"))
    outcomes: list[Outcome] = []
    matrix: Matrix | None = None

    def save() -> None:
        if args.json:
            args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2))

    def report(outcome: Outcome) -> None:
        outcomes.append(outcome)
        save()
        broken = outcome.broken()
        verdict = "BROKEN " + ", ".join(broken) if broken else "all ok"
        log(f"== {outcome.role} {outcome.secret} {outcome.mode}: {verdict} ({outcome.seconds:.0f} s)")
        for name in ("signin", "parse", "job", "live_trigger_log", "live_worker_log", "finished_logs"):
            log(f"     {name}: {getattr(outcome, name)}")
        if outcome.stored:
            log(f"     stored: {outcome.stored}")
        for line in outcome.errors[:14]:
            log(f"     ! {line}")

    try:
        log(f"work directory {work}")
        matrix = Matrix(work)
        cluster = matrix.cluster
        baseline = Outcome("all", "all", "every component holds every secret")
        matrix.checks(baseline, "baseline")
        report(baseline)
        current_role: str | None = None
        for role, secret, mode in scenarios(only):
            var = SECRETS[secret]
            if current_role not in (None, role):  # the last role back to every secret
                cluster.component_env.pop(current_role, None)
                if current_role != "init":
                    matrix.restart(current_role)
                else:
                    matrix.store_init_objects()
            current_role = role
            outcome = Outcome(role, secret, mode)
            log(f"-- {role}: {secret} {mode}")
            cluster.component_env[role] = matrix.override(var, mode, f"{role}-{secret}-{mode}")
            try:
                if role == "init":
                    matrix.store_init_objects()
                else:
                    matrix.restart(role)
            except Exception as err:
                outcome.job = f"restart/init failed: {err}"[:2000]
                report(outcome)
                continue
            if role == "init":
                outcome.stored = matrix.stored_encrypted()
            matrix.checks(outcome, f"{role}-{secret}-{mode}")
            report(outcome)
        if current_role is not None:
            cluster.component_env.pop(current_role, None)
            if current_role != "init":
                matrix.restart(current_role)
            else:
                matrix.store_init_objects()
        if not args.no_split:
            for variant in ("shared airflow.cfg", "own airflow.cfg"):
                log(f"-- the split of COMPONENT_SECRETS ({variant})")
                cluster.component_secrets = dict(COMPONENT_SECRETS)
                for name in ("api-server", "scheduler", "dag-processor", "triggerer", "worker"):
                    if variant == "own airflow.cfg":
                        fresh = work / "own-cfg" / name / "airflow.cfg"  # written by its first airflow command
                        shutil.rmtree(fresh.parent, ignore_errors=True)
                        fresh.parent.mkdir(parents=True)
                        cluster.component_env[name] = {"AIRFLOW_CONFIG": str(fresh)}
                    matrix.restart(name)
                if variant == "own airflow.cfg":
                    fresh = work / "own-cfg" / "init" / "airflow.cfg"
                    fresh.parent.mkdir(parents=True, exist_ok=True)
                    cluster.component_env["init"] = {"AIRFLOW_CONFIG": str(fresh)}
                matrix.store_init_objects()
                outcome = Outcome("split", "COMPONENT_SECRETS", variant)
                matrix.checks(outcome, "split")
                if FERNET_KEY not in COMPONENT_SECRETS["dag-processor"] and outcome.parse.startswith("import error"):
                    outcome.parse = "expected (the dag-processor holds no Fernet key): " + outcome.parse
                report(outcome)
            log(f"flower without any secret: {check_flower(matrix)}")
    finally:
        if matrix is not None:
            matrix.stop()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print("\nrole | secret | mode | broken | first errors")
    for o in outcomes:
        print(f"{o.role} | {o.secret} | {o.mode} | {', '.join(o.broken()) or '-'} | {' / '.join(o.errors[:2])[:400]}")


if __name__ == "__main__":
    main()
