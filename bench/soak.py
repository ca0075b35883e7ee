"""Soak benchmark: N ``gpu_training`` jobs with random faults on a real Airflow deployment.

Starts a private PostgreSQL (Airflow's metadata DB), the test sshd, the fake Lambda and fake Vast.ai
clouds wired to it (``tests/fakeclouds/rigs.py``: a "launched" instance is the sshd) and
``tests/airflow_cluster.py``'s cluster (api-server, scheduler with the LocalExecutor, dag-processor,
triggerer; users as in ``tests/e2e/cluster``) with both clouds' connections, then triggers ``--jobs``
jobs through the REST API, ``--concurrency`` at a time, each with one fault:

fault (cloud): what -> expected final job status

* none (vast): ``ok E 0.3`` -> completed
* rate_limit (lambda): the next 3 API requests answer 429 with ``Retry-After: 1`` -> completed
* error_after_create (lambda): the launch creates the instance, then answers 500 -> completed
* refuse_launch (lambda): the launch is refused for capacity although listed -> completed
* terminate_fail (lambda): the next 2 terminate calls answer 500 and do nothing -> completed
* crash (vast): ``crash K`` (K epochs, a traceback, exit 3) -> failed, "exited with code 3"
* stall (vast): ``stall K`` with ``stall_timeout_minutes`` 0.2 -> failed, "stalled"
* oom (vast): ``hang K 0.3``; once K epoch rows are stored the bench SIGKILLs the trainer process
  (not its wrapper), as the kernel's OOM killer does -> failed, "exited with code 137"
* cancel (vast): ``hang 200 0.3``; 0-30 s after the job row appears, alternately ``PATCH`` the
  dag run ``failed`` and ``POST /training/v1/jobs/{uuid}/cancel`` (admin token) -> cancelled
* spot (vast): ``spot`` + ``max_recoveries`` 1, ``ok 24 1``; once ``sense_progress`` is deferred and
  the trainer wrote 2-5 epochs (its own global.json on the box), the fake outbids the instance
  (``FakeVast.interrupt``) and the box's trainer process group is killed, as in
  tests/e2e/test_spot_recovery_dag.py -> completed, ``recovery_count`` 1, epochs 1..24 once

Faults are drawn from a shuffled deck (each block of 10 jobs holds every fault once, in random
order; ``--seed``), so 20 jobs exercise each fault twice.

**Keeping the fakes' global fault switches apart.** A fake's switches count down on whatever
request comes next, from any job. So the fake Lambda is reserved for the four provider-fault jobs
and they run there one at a time: the switch is set just before the job is triggered, and the
next provider-fault job starts only after this one's dag run has finished (the dispatcher skips
ahead to other jobs meanwhile, so the other slots stay busy). Every other job runs on the fake Vast,
which has no fault switched on. The instance reaper DAG (``gpu_instance_reaper``) is paused, so it
neither eats a 429 nor hides a leak (its grace period is 15 min anyway). After each provider-fault
job the bench checks that its fault fired (the counter reached 0), else the job did not test it.
The fake Vast gets 40 more A100 asks (each ask is one machine, and an outbid one stays taken) and
both fakes boot in 2 s, so a cancel can land while an instance boots.

Checked at the end:

* each job's final status against the table (and the failure reason's words, and for spot
  ``recovery_count`` 1 with an interrupted instance);
* leaked instances: every instance either fake ever launched must be terminated, and every row of
  ``instances`` must be ``terminated`` or ``failed`` (goal 0);
* epoch rows per job in the results DB: duplicates = rows - distinct (iteration, epoch) (the unique
  key makes it 0, checked anyway); lost = epochs the trainer wrote (its ``global.json`` on each of
  the job's boxes, column "wrote") that are not stored, and for a job that ended as expected also
  E - distinct rows of 1..E (completed) or K - distinct rows of 1..K (crash/stall/oom: everything
  written before the trainer ended is read); for cancels only the gaps in 1..max (a prefix, as the
  follower stops at the cancel); rows outside 1..E are counted as unexpected (goal 0 each);
* cancel -> terminated: from the cancel request to the fake's ``terminate_requested_at`` of the
  last of the job's instances (matched by name); cancels that landed before anything was launched
  have none. Goal p95 <= 60 s (the e2e tests' limit).

Exit status 1 when a goal is missed, a fault was not exercised, or a job did not finish in time.

    python bench/soak.py [--jobs 20] [--seed S] [--concurrency 8] [--job-timeout 360]
                         [--home DIR] [--keep] [--json FILE]

Needs root (sshd with root login) and PostgreSQL (``initdb``; ``make bench-soak`` installs Debian's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "plugins")]

import requests  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench.concurrency import machine as concurrency_machine  # noqa: E402
from gpu_training.taskgroup import STEP_TASK_IDS  # noqa: E402
from tests.airflow_cluster import AirflowCluster, ClusterError  # noqa: E402
from tests.e2e.cluster import USERS  # noqa: E402
from tests.fakeclouds.rigs import STARTERS, Rig  # noqa: E402
from tests.fakeclouds.vast import _ask  # noqa: E402
from tests.servers import PostgresServer, start_postgres  # noqa: E402
from tests.sshd import start_sshd  # noqa: E402

DAG_ID = "gpu_training"
REAPER_DAG_ID = "gpu_instance_reaper"
SCRIPTED = REPO / "tests" / "fixtures" / "scripted_trainer.py"
PROVIDER_FAULTS = ("rate_limit", "error_after_create", "refuse_launch", "terminate_fail")
FAULTS = ("none", *PROVIDER_FAULTS, "crash", "stall", "oom", "cancel", "spot")
COMPLETED_FAULTS = ("none", *PROVIDER_FAULTS, "spot")
#: The failure reason of a failed job must contain this.
FAILURE_WORDS = {"crash": "exited with code 3", "stall": "stalled", "oom": "exited with code 137"}
CANCEL_TO_TERMINATED_GOAL = 60.0
TASK_ORDER = STEP_TASK_IDS


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class Job:
    index: int
    fault: str
    cloud: str
    conf: dict[str, Any]
    expected_epochs: int | None = None  # exact rows 1..E expected (None: a prefix, for cancels)
    cancel_via: str | None = None  # patch / api
    cancel_delay: float | None = None
    interrupt_after: int | None = None  # spot: epoch rows before the interruption
    # filled in while it runs
    run_id: str | None = None
    uuid: str | None = None
    triggered_at: float | None = None
    finished_at: float | None = None
    run_state: str | None = None
    status: str | None = None
    failure_reason: str | None = None
    cancelled_by: str | None = None
    recovery_count: int | None = None
    rows: int = 0
    distinct_rows: int = 0
    max_epoch: int = 0
    written_epochs: int = 0  # distinct epochs in the trainer's global.json on the job's boxes
    lost: int = 0
    duplicated: int = 0
    extra: int = 0
    cancel_at: float | None = None
    cancel_stage: str | None = None
    cancel_answer: str | None = None
    cancel_to_terminated: float | None = None
    fault_fired: bool | None = None
    action_done: bool | None = None  # oom kill / spot interruption happened
    instances: list[dict[str, Any]] = field(default_factory=list)  # results DB rows
    fake_instances: list[dict[str, Any]] = field(default_factory=list)
    task_timeline: list[dict[str, Any]] = field(default_factory=list)
    fake_calls: list[tuple[float, str, str, int]] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)  # tasks that needed another try, with the error
    problems: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def label(self) -> str:
        return f"#{self.index:02d} {self.fault}" + (f"/{self.cancel_via}" if self.cancel_via else "")

    def expected_status(self) -> str:
        if self.fault in COMPLETED_FAULTS:
            return "completed"
        return "cancelled" if self.fault == "cancel" else "failed"


# --- the plan ------------------------------------------------------------------------------------


def plan(n: int, rng: random.Random, lambda_gpu: str, vast_gpu: str) -> list[Job]:
    deck: list[str] = []
    while len(deck) < n:
        block = list(FAULTS)
        rng.shuffle(block)
        deck += block
    jobs: list[Job] = []
    cancels = 0
    for i, fault in enumerate(deck[:n]):
        cloud = "lambda" if fault in PROVIDER_FAULTS else "vast"
        conf: dict[str, Any] = {
            "project_id": f"soak-{i:02d}-{fault}",
            "provider": cloud,
            "gpu": lambda_gpu if cloud == "lambda" else vast_gpu,
            "poll_interval_seconds": 1,
        }
        job = Job(i, fault, cloud, conf)
        if fault in ("none", *PROVIDER_FAULTS):
            epochs = rng.randint(4, 10) if fault == "none" else rng.randint(3, 6)
            conf["command"] = ["{python}", str(SCRIPTED), "ok", str(epochs), "0.3"]
            job.expected_epochs = epochs
        elif fault in ("crash", "stall"):
            epochs = rng.randint(2, 5)
            conf["command"] = ["{python}", str(SCRIPTED), fault, str(epochs)]
            if fault == "stall":
                conf["stall_timeout_minutes"] = 0.2
            job.expected_epochs = epochs
        elif fault == "oom":
            epochs = rng.randint(2, 5)
            conf["command"] = ["{python}", str(SCRIPTED), "hang", str(epochs), "0.3"]
            job.expected_epochs = epochs
        elif fault == "cancel":
            conf["command"] = ["{python}", str(SCRIPTED), "hang", "200", "0.3"]
            job.cancel_via = "patch" if cancels % 2 == 0 else "api"
            job.cancel_delay = round(rng.uniform(0, 30), 1)
            cancels += 1
        elif fault == "spot":
            # 1 s apart: the first rows must be visible while the trainer still trains.
            epochs = 24
            conf.update(spot=True, max_recoveries=1)
            conf["command"] = ["{python}", str(SCRIPTED), "ok", str(epochs), "1"]
            job.expected_epochs = epochs
            job.interrupt_after = rng.randint(2, 5)
        jobs.append(job)
    return jobs


# --- running one job -----------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, cluster: AirflowCluster, rigs: dict[str, Rig], boxes: Path) -> None:
        self.args = args
        self.cluster = cluster
        self.rigs = rigs
        self.boxes = boxes
        self.api_lock = threading.Lock()
        self.results = create_engine(cluster.results_url, connect_args={"timeout": 30})
        self.token = cluster.token("admin")

    # REST calls share the cluster's requests.Session: one at a time.
    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        with self.api_lock:
            return self.cluster.api(method, path, **kw)

    def run_state(self, run_id: str) -> str:
        resp = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")
        resp.raise_for_status()
        return str(resp.json()["state"])

    def task_instances(self, run_id: str) -> list[dict[str, Any]]:
        resp = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", params={"limit": 100})
        resp.raise_for_status()
        return list(resp.json()["task_instances"])

    def trigger(self, conf: dict[str, Any]) -> str:
        for attempt in range(5):
            resp = self.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
            if resp.ok:
                return str(resp.json()["dag_run_id"])
            if attempt == 4 or resp.status_code < 500:
                raise ClusterError(f"trigger -> {resp.status_code}: {resp.text[:500]}")
            time.sleep(1)
        raise AssertionError("unreachable")

    def query(self, sql: str, **params: Any) -> list[Any]:
        with self.results.connect() as conn:
            return list(conn.execute(text(sql), params))

    def job_uuid(self, run_id: str) -> str | None:
        rows = self.query("SELECT uuid FROM training_jobs WHERE dag_id = :d AND run_id = :r", d=DAG_ID, r=run_id)
        return str(rows[0][0]) if rows else None

    def epoch_rows(self, uuid: str) -> list[tuple[int, int]]:
        rows = self.query(
            "SELECT e.iteration, e.epoch FROM epoch_train e JOIN training_jobs j ON j.id = e.job_id WHERE j.uuid = :u",
            u=uuid,
        )
        return [(int(it), int(ep)) for it, ep in rows]

    def db_instances(self, uuid: str) -> list[dict[str, Any]]:
        rows = self.query(
            "SELECT i.name, i.provider, i.instance_id, i.state, i.state_reason, i.interrupted_at, i.spot "
            "FROM instances i JOIN training_jobs j ON j.id = i.job_id WHERE j.uuid = :u ORDER BY i.id",
            u=uuid,
        )
        return [
            {
                "name": r[0],
                "provider": r[1],
                "instance_id": r[2],
                "state": r[3],
                "state_reason": (r[4] or "")[:200],
                "interrupted": r[5] is not None,
                "spot": bool(r[6]),
            }
            for r in rows
        ]

    def wait_for(
        self, what: str, predicate: Any, timeout: float, interval: float = 0.2, *, run_id: str | None = None
    ) -> Any:
        """Poll ``predicate``; with ``run_id``, give up as soon as that dag run has ended."""
        deadline = time.monotonic() + timeout
        checked = time.monotonic()
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
            if run_id and time.monotonic() - checked > 2:
                checked = time.monotonic()
                state = self.run_state(run_id)
                if state in ("success", "failed"):
                    raise TimeoutError(f"the run ended ({state}) before {what}")
            time.sleep(interval)

    def trainer_files(self, instance_name: str, name: str) -> list[Path]:
        return [p for p in self.boxes.rglob(f"run/{name}") if instance_name in str(p)]

    def live_instance(self, job: Job) -> dict[str, Any] | None:
        assert job.uuid
        live = [i for i in self.db_instances(job.uuid) if i["state"] == "running" and i["instance_id"]]
        return live[-1] if live else None

    # --- the faults' actions ---------------------------------------------------------------------

    def set_provider_fault(self, job: Job) -> None:
        faults = self.rigs["lambda"].fake.faults
        with self.rigs["lambda"].fake.lock:
            if job.fault == "rate_limit":
                faults.retry_after = 1.0
                faults.rate_limit = 3
            elif job.fault == "error_after_create":
                faults.error_after_create = 1
            elif job.fault == "refuse_launch":
                faults.refuse_launch = 1
            elif job.fault == "terminate_fail":
                faults.terminate_fail = 2

    def clear_provider_fault(self, job: Job) -> None:
        fake = self.rigs["lambda"].fake
        with fake.lock:
            left = getattr(fake.faults, job.fault)
            job.fault_fired = left == 0
            setattr(fake.faults, job.fault, 0)
        if not job.fault_fired:
            job.problems.append(f"fault {job.fault} did not fire ({left} left)")

    def cancel(self, job: Job) -> None:
        assert job.run_id and job.uuid and job.cancel_delay is not None
        time.sleep(job.cancel_delay)
        with contextlib.suppress(Exception):
            tis = sorted(
                self.task_instances(job.run_id),
                key=lambda t: TASK_ORDER.index(t["task_id"]) if t["task_id"] in TASK_ORDER else 99,
            )
            active = [
                f"{ti['task_id']} {ti['state']}"
                for ti in tis
                if ti["state"] in ("running", "deferred", "queued", "scheduled", "up_for_retry", "up_for_reschedule")
            ]
            job.cancel_stage = ", ".join(active) or "none active"
            # The trainer hangs: nothing may fail before the cancel. If something did, the cancel
            # only relabels a job that had already failed.
            failed = [ti["task_id"] for ti in tis if ti["state"] in ("failed", "upstream_failed")]
            if failed:
                job.problems.append(f"already failed before the cancel: {', '.join(failed)}")
        job.cancel_at = time.time()
        if job.cancel_via == "patch":
            resp = self.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{job.run_id}", json={"state": "failed"})
        else:
            resp = requests.post(
                f"{self.cluster.base_url}/training/v1/jobs/{job.uuid}/cancel",
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=60,
            )
        job.cancel_answer = f"{resp.status_code}"
        expected = 200 if job.cancel_via == "patch" else 202
        if resp.status_code != expected:
            job.problems.append(f"cancel answered {resp.status_code}: {resp.text[:300]}")

    def oom_kill(self, job: Job) -> None:
        """After K epoch rows, SIGKILL the trainer process (not its wrapper), as the OOM killer does."""
        assert job.uuid and job.expected_epochs
        self.wait_for(
            f"{job.expected_epochs} epoch rows",
            lambda: len(self.epoch_rows(job.uuid)) >= job.expected_epochs,
            240,
            run_id=job.run_id,
        )
        inst = self.wait_for("the running instance", lambda: self.live_instance(job), 30)
        pid_file = self.wait_for("run/trainer.pid", lambda: self.trainer_files(inst["name"], "trainer.pid"), 30)[0]
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        job.action_done = True

    def box_epochs(self, instance_name: str) -> int:
        """Epochs the trainer wrote so far on the box (its own global.json, not the results DB)."""
        with contextlib.suppress(OSError):
            return (self.boxes / instance_name / "outputs" / "global.json").read_text().count('"epoch_complete"')
        return 0

    def box_epoch_set(self, instance_name: str) -> set[int]:
        out: set[int] = set()
        with contextlib.suppress(OSError):
            for line in (self.boxes / instance_name / "outputs" / "global.json").read_text().splitlines():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    event = json.loads(line)
                    if event.get("event") == "epoch_complete":
                        out.add(int(event["epoch"]))
        return out

    def interrupt(self, job: Job) -> None:
        """While ``sense_progress`` follows the trainer and it has written a few epochs, the fake
        outbids the instance and the box's processes die with it. Timed on the trainer's own file:
        the rows may reach the DB only after the trainer ended (the follower starts late under load)."""
        assert job.run_id and job.uuid and job.interrupt_after
        state: dict[str, Any] = {}

        def ready() -> bool:
            inst = self.live_instance(job)
            if inst is None or self.box_epochs(inst["name"]) < (job.interrupt_after or 0):
                return False
            now = time.monotonic()
            if now - state.get("asked", 0) >= 1:
                state["asked"] = now
                with contextlib.suppress(Exception):
                    state["sense"] = next(
                        ti["state"] for ti in self.task_instances(job.run_id) if ti["task_id"] == "sense_progress"
                    )
            state["inst"] = inst
            return state.get("sense") == "deferred"

        self.wait_for("the trainer to be followed with a few epochs written", ready, 240, 0.3, run_id=job.run_id)
        inst = state["inst"]
        if self.box_epochs(inst["name"]) >= (job.expected_epochs or 0):
            job.problems.append("spot: the trainer finished before the interruption")
            job.action_done = False
            return
        self.rigs["vast"].fake.interrupt(inst["instance_id"])
        killed = 0
        for pgid_file in self.trainer_files(inst["name"], "pgid"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int(pgid_file.read_text().strip()), signal.SIGKILL)
                killed += 1
        job.action_done = killed >= 1
        if not killed:
            job.problems.append(f"spot: no trainer process group found for {inst['name']}")

    # --- one job, start to end -------------------------------------------------------------------

    def run_job(self, job: Job) -> None:
        try:
            if job.fault in PROVIDER_FAULTS:
                self.set_provider_fault(job)
            job.triggered_at = time.time()
            job.run_id = self.trigger(job.conf)
            deadline = time.monotonic() + self.args.job_timeout
            job.uuid = self.wait_for(f"the job row of {job.run_id}", lambda: self.job_uuid(job.run_id), 180, 0.5)
            try:
                if job.fault == "cancel":
                    self.cancel(job)
                elif job.fault == "oom":
                    self.oom_kill(job)
                elif job.fault == "spot":
                    self.interrupt(job)
            except Exception as err:  # the run goes on; the outcome shows what happened
                job.problems.append(f"{job.fault} action: {type(err).__name__}: {err}")
            while True:
                state = self.run_state(job.run_id)
                if state in ("success", "failed"):
                    job.run_state = state
                    break
                if time.monotonic() > deadline:
                    job.problems.append(f"not finished within {self.args.job_timeout:.0f} s (run {state})")
                    job.task_timeline = self.timeline(job.run_id)
                    self.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{job.run_id}", json={"state": "failed"})
                    self.wait_for("the timed-out run to end", lambda: self.run_state(job.run_id) == "failed", 120, 2)
                    job.run_state = "timeout"
                    break
                time.sleep(2)
            job.finished_at = time.time()
        except Exception as err:
            job.error = f"{type(err).__name__}: {err}"
            job.problems.append(job.error)
            log(f"{job.label}: {traceback.format_exc()}")
        finally:
            if job.fault in PROVIDER_FAULTS:
                self.clear_provider_fault(job)
            job.finished_at = job.finished_at or time.time()

    def retries(self, job: Job) -> None:
        """Tasks that failed a try (retried, or waiting to be): which, and the error of that try."""
        assert job.run_id
        for ti in job.task_timeline:
            if (ti["try_number"] or 0) > 1 or ti["state"] == "up_for_retry":
                failed_try = (ti["try_number"] or 2) - (0 if ti["state"] == "up_for_retry" else 1)
                error = "?"
                with contextlib.suppress(Exception), self.api_lock:
                    entries = self.cluster.task_log_entries(DAG_ID, job.run_id, ti["task_id"], failed_try)
                    errors = [e for e in entries if isinstance(e, dict) and e.get("level") == "error"]
                    if errors:
                        detail = errors[-1].get("error_detail") or []
                        error = str(errors[-1].get("event"))
                        if detail and isinstance(detail, list) and isinstance(detail[0], dict):
                            error += f": {detail[0].get('exc_type')}: {str(detail[0].get('exc_value'))[:200]}"
                job.retried.append(f"{ti['task_id']} try {failed_try} failed ({error[:300]})")

    def timeline(self, run_id: str) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(Exception):
            for ti in self.task_instances(run_id):
                out.append({k: ti.get(k) for k in ("task_id", "state", "try_number", "start_date", "end_date")})
            out.sort(key=lambda t: TASK_ORDER.index(t["task_id"]) if t["task_id"] in TASK_ORDER else 99)
        return out

    # --- after every job ended -------------------------------------------------------------------

    def settle(self, job: Job) -> None:
        """The job's outcome, rows, instances and timings, read after the run ended."""
        if job.run_id and not job.task_timeline:
            job.task_timeline = self.timeline(job.run_id)
        if job.run_id:
            self.retries(job)
        if not job.uuid:
            job.problems.append("no job row")
            return
        row = self.query(
            "SELECT status, failure_reason, cancelled_by, recovery_count FROM training_jobs WHERE uuid = :u",
            u=job.uuid,
        )[0]
        job.status, job.failure_reason, job.cancelled_by, job.recovery_count = row[0], row[1], row[2], row[3]
        rows = self.epoch_rows(job.uuid)
        distinct = set(rows)
        job.rows, job.distinct_rows = len(rows), len(distinct)
        job.duplicated = len(rows) - len(distinct)
        epochs = {ep for it, ep in distinct if it == 1}
        job.extra = len(distinct) - len(epochs)  # rows of another iteration
        job.max_epoch = max(epochs, default=0)
        job.instances = self.db_instances(job.uuid)
        names = {i["name"] for i in job.instances}
        # What the trainer wrote: its global.json on each of the job's boxes (two after a recovery).
        written: set[int] = set().union(*(self.box_epoch_set(n) for n in names))
        job.written_epochs = len(written)
        words = FAILURE_WORDS.get(job.fault)
        as_expected = job.status == job.expected_status() and (not words or words in (job.failure_reason or ""))
        if job.status == "cancelled":  # the follower stops at the cancel: a prefix 1..k, no gaps
            job.lost = job.max_epoch - len(epochs)
        else:  # every epoch the trainer wrote is stored
            job.lost = len(written - epochs)
        if job.expected_epochs is not None and as_expected:  # and exactly the epochs it had to write
            wanted = set(range(1, job.expected_epochs + 1))
            job.lost = max(job.lost, len(wanted - epochs))
            job.extra += len(epochs - wanted)
        fake = self.rigs[job.cloud].fake
        with fake.lock:
            mine = [i for i in fake.launched() if i.name in names]
            for inst in mine:
                inst.phase(fake.faults)  # settles due terminations
            job.fake_instances = [
                {
                    "id": i.id,
                    "name": i.name,
                    "spot": i.spot,
                    "launched_at": i.launched_at,
                    "terminate_requested_at": i.terminate_requested_at,
                    "gone": i.gone,
                    "outbid": "outbid" in i.extra,
                }
                for i in mine
            ]
            ids = {i.id for i in mine}
            calls = list(getattr(fake, "timed_calls", []))
        # The fake Lambda serves the next provider-fault job only after this one finished.
        t0, t1 = job.triggered_at or 0, (job.finished_at or time.time()) + (0 if job.cloud == "lambda" else 5)
        if job.cloud == "lambda":  # reserved for this job while it ran
            job.fake_calls = [c for c in calls if t0 <= c[0] <= t1]
        else:
            job.fake_calls = [c for c in calls if t0 <= c[0] <= t1 and any(i in c[2] for i in ids)]
        if job.cancel_at is not None:
            times = [
                i["terminate_requested_at"]
                for i in job.fake_instances
                if i["terminate_requested_at"] is not None and i["terminate_requested_at"] >= job.cancel_at - 1
            ]
            if times:
                job.cancel_to_terminated = max(times) - job.cancel_at
        self.judge(job)

    def judge(self, job: Job) -> None:
        want = job.expected_status()
        if job.status != want:
            job.problems.append(f"status {job.status}, expected {want} (reason: {(job.failure_reason or '')[:300]})")
        elif job.fault in FAILURE_WORDS and FAILURE_WORDS[job.fault] not in (job.failure_reason or ""):
            words = FAILURE_WORDS[job.fault]
            job.problems.append(f"failure reason lacks {words!r}: {(job.failure_reason or '')[:300]}")
        if job.fault == "cancel" and job.status == "cancelled":
            by = "airflow" if job.cancel_via == "patch" else "admin"
            if by not in (job.cancelled_by or ""):
                job.problems.append(f"cancelled_by {job.cancelled_by!r}, expected {by!r}")
        if job.fault == "spot" and job.action_done:
            interrupted = [i for i in job.instances if i["interrupted"]]
            if job.recovery_count != 1 or len(interrupted) != 1:
                job.problems.append(f"spot: recovery_count {job.recovery_count}, {len(interrupted)} interrupted")
        if job.fault == "oom" and not job.action_done:
            job.problems.append("oom: the trainer was never killed")
        if job.lost or job.duplicated or job.extra:
            job.problems.append(f"rows: lost {job.lost}, duplicated {job.duplicated}, extra {job.extra}")
        leaked = [i["name"] for i in job.fake_instances if not i["gone"]]
        if leaked:
            job.problems.append(f"instances not terminated at the cloud: {leaked}")
        bad_rows = [f"{i['name']}={i['state']}" for i in job.instances if i["state"] not in ("terminated", "failed")]
        if bad_rows:
            job.problems.append(f"instances rows not terminated/failed: {bad_rows}")


# --- the report ----------------------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def machine() -> str:
    info = concurrency_machine()
    return f"{os.cpu_count()} CPUs, {info.get('cpu', '?')}"


def fake_leaks(rigs: dict[str, Rig]) -> list[str]:
    out = []
    for name, rig in rigs.items():
        fake = rig.fake
        with fake.lock:
            for inst in fake.launched():
                phase = inst.phase(fake.faults)
                if not inst.gone:
                    out.append(f"{name}:{inst.name or inst.id} ({phase})")
    return out


def scheduler_mismatches(path: Path) -> dict[str, list[str]]:
    """Per run id, the scheduler's "task state changed externally" errors (it then fails the TI)."""
    out: dict[str, list[str]] = {}
    needle = "reported that the task instance <TaskInstance: "
    with contextlib.suppress(OSError), path.open(errors="replace") as fh:
        for line in fh:
            if needle in line:
                ti = line.split(needle, 1)[1].split(" ti_id=")[0]
                parts = ti.split()
                if len(parts) >= 2:
                    out.setdefault(parts[1], []).append(
                        f"{line[:27]} executor reported {ti} finished: "
                        + (
                            line.split("finished with state ", 1)[1].split(". Learn more")[0]
                            if "finished with state " in line
                            else "?"
                        )
                    )
    return out


def report(soak: Soak, jobs: list[Job], timings: dict[str, float], failure: str | None) -> tuple[bool, dict[str, Any]]:
    rigs = soak.rigs
    leaks = fake_leaks(rigs)
    db_rows = soak.query("SELECT name, state FROM instances WHERE state NOT IN ('terminated', 'failed')")
    db_leaks = [f"{n}={s}" for n, s in db_rows]
    lost = sum(j.lost for j in jobs)
    dup = sum(j.duplicated for j in jobs)
    extra = sum(j.extra for j in jobs)
    c2t = [j.cancel_to_terminated for j in jobs if j.cancel_to_terminated is not None]
    print("\n" + "=" * 100)
    print(f"gpu_training soak benchmark ({datetime.now().isoformat(timespec='seconds')}), {machine()}")
    print(
        f"jobs {len(jobs)}, seed {soak.args.seed}, concurrency {soak.args.concurrency}; "
        "provider faults on the fake Lambda, one at a time; everything else on the fake Vast"
    )
    print("=" * 100)
    print(
        f"{'job':<26} {'cloud':<6} {'final':<10} {'expected':<10} {'ok':<3} "
        f"{'rows':>5} {'wrote':>5} {'want':>5} {'secs':>5}  notes"
    )
    for j in jobs:
        notes = []
        if j.fault in PROVIDER_FAULTS:
            notes.append("fired" if j.fault_fired else "NOT FIRED")
        if j.cancel_at is not None:
            c2t_s = f"{j.cancel_to_terminated:.1f} s" if j.cancel_to_terminated is not None else "nothing launched"
            notes.append(f"after {j.cancel_delay:g} s at [{j.cancel_stage}] -> terminate {c2t_s}")
        if j.fault == "spot":
            notes.append(f"interrupted after {j.interrupt_after} epochs, recoveries {j.recovery_count}")
        if j.fault in FAILURE_WORDS and j.failure_reason:
            notes.append(j.failure_reason.split(";")[0][:60])
        notes += [p for p in j.problems if not p.startswith("fault ")]
        notes += [f"retried: {r}" for r in j.retried]
        want = str(j.expected_epochs) if j.expected_epochs is not None else "pfx"
        secs = (j.finished_at or 0) - (j.triggered_at or 0)
        ok = "yes" if not j.problems else "NO"
        print(
            f"{j.label:<26} {j.cloud:<6} {j.status!s:<10} {j.expected_status():<10} {ok:<3} "
            f"{j.distinct_rows:>5} {j.written_epochs:>5} {want:>5} {secs:>5.0f}  {'; '.join(notes)}"
        )
    print("-" * 100)
    by_fault: dict[str, Counter[str]] = {}
    for j in jobs:
        by_fault.setdefault(j.fault, Counter())[f"{j.status}{'' if not j.problems else '!'}"] += 1
    print(
        "by fault (final status; ! = not as expected): "
        + ", ".join(f"{f} {dict(c)}" for f, c in sorted(by_fault.items(), key=lambda kv: FAULTS.index(kv[0])))
    )
    wrong = [j for j in jobs if j.problems]
    mismatches = scheduler_mismatches(soak.cluster.logs / "scheduler.log")
    rows = [
        ("jobs as expected", f"{len(jobs) - len(wrong)} / {len(jobs)}"),
        ("LEAKED instances at the fakes (goal 0)", f"{len(leaks)}" + (f": {leaks}" if leaks else "")),
        ("instances rows not terminated/failed (goal 0)", f"{len(db_leaks)}" + (f": {db_leaks}" if db_leaks else "")),
        ("LOST epoch rows (goal 0)", str(lost)),
        ("DUPLICATED epoch rows (goal 0)", str(dup)),
        ("unexpected epoch rows (goal 0)", str(extra)),
        (
            "cancel -> terminated p50 / p95 / max",
            f"{pct(c2t, 50):.1f} / {pct(c2t, 95):.1f} / {max(c2t, default=float('nan')):.1f} s "
            f"({len(c2t)} cancels that had an instance; goal p95 <= {CANCEL_TO_TERMINATED_GOAL:g} s)",
        ),
        ("instances launched (lambda / vast)", " / ".join(str(len(r.fake.launched())) for r in rigs.values())),
        ("cluster start", f"{timings.get('startup', float('nan')):.1f} s"),
        ("first trigger -> last job finished", f"{timings.get('finished', 0) - timings.get('triggered', 0):.1f} s"),
        ("TOTAL wall time", f"{timings['end'] - timings['begin']:.1f} s"),
    ]
    if failure:
        rows.insert(0, ("ABORTED", failure.splitlines()[0][:300]))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    for j in wrong:
        print(f"\n--- {j.label} ({j.cloud}, run {j.run_id}, job {j.uuid}): " + " | ".join(j.problems))
        print(f"    reason: {(j.failure_reason or '')[:400]!r}")
        t0 = j.triggered_at or 0
        for line in mismatches.get(j.run_id or "", []):
            print(f"    scheduler: {line}")
        for ti in j.task_timeline:
            print(
                f"    task {ti['task_id']:<17} {ti['state']!s:<16} try {ti['try_number']} "
                f"{ti['start_date']} -> {ti['end_date']}"
            )
        for inst in j.instances:
            print(f"    instances row {inst}")
        for inst in j.fake_instances:
            rel = {k: (round(v - t0, 1) if isinstance(v, float) and k.endswith("_at") else v) for k, v in inst.items()}
            print(f"    fake instance (t from trigger) {rel}")
        for t, method, path, status in j.fake_calls[:60]:
            print(f"    fake call +{t - t0:6.1f} s {method} {path} -> {status}")
    ok = (
        failure is None
        and not wrong
        and not leaks
        and not db_leaks
        and lost == 0
        and dup == 0
        and extra == 0
        and (not c2t or pct(c2t, 95) <= CANCEL_TO_TERMINATED_GOAL)
    )
    print(f"\nRESULT: {'all goals met' if ok else 'GOALS MISSED'}")
    return ok, {"jobs": [asdict(j) for j in jobs], "leaks": leaks, "db_leaks": db_leaks, "timings": timings}


# --- main ----------------------------------------------------------------------------------------


def dispatch(soak: Soak, jobs: list[Job], concurrency: int) -> None:
    """Run the jobs ``concurrency`` at a time; provider-fault jobs (the fake Lambda) one at a time."""
    pending = list(jobs)
    running: dict[threading.Thread, Job] = {}
    lambda_busy = False
    done = 0
    last_print = 0.0
    while pending or running:
        for thread, job in list(running.items()):
            if not thread.is_alive():
                del running[thread]
                done += 1
                lambda_busy = lambda_busy and job.cloud != "lambda"
                took = (job.finished_at or 0) - (job.triggered_at or 0)
                log(f"{job.label} finished: run {job.run_state} after {took:.0f} s ({done}/{len(jobs)})")
        while pending and len(running) < concurrency:
            # The fake Lambda's job first when it is free (the serial chain is the long pole).
            pick = next((j for j in pending if j.cloud == "lambda"), None) if not lambda_busy else None
            pick = pick or next((j for j in pending if j.cloud != "lambda"), None)
            if pick is None:
                break
            pending.remove(pick)
            lambda_busy = lambda_busy or pick.cloud == "lambda"
            thread = threading.Thread(target=soak.run_job, args=(pick,), name=f"job-{pick.index}", daemon=True)
            thread.start()
            running[thread] = pick
            log(f"{pick.label} started on {pick.cloud}")
        soak.cluster.check_alive()
        if time.monotonic() - last_print > 30:
            log(f"{done}/{len(jobs)} done, {len(running)} running, {len(pending)} waiting")
            last_print = time.monotonic()
        time.sleep(0.5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--concurrency", type=int, default=8, help="jobs running at once")
    parser.add_argument("--parallelism", type=int, default=16, help="[core] parallelism (LocalExecutor workers)")
    parser.add_argument("--job-timeout", type=float, default=360, help="seconds a job may take")
    parser.add_argument("--home", type=Path, help="working directory (default: a temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--json", type=Path, help="also write every job's details here")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    if os.geteuid() != 0:
        parser.error("needs root: the test sshd takes root logins by key (tests/sshd.py)")

    timings: dict[str, float] = {"begin": time.time()}
    work = args.home or Path(tempfile.mkdtemp(prefix="bench-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    boxes = work / "boxes"
    postgres: PostgresServer | None = None
    sshd = None
    rigs: dict[str, Rig] = {}
    cluster: AirflowCluster | None = None
    failure: str | None = None
    try:
        postgres = start_postgres(Path(tempfile.mkdtemp(prefix="bench-soak-postgres-")))
        sshd = start_sshd(work / "sshd")
        for name in ("lambda", "vast"):
            rigs[name] = STARTERS[name](sshd, boxes)
        for rig in rigs.values():
            rig.fake.faults.boot_seconds = 2.0
        vast = rigs["vast"].fake
        for n in range(40):
            vast.asks.append(_ask(5000 + n, "A100 SXM4", 1, round(1.30 + 0.01 * n, 2), round(0.75 + 0.01 * n, 2), "US"))
        env: dict[str, str] = {}
        for rig in rigs.values():
            env.update(rig.env)
        cluster = AirflowCluster(
            work / "airflow", parallelism=args.parallelism, sql_alchemy_conn=postgres.url(), users=USERS, extra_env=env
        )
        timings["startup"] = cluster.start()
        cluster.wait_dag_parsed(DAG_ID)
        with contextlib.suppress(ClusterError):  # no reaper: it must neither eat a fault nor hide a leak
            cluster.wait_dag_parsed(REAPER_DAG_ID, timeout=60)
        cluster.api("PATCH", f"/dags/{REAPER_DAG_ID}", json={"is_paused": True})
        soak = Soak(args, cluster, rigs, boxes)
        jobs = plan(args.jobs, random.Random(args.seed), rigs["lambda"].gpu, rigs["vast"].gpu)
        log(f"seed {args.seed}: " + ", ".join(j.label for j in jobs))
        timings["triggered"] = time.time()
        try:
            dispatch(soak, jobs, args.concurrency)
        except ClusterError as err:
            failure = str(err)
            log(f"ABORTED: {failure[:4000]}")
        timings["finished"] = time.time()
        time.sleep(3)  # terminations due by now settle
        for job in jobs:
            try:
                soak.settle(job)
            except Exception as err:
                job.problems.append(f"settle: {type(err).__name__}: {err}")
        timings["end"] = time.time()
        ok, data = report(soak, jobs, timings, failure)
        if args.json:
            args.json.write_text(json.dumps(data, indent=2, default=str))
        soak.results.dispose()
        return 0 if ok else 1
    finally:
        if cluster is not None:
            cluster.stop()
        for rig in rigs.values():
            with contextlib.suppress(Exception):
                rig.stop()
        if sshd is not None:
            sshd.stop()
        if postgres is not None:
            postgres.stop()
            shutil.rmtree(postgres.data_dir.parent, ignore_errors=True)
        if args.keep or args.home:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
