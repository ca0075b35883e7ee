"""Benchmark: global.json ingestion into the SQLite results DB, on the path production ingests by.

That path is the triggerer's follower (:class:`~gpu_training.follow.JobFollower`): its reader reads
the file by offset from where the results DB says, its batched writer parses the lines and stores
them in one transaction per batch with the new offset, on the DB threads. Each pass here is
:meth:`~gpu_training.follow.JobFollower.ingest_to_end` (what the follower does when the trainer
exited or before it judges a stall), so the stream's wait for new bytes is not measured.

Prints the machine, then (1) lines/s ingested from a generated global.json of 1 MB and of 100 MB
with each line decoder (``json``'s scanner, ``msgspec``; :class:`~gpu_training.events.LineDecoder`),
in the same run, and their ratio; the same for parsing alone; the production decoder's rate
against the goal (>= 50,000 events/s on 2 cores); and (2) the time of one pass that finds one new
event after 1 MB and after 100 MB of already-ingested file, and their ratio (a pass reads from the
stored byte offset, so both should cost the same; goal <= 1.2x).

    python bench/ingest.py [--large-mb 100] [--small-mb 1] [--polls 40] [--rounds 2]
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

from gpu_training.events import DEFAULT_DECODER, LineDecoder, parse_chunk
from gpu_training.follow import BATCH_BYTES, FollowSettings, JobFollower, LocalSource
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


def ingest(
    store: ResultsStore, host: LocalHost, job: str, decoder: LineDecoder = DEFAULT_DECODER
) -> tuple[int, int, int]:
    """One pass of the follower's ingest path: (events, errors, offset) it stored."""
    settings = FollowSettings(job_uuid=job, results_conn_id="bench", target=host.follow_target(), max_metric_rows=10**9)
    log = logging.getLogger("bench.ingest")
    follower = JobFollower(settings, LocalSource(host.workdir), log=log, store=store, decoder=decoder)
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


def parse_only_rate(path: Path, decoder: LineDecoder) -> float:
    """Lines/s of parse_chunk alone over the file, in batches as the writer takes them (no DB)."""
    data = path.read_bytes()
    started, lines, offset = time.perf_counter(), 0, 0
    while offset < len(data):
        events, errors, consumed = parse_chunk(data[offset : offset + BATCH_BYTES], offset, decoder=decoder)
        lines += len(events) + len(errors)
        offset += consumed
    return lines / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mb", type=float, default=100)
    parser.add_argument("--small-mb", type=float, default=1)
    parser.add_argument("--polls", type=int, default=40, help="polls per file; the median is reported")
    parser.add_argument("--rounds", type=int, default=2, help="ingests per file and decoder; the best is reported")
    args = parser.parse_args()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    print(machine(), flush=True)
    decoders = list(LineDecoder)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        engine = create_results_engine(f"sqlite:///{tmp}/results.db")
        upgrade(engine)
        store = ResultsStore(engine)
        files = []
        for label, mb in (("small", args.small_mb), ("large", args.large_mb)):
            host = LocalHost(Path(tmp) / label)
            host.prepare()
            n = generate(Path(host.path(GLOBAL_JSON_PATH)), int(mb * 1024 * 1024))
            files.append({"label": label, "mb": mb, "host": host, "n": n, "runs": {d: [] for d in decoders}})
        # Every file with every decoder, each ingest into a job of its own; the decoders' order
        # alternates from round to round, so drift hits both alike.
        for round_ in range(args.rounds):
            for f in files:
                for decoder in decoders if round_ % 2 == 0 else decoders[::-1]:
                    job = new_job(store, f"{f['label']}-{decoder}-{round_}")
                    started, cpu = time.perf_counter(), time.process_time()
                    ingested, errors, offset = ingest(store, f["host"], job, decoder)
                    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
                    assert ingested == f["n"] and errors == 0, (ingested, f["n"], errors)
                    f["size"], f["job"] = offset, job
                    f["runs"][decoder].append((elapsed, cpu))
                    print(f"  {f['label']} {decoder}: {f['n'] / elapsed:,.0f} lines/s", flush=True)
        parse_rates = {d: parse_only_rate(Path(files[1]["host"].path(GLOBAL_JSON_PATH)), d) for d in decoders}
        # Polls (the production decoder) alternate between the two files (and which goes first).
        polls: dict[str, list[float]] = {f["label"]: [] for f in files}
        for i in range(args.polls):
            for f in files if i % 2 == 0 else files[::-1]:
                polls[f["label"]].append(one_poll_seconds(store, f["host"], f["job"], i))
        engine.dispose()

    print(f"best of {args.rounds} ingests per file and decoder (reader + parse + batched store into SQLite):")
    print(f"{'file':>6} {'MB':>8} {'lines':>9} {'decoder':>8} {'ingest s':>9} {'lines/s':>10} {'lines/CPU-s':>12}")
    for f in files:
        for decoder in decoders:
            elapsed, cpu = min(f["runs"][decoder])
            print(
                f"{f['label']:>6} {f['size'] / 2**20:8.1f} {f['n']:9d} {decoder:>8} {elapsed:9.2f} "
                f"{f['n'] / elapsed:10.0f} {f['n'] / cpu:12.0f}"
            )
    small, large = files
    for f in (large, small):
        rates = {d: f["n"] / min(f["runs"][d])[0] for d in decoders}
        print(
            f"ingest, {f['mb']:g} MB file: json {rates[LineDecoder.JSON]:,.0f} lines/s, msgspec "
            f"{rates[LineDecoder.MSGSPEC]:,.0f} lines/s: msgspec/json "
            f"{rates[LineDecoder.MSGSPEC] / rates[LineDecoder.JSON]:.2f}x"
        )
    print(
        f"parse only (parse_chunk, {large['mb']:g} MB file): json {parse_rates[LineDecoder.JSON]:,.0f} lines/s, "
        f"msgspec {parse_rates[LineDecoder.MSGSPEC]:,.0f} lines/s: msgspec/json "
        f"{parse_rates[LineDecoder.MSGSPEC] / parse_rates[LineDecoder.JSON]:.2f}x"
    )
    for f in (large, small):
        rate = f["n"] / min(f["runs"][DEFAULT_DECODER])[0]
        verdict = "OK" if rate >= GOAL_EVENTS_PER_S else "BELOW GOAL"
        print(
            f"ingest into SQLite ({DEFAULT_DECODER}, production's decoder), {f['mb']:g} MB file: {rate:,.0f} "
            f"events/s (goal >= {GOAL_EVENTS_PER_S:,}/s on 2 cores): {verdict}"
        )
    small_poll, large_poll = (statistics.median(polls[f["label"]]) for f in files)
    ratio = large_poll / small_poll
    print(
        f"one pass finding 1 new event (median of {args.polls}): {small_poll * 1000:.2f} ms after "
        f"{small['mb']:g} MB, {large_poll * 1000:.2f} ms after {large['mb']:g} MB"
    )
    verdict = "OK" if ratio <= GOAL_POLL_RATIO else "ABOVE GOAL"
    print(f"poll cost {large['mb']:g} MB / {small['mb']:g} MB: {ratio:.2f}x (goal <= {GOAL_POLL_RATIO}x): {verdict}")


if __name__ == "__main__":
    main()
