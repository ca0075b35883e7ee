"""Benchmark: jobs per minute on the CeleryExecutor deployment against the same run on the LocalExecutor.

For each executor this starts a deployment, triggers ``--jobs`` ``gpu_training`` runs at once
through the REST API on a fake GPU cloud (``--cloud``, ``tests/fakeclouds/rigs.py``; the instance
boots in 0 s and is the test sshd on 127.0.0.1) with the scripted trainer (``ok --epochs
--interval``), waits until every run has finished and measures, from the first trigger request:

* trigger -> all started: until the first task of every run is running (``min(start_date)`` of
  its task instances), and trigger -> all finished (the runs' ``end_date``); jobs per minute
  started and finished are ``--jobs`` divided by those minutes;
* runs succeeded, jobs ``completed`` in the results DB, and instances left not terminated: rows of
  the results DB's ``instances`` not ``terminated``/``failed``, and instances the fake cloud still
  runs;
* CPU seconds over that window (trigger -> all finished) of each component's process tree, from
  ``/proc`` (utime+stime of its live processes plus what their reaped children used, as
  ``bench/concurrency.py`` counts): the scheduler's main process (and the children it reaped);
  the executor (LocalExecutor: its worker processes, children of the scheduler, and the task
  processes they run; CeleryExecutor: the ``airflow celery worker`` processes, their pool and task
  processes, and any live child of the scheduler); the triggerer; the api-server (every task talks
  to its execution API); the dag-processor; PostgreSQL and (Celery only) Redis; the test sshd (the
  SSH sessions the jobs open on their "instances") and this process (the fake cloud's HTTP server,
  the 1 s polls of the metadata DB); the machine's busy share, and what of it none of these used:
  other load on the machine, which slows everything above by its share (this VM is shared).

The two columns are printed side by side with the machine they ran on.

**The same deployment but for the executor.** Both runs use ``tests/airflow_cluster.py``'s
``CeleryDeployment`` databases: a private PostgreSQL server with Airflow's metadata DB ``airflow``
and the results DB ``training_results`` (as ``docker-compose.yaml`` has them). The LocalExecutor run
starts that PostgreSQL too (``CeleryDeployment(executor="LocalExecutor")``) rather than using the SQLite default, so
the database, its connection count and the results store are the same and only the executor
differs: no Redis broker, no Celery result backend and no workers, just the scheduler's forked
worker processes. (SQLite would also lock up under 20 concurrent runs, see ``bench/concurrency.py``.)
The CeleryDeployment's moto S3 server is not started for the LocalExecutor: the jobs write their
outputs to the embedded ``file://`` storage in both runs, so nothing uses it. Both get the same
number of task slots: ``--parallelism`` (default ``--workers`` x ``--concurrency``) is the
LocalExecutor's worker count and, for both, ``[core] parallelism`` and
``max_active_tasks_per_dag``. DAGs other than ``gpu_training`` (the instance reaper, retraining)
stay paused, so nothing else runs meanwhile. Each executor gets a fresh fake cloud; the sshd is
shared.

Figures only, no goals. On this 2-core VM the default run (20 jobs, 2 workers x 8) took 8-9 minutes
while other tests shared the machine (20-30% of it): each executor's 20 jobs are 200 task instances
and ~280 CPU seconds (Airflow ~140-175, the sshd's SSH sessions of the fake instances ~130, which on
a real cloud would run on the instances), so ~2 minutes per executor even on idle cores, plus ~35 s
to start and stop each deployment; ``--jobs 4`` takes about 3 minutes. A component that dies or a
run that fails is reported below the table with the component log tails, and every process is
stopped at the end, also on Ctrl-C or SIGTERM.

    python bench/cluster.py [--jobs 20] [--epochs 5] [--interval 1] [--cloud lambda]
                            [--workers 2] [--concurrency 8] [--parallelism N]
                            [--executors LocalExecutor,CeleryExecutor] [--keep] [--json FILE]

Needs root (sshd with root login), PostgreSQL and Redis (``make bench-cluster`` installs them).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

import requests  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench.concurrency import machine, machine_cpu_ticks, pct, tree_cpu  # noqa: E402
from tests.airflow_cluster import AirflowCluster, CeleryDeployment, ClusterError, _proc_stat  # noqa: E402
from tests.fakeclouds.rigs import STARTERS, Rig  # noqa: E402
from tests.sshd import Sshd, start_sshd  # noqa: E402

DAG_ID = "gpu_training"
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
EXECUTORS = ("LocalExecutor", "CeleryExecutor")
#: CPU rows, in the table's order: (key, label).
CPU_ROWS = (
    ("scheduler", "scheduler CPU (main process)"),
    ("scheduler-reaped", "  of which its reaped children"),
    ("executor", "executor CPU (workers + tasks)"),
    ("triggerer", "triggerer CPU"),
    ("api-server", "api-server CPU"),
    ("dag-processor", "dag-processor CPU"),
    ("postgres", "PostgreSQL CPU"),
    ("redis", "Redis CPU"),
    ("sshd", "sshd CPU (fake boxes: SSH sessions)"),
    ("bench", "bench process CPU (fake cloud, polls)"),
)
AIRFLOW_CPU = ("scheduler", "executor", "triggerer", "api-server", "dag-processor")


def log(msg: str) -> None:
    print(f"[bench-cluster {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while processes are being stopped (a second Ctrl-C must not leave
    half of them running); they are delivered right after."""
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if pending:
            raise KeyboardInterrupt(f"signal {pending[0]}")


# --- CPU -----------------------------------------------------------------------------------------


def _pid_cpu(pid: int) -> tuple[float, float]:
    """(utime+stime, cutime+cstime: what its reaped children used) of one process, in seconds."""
    fields = _proc_stat(pid)
    if not fields:
        return 0.0, 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks, (int(fields[13]) + int(fields[14])) / ticks


def _tree(pid: int | None) -> float:
    return sum(tree_cpu(pid)) if pid else 0.0


def cpu_snapshot(cluster: AirflowCluster, servers: dict[str, int]) -> dict[str, float]:
    """CPU seconds so far per row of :data:`CPU_ROWS` (``servers``: name -> pid), and the machine's
    busy and total CPU seconds (all CPUs together)."""

    def pid(name: str) -> int | None:
        with contextlib.suppress(ClusterError):
            return cluster.pid(name)
        return None

    out: dict[str, float] = {}
    scheduler = pid("scheduler")
    own, reaped = _pid_cpu(scheduler) if scheduler else (0.0, 0.0)
    main = own + reaped
    out["scheduler"], out["scheduler-reaped"] = main, reaped
    # The scheduler's tree beyond its main process: the LocalExecutor's workers (and their tasks);
    # for the CeleryExecutor whatever it forks to send tasks, plus the Celery workers.
    out["executor"] = _tree(scheduler) - main + sum(_tree(pid(w)) for w in cluster.workers)
    for name in ("triggerer", "api-server", "dag-processor"):
        out[name] = _tree(pid(name))
    for name, server_pid in servers.items():
        out[name] = _tree(server_pid)
    times = os.times()
    out["bench"] = times.user + times.system  # this process's threads: the fake cloud's HTTP server, the polls
    busy, total = machine_cpu_ticks()
    ticks = os.sysconf("SC_CLK_TCK")
    out["machine_busy"], out["machine_total"] = busy / ticks, total / ticks
    return out


# --- one executor --------------------------------------------------------------------------------


@dataclass
class Result:
    executor: str
    values: dict[str, str] = field(default_factory=dict)  # row label -> figure
    failure: str | None = None
    details: list[str] = field(default_factory=list)  # failed runs, log tails
    raw: dict[str, Any] = field(default_factory=dict)


def _utc(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _per_min(jobs: int, seconds: float | None) -> str:
    return "-" if not seconds else f"{jobs * 60.0 / seconds:.1f}"


def job_conf(args: argparse.Namespace, rig: Rig, i: int) -> dict[str, Any]:
    return {
        "project_id": f"bench-cluster-{i:03d}",
        "provider": rig.name,
        "gpu": rig.gpu,
        "command": ["{python}", str(SCRIPTED), "ok", str(args.epochs), f"{args.interval:g}"],
        "poll_interval_seconds": args.poll_interval,
    }


def trigger(cluster: AirflowCluster, conf: dict[str, Any]) -> str:
    for attempt in range(5):
        try:
            return cluster.trigger(DAG_ID, conf)
        except (ClusterError, requests.RequestException) as err:
            if attempt == 4 or (isinstance(err, ClusterError) and "-> 5" not in str(err)):
                raise
            log(f"trigger failed, retrying: {str(err)[:300]}")
            time.sleep(1)
    raise AssertionError("unreachable")


POLL = text(
    "SELECT dr.run_id, dr.state, dr.end_date, "
    "(SELECT min(ti.start_date) FROM task_instance ti WHERE ti.dag_id = dr.dag_id AND ti.run_id = dr.run_id) "
    "FROM dag_run dr WHERE dr.dag_id = :dag"
)
TRIES = text(
    "SELECT coalesce(hostname, ''), count(*), coalesce(sum(CASE WHEN try_number > 1 THEN 1 ELSE 0 END), 0) "
    "FROM task_instance WHERE dag_id = :dag AND start_date IS NOT NULL GROUP BY 1 ORDER BY 1"
)
RETRIED = text(
    "SELECT task_id, count(*) FROM task_instance WHERE dag_id = :dag AND try_number > 1 GROUP BY 1 ORDER BY 1"
)
TI_STATES = text(
    "SELECT task_id, coalesce(state, 'none'), count(*) FROM task_instance WHERE dag_id = :dag GROUP BY 1, 2 ORDER BY 1"
)


def run_executor(executor: str, args: argparse.Namespace, sshd: Sshd, work: Path) -> Result:
    """Start the deployment, run the jobs, measure; everything of this executor is stopped on return."""
    result = Result(executor)
    root = work / executor.removesuffix("Executor").lower()
    rig: Rig | None = None
    deployment: CeleryDeployment | None = None
    meta = results = None
    run_ids: list[str] = []
    states: dict[str, str] = {}
    started: dict[str, datetime] = {}
    ended: dict[str, datetime] = {}
    t_begin = time.time()
    try:
        rig = STARTERS[args.cloud](sshd, root / "boxes")
        rig.fake.faults.boot_seconds = 0.0
        extra_env = {
            **rig.env,
            # Only gpu_training runs: the reaper and the retraining DAGs stay paused.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(args.parallelism),
        }
        log(f"{executor}: starting the deployment")
        deployment = CeleryDeployment(
            root,
            executor=executor,
            workers=args.workers,
            worker_concurrency=args.concurrency,
            parallelism=args.parallelism,
            extra_env=extra_env,
        )
        startup = deployment.start()
        cluster = deployment.airflow
        cluster.wait_dag_parsed(DAG_ID, timeout=180)
        result.values["deployment start"] = f"{startup:.1f} s"
        assert deployment.postgres is not None
        servers = {"postgres": deployment.postgres.proc.pid, "sshd": sshd.proc.pid}
        if deployment.redis is not None:
            servers["redis"] = deployment.redis.proc.pid
        meta = create_engine(cluster.sql_alchemy_conn)
        results = create_engine(cluster.results_url)

        cpu0 = cpu_snapshot(cluster, servers)
        t0 = time.time()
        for i in range(args.jobs):
            run_ids.append(trigger(cluster, job_conf(args, rig, i)))
        log(f"{executor}: triggered {len(run_ids)} runs in {time.time() - t0:.1f} s")
        wanted = set(run_ids)
        deadline = time.monotonic() + args.timeout
        last_print = time.monotonic()
        cpu1: dict[str, float] | None = None
        t_done: float | None = None
        try:
            while True:
                cluster.check_alive()
                with meta.connect() as conn:
                    rows = list(conn.execute(POLL, {"dag": DAG_ID}))
                for run_id, state, end_date, first_start in rows:
                    if run_id not in wanted:
                        continue
                    states[run_id] = str(state)
                    if first_start is not None:
                        started[run_id] = _utc(first_start)  # type: ignore[assignment]
                    if state in ("success", "failed") and end_date is not None:
                        ended[run_id] = _utc(end_date)  # type: ignore[assignment]
                if len(ended) == len(run_ids):
                    cpu1, t_done = cpu_snapshot(cluster, servers), time.time()
                    break
                if time.monotonic() - last_print > 15:
                    log(
                        f"{executor}: {time.time() - t0:5.0f} s: {len(started)} started, "
                        f"{len(ended)}/{len(run_ids)} finished"
                    )
                    last_print = time.monotonic()
                if time.monotonic() > deadline:
                    raise ClusterError(f"only {len(ended)} of {len(run_ids)} runs finished within {args.timeout:.0f} s")
                time.sleep(1)
        except (ClusterError, OSError) as err:  # OSError: the DB or the API went away
            result.failure = str(err)
            log(f"{executor}: ABORTED: {result.failure.splitlines()[0][:300]}")
        if cpu1 is None:
            cpu1, t_done = cpu_snapshot(cluster, servers), time.time()
        assert t_done is not None
        measure(result, args, rig, cluster, meta, results, run_ids, states, started, ended, t0, t_done, cpu0, cpu1)
        failed = [r for r in run_ids if states.get(r) != "success"]
        if failed or result.failure:
            result.details += failure_details(cluster, meta, results, failed, states, result.failure)
    except Exception as err:  # reported in the table; KeyboardInterrupt goes on to main
        result.failure = result.failure or f"{type(err).__name__}: {err}"
        log(f"{executor}: FAILED: {result.failure.splitlines()[0][:300]}")
        if deployment is not None and deployment.cluster is not None:
            result.details.append(deployment.cluster.log_tails(*deployment.cluster.components, lines=40))
        else:
            result.details.append(result.failure)
    finally:
        with shielded():
            for engine in (meta, results):
                if engine is not None:
                    engine.dispose()
            if deployment is not None:
                log(f"{executor}: stopping the deployment")
                deployment.stop()
            if rig is not None:
                with contextlib.suppress(Exception):
                    rig.stop()
        result.values["bench wall time (start to stop)"] = f"{time.time() - t_begin:.0f} s"
    return result


def measure(
    result: Result,
    args: argparse.Namespace,
    rig: Rig,
    cluster: AirflowCluster,
    meta: Any,
    results: Any,
    run_ids: list[str],
    states: dict[str, str],
    started: dict[str, datetime],
    ended: dict[str, datetime],
    t0: float,
    t_done: float,
    cpu0: dict[str, float],
    cpu1: dict[str, float],
) -> None:
    n = len(run_ids)
    start_lat = [started[r].timestamp() - t0 for r in run_ids if r in started]
    end_lat = [ended[r].timestamp() - t0 for r in run_ids if r in ended]
    all_started = max(start_lat) if len(start_lat) == n and n else None
    all_finished = max(end_lat) if len(end_lat) == n and n else None
    with results.connect() as conn:
        jobs = list(
            conn.execute(
                text("SELECT run_id, status, trainer_started_at FROM training_jobs WHERE dag_id = :dag"),
                {"dag": DAG_ID},
            )
        )
        left = list(conn.execute(text("SELECT name, state FROM instances WHERE state NOT IN ('terminated', 'failed')")))
    with meta.connect() as conn:
        by_host = list(conn.execute(TRIES, {"dag": DAG_ID}))
        retried = list(conn.execute(RETRIED, {"dag": DAG_ID}))
    jobs = [j for j in jobs if j[0] in set(run_ids)]
    trainer_lat = [_utc(j[2]).timestamp() - t0 for j in jobs if j[2] is not None]  # type: ignore[union-attr]
    completed = sum(1 for j in jobs if j[1] == "completed")
    fake_live = [i.name or i.id for i in rig.fake.live()]
    succeeded = sum(1 for r in run_ids if states.get(r) == "success")
    window = t_done - t0
    v = result.values
    v["runs succeeded"] = f"{succeeded} / {n}"
    v["jobs completed (results DB)"] = f"{completed} / {n}"
    v["trigger -> all started"] = _secs(all_started) if all_started is not None else f"{len(start_lat)} of {n}"
    v["jobs/min started"] = _per_min(n, all_started)
    v["trigger -> started p50 / max"] = f"{pct(start_lat, 50):.1f} / {max(start_lat):.1f} s" if start_lat else "-"
    v["trigger -> all trainers started"] = (
        _secs(max(trainer_lat)) if len(trainer_lat) == n and n else f"{len(trainer_lat)} of {n}"
    )
    v["trigger -> all finished"] = _secs(all_finished) if all_finished is not None else f"{len(end_lat)} of {n}"
    v["jobs/min finished"] = _per_min(n, all_finished)
    v["trigger -> finished p50 / max"] = f"{pct(end_lat, 50):.1f} / {max(end_lat):.1f} s" if end_lat else "-"
    v["task instances run (per worker)"] = " + ".join(str(c) for _, c, _ in by_host) or "0"
    v["task instances retried"] = str(sum(c for _, c in retried)) + (
        f" ({', '.join(f'{t} x{c}' for t, c in retried)})" if retried else ""
    )
    v["instances not terminated (DB / cloud)"] = f"{len(left)} / {len(fake_live)}"
    if left or fake_live:
        result.details.append(f"instances not terminated: results DB {left}, fake cloud {fake_live}")
    v["CPU window (trigger -> finished)"] = f"{window:.1f} s"
    airflow_total = measured = 0.0
    for key, label in CPU_ROWS:
        if key not in cpu0 or key not in cpu1:
            v[label] = "-"
            continue
        secs = cpu1[key] - cpu0[key]
        if key in AIRFLOW_CPU:
            airflow_total += secs
        if key != "scheduler-reaped":
            measured += secs
        v[label] = f"{secs:.1f} s ({100.0 * secs / window:.0f}%)" if window > 0 else f"{secs:.1f} s"
    v["Airflow CPU in all / per job"] = f"{airflow_total:.1f} / {airflow_total / n:.2f} s" if n else "-"
    busy = cpu1["machine_busy"] - cpu0["machine_busy"]
    total = cpu1["machine_total"] - cpu0["machine_total"]
    v["machine busy"] = f"{100.0 * busy / total:.0f}% of {os.cpu_count()} CPUs" if total else "-"
    # Whatever else ran meanwhile (other tests, builds): the figures above are slower by its share.
    other = max(0.0, busy - measured)
    v["other load on the machine"] = f"{other:.1f} s ({100.0 * other / total:.0f}% of the machine)" if total else "-"
    result.raw = {
        "start_latency_s": start_lat,
        "finish_latency_s": end_lat,
        "trainer_start_latency_s": trainer_lat,
        "cpu_seconds": {k: cpu1[k] - cpu0[k] for k in cpu0 if k in cpu1},
        "run_states": states,
        "window_s": window,
    }


def failure_details(
    cluster: AirflowCluster,
    meta: Any,
    results: Any,
    failed: list[str],
    states: dict[str, str],
    failure: str | None,
) -> list[str]:
    out = []
    if failure:
        out.append(failure)
    with contextlib.suppress(Exception), meta.connect() as conn:
        counts = [f"{t}={s}:{c}" for t, s, c in conn.execute(TI_STATES, {"dag": DAG_ID})]
        out.append("task instances (task=state:count): " + ", ".join(counts))
    if failed:
        with contextlib.suppress(Exception), results.connect() as conn:
            for run_id, status, reason in conn.execute(
                text("SELECT run_id, status, failure_reason FROM training_jobs WHERE dag_id = :dag"), {"dag": DAG_ID}
            ):
                if run_id in failed:
                    out.append(f"run {run_id}: job {status}: {(reason or '')[:300]}")
        out.append(f"{len(failed)} runs not successful: {dict(Counter(states.get(r, '?') for r in failed))}")
    names = ("scheduler", "triggerer", *cluster.workers)
    out.append(cluster.log_tails(*names, lines=40))
    return out


# --- the report ----------------------------------------------------------------------------------


def print_table(args: argparse.Namespace, done: list[Result]) -> None:
    labels: list[str] = []
    for res in done:
        labels += [k for k in res.values if k not in labels]
    order = [
        "deployment start",
        "runs succeeded",
        "jobs completed (results DB)",
        "trigger -> all started",
        "jobs/min started",
        "trigger -> started p50 / max",
        "trigger -> all trainers started",
        "trigger -> all finished",
        "jobs/min finished",
        "trigger -> finished p50 / max",
        "task instances run (per worker)",
        "task instances retried",
        "instances not terminated (DB / cloud)",
        "CPU window (trigger -> finished)",
        *(label for _, label in CPU_ROWS),
        "Airflow CPU in all / per job",
        "machine busy",
        "other load on the machine",
        "bench wall time (start to stop)",
    ]
    labels = [k for k in order if k in labels] + [k for k in labels if k not in order]
    rows = [("", *(r.executor for r in done))]
    rows += [(k, *(r.values.get(k, "-") for r in done)) for k in labels]
    rows.append(("status", *("FAILED" if r.failure else "ok" for r in done)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    m = machine()
    slots = f"{args.workers} workers x {args.concurrency}" if "CeleryExecutor" in args.executors else ""
    print("\n" + "=" * (sum(widths) + 3 * len(widths)))
    print(f"gpu_training on a cluster: {' vs '.join(args.executors)} ({datetime.now().isoformat(timespec='seconds')})")
    print(f"machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram']} RAM")
    print(
        f"{args.jobs} jobs at once on the fake {args.cloud} cloud (boot 0 s), scripted trainer ok {args.epochs} "
        f"epochs {args.interval:g} s apart, poll {args.poll_interval:g} s; parallelism {args.parallelism}"
        + (f"; Celery {slots}" if slots else "")
        + "; PostgreSQL metadata + results DB for each"
    )
    print("=" * (sum(widths) + 3 * len(widths)))
    for i, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("   ".join(cells).rstrip())
        if i == 0:
            print("-" * (sum(widths) + 3 * (len(widths) - 1)))
    print(
        "CPU rows: seconds over the window (share of one core); executor = LocalExecutor workers / Celery "
        "workers; other load = machine busy - every row above"
    )
    for res in done:
        if res.details:
            print(f"\n----- {res.executor}: {res.failure.splitlines()[0][:300] if res.failure else 'problems'}")
            for item in res.details:
                print(item)


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20, help="runs triggered at once per executor")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the scripted trainer")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between epochs")
    parser.add_argument("--poll-interval", type=float, default=2.0, help="the jobs' poll_interval_seconds")
    parser.add_argument("--cloud", choices=sorted(STARTERS), default="lambda", help="the fake GPU cloud")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers")
    parser.add_argument("--concurrency", type=int, default=8, help="task slots per Celery worker")
    parser.add_argument(
        "--parallelism",
        type=int,
        default=0,
        help="[core] parallelism for both and the LocalExecutor's workers (default: workers x concurrency)",
    )
    parser.add_argument(
        "--executors", default=",".join(EXECUTORS), help="comma-separated, in this order (default: both)"
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the runs, per executor")
    parser.add_argument("--home", type=Path, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (homes, logs)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.parallelism = args.parallelism or args.workers * args.concurrency
    args.executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    if unknown := [e for e in args.executors if e not in EXECUTORS]:
        parser.error(f"unknown executors {unknown}: {', '.join(EXECUTORS)}")
    if os.geteuid() != 0:
        parser.error("needs root: the test sshd takes root logins by key (tests/sshd.py)")

    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so every finally below stops its processes.
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    work = (args.home or Path(tempfile.mkdtemp(prefix="bench-cluster-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    done: list[Result] = []
    sshd: Sshd | None = None
    interrupted = False
    try:
        sshd = start_sshd(work / "sshd")
        for executor in args.executors:
            done.append(run_executor(executor, args, sshd, work))
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: everything stopped; the figures so far follow")
    finally:
        try:
            with shielded():
                if sshd is not None:
                    sshd.stop()
        except KeyboardInterrupt:
            interrupted = True
        if args.keep or args.home:
            log(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if done:
        print_table(args, done)
    if args.json:
        args.json.write_text(
            json.dumps(
                [{"executor": r.executor, "values": r.values, "failure": r.failure, **r.raw} for r in done],
                indent=2,
                default=str,
            )
        )
    if interrupted:
        return 130
    return 0 if done and all(r.failure is None and not r.details for r in done) else 1


if __name__ == "__main__":
    sys.exit(main())
