"""Command line for operators (``python -m gpu_training.cli``; the make targets call it):

- ``run --conf JSON``: one ``gpu_training`` DAG run through ``airflow dags test`` (a real dag run in
  the Airflow home, every task executed), then the job's summary; non-zero when it did not complete;
- ``show UUID``: the summary of a job;
- ``status``: recent jobs, their state, GPU, nodes and cost (``make status``);
- ``logs UUID``: a job's trainer log, live, every node's (``make logs JOB=...``);
- ``validate``: configuration and connections: the results DB reachable and migrated, each
  configured cloud's credentials answered, the trainer image present (``make validate``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gpu_training.errors import JobParamsError
from gpu_training.params import parse_job_params
from gpu_training.results.models import Artifact, EpochTrain, Eval, Instance, TrainingJob
from gpu_training.results.states import InstanceState, JobStatus
from gpu_training.results.store import ResultsStore

DAG_ID = "gpu_training"


def _store() -> ResultsStore:
    from gpu_training.hooks.results import ResultsDbHook

    return ResultsDbHook().get_store()


def summary(store: ResultsStore, job_uuid: str) -> str:
    """A human-readable report of one job: status, per-epoch loss, final eval, outputs."""
    job = store.job(job_uuid)
    lines = [
        f"job        {job.uuid}",
        f"project    {job.project_id}    provider {job.provider}    run {job.run_id}",
        f"status     {job.status}" + (f"    reason: {job.failure_reason}" if job.failure_reason else ""),
    ]
    if job.time_taken is not None:
        lines.append(f"time taken {job.time_taken:.1f} s    cost {job.cost_usd or 0:.4f} USD")
    with store.session() as s:
        epochs = s.scalars(
            select(EpochTrain).where(EpochTrain.job_id == job.id).order_by(EpochTrain.iteration, EpochTrain.epoch)
        ).all()
        evals = s.scalars(select(Eval).where(Eval.job_id == job.id).order_by(Eval.iteration, Eval.epoch)).all()
        artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job.id)).all()
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id)).all()
    if epochs:
        lines.append("per-epoch loss:")
        for e in epochs:
            val = (e.metrics or {}).get("val_accuracy")
            extra = f"    val_accuracy {val:.4f}" if isinstance(val, (int, float)) else ""
            loss = f"{e.avg_loss:.4f}" if e.avg_loss is not None else "n/a"
            lines.append(f"  iteration {e.iteration} epoch {e.epoch:3d}  avg_loss {loss}{extra}")
    if evals:
        last = evals[-1]
        metrics = "  ".join(
            f"{name} {getattr(last, name):.4f}"
            for name in ("accuracy", "precision", "recall", "f1", "auc", "loss")
            if getattr(last, name) is not None
        )
        lines.append(f"final eval (iteration {last.iteration}, epoch {last.epoch}): {metrics}")
    for inst in instances:
        lines.append(
            f"instance   {inst.name} ({inst.provider}"
            + (f" {inst.instance_type}" if inst.instance_type and inst.provider not in ("local", "ssh") else "")
            + (f" {inst.region}" if inst.region and inst.provider not in ("local", "ssh") else "")
            + f") state {inst.state}"
            + (f", terminated {inst.terminated_at:%Y-%m-%d %H:%M:%S} UTC" if inst.terminated_at else "")
            + (f" ({inst.state_reason})" if inst.state_reason and inst.state != InstanceState.RUNNING else "")
        )
        if inst.price_per_hour and inst.billable_seconds is not None:
            lines.append(
                f"  cost     {inst.billable_seconds:.0f} s x {inst.price_per_hour:g} USD/h"
                f" = {inst.cost_usd or 0:.4f} USD"
            )
    if artifacts:
        lines.append(f"outputs    {job.outputs_uri}  ({len(artifacts)} files, MANIFEST.sha256)")
    lines.append(f"results DB {store.engine.url.render_as_string(hide_password=True)}")
    return "\n".join(lines)


def _dag_file_args() -> list[str]:
    """``-f`` the DAG's own file where the dags folder has it: ``dags test`` then parses and
    serializes that file alone, not every DAG of the folder (the retraining DAGs cost 7x more)."""
    from airflow.configuration import conf

    path = Path(conf.get("core", "dags_folder")) / f"{DAG_ID}.py"
    return ["-f", str(path)] if path.is_file() else []


def run_id_of(dag_id: str, logical_date: datetime) -> str | None:
    """The run id of this DAG's run of that logical date, in this Airflow home's metadata DB."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.scalar(select(DagRun.run_id).where(DagRun.dag_id == dag_id, DagRun.logical_date == logical_date))


def run(conf: dict, *, quiet: bool = False) -> int:
    """``make run``: one job of the gpu_training DAG through ``airflow dags test``, then its summary."""
    try:
        parse_job_params(conf)
    except JobParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    store = _store()
    store.check_schema()
    # Airflow keys a dag run by its logical date: ours, to the microsecond, finds our run (and so
    # our job) afterwards, whatever else runs in this Airflow home at the same time.
    logical_date = datetime.now(UTC)
    cmd = [
        sys.executable,
        "-m",
        "airflow",
        "dags",
        "test",
        DAG_ID,
        logical_date.isoformat(),
        *_dag_file_args(),
        "--conf",
        json.dumps(conf),
    ]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.STDOUT if quiet else None
    )
    elapsed = time.monotonic() - t0
    run_id = run_id_of(DAG_ID, logical_date)
    job = None
    if run_id is not None:
        with store.session() as s:
            job = s.scalars(
                select(TrainingJob).where(TrainingJob.dag_id == DAG_ID, TrainingJob.run_id == run_id)
            ).first()
    print()
    if job is None:
        print(f"no job was registered (airflow dags test exited {proc.returncode}); see the log above", file=sys.stderr)
        return proc.returncode or 1
    print(summary(store, job.uuid))
    print(f"wall time  {elapsed:.1f} s (airflow dags test)")
    final = store.job(job.uuid).status
    return 0 if proc.returncode == 0 and final == JobStatus.COMPLETED else 1


# --- make status -----------------------------------------------------------------------------------

#: A job in one of these states is over: its cost is settled and ``logs`` stops following it.
FINISHED = tuple(status for status in JobStatus if status.is_terminal)


def status_lines(store: ResultsStore, *, limit: int = 20, project: str | None = None) -> list[str]:
    """Recent jobs, newest first: state, where (GPU / instance type, nodes), cost, time, why it failed."""
    from gpu_training.lifecycle import job_cost

    with store.session() as s:
        query = select(TrainingJob).order_by(TrainingJob.created_at.desc(), TrainingJob.id.desc()).limit(limit)
        if project:
            query = query.where(TrainingJob.project_id == project)
        jobs = s.scalars(query).all()
        instances: dict[int, list[Instance]] = {}
        if jobs:
            rows = s.scalars(select(Instance).where(Instance.job_id.in_([j.id for j in jobs])).order_by(Instance.id))
            for row in rows:
                instances.setdefault(row.job_id, []).append(row)
    header = f"{'job':36}  {'project':14} {'status':10} {'provider':8} {'gpu / instance':22} {'nodes':>5} "
    header += f"{'cost USD':>9}  {'started (UTC)':16} {'time':>8}  reason"
    lines = [header]
    now = datetime.now(UTC)
    for job in jobs:
        launched = [i for i in instances.get(job.id, []) if i.instance_id]
        last = launched[-1] if launched else None
        # Before an instance exists, what was asked for; a job of provider "cloud" shows the cloud it got.
        where = ((job.params or {}).get("gpu") or "") if last is None else (last.instance_type or "")
        provider = last.provider if last is not None else job.provider
        nodes = int((job.params or {}).get("num_nodes") or 1)
        finished = job.status in FINISHED
        cost = job.cost_usd if finished and job.cost_usd is not None else job_cost(store, job.uuid, now=now)
        started = job.started_at or job.created_at
        if job.time_taken is not None:
            took = job.time_taken
        else:
            took = ((job.completed_at if finished and job.completed_at else now) - started).total_seconds()
        reason = (job.failure_reason or "").splitlines()[0][:80] if job.failure_reason else ""
        lines.append(
            f"{job.uuid:36}  {job.project_id[:14]:14} {job.status:10} {provider[:8]:8} {where[:22]:22} "
            f"{nodes:>5} {cost:>9.4f}  {started:%Y-%m-%d %H:%M} {_duration(took):>8}  {reason}".rstrip()
        )
    if not jobs:
        lines.append("(no jobs" + (f" of project {project}" if project else "") + ")")
    return lines


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


# --- make logs -------------------------------------------------------------------------------------

#: How much of the log is shown before following (its last lines, per node).
LOGS_TAIL_LINES = 50
_TAIL_BYTES = 256 * 1024
_READ_BYTES = 1 << 20


class NodeLog:
    """One node's ``logs/trainer.log`` followed by byte offset; lines are printed whole (a line
    still being written waits for its newline, or for :meth:`flush`)."""

    def __init__(self, host: Any, rank: int, *, out: Any, from_start: bool = False) -> None:
        self.host, self.rank, self.out = host, rank, out
        self.prefix = False
        self.offset: int | None = 0 if from_start else None  # None: the tail comes first
        self.partial = b""
        self.error = ""  # the last read error shown, so that a lasting one is said once

    def print(self, lines: list[bytes]) -> None:
        for line in lines:
            text = line.decode("utf-8", "replace")
            print(f"[node {self.rank}] {text}" if self.prefix else text, file=self.out, flush=True)

    def tail(self, max_lines: int) -> None:
        """Print the last ``max_lines`` whole lines and position after them."""
        from gpu_training.hosts.base import LOG_PATH

        folder, name = LOG_PATH.split("/", 1)
        size = sum(f.size for f in self.host.list_files(folder) if f.path == name)
        start = max(0, size - _TAIL_BYTES)
        data = self.host.read_chunk(LOG_PATH, start, _TAIL_BYTES) or b""
        lines = data.split(b"\n")
        self.partial = lines.pop()
        if start and lines:
            lines = lines[1:]  # cut by the window
        self.print(lines[-max_lines:])
        self.offset = start + len(data)

    def drain(self) -> None:
        """Print every whole line appended since the last read (the tail, the first time)."""
        from gpu_training.hosts.base import LOG_PATH

        if self.offset is None:
            self.tail(LOGS_TAIL_LINES)
            return
        while True:
            data = self.host.read_chunk(LOG_PATH, self.offset, _READ_BYTES) or b""
            self.offset += len(data)
            lines = (self.partial + data).split(b"\n")
            self.partial = lines.pop()
            self.print(lines)
            if len(data) < _READ_BYTES:
                return

    def flush(self) -> None:
        """The last line, though it has no newline (the log is over)."""
        if self.partial:
            self.print([self.partial])
            self.partial = b""


def follow_logs(
    store: ResultsStore, job_uuid: str, *, out: Any = None, interval: float = 1.0, follow: bool = True
) -> int:
    """Print the job's trainer log (every node's, ``[node N]`` first when there are several): its
    last lines, then what is appended, polled every ``interval`` s until the job has finished.
    Returns the exit status: 2 for an unknown job, else 0."""
    from gpu_training import lifecycle
    from gpu_training.errors import InstanceNotFoundError, JobNotFoundError

    out = out or sys.stdout
    try:
        job = store.job(job_uuid)
    except JobNotFoundError:
        where = store.engine.url.render_as_string(hide_password=True)
        print(f"error: no job {job_uuid} in the results DB {where} (make status lists them)", file=sys.stderr)
        return 2
    logs: dict[str, NodeLog] = {}  # by instance name, rank order
    said = ""  # the last "waiting" or "not reachable" message, said once
    while True:
        job = store.job(job_uuid)
        finished = job.status in FINISHED
        try:
            names = [n.name for n in lifecycle.current_nodes(store, job_uuid)]
        except InstanceNotFoundError:
            names = []
        if names and names != list(logs):
            # The first instance(s), or new ones (a replacement after an interruption, the nodes
            # of a group as they come): a log that appears while following is read from its start.
            try:
                hosts = lifecycle.node_hosts(store, job_uuid)
            except Exception as err:  # not launched yet, no address yet, or gone meanwhile
                hosts = []
                if not isinstance(err, InstanceNotFoundError) and str(err) != said:
                    said = str(err)
                    print(f"-- instance not reachable (job {job.status}): {err}", file=out, flush=True)
            if hosts:
                kept = {record.name for record, _, _ in hosts}
                for name, log in logs.items():
                    if name not in kept:  # a node left: what it wrote last, then its unfinished line
                        with contextlib.suppress(Exception):
                            log.drain()
                        log.flush()
                added = [record.name for record, _, _ in hosts if record.name not in logs]
                if logs and added:
                    print(f"-- job {job_uuid} now on {', '.join(added)}", file=out, flush=True)
                logs = {
                    record.name: logs.get(record.name)
                    or NodeLog(host, record.node_rank, out=out, from_start=bool(logs))
                    for record, _, host in hosts
                }
                for log in logs.values():
                    log.prefix = len(logs) > 1
        for log in logs.values():
            try:
                log.drain()
                log.error = ""
            except Exception as err:  # torn down meanwhile, or a connection that comes back
                if f"{err}" != log.error:
                    log.error = f"{err}"
                    print(f"-- node {log.rank}: log not readable: {type(err).__name__}: {err}", file=out, flush=True)
        if not logs and (finished or not follow):
            _no_instance(store, job, out)
            return 0
        if finished or not follow:
            for log in logs.values():
                log.flush()
            if finished:
                print(f"-- job {job_uuid} {job.status}", file=out, flush=True)
            return 0
        if not logs and not said:
            said = f"job {job_uuid} is {job.status}: waiting for its instance (Ctrl-C to stop)"
            print(said, file=out, flush=True)
        time.sleep(interval)


def _no_instance(store: ResultsStore, job: TrainingJob, out: Any) -> None:
    """Say that there is no instance to read the log from, and where the uploaded one is."""
    from gpu_training.hosts.base import LOG_PATH

    gone = store.instances_for_job(job.uuid)
    what = "its instance is gone" if gone else "it never had an instance"
    print(f"job {job.uuid} is {job.status} and {what}: no live trainer log to follow", file=out)
    if job.failure_reason:
        print(f"reason: {job.failure_reason.splitlines()[0]}", file=out)
    uploaded = [a for a in store.artifacts(job.uuid) if a.name == LOG_PATH]
    if uploaded:
        print(f"its trainer log was uploaded with the outputs: {uploaded[0].uri}", file=out)
    elif gone:
        print("its trainer log was not uploaded (the outputs were not, or it had none)", file=out)
    out.flush()


# --- make validate ---------------------------------------------------------------------------------


def validate_checks(*, image: str | None = None) -> list[tuple[str, str, str]]:
    """``(result, what, detail)`` per check; result is ``ok``, ``FAIL`` or ``skipped``."""
    from gpu_training.params import DEFAULT_IMAGE

    checks: list[tuple[str, str, str]] = [_check_results_db()]
    checks.extend(_check_clouds())
    checks.append(_check_image(image or DEFAULT_IMAGE))
    checks.extend(_check_policy())
    return checks


def _check_policy() -> list[tuple[str, str, str]]:
    """The deployment's policy in force (``[gpu_training]``), one line per key, and a WARN where a
    triggered job could run code as root on this machine."""
    import os

    from gpu_training.policy import Policy

    try:
        policy = Policy.current()
    except ValueError as err:
        return [("FAIL", "policy [gpu_training]", str(err))]
    checks = [("policy", key, value) for key, value in policy.described()]
    if policy.allows_provider("local") and not policy.local_run_as_user and os.geteuid() == 0:
        checks.append(
            (
                "WARN",
                "local trainers run as root",
                "provider 'local' is allowed and this worker is root: a triggered job's trainer runs as root "
                "here. Set [gpu_training] local_run_as_user to an unprivileged user, or leave 'local' out of "
                "allowed_providers",
            )
        )
    elif policy.local_run_as_user:
        import pwd

        try:
            pwd.getpwnam(policy.local_run_as_user)
        except KeyError:
            checks.append(("FAIL", "local_run_as_user", f"{policy.local_run_as_user!r} is not a user on this machine"))
    return checks


def _check_results_db() -> tuple[str, str, str]:
    from gpu_training.errors import ResultsDbError
    from gpu_training.hooks.results import ResultsDbHook
    from gpu_training.results.migrate import check_at_head, head_revision

    try:
        engine = ResultsDbHook().get_engine()
        where = engine.url.render_as_string(hide_password=True)
        with engine.connect():
            pass
        check_at_head(engine)
    except ResultsDbError as err:
        return "FAIL", "results DB", str(err)
    except Exception as err:
        return "FAIL", "results DB", f"not reachable: {type(err).__name__}: {err}"
    return "ok", "results DB", f"{where} at schema {head_revision()}"


def _check_clouds() -> list[tuple[str, str, str]]:
    from gpu_training.providers.base import GpuRequest
    from gpu_training.providers.registry import CLOUD_CONNECTIONS, CLOUDS, cloud_class, configured_clouds

    configured = configured_clouds()
    checks = []
    for name in CLOUDS:
        conn_id = CLOUD_CONNECTIONS[name]
        if name not in configured:
            checks.append(("skipped", f"cloud {name}", f"no connection {conn_id}"))
            continue
        try:
            provider = cloud_class(name)()
            offers = provider.list_offers(GpuRequest())
        except Exception as err:
            checks.append(("FAIL", f"cloud {name}", f"{conn_id}: {type(err).__name__}: {err}"))
            continue
        checks.append(("ok", f"cloud {name}", f"{conn_id}: credentials accepted, {len(offers)} offers listed"))
        if name == "runpod":
            checks.append(_check_runpod_create(provider, conn_id))
    return checks


def _check_runpod_create(provider: Any, conn_id: str) -> tuple[str, str, str]:
    """Whether RunPod's key may create pods: listing offers only needs read access, and a read-only
    key would otherwise show up as every launch refused (see ``RunPodHook.check_create_permission``:
    a create the spec must refuse, so no pod is made)."""
    try:
        provider.hook.check_create_permission()
    except Exception as err:
        return ("FAIL", "cloud runpod: create pods", f"{conn_id}: {type(err).__name__}: {err}")
    return ("ok", "cloud runpod: create pods", f"{conn_id}: the key may create pods (probe refused as a body, 422)")


def _check_image(image: str) -> tuple[str, str, str]:
    import shutil

    what = f"trainer image {image}"
    build = f"build it: sudo bash include/trainer/build_base_image.sh && docker build -t {image} include/trainer"
    docker = shutil.which("docker")
    if not docker:
        return "FAIL", what, f"docker is not installed (runtime 'docker' needs it; apt-get install docker.io); {build}"
    try:
        proc = subprocess.run(
            [docker, "image", "inspect", "--format", "{{.Id}}", image], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        return "FAIL", what, f"docker did not answer: {err}"
    if proc.returncode != 0:
        said = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        if "no such image" not in said.lower():
            return "FAIL", what, f"docker did not answer: {said} (is dockerd running?)"
        return "FAIL", what, f"not present in Docker; {build}"
    return "ok", what, f"present ({proc.stdout.strip()[:19]})"


def validate(*, image: str | None = None, out: Any = None) -> int:
    """Print one line per check and a count; 1 if any check failed."""
    out = out or sys.stdout
    checks = validate_checks(image=image)
    for result, what, detail in checks:
        print(f"{result:8} {what:34} {detail}", file=out)
    real = [c for c in checks if c[0] != "policy"]  # the policy lines say what is in force
    failed = sum(1 for c in real if c[0] == "FAIL")
    warned = sum(1 for c in real if c[0] == "WARN")
    print(f"{len(real)} checks, {failed} failed" + (f", {warned} warnings" if warned else ""), file=out)
    return 1 if failed else 0


def _quiet_logs() -> None:
    """Keep Alembic's INFO lines (each schema check logs two) out of the commands' output."""
    import logging

    import airflow  # noqa: F401  (configures logging first, which would reset the level)

    logging.getLogger("alembic").setLevel(logging.WARNING)


def _operator_command(args: argparse.Namespace) -> int:
    """``status``, ``logs`` and ``validate``."""
    from sqlalchemy.exc import SQLAlchemyError

    from gpu_training.errors import ResultsDbError

    _quiet_logs()
    if args.cmd == "validate":
        return validate(image=args.image)
    store = _store()
    try:
        store.check_schema()
    except ResultsDbError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SQLAlchemyError as err:
        where = store.engine.url.render_as_string(hide_password=True)
        print(f"error: results DB {where} not reachable: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if args.cmd == "logs":
        return follow_logs(store, args.uuid, follow=not args.no_follow, interval=args.interval)
    print("\n".join(status_lines(store, limit=args.limit, project=args.project or None)))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_training.cli", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run one gpu_training job and print its summary")
    p_run.add_argument("--conf", default="{}", help="JSON object of DAG params")
    p_run.add_argument("--quiet", action="store_true", help="hide Airflow's task logs")
    p_show = sub.add_parser("show", help="print the summary of a job")
    p_show.add_argument("uuid")
    p_status = sub.add_parser("status", help="recent jobs: state, GPU, nodes, cost")
    p_status.add_argument("--limit", type=int, default=20, help="how many jobs, newest first (default 20)")
    p_status.add_argument("--project", default=None, help="only this project_id's jobs")
    p_logs = sub.add_parser("logs", help="follow a job's trainer log (every node's) until it finishes")
    p_logs.add_argument("uuid")
    p_logs.add_argument("--no-follow", action="store_true", help="print the last lines and exit")
    p_logs.add_argument("--interval", type=float, default=1.0, help="seconds between reads (default 1)")
    p_validate = sub.add_parser("validate", help="check the results DB, the clouds' credentials, the trainer image")
    p_validate.add_argument(
        "--image", default=None, help="the trainer image to look for (default: the params' default image)"
    )
    args = parser.parse_args(argv)
    if args.cmd in ("status", "logs", "validate"):
        try:
            return _operator_command(args)
        except KeyboardInterrupt:
            return 130  # Ctrl-C: quietly, as the shell reports a SIGINT
        except BrokenPipeError:
            # `make status | head`: the reader left; nothing more to say, and nowhere to say it.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
    if args.cmd == "run":
        try:
            conf = json.loads(args.conf or "{}")
        except json.JSONDecodeError as err:
            print(f"error: --conf is not valid JSON: {err}", file=sys.stderr)
            return 2
        if not isinstance(conf, dict):
            print("error: --conf must be a JSON object of params", file=sys.stderr)
            return 2
        return run(conf, quiet=args.quiet)
    print(summary(_store(), args.uuid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
