"""Benchmark: latency of the results API's read endpoints over a results DB of realistic volume.

Builds a results DB (SQLite in a temporary directory by default; ``--url`` for another, empty,
SQLAlchemy database, which is migrated and filled): ``--jobs`` jobs with metrics, each of
``--iterations`` iterations of ``--epochs`` epochs (default 200 x 5 x 100 = 10^5 ``epoch_train``
rows), an evaluation every ``--eval-every`` epochs, steps, artifacts and instances, stored by the
real ingestion path (``global.json`` lines through ``parse_chunk`` and ``ResultsStore.ingest``), plus
``--light-jobs`` jobs without metrics (a results DB keeps every job ever run, most of them short).

Then serves the real app (``create_app``, mounted under ``/training`` as the api-server mounts it)
with uvicorn on 127.0.0.1 in a separate process and times ``--requests`` sequential HTTP requests
per endpoint over one keep-alive connection (after a warm-up), each request with other parameters
(another job, project, status...). Only the user is injected (who a token would say); the per-DAG
authorization is the real ``DagAccess`` over Airflow's SimpleAuthManager. Prints the machine, the
row counts and p50/p95/max per endpoint (goal: p95 <= 50 ms with 10^5 epoch rows).

    python bench/api.py [--requests 300] [--jobs 200] [--light-jobs 4800] [--url sqlite:///...]
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import multiprocessing
import os
import platform
import random
import socket
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "plugins"), str(ROOT)]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-api-"))

from sqlalchemy import Engine, func, insert, select  # noqa: E402

from gpu_training.events import parse_chunk  # noqa: E402
from gpu_training.hooks.results import create_results_engine  # noqa: E402
from gpu_training.results.migrate import upgrade  # noqa: E402
from gpu_training.results.models import (  # noqa: E402
    Artifact,
    EpochTrain,
    Eval,
    Instance,
    TrainingIteration,
    TrainingJob,
    TrainingStep,
)
from gpu_training.results.store import ResultsStore  # noqa: E402

GOAL_P95_MS = 50.0
T0 = datetime(2026, 6, 1, tzinfo=UTC)
DAGS = ("gpu_training", "gpu_training_sweep", "nightly_eval")
PROJECTS = tuple(f"proj-{i:02d}" for i in range(20))
PROVIDERS = ("local", "ssh", "lambda", "runpod", "vast", "ec2")
#: Status mix of a long-lived deployment: most jobs ended.
STATUSES = ("completed",) * 14 + ("failed",) * 3 + ("cancelled", "running", "pending", "provisioning")


# --- the database ---------------------------------------------------------------------------------


@dataclass
class World:
    heavy: list[str]  # uuids of the jobs with metrics
    light: list[str]
    iterations: int
    epochs: int
    eval_every: int
    ingest_events: int
    ingest_s: float
    build_s: float


def line(ts: datetime, phase: str, event: str, **fields: Any) -> str:
    payload: dict[str, Any] = {"ts": ts.isoformat(timespec="milliseconds"), "phase": phase, "event": event}
    payload.update(fields)
    return json.dumps(payload)


def global_json(start: datetime, iterations: int, epochs: int, eval_every: int) -> bytes:
    """A job's whole ``global.json``: iterations of trajectories, epochs and evaluations."""
    ts = start
    out = [line(ts, "PROJECT", "start")]
    for it in range(1, iterations + 1):
        out.append(line(ts, "ITERATION", "start", iteration=it, data={"config": {"lr": 0.01, "batch": 64}}))
        out.append(line(ts, "TRAJECTORY", "start", iteration=it))
        ts += timedelta(seconds=30)
        out.append(line(ts, "TRAJECTORY", "end", iteration=it, data={"duration_seconds": 30.0}))
        out.append(line(ts, "TRAINING", "start", iteration=it))
        for ep in range(1, epochs + 1):
            ts += timedelta(seconds=20)
            loss = 1.0 / (ep + it)
            data = {
                "avg_loss": loss,
                "model_path": f"checkpoints/iter{it:03d}_epoch{ep:03d}_model.npz",
                "optimizer_path": f"checkpoints/iter{it:03d}_epoch{ep:03d}_optimizer.npz",
                "val_loss": loss * 1.1,
                "val_accuracy": 1 - loss / 2,
                "learning_rate": 0.01,
            }
            out.append(line(ts, "TRAINING", "epoch_complete", iteration=it, epoch=ep, data=data))
            if ep % eval_every == 0:
                acc = 1 - loss / 3
                metrics = {"accuracy": acc, "precision": acc, "recall": acc, "f1": acc, "auc": acc, "loss": loss}
                metrics["confusion_matrix"] = [[90, 10], [8, 92]]
                out.append(line(ts, "EVAL_MODEL", "metrics", iteration=it, epoch=ep, data=metrics))
        out.append(line(ts, "TRAINING", "end", iteration=it))
        out.append(line(ts, "ITERATION", "end", iteration=it))
    out.append(line(ts, "PROJECT", "end"))
    return ("\n".join(out) + "\n").encode()


def job_row(i: int, rng: random.Random, created_at: datetime, status: str) -> dict[str, Any]:
    project, provider = PROJECTS[i % len(PROJECTS)], rng.choice(PROVIDERS)
    gpu = rng.choice(("", "A100", "H100", "RTX_4090"))
    return {
        "uuid": str(uuidlib.UUID(int=rng.getrandbits(128), version=4)),
        "project_id": project,
        "dag_id": DAGS[i % len(DAGS)],
        "run_id": f"scheduled__{created_at.isoformat()}__{i}",
        "map_index": -1,
        "provider": provider,
        "runtime": "docker" if i % 2 else "process",
        "status": status,
        "params": {"project_id": project, "gpu": gpu, "provider": provider, "config": {"lr": 0.01}},
        "training_config": {"lr": 0.01},
        "outputs_uri": f"s3://bench-outputs/{project}/{i}",
        "created_at": created_at,
        "updated_at": created_at,
        "started_at": created_at + timedelta(minutes=3) if status != "pending" else None,
        "completed_at": created_at + timedelta(hours=3) if status in ("completed", "failed", "cancelled") else None,
        "time_taken": 10_800.0 if status in ("completed", "failed", "cancelled") else None,
        "cost_usd": round(rng.uniform(0.5, 40), 2) if status != "pending" else None,
        "failure_reason": "sense_progress: trainer exited with code 1" if status == "failed" else None,
        "ingest_offset": 0,
        "project_ended": False,
    }


def build(engine: Engine, *, jobs: int, light_jobs: int, iterations: int, epochs: int, eval_every: int) -> World:
    """Fill the (migrated, empty) results DB; jobs are created over 180 days, heavy ones spread
    among light ones."""
    started = time.perf_counter()
    store = ResultsStore(engine)
    rng = random.Random(42)
    total = jobs + light_jobs
    step = timedelta(days=180) / total
    heavy_at = set(rng.sample(range(total), jobs))
    rows = []
    for i in range(total):
        created = T0 + step * i
        status = "completed" if i in heavy_at and i % 7 else rng.choice(STATUSES)
        rows.append(job_row(i, rng, created, status))
    with engine.begin() as conn:
        conn.execute(insert(TrainingJob.__table__), rows)
    heavy = [rows[i]["uuid"] for i in sorted(heavy_at)]
    light = [rows[i]["uuid"] for i in range(total) if i not in heavy_at]

    n_events, ingest_s = 0, 0.0
    for job_uuid, i in zip(heavy, sorted(heavy_at), strict=True):
        chunk = global_json(T0 + step * i, iterations, epochs, eval_every)
        t = time.perf_counter()
        events, errors, consumed = parse_chunk(chunk, 0, final=True)
        result = store.ingest(job_uuid, expected_offset=0, new_offset=consumed, events=events, errors=errors)
        ingest_s += time.perf_counter() - t
        assert not result.conflict and not errors, (result, errors[:1])
        n_events += len(events)

    ids = dict(select_ids(engine))
    heavy_set = set(heavy)
    artifacts, instances = [], []
    for n, row in enumerate(rows):
        job_id, at = ids[row["uuid"]], row["created_at"]
        instances.append(
            {
                "job_id": job_id,
                "provider": row["provider"],
                "name": f"gpujob-{row['uuid'][:8]}-{n}",
                "instance_id": f"i-{n:08x}",
                "instance_type": "gpu_1x_a100",
                "region": "us-east-1",
                "price_per_hour": 1.29,
                "spot": n % 3 == 0,
                "state": "terminated",
                "created_at": at,
                "launched_at": at + timedelta(minutes=1),
                "ready_at": at + timedelta(minutes=3),
                "terminated_at": at + timedelta(hours=3),
                "billable_seconds": 10_800.0,
                "cost_usd": 3.87,
            }
        )
        if row["uuid"] in heavy_set:
            for it in range(1, iterations + 1):
                for name in (f"checkpoints/iter{it:03d}_final_model.npz", f"logs/iter{it:03d}.log"):
                    artifacts.append(
                        {
                            "job_id": job_id,
                            "name": name,
                            "uri": f"{row['outputs_uri']}/{name}",
                            "size_bytes": 1 << 20,
                            "sha256": "0" * 64,
                            "created_at": at + timedelta(hours=3),
                        }
                    )
    with engine.begin() as conn:
        conn.execute(insert(Instance.__table__), instances)
        conn.execute(insert(Artifact.__table__), artifacts)
    return World(
        heavy, light, iterations, epochs, eval_every, n_events, ingest_s, build_s=time.perf_counter() - started
    )


def select_ids(engine: Engine) -> list[tuple[str, int]]:
    with engine.connect() as conn:
        return [(u, i) for u, i in conn.execute(select(TrainingJob.uuid, TrainingJob.id))]


def row_counts(engine: Engine) -> dict[str, int]:
    tables = (TrainingJob, TrainingIteration, TrainingStep, EpochTrain, Eval, Artifact, Instance)
    with engine.connect() as conn:
        return {
            str(model.__tablename__): int(conn.scalar(select(func.count()).select_from(model)) or 0) for model in tables
        }


# --- the server -----------------------------------------------------------------------------------


def serve(url: str, port: int) -> None:
    """The app on uvicorn (in a child process): the real routes, store and DagAccess, the user
    injected as a verified token would name it."""
    logging.getLogger("alembic").setLevel(logging.WARNING)
    import uvicorn
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import FastAPI

    from gpu_training.api.app import create_app
    from gpu_training.api.db import get_store

    store = ResultsStore(create_results_engine(url))
    store.check_schema()
    api = create_app()
    api.state.auth_manager = SimpleAuthManager()
    api.dependency_overrides[get_store] = lambda: store
    api.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="bench", role="VIEWER")
    root = FastAPI()
    root.mount("/training", api)
    uvicorn.run(root, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/training/openapi.json")
            if conn.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the API server did not answer on port {port} within {timeout} s")


# --- the measurement ------------------------------------------------------------------------------


@dataclass
class Endpoint:
    label: str
    path: Callable[[int], str]  # request number -> path with query


def endpoints(world: World, rng: random.Random, total_jobs: int) -> list[Endpoint]:
    heavy, every = world.heavy, world.heavy + world.light
    since = [(T0 + timedelta(days=d)).isoformat() for d in range(0, 180, 7)]
    statuses = ("completed", "failed", "running", "cancelled", "pending")

    def q(path: str, **params: Any) -> str:
        return f"/training/v1{path}" + (f"?{urlencode(params)}" if params else "")

    def pick(seq: list[str], i: int) -> str:
        return seq[(i * 7919) % len(seq)]

    return [
        Endpoint("GET /jobs", lambda i: q("/jobs")),
        Endpoint("GET /jobs?status=", lambda i: q("/jobs", status=statuses[i % len(statuses)])),
        Endpoint("GET /jobs?project_id=", lambda i: q("/jobs", project_id=PROJECTS[i % len(PROJECTS)])),
        Endpoint("GET /jobs?provider=", lambda i: q("/jobs", provider=PROVIDERS[i % len(PROVIDERS)])),
        Endpoint("GET /jobs?since=", lambda i: q("/jobs", since=since[i % len(since)])),
        Endpoint(
            "GET /jobs?offset=(deep)",
            lambda i: q("/jobs", offset=max(0, total_jobs - 100 - (i % 50) * 10), limit=50),
        ),
        Endpoint("GET /jobs?limit=500", lambda i: q("/jobs", limit=500, offset=(i % 5) * 500)),
        Endpoint("GET /jobs/{uuid}", lambda i: q(f"/jobs/{pick(every, i)}")),
        Endpoint(
            f"GET /jobs/{{uuid}}/details ({world.iterations * world.epochs} ep.)",
            lambda i: q(f"/jobs/{pick(heavy, i)}/details"),
        ),
        Endpoint(
            f"GET /jobs/{{uuid}}/iterations/{{n}}/epochs ({world.epochs})",
            lambda i: q(f"/jobs/{pick(heavy, i)}/iterations/{1 + i % world.iterations}/epochs"),
        ),
        Endpoint(
            "GET /evaluations?model_id=uuid/it/ep",
            lambda i: q(
                "/evaluations",
                model_id=f"{pick(heavy, i)}/{1 + i % world.iterations}/{world.eval_every * (1 + i % 3)}",
            ),
        ),
        Endpoint("GET /evaluations?model_id=uuid", lambda i: q("/evaluations", model_id=pick(heavy, i))),
        Endpoint("GET /evaluations (latest)", lambda i: q("/evaluations", offset=(i % 10) * 50)),
    ]


def measure(port: int, endpoint: Endpoint, requests: int, warmup: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for i in range(-warmup, requests):
        path = endpoint.path(i % 1_000_003)
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        elapsed = time.perf_counter() - started
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {body[:300]!r}")
        if i >= 0:
            times.append(elapsed)
    conn.close()
    return times


def machine() -> str:
    model = "unknown CPU"
    mem = "? GiB"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
        with open("/proc/meminfo") as fh:
            kib = next(int(ln.split()[1]) for ln in fh if ln.startswith("MemTotal"))
            mem = f"{kib / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration):
        pass
    nproc = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    import fastapi
    import sqlalchemy
    import uvicorn

    return (
        f"machine: nproc {nproc}, {model}, {mem}, Python {platform.python_version()}, "
        f"SQLite {sqlite3.sqlite_version}, SQLAlchemy {sqlalchemy.__version__}, "
        f"FastAPI {fastapi.__version__}, uvicorn {uvicorn.__version__}"
    )


def pct(sorted_ms: list[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of sorted values."""
    return sorted_ms[min(len(sorted_ms) - 1, max(0, round(q * len(sorted_ms)) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an empty SQLAlchemy database to fill (default: SQLite in a temp dir)")
    parser.add_argument("--jobs", type=int, default=200, help="jobs with metrics")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=100, help="epochs per iteration")
    parser.add_argument("--eval-every", type=int, default=10, help="an evaluation every N epochs")
    parser.add_argument("--light-jobs", type=int, default=4800, help="jobs without metrics")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per endpoint")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per endpoint first")
    args = parser.parse_args()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    print(machine(), flush=True)

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        url = args.url or f"sqlite:///{tmp}/results.db"
        engine = create_results_engine(url)
        upgrade(engine)
        world = build(
            engine,
            jobs=args.jobs,
            light_jobs=args.light_jobs,
            iterations=args.iterations,
            epochs=args.epochs,
            eval_every=args.eval_every,
        )
        counts = row_counts(engine)
        engine.dispose()
        print(
            f"database: {engine.url.render_as_string(hide_password=True)} "
            f"({engine.dialect.name}), built in {world.build_s:.1f} s; "
            f"{world.ingest_events:,} global.json events ingested at {world.ingest_events / world.ingest_s:,.0f}/s"
        )
        print("rows: " + ", ".join(f"{table} {n:,}" for table, n in counts.items()), flush=True)

        port = free_port()
        server = multiprocessing.get_context("spawn").Process(target=serve, args=(url, port), daemon=True)
        server.start()
        try:
            wait_ready(port)
            rng = random.Random(7)
            results = []
            for ep in endpoints(world, rng, counts["training_jobs"]):
                ms = sorted(t * 1000 for t in measure(port, ep, args.requests, args.warmup))
                results.append((ep.label, ms))
        finally:
            server.terminate()
            server.join(10)

    width = max(len(label) for label, _ in results)
    print(f"{'endpoint (sequential, keep-alive HTTP)':<{width}} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    above = []
    for label, ms in results:
        p95 = pct(ms, 0.95)
        flag = "" if p95 <= GOAL_P95_MS else "  ABOVE"
        if flag:
            above.append(label)
        print(f"{label:<{width}} {len(ms):5d} {statistics.median(ms):8.2f} {p95:8.2f} {ms[-1]:8.2f}{flag}")
    verdict = "OK" if not above else f"ABOVE ({', '.join(above)})"
    print(f"p95 <= {GOAL_P95_MS:g} ms with 10^5 epoch rows ({counts['epoch_train']:,} here): {verdict}")


if __name__ == "__main__":
    main()
