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

``--sizes``: instead, what ONE long job costs (``--long-epochs``, default 200,000 epochs in 2
iterations, an evaluation every 100 epochs), on SQLite and a throwaway PostgreSQL (``--db``): for
each answer the time, the server's peak memory (its RSS high-water mark over the request, above its
RSS before it: ``/proc/<pid>/clear_refs``) and the bytes sent, with the ratio to the baseline
measured in the same run: ``/details`` as it was before issue 21 (every epoch and evaluation: the
old code, kept here as ``unbounded_details``, served by the same server). The Training jobs page's
initial load was that one ``/details``; now it is ``/details?epochs_limit=0&evals_limit=0``, one
``/series`` (1000 buckets) and the latest 2,000 evaluations in 4 pages; its refresh every 10 s of a
running job was that ``/details`` again, now the one without epochs.

    python bench/api.py --sizes [--long-epochs 200000] [--db sqlite|postgresql|both] [--repeat 3]
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

from gpu_training.api import queries  # noqa: E402
from gpu_training.api.schemas import (  # noqa: E402
    ArtifactInfo,
    Epoch,
    Evaluation,
    InstanceInfo,
    Iteration,
    Job,
    Step,
    model_id,
)
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


# --- one long job: answer sizes against the unbounded /details (--sizes) ---------------------------


def unbounded_details(store: ResultsStore, job: TrainingJob) -> dict[str, Any]:
    """``/details`` before issue 21 (``queries.job_details`` at 19decc4, verbatim but for its name):
    every epoch and evaluation of the job. The baseline of ``--sizes``."""
    import functools

    with store.engine.connect() as conn:
        of_job = functools.partial(queries._rows_of_job, conn, job.id)
        iterations = of_job(Iteration, TrainingIteration, TrainingIteration.iteration)
        steps = of_job(Step, TrainingStep, TrainingStep.iteration, TrainingStep.id, extra=[TrainingStep.iteration])
        epochs = of_job(Epoch, EpochTrain, EpochTrain.iteration, EpochTrain.epoch)
        evals = of_job(Evaluation, Eval, Eval.iteration, Eval.epoch)
        artifacts = of_job(ArtifactInfo, Artifact, Artifact.name)
        instances = of_job(InstanceInfo, Instance, Instance.id)
    numbers = {row["iteration"] for rows in (epochs, evals) for row in rows}
    by_number = {it["iteration"]: it for it in iterations}
    by_number |= {n: dict.fromkeys(Iteration.model_fields) | {"iteration": n} for n in numbers - by_number.keys()}
    for it in by_number.values():
        it.update(steps=[], epochs=[], evals=[])
    for row in epochs:
        by_number[row["iteration"]]["epochs"].append(row)
    for row in evals:
        row.update(model_id=model_id(job.uuid, row["iteration"], row["epoch"]), job_uuid=job.uuid)
        by_number[row["iteration"]]["evals"].append(row)
    for row in steps:  # the steps of an iteration with no row, epoch nor evaluation are not shown
        of_step = by_number.get(row.pop("iteration"))
        if of_step is not None:
            of_step["steps"].append(row)
    return Job.of(job).model_dump() | {
        "iterations": [by_number[n] for n in sorted(by_number)],
        "artifacts": artifacts,
        "instances": instances,
        "params": job.params or {},
        "training_config": job.training_config,
        "outputs_uri": job.outputs_uri,
    }


def build_long_job(engine: Engine, epochs: int, eval_every: int) -> str:
    """One completed job of ``epochs`` epochs in 2 iterations (avg_loss and 4 more metrics each, as a
    trainer reports them), an evaluation every ``eval_every`` epochs; bulk inserted."""
    rng = random.Random(42)
    row = job_row(0, rng, T0, "completed")
    per_iteration = epochs // 2
    with engine.begin() as conn:
        job_id = conn.execute(insert(TrainingJob.__table__).returning(TrainingJob.id), [row]).scalar_one()
        conn.execute(insert(TrainingIteration.__table__), [{"job_id": job_id, "iteration": it} for it in (1, 2)])
        for it in (1, 2):
            for start in range(1, per_iteration + 1, 20_000):
                batch = range(start, min(per_iteration, start + 19_999) + 1)
                conn.execute(
                    insert(EpochTrain.__table__),
                    [
                        {
                            "job_id": job_id,
                            "iteration": it,
                            "epoch": ep,
                            "avg_loss": 1.0 / (ep + it),
                            "model_path": f"checkpoints/iter{it:03d}_epoch{ep:06d}_model.npz",
                            "metrics": {
                                "val_loss": 1.1 / (ep + it),
                                "val_accuracy": 1 - 0.5 / (ep + it),
                                "learning_rate": 0.01,
                                "samples": 60_000,
                            },
                            "completed_at": T0 + timedelta(seconds=ep),
                        }
                        for ep in batch
                    ],
                )
            conn.execute(
                insert(Eval.__table__),
                [
                    {
                        "job_id": job_id,
                        "iteration": it,
                        "epoch": ep,
                        "accuracy": 1 - 0.3 / (ep + it),
                        "f1": 1 - 0.35 / (ep + it),
                        "loss": 1.0 / (ep + it),
                        "confusion_matrix": [[90, 10], [8, 92]],
                        "evaluated_at": T0 + timedelta(seconds=ep),
                    }
                    for ep in range(eval_every, per_iteration + 1, eval_every)
                ],
            )
    return str(row["uuid"])


def serve_with_baseline(url: str, port: int) -> None:
    """:func:`serve`, plus the baseline: the unbounded ``/details`` at ``/baseline/jobs/{uuid}/details``."""
    import uvicorn
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from airflow.api_fastapi.core_api.security import get_user
    from fastapi import FastAPI

    from gpu_training.api.app import create_app
    from gpu_training.api.db import get_store
    from gpu_training.api.routes import json_response

    logging.getLogger("alembic").setLevel(logging.WARNING)
    store = ResultsStore(create_results_engine(url))
    store.check_schema()
    api = create_app()
    api.state.auth_manager = SimpleAuthManager()
    api.dependency_overrides[get_store] = lambda: store
    api.dependency_overrides[get_user] = lambda: SimpleAuthManagerUser(username="bench", role="VIEWER")
    root = FastAPI()

    @root.get("/baseline/jobs/{job_uuid}/details")
    def baseline(job_uuid: str) -> Any:
        job = queries.job(store, job_uuid)
        assert job is not None
        return json_response(unbounded_details(store, job))

    root.mount("/training", api)
    uvicorn.run(root, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False)


def _kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))


@dataclass
class Cost:
    seconds: float
    peak_mib: float  # the server's RSS high-water mark over the request, above its RSS before it
    bytes: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.seconds + other.seconds, max(self.peak_mib, other.peak_mib), self.bytes + other.bytes)


def request_cost(conn: http.client.HTTPConnection, pid: int, path: str) -> Cost:
    with open(f"/proc/{pid}/clear_refs", "w") as fh:
        fh.write("5")  # resets the high-water mark (VmHWM) to the RSS now
    before = _kib(pid, "VmRSS")
    started = time.perf_counter()
    conn.request("GET", path)
    resp = conn.getresponse()
    body = resp.read()
    elapsed = time.perf_counter() - started
    if resp.status != 200:
        raise RuntimeError(f"{path}: {resp.status} {body[:300]!r}")
    return Cost(elapsed, (_kib(pid, "VmHWM") - before) / 1024, len(body))


def measure_sizes(url: str, job: str, epochs_total: int, evals_total: int, repeat: int) -> list[tuple[str, Cost]]:
    """Each answer (and the page's loads) in a server of its own: its memory on the first run (the
    server warmed by one small read of the job: imports, a connection), then its time, the median
    of ``repeat`` more runs. A server of its own, since memory a process freed stays in its RSS and
    would hide the next request's."""
    v1 = f"/training/v1/jobs/{job}"
    shown = min(evals_total, 2000)
    page_loads = [
        f"{v1}/details?epochs_limit=0&evals_limit=0",
        f"{v1}/series?metric=avg_loss&points=1000",
        *(f"{v1}/evaluations?limit=500&offset={o}" for o in range(evals_total - shown, evals_total, 500)),
    ]
    baseline = f"/baseline/jobs/{job}/details"
    cases: list[tuple[str, list[str]]] = [
        (f"baseline: /details, every row ({epochs_total:,} epochs, {evals_total:,} evals)", [baseline]),
        ("/details (default: the first 500 epochs and evals)", [f"{v1}/details"]),
        ("/details?epochs_limit=0&evals_limit=0", [page_loads[0]]),
        ("/epochs?limit=5000&offset=<last page>", [f"{v1}/epochs?limit=5000&offset={epochs_total - 5000}"]),
        ("/series?metric=avg_loss&points=1000", [page_loads[1]]),
        ("/series?metric=val_loss&points=1000 (a JSON metric)", [f"{v1}/series?metric=val_loss&points=1000"]),
        ("page, initial load before: the baseline /details", [baseline]),
        (f"page, initial load now: details, series, {len(page_loads) - 2} pages of evals", page_loads),
        ("page, refresh every 10 s now: details without rows", [page_loads[0]]),
    ]
    results = []
    for label, paths in cases:
        port = free_port()
        server = multiprocessing.get_context("spawn").Process(target=serve_with_baseline, args=(url, port), daemon=True)
        server.start()
        try:
            wait_ready(port, timeout=120)
            assert server.pid is not None
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
            request_cost(conn, server.pid, v1)
            first = Cost(0.0, 0.0, 0)
            for path in paths:
                first = first + request_cost(conn, server.pid, path)
            runs = []
            for _ in range(repeat):
                total = Cost(0.0, 0.0, 0)
                for path in paths:
                    total = total + request_cost(conn, server.pid, path)
                runs.append(total.seconds)
            conn.close()
        finally:
            server.terminate()
            server.join(10)
        results.append((label, Cost(statistics.median(runs), first.peak_mib, first.bytes)))
        print(f"  measured: {label}", file=sys.stderr, flush=True)
    return results


def sizes(args: argparse.Namespace) -> None:
    """``--sizes``: one long job's answers on each backend, against the unbounded baseline."""
    print(machine(), flush=True)
    backends = ("sqlite", "postgresql") if args.db == "both" else (args.db,)
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="bench-api-sizes-") as tmp:
            postgres = None
            if backend == "postgresql":
                from tests.servers import start_postgres

                root = Path(tempfile.mkdtemp(prefix="bench-api-postgres-"))  # the server runs as postgres
                postgres = start_postgres(root, user="results", database="results")
                url = postgres.url()
            else:
                url = f"sqlite:///{tmp}/results.db"
            try:
                engine = create_results_engine(url)
                upgrade(engine)
                started = time.perf_counter()
                job = build_long_job(engine, args.long_epochs, eval_every=100)
                counts = row_counts(engine)
                engine.dispose()
                print(
                    f"\n{backend}: one job, {counts['epoch_train']:,} epochs and {counts['evals']:,} evaluations "
                    f"stored in {time.perf_counter() - started:.1f} s",
                    flush=True,
                )
                results = measure_sizes(url, job, counts["epoch_train"], counts["evals"], args.repeat)
            finally:
                if postgres is not None:
                    postgres.stop()
                    import shutil

                    shutil.rmtree(postgres.data_dir.parent, ignore_errors=True)
        base = results[0][1]
        width = max(len(label) for label, _ in results)
        print(f"{'answer (' + backend + ')':<{width}} {'time ms':>9} {'peak MiB':>9} {'bytes':>12}  vs baseline")
        for label, cost in results:
            ratio = (
                f"time x{cost.seconds / base.seconds:.4f}, memory x{cost.peak_mib / max(base.peak_mib, 1e-9):.4f}, "
                f"bytes x{cost.bytes / base.bytes:.5f}"
            )
            print(f"{label:<{width}} {cost.seconds * 1000:9.1f} {cost.peak_mib:9.1f} {cost.bytes:12,}  {ratio}")


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
    parser.add_argument("--sizes", action="store_true", help="one long job's answer sizes instead (see above)")
    parser.add_argument("--long-epochs", type=int, default=200_000, help="--sizes: epochs of the long job")
    parser.add_argument("--db", choices=("sqlite", "postgresql", "both"), default="both", help="--sizes: backends")
    parser.add_argument("--repeat", type=int, default=3, help="--sizes: runs of each answer (the median time)")
    args = parser.parse_args()
    logging.getLogger("alembic").setLevel(logging.WARNING)
    if args.sizes:
        sizes(args)
        return
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
