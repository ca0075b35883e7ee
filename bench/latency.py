"""Benchmark: latency from the trainer writing an event to its row being visible in the results DB.

A writer process appends ``TRAINING/epoch_complete`` events to ``outputs/global.json`` at a steady
rate, each carrying the wall time it was written; :class:`~gpu_training.triggers.GlobalJsonTrigger`
follows the file exactly as in the triggerer (locally by offset, and over SSH through a real sshd
on 127.0.0.1 with ``tail -F``), and a reader polls the results DB every 5 ms for new rows. Prints
p50/p95/max per transport (goal: p95 <= 1 s).

    python bench/latency.py [--events 200] [--rate 20]      (SSH needs root: it starts sshd)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-latency-"))

from sqlalchemy import select  # noqa: E402

from gpu_training import follow  # noqa: E402
from gpu_training.hooks.results import create_results_engine  # noqa: E402
from gpu_training.hosts.base import TRAINER_STATUS_SCRIPT  # noqa: E402
from gpu_training.hosts.local import LocalHost  # noqa: E402
from gpu_training.results.migrate import upgrade  # noqa: E402
from gpu_training.results.models import EpochTrain  # noqa: E402
from gpu_training.results.store import ResultsStore  # noqa: E402
from gpu_training.triggers import GlobalJsonTrigger  # noqa: E402

WRITER = r"""
import json, sys, time
from datetime import datetime, timezone
path, n, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def line(phase, event, **kw):
    return json.dumps({"ts": datetime.now(timezone.utc).isoformat(), "phase": phase, "event": event, **kw}) + "\n"
with open(path, "a") as fh:
    fh.write(line("PROJECT", "start")); fh.flush()
    time.sleep(3)  # the follower attaches (SSH connect) once per job; steady state is measured
    for epoch in range(1, n + 1):
        time.sleep(1 / rate)
        fh.write(line("TRAINING", "epoch_complete", iteration=1, epoch=epoch, data={"avg_loss": 0.1, "t": time.time()}))
        fh.flush()
    time.sleep(0.5)
    fh.write(line("PROJECT", "end")); fh.flush()
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


def measure(label: str, target: dict[str, Any], n: int, rate: float) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-latency-{label}-"))
    engine = create_results_engine(f"sqlite:///{tmp / 'results.db'}")
    upgrade(engine)
    store = ResultsStore(engine)
    job = store.create_job(
        project_id="bench", provider="local", runtime="process", params={"project_id": "bench"},
        dag_id="bench", run_id=f"latency-{label}",
    )  # fmt: skip
    host = LocalHost(target["workdir"])
    host.prepare()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, host.path("outputs/global.json"), str(n), str(rate)])
    Path(host.path("run/trainer.pid")).write_text(f"{writer.pid}\n")
    follow.results_store = lambda conn_id: store  # type: ignore[assignment]
    trigger = GlobalJsonTrigger(
        job_uuid=job,
        results_conn_id="bench",
        target=target,
        status_command=[TRAINER_STATUS_SCRIPT, host.workdir],
        poll_interval_seconds=5,
    )
    outcome: dict[str, Any] = {}

    def run_trigger() -> None:
        async def first() -> None:
            async for event in trigger.run():
                outcome.update(event.payload)
                return

        asyncio.run(first())

    thread = threading.Thread(target=run_trigger)
    thread.start()
    job_id = store.job(job).id
    seen: dict[int, float] = {}
    with engine.connect() as conn:
        while thread.is_alive() or len(seen) < n:
            rows = conn.execute(
                select(EpochTrain.epoch, EpochTrain.metrics).where(
                    (EpochTrain.job_id == job_id) & (EpochTrain.epoch > max(seen, default=0))
                )
            ).all()
            now = time.time()
            for epoch, metrics in rows:
                seen.setdefault(epoch, now - float(metrics["t"]))
            conn.rollback()
            if not thread.is_alive() and len(seen) >= n:
                break
            time.sleep(0.005)
            if not thread.is_alive() and not rows:
                break
    thread.join()
    writer.wait()
    engine.dispose()
    if outcome.get("kind") != "project_end" or len(seen) != n:
        raise SystemExit(f"{label}: the job did not end as expected: {outcome}, {len(seen)}/{n} rows")
    return sorted(seen.values())


def report(label: str, latencies: list[float]) -> None:
    p50 = statistics.median(latencies)
    p95 = latencies[int(0.95 * (len(latencies) - 1))]
    print(f"  {label:<6} {len(latencies):>7} {p50 * 1000:>9.1f} {p95 * 1000:>9.1f} {max(latencies) * 1000:>9.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second the writer appends")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"writer: {args.events} events at {args.rate:g}/s; results DB: SQLite; reader polls every 5 ms")
    print(f"  {'path':<6} {'events':>7} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    report(
        "local", measure("local", {"kind": "local", "workdir": tempfile.mkdtemp(prefix="job-")}, args.events, args.rate)
    )
    if os.geteuid() != 0:
        print("  ssh    skipped: starting sshd needs root")
        return
    from tests.sshd import start_sshd

    sshd = start_sshd(Path(tempfile.mkdtemp(prefix="bench-sshd-")))
    try:
        os.environ["AIRFLOW_CONN_BENCH_SSH"] = sshd.connection()
        target = {
            "kind": "ssh",
            "workdir": tempfile.mkdtemp(prefix="job-"),
            "ssh_conn_id": "bench_ssh",
            "host": "127.0.0.1",
            "port": sshd.port,
            "username": "root",
        }
        report("ssh", measure("ssh", target, args.events, args.rate))
    finally:
        sshd.stop()
    print("goal: p95 <= 1000 ms")


if __name__ == "__main__":
    main()
