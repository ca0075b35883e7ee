"""Benchmark: N training jobs followed at once by one triggerer process (issue 25).

For each N of ``--jobs`` (default 50, 100, 200) and each follower of ``--follower``, N fake trainers
are started the way the reference trainer is (``LocalHost.start_trainer``: ``include/remote/
run_trainer.sh`` under ``setsid``, which records ``run/trainer.pid``), so the follower's per-job
status check (``TRAINER_STATUS_SCRIPT`` every ``poll_interval``) really runs. Each trainer is a bash
loop (no fork per event) appending a ``TRAINING/epoch_complete`` event carrying its wall-clock write
time to ``outputs/global.json`` and a line to its log every ``--interval`` s for ``--minutes``, then
``PROJECT end``; their phases are spread over one interval. Half the jobs (``--ssh-share``) are
followed over SSH through the test sshd on 127.0.0.1 (its sessions given an empty ``HOME``, so no
login file of this machine runs per command), the rest locally.

ONE separate follower process runs the production trigger
(:class:`~gpu_training.triggers.GlobalJsonTrigger`) for every job on one asyncio event loop, as
Airflow's triggerer does (``async for event in trigger.run()``), storing into a results DB (a SQLite
file, or ``--results-db postgres``: a throwaway PostgreSQL of ``tests/servers.py``). This process
reads ``/proc`` of the follower twice a second and polls the results DB every 20 ms for new rows.

Printed per N and follower, over the steady window (from one interval after every job's first row
was seen to the trainers' last epoch):

- CPU of the follower process as a share of one core: utime+stime of itself and of its reaped
  children (the local ``bash`` status checks), and, apart, what the test sshd spent serving the SSH
  jobs (on a real cloud that runs on the instances);
- the event loop's longest block: the longest single callback (CPU, ``Handle._run`` timed) and the
  longest overshoot of a 10 ms probe sleep (wall);
- event -> row latency p50/p95/max (first sight of each (job, epoch) by the reader);
- rows lost / duplicated over the whole run (epochs written vs rows stored), and how the triggers
  ended.

A second follower implementation goes into ``FOLLOWERS`` (``--follower current,new``): each runs on
fresh trainers and a fresh DB in the same run, and its figures are printed beside today's with their
ratio.

    python bench/followers.py [--jobs 50,100,200] [--minutes 10] [--interval 2] [--ssh-share 0.5]
                              [--results-db sqlite|postgres] [--follower current]
    (SSH needs root: it starts sshd; with --ssh-share 0 it runs without)
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import logging
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]
if "AIRFLOW_HOME" not in os.environ:  # the follower process inherits it
    os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="bench-followers-airflow-")
    atexit.register(shutil.rmtree, os.environ["AIRFLOW_HOME"], True)

RESULTS_CONN_ID = "bench_results"
SSH_CONN_ID = "bench_ssh"
TICKS = os.sysconf("SC_CLK_TCK")
READER_POLL_SECONDS = 0.02
SAMPLE_SECONDS = 0.5
SSHD_SAMPLE_EVERY = 4

#: A trainer in bash builtins only (``read -t`` on a pipe nobody writes is its sleep), so 200 of them
#: cost the machine little: ``$1`` interval (us), ``$2`` epochs, ``$3`` first epoch's time (Unix us).
#: Epochs are written on a fixed schedule, so a late wakeup does not shift the next one.
TRAINER = r"""
interval_us=$1; epochs=$2; first_us=$3
exec {never}<> <(:)
gj=outputs/global.json
stamp() { TZ=UTC printf -v ts '%(%Y-%m-%dT%H:%M:%S)T' -1; ts="$ts+00:00"; }
nap_until() {
  local now=${EPOCHREALTIME/./} wait
  wait=$(( $1 - now ))
  (( wait > 0 )) && read -t "$(printf '%d.%06d' $(( wait / 1000000 )) $(( wait % 1000000 )))" -u "$never" _
  return 0
}
stamp; printf '{"ts":"%s","phase":"PROJECT","event":"start"}\n' "$ts" >> "$gj"
for (( epoch = 1; epoch <= epochs; epoch++ )); do
  nap_until $(( first_us + (epoch - 1) * interval_us ))
  stamp
  loss=$(( 1000000 / epoch ))
  printf -v line '{"ts":"%s","phase":"TRAINING","event":"epoch_complete","iteration":1,"epoch":%d,"data":' \
    "$ts" "$epoch"
  printf '%s{"avg_loss":%d.%06d,"t":%s}}\n' "$line" $(( loss / 1000000 )) $(( loss % 1000000 )) "$EPOCHREALTIME" \
    >> "$gj"
  echo "epoch $epoch done"
done
stamp; printf '{"ts":"%s","phase":"PROJECT","event":"end"}\n' "$ts" >> "$gj"
"""


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if "MemTotal" in line))
    return f"{os.cpu_count()} CPUs ({model}), {mem / 2**20:.0f} GiB RAM, Python {platform.python_version()}"


# --- the follower process ---------------------------------------------------------------------------------


@contextmanager
def loop_blocks(timeline: dict[int, list[float]]) -> Iterator[None]:
    """Per wall-clock second, the CPU time of the longest single callback the loop ran (a task's step
    between two awaits), into ``timeline[second][0]``."""
    run = asyncio.events.Handle._run

    def timed(handle: asyncio.events.Handle) -> None:
        started = time.thread_time()
        run(handle)
        spent = time.thread_time() - started
        slot = timeline.setdefault(int(time.time()), [0.0, 0.0])
        if spent > slot[0]:
            slot[0] = spent

    asyncio.events.Handle._run = timed  # type: ignore[method-assign]
    try:
        yield
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]


async def probe(timeline: dict[int, list[float]], stop: asyncio.Event) -> None:
    """A task sleeping 10 ms at a time: per second, its longest overshoot (what any task waiting on
    the loop saw, this machine's other load included), into ``timeline[second][1]``."""
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.01)
        late = time.perf_counter() - started - 0.01
        slot = timeline.setdefault(int(time.time()), [0.0, 0.0])
        if late > slot[1]:
            slot[1] = late


async def current_follower(kwargs_list: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Today's follower: one ``GlobalJsonTrigger`` per job, each run as the triggerer runs a trigger
    (a task of its own iterating ``trigger.run()``); the payload of each one's event."""
    from gpu_training.triggers import GlobalJsonTrigger

    async def one(kwargs: dict[str, Any]) -> dict[str, Any]:
        async for event in GlobalJsonTrigger(**kwargs).run():
            return dict(event.payload)
        return {"kind": "no event"}

    results = await asyncio.gather(*(asyncio.create_task(one(kw)) for kw in kwargs_list), return_exceptions=True)
    return [r if isinstance(r, dict) else {"kind": f"raised {type(r).__name__}: {r}"} for r in results]


#: The followers this bench can run, by name: each follows every job of the list on the running loop
#: until all ended and returns each one's trigger event payload. A new implementation goes here.
FOLLOWERS: dict[str, Callable[[Sequence[dict[str, Any]]], Awaitable[list[dict[str, Any]]]]] = {
    "current": current_follower,
}


def follower_process(spec_path: Path) -> None:
    """The follower process: run ``spec["follower"]`` on ``spec["jobs"]`` (trigger kwargs), write
    its events and its loop's timeline to ``spec["result"]``."""
    spec = json.loads(spec_path.read_text())
    # Imported once per triggerer, by its first job (of its kind): not measured.
    import asyncssh  # noqa: F401

    import gpu_training.notify
    import gpu_training.triggers  # noqa: F401

    timeline: dict[int, list[float]] = {}

    async def main() -> list[dict[str, Any]]:
        stop = asyncio.Event()
        probing = asyncio.create_task(probe(timeline, stop))
        try:
            return await FOLLOWERS[spec["follower"]](spec["jobs"])
        finally:
            stop.set()
            await probing

    with loop_blocks(timeline):
        events = asyncio.run(main())
    Path(spec["result"]).write_text(json.dumps({"events": events, "timeline": sorted(timeline.items())}))
    from gpu_training import follow

    follow.DB_THREADS.shutdown(wait=True)


# --- the bench process -------------------------------------------------------------------------------------


def proc_ticks(pid: int) -> tuple[int, int] | None:
    """(utime+stime, cutime+cstime) of a process in clock ticks; None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def tree_ticks(root: int) -> dict[tuple[int, str], int]:
    """Every process under ``root`` (itself included): (pid, start time) -> all its ticks, its reaped
    children's included."""
    parents: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
        stats[int(entry.name)] = fields
    ticks = {}
    for pid, fields in stats.items():
        up = pid
        while up not in (0, 1, root) and up in parents:
            up = parents[up]
        if up == root:
            ticks[(pid, fields[19])] = sum(int(f) for f in fields[11:15])
    return ticks


@dataclass
class Run:
    """One follower on N jobs: what was sampled while it ran."""

    follower: str
    jobs: int
    #: (time, own ticks, reaped children's ticks) of the follower process.
    cpu: list[tuple[float, int, int]] = field(default_factory=list)
    #: (time, {process: ticks}) of the sshd's processes.
    sshd: list[tuple[float, dict[tuple[int, str], int]]] = field(default_factory=list)
    #: job id -> how it is followed (local, ssh).
    kinds: dict[int, str] = field(default_factory=dict)
    #: (job id, epoch) -> (written at, first seen at).
    seen: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[int, list[float]]] = field(default_factory=list)
    window: tuple[float, float] = (0.0, 0.0)
    lost: int = 0
    duplicated: int = 0
    expected: int = 0
    offsets_ok: int = 0


def sample_at(samples: Sequence[tuple[float, Any]], when: float) -> tuple[float, Any]:
    """The sample nearest ``when``."""
    return min(samples, key=lambda s: abs(s[0] - when))


def start_trainers(tmp: Path, jobs: int, interval: float, epochs: int, first_at: float) -> list[Path]:
    """``jobs`` work directories, each with a trainer started as the local provider starts one."""
    from gpu_training.hosts.local import LocalHost

    script = tmp / "trainer.sh"
    script.write_text(TRAINER)
    workdirs = []
    for n in range(jobs):
        host = LocalHost(tmp / f"job{n}")
        host.prepare()
        first_us = int((first_at + n * interval / jobs) * 1e6)
        argv = ["bash", str(script), str(int(interval * 1e6)), str(epochs), str(first_us)]
        host.start_trainer(argv, {"PATH": os.environ["PATH"]})
        workdirs.append(host.root)
    return workdirs


def stop_trainers(workdirs: Sequence[Path]) -> None:
    """Kill the trainers still running (a follower that failed): their wrapper's process group."""
    for workdir in workdirs:
        if (workdir / "run/exit_code").exists():
            continue  # it ended: its process group is gone (and its number may be another's by now)
        with suppress(OSError, ValueError):
            os.killpg(int((workdir / "run/pgid").read_text()), signal.SIGKILL)


def measure(
    follower: str, jobs: int, args: argparse.Namespace, results_url: str, ssh_port: int | None, sshd_pid: int | None
) -> Run:
    from sqlalchemy import func, select

    from gpu_training.follow.settings import FollowSettings
    from gpu_training.hooks.results import create_results_engine
    from gpu_training.hosts.base import TRAINER_STATUS_SCRIPT
    from gpu_training.params import JobSpec
    from gpu_training.results.models import EpochTrain, TrainingJob
    from gpu_training.results.store import ResultsStore
    from tests.servers import results_connection

    run = Run(follower, jobs)
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-followers-{follower}-{jobs}-"))
    engine = create_results_engine(results_url)
    store = ResultsStore(engine)
    epochs = max(1, round(args.minutes * 60 / args.interval))
    run.expected = epochs * jobs
    lead = 5.0 + 0.1 * jobs  # trainers started and the follower attached before the first epoch
    started = time.time()
    first_at = started + lead
    workdirs = start_trainers(tmp, jobs, args.interval, epochs, first_at)
    spec = JobSpec(project_id="bench")  # a job's defaults, as lifecycle.follow_kwargs passes them
    n_ssh = round(jobs * args.ssh_share) if ssh_port is not None else 0
    kwargs_list = []
    job_ids: dict[int, str] = {}
    for n, workdir in enumerate(workdirs):
        uuid = store.create_job(
            project_id="bench", provider="local", runtime="process", params={}, dag_id="bench",
            run_id=f"{follower}-{jobs}-{n}",
        )  # fmt: skip
        job_ids[store.job(uuid).id] = str(workdir)
        target: dict[str, Any] = {"kind": "local", "workdir": str(workdir)}
        if n * n_ssh // jobs != (n + 1) * n_ssh // jobs:  # n_ssh of them, spread evenly
            target = {"kind": "ssh", "workdir": str(workdir), "ssh_conn_id": SSH_CONN_ID, "host": "127.0.0.1"}
            target.update(port=ssh_port, username="root")
        run.kinds[store.job(uuid).id] = target["kind"]
        kwargs_list.append(
            FollowSettings(
                job_uuid=uuid,
                results_conn_id=RESULTS_CONN_ID,
                target=target,
                status_command=(TRAINER_STATUS_SCRIPT, str(workdir)),
                runtime="process",
                poll_interval=spec.poll_interval_seconds,
                stall_timeout=timedelta(minutes=spec.stall_timeout_minutes),
                max_runtime=timedelta(minutes=max(spec.max_runtime_minutes, 2 * args.minutes)),
                unreachable_timeout=timedelta(minutes=spec.unreachable_timeout_minutes),
                stop_on_nan=spec.stop_on_nan,
                max_cost_usd=spec.max_cost_usd,
            ).to_kwargs()
        )
    result_path = tmp / "result.json"
    spec_path = tmp / "spec.json"
    spec_path.write_text(json.dumps({"follower": follower, "jobs": kwargs_list, "result": str(result_path)}))
    env = {**os.environ, f"AIRFLOW_CONN_{RESULTS_CONN_ID.upper()}": results_connection(results_url)}
    with (tmp / "follower.log").open("ab") as output:  # the triggerer's log, as Airflow's goes to a file
        child = subprocess.Popen(
            [sys.executable, __file__, "--follower-process", str(spec_path)], env=env, stdout=output, stderr=output
        )

    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            now = time.time()
            ticks = proc_ticks(child.pid)
            if ticks is not None and child.poll() is None:
                run.cpu.append((now, *ticks))
            if sshd_pid is not None and n_ssh and not (len(run.cpu) % SSHD_SAMPLE_EVERY):
                run.sshd.append((now, tree_ticks(sshd_pid)))  # a walk of /proc: less often
            stop.wait(SAMPLE_SECONDS)

    def read_rows() -> None:
        last = 0
        with engine.connect() as conn:
            while True:
                done = stop.is_set()
                rows = conn.execute(
                    select(EpochTrain.id, EpochTrain.job_id, EpochTrain.epoch, EpochTrain.metrics)
                    .where(EpochTrain.id > last)
                    .order_by(EpochTrain.id)
                ).all()
                conn.rollback()
                now = time.time()
                for row_id, job_id, epoch, metrics in rows:
                    last = max(last, row_id)
                    run.seen.setdefault((job_id, epoch), (float(metrics["t"]), now))
                if done:
                    return
                time.sleep(READER_POLL_SECONDS)

    threads = [threading.Thread(target=sample, daemon=True), threading.Thread(target=read_rows, daemon=True)]
    for thread in threads:
        thread.start()
    deadline = first_at + epochs * args.interval + 120 + 0.5 * jobs
    try:
        child.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        print(f"  {follower} on {jobs} jobs: the follower did not finish in time (killed)", file=sys.stderr)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        stop_trainers(workdirs)
    if child.returncode == 0 and result_path.exists():
        result = json.loads(result_path.read_text())
        run.events = result["events"]
        run.timeline = [(int(s), v) for s, v in result["timeline"]]
    with engine.connect() as conn:
        counts = conn.execute(
            select(EpochTrain.job_id, func.count(), func.count(func.distinct(EpochTrain.epoch))).group_by(
                EpochTrain.job_id
            )
        ).all()
        offsets = dict(conn.execute(select(TrainingJob.id, TrainingJob.ingest_offset)).all())
    stored = {job_id: (total, distinct) for job_id, total, distinct in counts}
    for job_id, workdir in job_ids.items():
        total, distinct = stored.get(job_id, (0, 0))
        run.lost += epochs - distinct
        run.duplicated += total - distinct
        size = (Path(workdir) / "outputs/global.json").stat().st_size
        run.offsets_ok += offsets.get(job_id) == size
    engine.dispose()
    # The steady window: one interval after every job's first row was seen, to the last epoch.
    first_seen: dict[int, float] = {}
    for (job_id, _), (_, seen_at) in run.seen.items():
        first_seen[job_id] = min(first_seen.get(job_id, seen_at), seen_at)
    attached = max(first_seen.values()) if len(first_seen) == jobs else first_at + args.interval
    run.window = (max(attached, first_at) + args.interval, first_at + epochs * args.interval)
    if run.window[1] - run.window[0] < 2 * SAMPLE_SECONDS:
        run.window = (first_at, run.window[1])
    if run.lost or child.returncode:
        print(f"  {follower} on {jobs} jobs: its files kept for a look: {tmp}", file=sys.stderr)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return run


@dataclass
class Figures:
    cpu: float  # share of one core, the follower process and its reaped children
    cpu_children: float
    sshd: float | None
    callback_ms: float
    overshoot_ms: float
    attach_callback_ms: float
    p50: float
    p95: float
    max: float
    latencies: int
    #: kind of follow target -> (p50, p95, max, count) in ms.
    by_kind: dict[str, tuple[float, float, float, int]]


def percentiles(latencies: list[float]) -> tuple[float, float, float, int]:
    """(p50, p95, max) in ms and how many, of latencies in seconds."""
    ordered = sorted(latencies) or [float("nan")]
    return (
        statistics.median(ordered) * 1000,
        ordered[int(0.95 * (len(ordered) - 1))] * 1000,
        ordered[-1] * 1000,
        len(latencies),
    )


def figures(run: Run) -> Figures:
    start, end = run.window
    t0, own0, kids0 = sample_at(run.cpu, start)
    t1, own1, kids1 = sample_at(run.cpu, end)
    wall = max(t1 - t0, 1e-9)
    sshd = None
    if run.sshd:
        s0, before = sample_at(run.sshd, start)
        s1, after = sample_at(run.sshd, end)
        sshd = sum(ticks - before.get(proc, 0) for proc, ticks in after.items()) / TICKS / max(s1 - s0, 1e-9)
    steady = [v for second, v in run.timeline if start <= second < end]
    attach = [v for second, v in run.timeline if second < start]
    latencies: dict[str, list[float]] = {}
    for (job_id, _), (written, seen) in run.seen.items():
        if start <= written < end:
            latencies.setdefault(run.kinds[job_id], []).append(seen - written)
    p50, p95, worst, count = percentiles([lat for kind in latencies.values() for lat in kind])
    return Figures(
        cpu=(own1 + kids1 - own0 - kids0) / TICKS / wall,
        cpu_children=(kids1 - kids0) / TICKS / wall,
        sshd=sshd,
        callback_ms=max((v[0] for v in steady), default=0.0) * 1000,
        overshoot_ms=max((v[1] for v in steady), default=0.0) * 1000,
        attach_callback_ms=max((v[0] for v in attach), default=0.0) * 1000,
        p50=p50,
        p95=p95,
        max=worst,
        latencies=count,
        by_kind={kind: percentiles(values) for kind, values in sorted(latencies.items())},
    )


def report(run: Run, fig: Figures, baseline: Figures | None) -> None:
    ends: dict[str, int] = {}
    for event in run.events:
        ends[str(event.get("kind"))] = ends.get(str(event.get("kind")), 0) + 1
    sshd = f"{fig.sshd * 100:>6.1f}%" if fig.sshd is not None else f"{'-':>7}"
    print(
        f"{run.jobs:>5} {run.follower:<9} {fig.cpu * 100:>6.1f}% {fig.cpu_children * 100:>7.1f}% {sshd}"
        f" {fig.callback_ms:>8.1f} {fig.overshoot_ms:>8.1f} {fig.attach_callback_ms:>9.1f}"
        f" {fig.p50:>7.0f} {fig.p95:>7.0f} {fig.max:>7.0f} {run.lost:>5} {run.duplicated:>5}"
        f" {run.offsets_ok:>4}/{run.jobs:<4} {run.window[1] - run.window[0]:>5.0f}s  "
        f"{run.expected - run.lost}/{run.expected} epochs stored; "
        + ", ".join(f"{kind} {count}" for kind, count in sorted(ends.items()))
    )
    if len(fig.by_kind) > 1:
        print(
            f"{'':>5} {'':<9} latency p50/p95/max ms: "
            + ", ".join(
                f"{kind} {p50:.0f}/{p95:.0f}/{worst:.0f} ({count} epochs)"
                for kind, (p50, p95, worst, count) in fig.by_kind.items()
            )
        )
    if baseline is not None:
        print(
            f"{'':>5} {'ratio':<9} {fig.cpu / max(baseline.cpu, 1e-9):>6.2f}x {'':>8} {'':>7}"
            f" {fig.callback_ms / max(baseline.callback_ms, 1e-9):>7.2f}x {'':>8} {'':>9}"
            f" {fig.p50 / max(baseline.p50, 1e-9):>6.2f}x {fig.p95 / max(baseline.p95, 1e-9):>6.2f}x"
            f"   (to {run.follower} vs the first follower)"
        )


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--follower-process":
        follower_process(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="50,100,200", help="numbers of jobs followed at once, one run each")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long every trainer writes")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between a trainer's epochs")
    parser.add_argument("--ssh-share", type=float, default=0.5, help="share of the jobs followed over SSH")
    parser.add_argument("--results-db", choices=("sqlite", "postgres"), default="sqlite")
    parser.add_argument("--follower", default="current", help=f"followers to compare, of {', '.join(FOLLOWERS)}")
    args = parser.parse_args()
    followers = args.follower.split(",")
    unknown = [f for f in followers if f not in FOLLOWERS]
    if unknown:
        parser.error(f"unknown follower {', '.join(unknown)}: one of {', '.join(FOLLOWERS)}")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    from gpu_training.hooks.results import create_results_engine
    from gpu_training.results.migrate import upgrade

    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-followers-"))
    sshd = postgres = None
    try:
        ssh_port = sshd_pid = None
        if args.ssh_share > 0 and os.geteuid() != 0:
            print("SSH jobs skipped: starting sshd needs root (every job followed locally)")
        elif args.ssh_share > 0:
            from tests.sshd import start_sshd

            # An empty home for the sessions: a host's login files are not the follower's cost (this
            # machine's root .bashrc runs `pyenv init`, a rehash included, for every SSH command).
            home = tmp / "home"
            home.mkdir()
            sshd = start_sshd(tmp / "sshd", [f"SetEnv HOME={home}"])
            os.environ[f"AIRFLOW_CONN_{SSH_CONN_ID.upper()}"] = sshd.connection()
            ssh_port, sshd_pid = sshd.port, sshd.proc.pid
        if args.results_db == "postgres":
            from tests.servers import PostgresResults

            tmp.chmod(0o711)  # the server runs as the postgres user: it must reach its directory
            postgres = PostgresResults.start(tmp / "postgres")
        print(
            f"trainers: an epoch every {args.interval:g} s for {args.minutes:g} min each, phases spread;"
            f" {f'{args.ssh_share:.0%} of the jobs over SSH (test sshd on 127.0.0.1)' if ssh_port else 'all local'};"
            f" results DB: {'PostgreSQL' if postgres else 'SQLite'}; reader polls every"
            f" {READER_POLL_SECONDS * 1000:.0f} ms"
        )
        print(
            f"{'jobs':>5} {'follower':<9} {'CPU':>7} {'of it':>8} {'sshd':>7} {'block ms':>8} {'probe ms':>8}"
            f" {'attach ms':>9} {'p50 ms':>7} {'p95 ms':>7} {'max ms':>7} {'lost':>5} {'dup':>5} {'offsets':>9}"
            f" {'window':>6}  ended"
        )
        for jobs in (int(j) for j in args.jobs.split(",")):
            baseline = None
            for place, follower in enumerate(followers):
                if postgres is not None:
                    url = postgres.fresh_database()
                else:
                    url = f"sqlite:///{tmp / f'results-{jobs}-{place}-{follower}.db'}"
                    engine = create_results_engine(url)
                    upgrade(engine)
                    engine.dispose()
                run = measure(follower, jobs, args, url, ssh_port, sshd_pid)
                fig = figures(run)
                report(run, fig, baseline)
                baseline = baseline or fig
    finally:
        if sshd is not None:
            sshd.stop()
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        "(CPU: the follower process's utime+stime and its reaped children's (\"of it\": the local bash status"
        " checks) over the steady window, as a share of one core; sshd: what the test sshd spent serving the"
        " SSH jobs' streams and status checks, which runs on the instances in production; block: the longest"
        " single callback of the loop, CPU; probe: a 10 ms sleep's longest overshoot, wall, the machine's"
        " other load included; attach: the longest callback before the window (connecting, first reads);"
        " latency: trainer writes an epoch -> the reader first sees its row, epochs written in the window;"
        " lost/dup: epochs written vs rows stored, whole run; offsets: jobs whose stored offset is their"
        " global.json's size)"
    )


if __name__ == "__main__":
    main()
