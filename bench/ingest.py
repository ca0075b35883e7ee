"""Benchmark: global.json ingestion into the SQLite results DB, on the path production ingests by.

That path is the triggerer's follower (:class:`~gpu_training.follow.JobFollower`): its reader reads
the file by offset from where the results DB says, its batched writer parses the lines and stores
them in one transaction per batch with the new offset, on the DB threads. Each pass here is
:meth:`~gpu_training.follow.JobFollower.ingest_to_end` (what the follower does when the trainer
exited or before it judges a stall), so the stream's wait for new bytes is not measured.

Prints the machine, then (1) events/s ingested from a generated global.json of 1 MB and of 100 MB
(goal >= 50,000 events/s on 2 cores), and (2) the time of one pass that finds one new event after
1 MB and after 100 MB of already-ingested file, and their ratio (a pass reads from the stored byte
offset, so both should cost the same; goal <= 1.2x).

    python bench/ingest.py [--large-mb 100] [--small-mb 1] [--polls 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from gpu_training.follow import FollowSettings, JobFollower, LocalSource
from gpu_training.hooks.results import create_results_engine
from gpu_training.hosts.local import LocalHost
from gpu_training.progress import GLOBAL_JSON_PATH
from gpu_training.results.migrate import upgrade
from gpu_training.results.store import ResultsStore

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
GOAL_EVENTS_PER_S = 50_000
GOAL_POLL_RATIO = 1.2


def line(ts: datetime, phase: str, event: str, **fields: object) -> str:
    payload: dict[str, object] = {"ts": ts.isoformat(timespec="milliseconds"), "phase": phase, "event": event}
    payload.update(fields)
    return json.dumps(payload) + "\n"


def generate(path: Path, target_bytes: int, epochs_per_iteration: int = 50) -> int:
    """Write a realistic global.json of about ``target_bytes``; returns the number of events."""
    n = 0
    size = 0
    it = 0
    ts = T0
    with path.open("w") as fh:

        def put(text: str) -> None:
            nonlocal n, size
            fh.write(text)
            n += 1
            size += len(text)

        put(line(ts, "PROJECT", "start"))
        while size < target_bytes:
            it += 1
            put(line(ts, "ITERATION", "start", iteration=it))
            put(line(ts, "TRAJECTORY", "start", iteration=it))
            put(line(ts, "TRAJECTORY", "end", iteration=it, data={"duration_seconds": 1.5}))
            put(line(ts, "TRAINING", "start", iteration=it))
            for ep in range(1, epochs_per_iteration + 1):
                ts += timedelta(seconds=1)
                put(
                    line(
                        ts,
                        "TRAINING",
                        "epoch_complete",
                        iteration=it,
                        epoch=ep,
                        data={
                            "avg_loss": 1.0 / ep,
                            "model_path": f"checkpoints/iter{it:03d}_epoch{ep:03d}_model.npz",
                            "optimizer_path": f"checkpoints/iter{it:03d}_epoch{ep:03d}_optimizer.npz",
                            "val_accuracy": 0.9,
                            "learning_rate": 0.01,
                        },
                    )
                )
            put(line(ts, "TRAINING", "end", iteration=it))
            put(
                line(
                    ts,
                    "EVAL_MODEL",
                    "metrics",
                    iteration=it,
                    epoch=epochs_per_iteration,
                    data={"accuracy": 0.95, "f1": 0.94, "loss": 0.2, "confusion_matrix": [[1, 0], [0, 1]]},
                )
            )
            put(line(ts, "ITERATION", "end", iteration=it))
    return n


def new_job(store: ResultsStore, name: str) -> str:
    return store.create_job(
        project_id="bench", provider="local", runtime="process", params={}, dag_id="bench", run_id=name
    )


def ingest(store: ResultsStore, host: LocalHost, job: str) -> tuple[int, int, int]:
    """One pass of the follower's ingest path: (events, errors, offset) it stored."""
    settings = FollowSettings(job_uuid=job, results_conn_id="bench", target=host.follow_target(), max_metric_rows=10**9)
    follower = JobFollower(settings, LocalSource(host.workdir), log=logging.getLogger("bench.ingest"), store=store)
    asyncio.run(follower.ingest_to_end())
    return follower.writer.events, follower.writer.errors, follower.offset


def one_poll_seconds(store: ResultsStore, host: LocalHost, job: str, i: int) -> float:
    """Time of a poll that finds exactly one new event."""
    with Path(host.path(GLOBAL_JSON_PATH)).open("a") as fh:
        fh.write(line(T0, "CUSTOM", f"tick_{i}"))
    started = time.perf_counter()
    n_events, _, _ = ingest(store, host, job)
    elapsed = time.perf_counter() - started
    assert n_events == 1, n_events
    return elapsed


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import sqlalchemy

    return (
        f"machine: nproc {nproc}, {model}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, SQLAlchemy {sqlalchemy.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mb", type=float, default=100)
    parser.add_argument("--small-mb", type=float, default=1)
    parser.add_argument("--polls", type=int, default=40, help="polls per file; the median is reported")
    args = parser.parse_args()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        engine = create_results_engine(f"sqlite:///{tmp}/results.db")
        upgrade(engine)
        store = ResultsStore(engine)
        files = []
        for label, mb in (("small", args.small_mb), ("large", args.large_mb)):
            host = LocalHost(Path(tmp) / label)
            host.prepare()
            n = generate(Path(host.path(GLOBAL_JSON_PATH)), int(mb * 1024 * 1024))
            job = new_job(store, label)
            started, cpu = time.perf_counter(), time.process_time()
            ingested, errors, offset = ingest(store, host, job)
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
            assert ingested == n and errors == 0, (ingested, n, errors)
            files.append(
                {"label": label, "mb": mb, "size": offset, "host": host, "job": job, "n": n, "s": elapsed, "cpu": cpu}
            )
        # Polls alternate between the two files (and which goes first), so drift hits both alike.
        polls: dict[str, list[float]] = {f["label"]: [] for f in files}
        for i in range(args.polls):
            for f in files if i % 2 == 0 else files[::-1]:
                polls[f["label"]].append(one_poll_seconds(store, f["host"], f["job"], i))
        engine.dispose()

    print(
        f"{'file':>6} {'MB':>8} {'events':>9} {'ingest s':>9} {'events/s':>10} {'events/CPU-s':>12} "
        f"{'one poll after (ms)':>20}"
    )
    for f in files:
        poll_ms = statistics.median(polls[f["label"]]) * 1000
        print(
            f"{f['label']:>6} {f['size'] / 2**20:8.1f} {f['n']:9d} {f['s']:9.2f} {f['n'] / f['s']:10.0f} "
            f"{f['n'] / f['cpu']:12.0f} {poll_ms:20.2f}"
        )
    small, large = files
    for f in (large, small):
        rate = f["n"] / f["s"]
        verdict = "OK" if rate >= GOAL_EVENTS_PER_S else "BELOW GOAL"
        print(
            f"ingest into SQLite, {f['mb']:g} MB file: {rate:,.0f} events/s "
            f"(goal >= {GOAL_EVENTS_PER_S:,}/s on 2 cores): {verdict}"
        )
    small_poll, large_poll = (statistics.median(polls[f["label"]]) for f in files)
    ratio = large_poll / small_poll
    print(
        f"one poll finding 1 new event (median of {args.polls}): {small_poll * 1000:.2f} ms after "
        f"{small['mb']:g} MB, {large_poll * 1000:.2f} ms after {large['mb']:g} MB"
    )
    verdict = "OK" if ratio <= GOAL_POLL_RATIO else "ABOVE GOAL"
    print(f"poll cost {large['mb']:g} MB / {small['mb']:g} MB: {ratio:.2f}x (goal <= {GOAL_POLL_RATIO}x): {verdict}")


if __name__ == "__main__":
    main()
