"""Benchmark: global.json ingestion into the SQLite results DB.

Prints (1) events/s ingested from a large generated global.json, and (2) the time of one poll
that finds one new event after 1 MB and after 100 MB of already-ingested file (a poll reads from
the stored byte offset, so both should be the same).

    python bench/ingest.py [--large-mb 100] [--small-mb 1] [--polls 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

from gpu_training.hooks.results import create_results_engine
from gpu_training.hosts.local import LocalHost
from gpu_training.progress import GLOBAL_JSON_PATH, ingest_new_bytes
from gpu_training.results.migrate import upgrade
from gpu_training.results.store import ResultsStore

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


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


def one_poll_seconds(store: ResultsStore, host: LocalHost, job: str, polls: int) -> float:
    """Median time of a poll that finds exactly one new event."""
    path = Path(host.path(GLOBAL_JSON_PATH))
    times = []
    for i in range(polls):
        with path.open("a") as fh:
            fh.write(line(T0, "CUSTOM", f"tick_{i}"))
        started = time.perf_counter()
        n_events, _, _ = ingest_new_bytes(store, host, job, writer_done=False)
        times.append(time.perf_counter() - started)
        assert n_events == 1, n_events
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--large-mb", type=float, default=100)
    parser.add_argument("--small-mb", type=float, default=1)
    parser.add_argument("--polls", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        engine = create_results_engine(f"sqlite:///{tmp}/results.db")
        upgrade(engine)
        store = ResultsStore(engine)
        rows = []
        for label, mb in (("small", args.small_mb), ("large", args.large_mb)):
            host = LocalHost(Path(tmp) / label)
            host.prepare()
            n = generate(Path(host.path(GLOBAL_JSON_PATH)), int(mb * 1024 * 1024))
            job = new_job(store, label)
            started = time.perf_counter()
            ingested, errors, offset = ingest_new_bytes(store, host, job, writer_done=False)
            elapsed = time.perf_counter() - started
            assert ingested == n and errors == 0, (ingested, n, errors)
            poll = one_poll_seconds(store, host, job, args.polls)
            rows.append((label, offset / 1024 / 1024, n, elapsed, n / elapsed, poll))
        print(f"{'file':>6} {'MB':>8} {'events':>9} {'ingest s':>9} {'events/s':>10} {'one poll after (ms)':>20}")
        for label, mb, n, elapsed, rate, poll in rows:
            print(f"{label:>6} {mb:8.1f} {n:9d} {elapsed:9.2f} {rate:10.0f} {poll * 1000:20.2f}")
        engine.dispose()


if __name__ == "__main__":
    main()
