"""Benchmark: many concurrent ``gpu_training`` runs on a real Airflow deployment (separate processes).

Starts ``tests/airflow_cluster.py``'s cluster (api-server, scheduler with the LocalExecutor,
dag-processor, triggerer), triggers ``--runs`` runs at once on the local provider with the scripted
trainer (``ok`` mode, ``--epochs`` epochs ``--interval`` seconds apart), and while they run samples:

* every second, the task instances of the DAG that are ``running`` (a worker slot each), ``deferred``,
  ``queued`` or ``scheduled``, split by task id (one read-only query on the metadata DB), and the CPU
  time of each component's process tree (``/proc``: utime+stime of every live process of the tree,
  plus what its reaped children used, so short-lived ``bash`` status checks count too);
* the scheduler loop duration, ``scheduler.scheduler_loop_duration``, sent by Airflow's StatsD
  client (``[metrics] statsd_on``) to a UDP socket this script listens on;
* every 0.2 s, the ``epoch_train`` rows of the results DB, recording when each (job, epoch) was
  first seen; against the event's ``ts`` in the job's ``global.json`` this is the latency from the
  trainer writing an event to its row being visible.

The figures of interest are taken over the window in which every trainer trains at once (from the
last ``PROJECT start`` to the first ``PROJECT end``); when the runs do not all overlap (too few or too
short epochs for the ramp-up), over the window in which any trainer trains, and the table says so.

    python bench/concurrency.py [--runs 50] [--epochs 30] [--interval 2] [--parallelism 32]
                                [--metadata-db postgres|sqlite]

Airflow's metadata DB is a private PostgreSQL server by default (``tests/servers.py``
``start_postgres``: Debian's ``postgresql`` package; Airflow uses psycopg2 and asyncpg, both in
requirements.txt). ``--metadata-db sqlite`` shows why: at about 50 concurrent runs its writers hit
"database is locked" and components exit. If a component dies, the figures so far are printed with
the cause. The results DB is SQLite either way.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

from sqlalchemy import create_engine, text  # noqa: E402

from tests.airflow_cluster import COMPONENTS, AirflowCluster, ClusterError, _proc_stat, tree_pids  # noqa: E402
from tests.servers import PostgresServer, start_postgres  # noqa: E402

DAG_ID = "gpu_training"
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
LOOP_METRIC = "scheduler.scheduler_loop_duration"
SAMPLED_STATES = ("running", "deferred", "queued", "scheduled", "up_for_retry")

# --- what the machine is -------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0])
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "ram": f"{mem_kb / 1024 / 1024:.1f} GiB"}


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds of ``root``'s live process tree: (utime+stime of its processes, cutime+cstime:
    what their reaped children used, e.g. short-lived ``bash`` status checks)."""
    own = children = 0
    for pid in tree_pids(root):
        fields = _proc_stat(pid)
        if fields:
            own += int(fields[11]) + int(fields[12])
            children += int(fields[13]) + int(fields[14])
    ticks = os.sysconf("SC_CLK_TCK")
    return own / ticks, children / ticks


# --- samplers ------------------------------------------------------------------------------------


class StatsdListener(threading.Thread):
    """Collects StatsD timings (``name:value|ms``) with the wall time they arrived."""

    def __init__(self) -> None:
        super().__init__(name="statsd", daemon=True)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.5)
        self.port = int(self.sock.getsockname()[1])
        self.timings: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.packets = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            try:
                data = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.time()
            self.packets += 1
            for line in data.decode(errors="replace").splitlines():
                name, _, rest = line.partition(":")
                parts = rest.split("|")
                if len(parts) >= 2 and parts[1] == "ms":
                    with contextlib.suppress(ValueError):
                        self.timings[name].append((now, float(parts[0])))

    def stop(self) -> None:
        self._halt.set()
        self.join(2)
        self.sock.close()


@dataclass
class Sample:
    t: float
    rows: list[tuple[str, str, str]]  # (run_id, task_id, state) of the sampled states
    cpu: dict[str, tuple[float, float]]  # component -> CPU seconds of its tree so far (own, reaped children)
    machine: tuple[int, int]

    def count(self, state: str, task_id: str | None = None) -> int:
        return sum(1 for _, tid, st in self.rows if st == state and (task_id is None or tid == task_id))


@dataclass
class Sampler:
    cluster: AirflowCluster
    samples: list[Sample] = field(default_factory=list)
    first_seen: dict[tuple[str, int, int], float] = field(default_factory=dict)  # (uuid, it, epoch) -> t
    errors: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._halt = threading.Event()
        self.meta = create_engine(self.cluster.sql_alchemy_conn, connect_args=self._connect_args())
        self.results = create_engine(self.cluster.results_url, connect_args={"timeout": 30})
        self.threads = [
            threading.Thread(target=self._every_second, name="ti-sampler", daemon=True),
            threading.Thread(target=self._epochs, name="epoch-sampler", daemon=True),
        ]

    def _connect_args(self) -> dict[str, Any]:
        return {"timeout": 30} if self.cluster.sql_alchemy_conn.startswith("sqlite") else {}

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def stop(self) -> None:
        self._halt.set()
        for thread in self.threads:
            thread.join(10)
        self.meta.dispose()
        self.results.dispose()

    def _cpu(self) -> dict[str, tuple[float, float]]:
        out = {}
        for name in COMPONENTS:
            with contextlib.suppress(Exception):
                out[name] = tree_cpu(self.cluster.pid(name))
        return out

    def _every_second(self) -> None:
        query = text(
            "SELECT run_id, task_id, state FROM task_instance WHERE dag_id = :dag AND state IN "
            "('running', 'deferred', 'queued', 'scheduled', 'up_for_retry')"
        )
        while not self._halt.is_set():
            started = time.time()
            rows: list[tuple[str, str, str]] = []
            try:
                with self.meta.connect() as conn:
                    rows = [(str(r), str(t), str(st)) for r, t, st in conn.execute(query, {"dag": DAG_ID})]
            except Exception as err:
                self.errors[f"metadata query: {type(err).__name__}: {str(err)[:120]}"] += 1
            self.samples.append(Sample(started, rows, self._cpu(), machine_cpu_ticks()))
            self._halt.wait(max(0.0, 1.0 - (time.time() - started)))

    def _epochs(self) -> None:
        query = text(
            "SELECT e.id, j.uuid, e.iteration, e.epoch FROM epoch_train e JOIN training_jobs j ON j.id = e.job_id "
            "WHERE e.id > :after"
        )
        last_id = 0
        while not self._halt.is_set():
            started = time.time()
            try:
                with self.results.connect() as conn:
                    rows = list(conn.execute(query, {"after": max(0, last_id - 500)}))
            except Exception as err:
                self.errors[f"results query: {type(err).__name__}: {str(err)[:120]}"] += 1
                rows = []
            for row_id, uuid, iteration, epoch in rows:
                self.first_seen.setdefault((str(uuid), int(iteration), int(epoch)), started)
                last_id = max(last_id, int(row_id))
            self._halt.wait(max(0.0, 0.2 - (time.time() - started)))


# --- the figures ---------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def parse_ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def job_events(home: Path, store_rows: list[tuple[str, str, str]]) -> dict[str, dict[str, Any]]:
    """Per job uuid: PROJECT start/end wall times and each epoch's event ts, from the uploaded
    global.json (``$AIRFLOW_HOME/storage/outputs/<uuid>/global.json``)."""
    out: dict[str, dict[str, Any]] = {}
    for uuid, run_id, outputs_uri in store_rows:
        # outputs_uri is the job's own directory (<outputs_uri param>/<uuid>/), file:// on this machine.
        path = Path(outputs_uri.removeprefix("file://")) if outputs_uri else home / "storage" / "outputs" / uuid
        info: dict[str, Any] = {"run_id": run_id, "epochs": {}, "start": None, "end": None}
        with contextlib.suppress(OSError):
            for line in (path / "global.json").read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    ev = json.loads(line)
                    key = (ev.get("phase"), ev.get("event"))
                    if key == ("PROJECT", "start"):
                        info["start"] = parse_ts(ev["ts"])
                    elif key == ("PROJECT", "end"):
                        info["end"] = parse_ts(ev["ts"])
                    elif key == ("TRAINING", "epoch_complete"):
                        info["epochs"][(int(ev.get("iteration") or 1), int(ev["epoch"]))] = parse_ts(ev["ts"])
        out[uuid] = info
    return out


def log_matches(home: Path, needle: str) -> int:
    count = 0
    for path in (home / "logs").rglob("*"):
        if path.is_file():
            with contextlib.suppress(OSError):
                count += path.read_text(errors="replace").count(needle)
    return count


def window_rows(
    label: str, samples: list[Sample], loop_timings: list[tuple[float, float]], nproc: str
) -> list[tuple[str, str]]:
    """Worker slots, scheduler loop and CPU over the samples of one window."""
    if len(samples) < 2:
        return [(label, "none (fewer than 2 samples)")]
    w0, w1 = samples[0].t, samples[-1].t
    running = [s.count("running") for s in samples]
    by_task: Counter[str] = Counter()
    for s in samples:
        for _, task_id, state in s.rows:
            if state == "running":
                by_task[task_id] = max(by_task[task_id], s.count("running", task_id))
    deferred = [s.count("deferred", "sense_progress") for s in samples]
    loops = [ms for t, ms in loop_timings if w0 <= t <= w1]
    rows = [
        (label, f"{w1 - w0:.1f} s, {len(samples)} samples"),
        (
            "  running TIs, max / mean",
            f"{max(running)} / {_mean(running):.2f}"
            + (f" (max by task: {', '.join(f'{k}={v}' for k, v in sorted(by_task.items()))})" if by_task else ""),
        ),
        ("  sense_progress deferred, min / max", f"{min(deferred)} / {max(deferred)}"),
        (
            "  scheduler loop p50 / p95 / max",
            f"{pct(loops, 50):.0f} / {pct(loops, 95):.0f} / {max(loops, default=0):.0f} ms ({len(loops)} loops)",
        ),
    ]
    first, last = samples[0], samples[-1]
    span = last.t - first.t
    for name in COMPONENTS:
        if name in first.cpu and name in last.cpu:
            own = last.cpu[name][0] - first.cpu[name][0]
            children = last.cpu[name][1] - first.cpu[name][1]
            detail = f" (own {own:.1f} s + reaped children {children:.1f} s)" if children >= 0.05 else ""
            share = 100.0 * (own + children) / span
            rows.append((f"  {name} CPU", f"{own + children:.1f} s = {share:.1f}% of one core{detail}"))
    busy = last.machine[0] - first.machine[0]
    total = last.machine[1] - first.machine[1]
    rows.append(("  machine CPU busy", f"{100.0 * busy / total if total else float('nan'):.0f}% of {nproc} CPUs"))
    return rows


def report(
    args: argparse.Namespace,
    cluster: AirflowCluster,
    sampler: Sampler,
    statsd: StatsdListener,
    run_states: dict[str, str],
    timings: dict[str, float],
    failure: str | None,
    trigger_retries: int,
) -> dict[str, Any]:
    with sampler.results.connect() as conn:
        jobs = [
            (str(u), str(r), str(o or ""))
            for u, r, o in conn.execute(text("SELECT uuid, run_id, outputs_uri FROM training_jobs"))
        ]
        epoch_rows = int(conn.execute(text("SELECT count(*) FROM epoch_train")).scalar() or 0)
        completed = int(
            conn.execute(text("SELECT count(*) FROM training_jobs WHERE status = 'completed'")).scalar() or 0
        )
    events = job_events(cluster.home, jobs)
    timings.setdefault("finished", timings["end"])
    t0 = timings["triggered"]
    samples = sampler.samples
    starts = [e["start"] for e in events.values() if e["start"]]
    ends = [e["end"] for e in events.values() if e["end"]]
    all_window = (max(starts), min(ends)) if starts and ends and len(starts) == args.runs else None
    if all_window and all_window[1] - all_window[0] >= 3:
        window, window_kind = all_window, "every trainer training"
    elif starts and ends:
        window, window_kind = (min(starts), max(ends)), "any trainer training (the runs never all overlapped)"
    else:
        window, window_kind = (t0, timings["finished"]), "whole run (no trainer events found)"
    w0, w1 = window
    in_window = [s for s in samples if w0 <= s.t <= w1]

    # Worker slots held by jobs while their trainer trains: from the first sample that shows the
    # run's sense_progress deferred (it has handed its slot back once) to the trainer's PROJECT end.
    # Whatever runs for such a run then (a sensor resumed to poll, anything else) holds a slot.
    first_deferred: dict[str, float] = {}
    for s in samples:
        for run_id, task_id, state in s.rows:
            if task_id == "sense_progress" and state == "deferred":
                first_deferred.setdefault(run_id, s.t)
    trainer_end = {info["run_id"]: info["end"] for info in events.values() if info["end"]}
    held: list[int] = []
    held_by_task: Counter[str] = Counter()
    for s in samples:
        n = 0
        for run_id, task_id, state in s.rows:
            begin, end = first_deferred.get(run_id), trainer_end.get(run_id)
            if state == "running" and begin is not None and end is not None and begin <= s.t <= end:
                n += 1
                held_by_task[task_id] += 1
        if any(begin <= s.t <= trainer_end.get(r, 0) for r, begin in first_deferred.items()):
            held.append(n)
    all_deferred_at = next((s.t for s in samples if s.count("deferred", "sense_progress") == args.runs), None)
    max_deferred = max((s.count("deferred", "sense_progress") for s in samples), default=0)

    loop_timings = statsd.timings.get(f"airflow.{LOOP_METRIC}", [])
    loops_all = [ms for _, ms in loop_timings]
    # Steady state: from the first sample with every sensor deferred to the last one before any fires.
    steady: list[Sample] = []
    for s in samples:
        if s.count("deferred", "sense_progress") == args.runs:
            steady.append(s)
        elif steady:
            break

    # Event written -> row visible. "Live": written after the job's first row was already visible
    # (its follower was running); "backlog": written before, while the job waited for its follower.
    live: list[float] = []
    backlog: list[float] = []
    missing = 0
    for uuid, info in events.items():
        seen_job = [t for (u, _, _), t in sampler.first_seen.items() if u == uuid]
        follower_live = min(seen_job) if seen_job else float("inf")
        for (iteration, epoch), ts in info["epochs"].items():
            seen = sampler.first_seen.get((uuid, iteration, epoch))
            if seen is None:
                missing += 1
            else:
                (live if ts > follower_live else backlog).append(seen - ts)

    succeeded = sum(1 for s in run_states.values() if s == "success")
    m = machine()
    rows: list[tuple[str, str]] = [
        ("machine", f"{m['nproc']} CPUs, {m['cpu']}, {m['ram']} RAM"),
        ("metadata DB / results DB", f"{cluster.sql_alchemy_conn.split('://')[0]} / sqlite"),
        (
            "runs / epochs / interval",
            f"{args.runs} runs x {args.epochs} epochs, {args.interval:g} s apart, poll {args.poll_interval:g} s",
        ),
        ("parallelism / max_active_tasks", f"{args.parallelism} / {args.max_active_tasks}"),
        ("cluster start", f"{timings['startup']:.1f} s"),
        ("trigger -> all runs finished", f"{timings['finished'] - t0:.1f} s"),
        ("bench wall time (all)", f"{timings['end'] - timings['begin']:.1f} s"),
        ("runs succeeded", f"{succeeded} / {args.runs} ({dict(Counter(run_states.values()))})"),
        ("trigger requests retried (5xx)", str(trigger_retries)),
        ("jobs completed / epoch rows", f"{completed} / {epoch_rows} (expected {args.runs * args.epochs})"),
        (
            "trigger -> trainers started (first / last)",
            f"{min(starts) - t0:.1f} / {max(starts) - t0:.1f} s" if starts else "none",
        ),
        (
            "trigger -> all sensors deferred",
            f"{all_deferred_at - t0:.1f} s" if all_deferred_at else f"never all at once (max {max_deferred})",
        ),
        (
            "SLOTS HELD while trainers train, max / mean",
            f"{max(held, default=0)} / {_mean(held):.2f} over {len(held)} samples"
            + (f" ({', '.join(f'{k}: {v} sample-slots' for k, v in held_by_task.items())})" if held_by_task else ""),
        ),
    ]
    rows += window_rows(f"window: {window_kind}", in_window, loop_timings, m["nproc"])
    rows += window_rows("steady state: every sensor deferred", steady, loop_timings, m["nproc"])
    rows += [
        (
            "scheduler loop, whole bench p50 / p95 / max",
            f"{pct(loops_all, 50):.0f} / {pct(loops_all, 95):.0f} / {max(loops_all, default=0):.0f} ms "
            f"({len(loops_all)} loops)",
        ),
        (
            "event ts -> row visible, live p50 / p95 / max",
            f"{pct(live, 50):.2f} / {pct(live, 95):.2f} / {max(live, default=float('nan')):.2f} s "
            f"({len(live)} epochs; sampled every 0.2 s)",
        ),
        (
            "  backlog (written before the follower ran)",
            f"{len(backlog)} epochs, p50 / max {pct(backlog, 50):.1f} / {max(backlog, default=float('nan')):.1f} s",
        ),
        (
            "  all epochs p50 / p95",
            f"{pct(live + backlog, 50):.2f} / {pct(live + backlog, 95):.2f} s ({missing} never seen)",
        ),
        ('"database is locked" in logs', str(log_matches(cluster.home, "database is locked"))),
        ("sampler errors", "; ".join(f"{k} x{v}" for k, v in sampler.errors.items()) or "none"),
    ]
    if failure:
        rows.insert(0, ("ABORTED", failure.splitlines()[0][:300]))
    width = max(len(k) for k, _ in rows)
    print("\n" + "=" * (width + 60))
    print(f"gpu_training concurrency benchmark ({datetime.now().isoformat(timespec='seconds')})")
    print("=" * (width + 60))
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return {
        "rows": rows,
        "latency_live_s": live,
        "latency_backlog_s": backlog,
        "scheduler_loop_ms": loop_timings,
        "slots_held_per_sample": held,
        "home": str(cluster.home),
        "failure": failure,
    }


def _mean(values: list[int]) -> float:
    return statistics.fmean(values) if values else 0.0


# --- main ----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between epochs")
    parser.add_argument("--poll-interval", type=float, default=5.0, help="the job's poll_interval_seconds")
    parser.add_argument("--parallelism", type=int, default=32, help="[core] parallelism (LocalExecutor workers)")
    parser.add_argument(
        "--max-active-tasks", type=int, default=0, help="[core] max_active_tasks_per_dag (0: parallelism)"
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds to wait for all runs")
    parser.add_argument(
        "--metadata-db",
        choices=("sqlite", "postgres"),
        default="postgres",
        help="Airflow's metadata DB (SQLite locks up at about 50 concurrent runs)",
    )
    parser.add_argument(
        "--extra-pythonpath", type=Path, help="a directory put on every component's PYTHONPATH (e.g. psycopg2)"
    )
    parser.add_argument("--home", type=Path, help="Airflow home (default: a temporary directory, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the Airflow home")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    args.max_active_tasks = args.max_active_tasks or args.parallelism

    begin = time.time()
    home = args.home or Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    pythonpath = [str(REPO / "plugins")]
    if args.extra_pythonpath:
        pythonpath.append(str(args.extra_pythonpath.resolve()))
        sys.path.append(str(args.extra_pythonpath.resolve()))
    postgres: PostgresServer | None = None
    sql_alchemy_conn = None
    if args.metadata_db == "postgres":
        missing = [m for m in ("psycopg2", "asyncpg") if importlib.util.find_spec(m) is None]
        if missing:  # Airflow uses both: psycopg2 for its sync engine, asyncpg for its async one
            parser.error(
                f"--metadata-db postgres needs {', '.join(missing)} (psycopg2-binary, asyncpg): "
                "install them or give their directory with --extra-pythonpath"
            )
        # Its own directory: the server runs as the postgres user, which must reach its data dir.
        postgres = start_postgres(Path(tempfile.mkdtemp(prefix="bench-postgres-")))
        sql_alchemy_conn = postgres.url()
    statsd = StatsdListener()
    statsd.start()
    cluster = AirflowCluster(
        home,
        parallelism=args.parallelism,
        sql_alchemy_conn=sql_alchemy_conn,
        extra_env={
            "PYTHONPATH": os.pathsep.join(pythonpath),
            "AIRFLOW__CORE__MAX_ACTIVE_TASKS_PER_DAG": str(args.max_active_tasks),
            "AIRFLOW__METRICS__STATSD_ON": "True",
            "AIRFLOW__METRICS__STATSD_HOST": "127.0.0.1",
            "AIRFLOW__METRICS__STATSD_PORT": str(statsd.port),
            "AIRFLOW__METRICS__STATSD_PREFIX": "airflow",
        },
    )
    sampler: Sampler | None = None
    run_states: dict[str, str] = {}
    timings: dict[str, float] = {"begin": begin}
    failure: str | None = None
    retries = 0

    def trigger(i: int) -> str:
        nonlocal retries
        conf = {
            "project_id": f"bench-{i:03d}",
            "provider": "local",
            "command": ["{python}", str(SCRIPTED), "ok", str(args.epochs), str(args.interval)],
            "poll_interval_seconds": args.poll_interval,
        }
        for attempt in range(5):
            try:
                return cluster.trigger(DAG_ID, conf)
            except ClusterError as err:
                if attempt == 4 or "-> 5" not in str(err):
                    raise
                retries += 1
                print(f"trigger {i} failed, retrying: {str(err)[:300]}", file=sys.stderr)
                time.sleep(1)
        raise AssertionError("unreachable")

    try:
        timings["startup"] = cluster.start()
        cluster.wait_dag_parsed(DAG_ID)
        sampler = Sampler(cluster)
        sampler.start()
        timings["triggered"] = time.time()
        run_ids: list[str] = []
        try:
            for i in range(args.runs):
                run_ids.append(trigger(i))
            print(f"triggered {len(run_ids)} runs in {time.time() - timings['triggered']:.1f} s", file=sys.stderr)
            deadline = time.monotonic() + args.timeout
            last_print = 0.0
            while True:
                cluster.check_alive()
                data = cluster.api("GET", f"/dags/{DAG_ID}/dagRuns", params={"limit": 100}).json()
                run_states = {
                    r["dag_run_id"]: r["state"] for r in data.get("dag_runs", []) if r["dag_run_id"] in run_ids
                }
                done = sum(1 for s in run_states.values() if s in ("success", "failed"))
                if time.monotonic() - last_print > 15:
                    last = sampler.samples[-1] if sampler.samples else Sample(0, [], {}, (0, 0))
                    print(
                        f"  {time.time() - timings['triggered']:6.0f} s: {done}/{len(run_ids)} runs finished, "
                        f"running {last.count('running')}, deferred {last.count('deferred')}, "
                        f"epochs seen {len(sampler.first_seen)}",
                        file=sys.stderr,
                    )
                    last_print = time.monotonic()
                if done == len(run_ids):
                    break
                if time.monotonic() > deadline:
                    raise ClusterError(f"only {done} of {len(run_ids)} runs finished within {args.timeout:.0f} s")
                time.sleep(2)
        except (ClusterError, OSError, ValueError) as err:  # OSError: requests' connection errors
            failure = str(err)
            print(f"ABORTED: {failure[:6000]}", file=sys.stderr)
        timings["finished"] = time.time()
        time.sleep(1)
        sampler.stop()
        timings["end"] = time.time()
        result = report(args, cluster, sampler, statsd, run_states, timings, failure, retries)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2, default=str))
        ok = not failure and len(run_states) == args.runs and all(s == "success" for s in run_states.values())
        return 0 if ok else 1
    finally:
        if sampler is not None:
            sampler.stop()
        statsd.stop()
        cluster.stop()
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.data_dir.parent, ignore_errors=True)
        if not args.keep and args.home is None:
            shutil.rmtree(home, ignore_errors=True)
        elif args.keep:
            print(f"Airflow home kept: {home}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
