"""The fault matrix: every stage of a job x every fault, one whole job per cell, in-process.

Each cell runs the ``gpu_training`` DAG's own operators (built by ``dags/gpu_training.py``) through
:func:`run_job`, a small driver with Airflow's semantics: tasks in order, a failed upstream makes
the ordinary tasks ``upstream_failed``, a retryable error is retried up to the operator's
``retries``, a ``NOT_RETRYABLE`` one fails at once, ``upload_outputs``, ``teardown`` and
``finalize`` run whatever happened (``all_done``), deferrals are resumed by running their trigger
here (the boot wait's poll interval, and ``GlobalJsonTrigger``, i.e. the follower, against the test
sshd). The cloud is a fake cloud (``tests/fakeclouds``) whose instances are boxes on the test sshd;
for the Lambda cells SSH goes through a :class:`~tests.tcp_proxy.TcpProxy` that cuts it.

Every cell ends with the fake cloud's own record showing every instance it launched terminated,
every instance row terminated (or failed, never launched), and the job's status and reason.

Rows are the stages, columns the faults; each cell says how the job must end: ``C`` completed,
``F`` failed (its reason naming the cause), ``X`` cancelled, ``-`` N/A; cells marked ``*`` or ``+``
run on all four clouds with ``FAULT_MATRIX_ALL_CLOUDS=1`` (by default, as in CI, on Lambda), the
rest on Lambda::

    stage        | 500 | 429 | half | lie | ssh | cut | crash | oom | stall | json! | json? | cancel
    -------------+-----+-----+------+-----+-----+-----+-------+-----+-------+-------+-------+-------
    queued       |  -  |  -  |  -   |  -  |  -  |  -  |   -   |  -  |   -   |   -   |   -   |   X
    offer        |  F* |  F* |  -   |  F* |  -  |  -  |   -   |  -  |   -   |   -   |   -   |   X
    launching    |  F* |  F* |  C+  |  C+ |  -  |  -  |   -   |  -  |   -   |   -   |   -   |   X
    booting      |  F  |  F  |  -   |  -  |  C  |  -  |   -   |  -  |   -   |   -   |   -   |   X
    transferring |  F  |  F  |  -   |  -  |  C  |  C  |   -   |  -  |   -   |   -   |   -   |   X
    training     |  C  |  F  |  -   |  -  |  C  |  -  |   F   |  F  |   F   |   C   |   F   |   X
    uploading    |  F  |  F  |  -   |  -  |  C  |  C  |   -   |  -  |   -   |   -   |   -   |   C
    teardown     |  C+ |  C+ |  -   |  -  |  -  |  -  |   -   |  -  |   -   |   -   |   -   |   -

Faults: ``500`` the cloud API answers HTTP 500 (EC2: ``InternalError``) to the stage's calls (at
launching: to launches only) through all of its step's tries, and is back before the next step;
while training it is down only once the trainer runs (following needs SSH alone: the job completes);
at teardown only the first terminate calls fail (``Faults.terminate_fail``). ``429`` the same with
rate limiting (``Faults.rate_limit``; EC2 answers 503 ``RequestLimitExceeded``); while training it
strikes ``start_trainer``. ``half`` a launch that creates the instance, then answers 500
(``Faults.error_after_create``): adopted by its name. ``lie`` offers listed with capacity whose
launch is refused (``Faults.refuse_launch``): one refusal at launching (the next offer runs), every
offer at the offer stage. ``ssh`` SSH refused through the proxy: for 2 s of the boot wait, for the
first try of transfer and upload, for 2 s of following. ``cut`` the connection reset with a 24 MiB
file a quarter through (dataset in, model out): the retry resumes / fetches again. ``crash`` /
``oom`` / ``stall``: the trainer exits 3, is SIGKILLed (137), or stops writing (the trainer is
stopped). ``json!`` malformed lines in ``global.json`` (recorded, skipped). ``json?`` the trainer
exits 0 without writing ``global.json``. ``cancel`` ``store.request_cancel`` while the stage runs;
once training reached PROJECT end the job is completed and a cancel is refused (uploading). One
more training cell, ``cancel stop refused``: the cancel's first stop of the trainer finds SSH
down, and the stop is tried again (where the trainer must be stopped, the cells check it is by the
time ``sense_progress`` ended, on the cell's own box).

Why the N/A cells are N/A: ``queued`` makes no cloud or SSH call (``register_job``/``build_config``
only validate and render), so only a cancel means something there; a half-created instance and a
capacity lie exist only where an instance is launched (a replacement launch while booting is
``test_cloud_jobs``' unhealthy/vanish case); no SSH before an instance exists, and once it is
terminated none after; "transfer cut" needs a file in flight (inputs, outputs); the trainer runs
only while training, so crash / OOM / stall / ``global.json`` faults elsewhere are meaningless (OOM
while launching); a cancel after teardown began changes nothing (``test_cancel``).

Worker SIGKILL and triggerer restart need a real deployment: they are the matrix's cluster cells in
``tests/e2e/cluster/test_airflow_cluster.py`` (``test_triggerer_killed_mid_job_loses_and_duplicates_nothing``,
``test_scheduler_and_workers_killed_after_deferral``), not repeated here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from airflow.sdk import TriggerRule
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred
from sqlalchemy import func, select

from gpu_training import follow, lifecycle
from gpu_training.hosts.ssh import SshHost
from gpu_training.job import following as job_following
from gpu_training.job import teardown as job_teardown
from gpu_training.job import terminate as job_terminate
from gpu_training.providers.registry import CLOUD_CONNECTIONS
from gpu_training.results.models import Artifact, EpochTrain, IngestError
from gpu_training.results.store import ResultsStore
from gpu_training.taskgroup import STEP_TASK_IDS
from tests.fakeclouds.base import Reply
from tests.fakeclouds.boxes import box_processes, kill_box
from tests.fakeclouds.rigs import STARTERS, Rig
from tests.tcp_proxy import TcpProxy

REPO = Path(__file__).resolve().parents[1]
SCRIPTED = str(REPO / "tests" / "fixtures" / "scripted_trainer.py")
DAG_ID = "gpu_training"
ALL_CLOUDS = ("lambda", "runpod", "vast", "ec2")
#: Cells that run a whole job after the cloud's fault run on Lambda only unless this is set: each
#: such job costs ~10 s, and test_cloud_jobs already covers each cloud's own fault handling.
#: ``FAULT_MATRIX_ALL_CLOUDS=1`` runs the cells marked ``*`` and ``+`` on every cloud; by default on
#: Lambda only (each cloud's own handling of these faults is tests/test_cloud_jobs.py's), which keeps
#: the suite inside its time budget.
EVERY_CLOUD = os.environ.get("FAULT_MATRIX_ALL_CLOUDS") == "1"
PROVIDER_FAULT_CLOUDS = ALL_CLOUDS if EVERY_CLOUD else ("lambda",)
WHOLE_JOB_CLOUDS = PROVIDER_FAULT_CLOUDS
#: Short cloud API retries (the policy is the same): a failing call gives up in about a second.
QUICK_API = {"retry_attempts": 3, "retry_initial_seconds": 0.05, "retry_max_wait_seconds": 0.3}
#: A whole task may not take longer than this here (a hang is a failure, not a stuck suite).
TASK_DEADLINE_SECONDS = 120
BIG = 24 * 1024 * 1024  # a file big enough to be cut in flight


# --- the driver ------------------------------------------------------------------------------------


def load_dag_tasks() -> dict[str, Any]:
    """The deployed DAG's tasks (its file, parsed as the dag processor does): real retries and rules."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(REPO / "dags" / "gpu_training.py"))
    assert not bag.import_errors, bag.import_errors
    return dict(bag.dags[DAG_ID].task_dict)


@dataclasses.dataclass
class FakeTI:
    """What the operators read of their task instance."""

    dag_id: str
    run_id: str
    try_number: int
    max_tries: int
    states: dict[str, str]
    map_index: int = -1

    def get_task_states(
        self, *, dag_id: str, run_ids: list[str], task_ids: list[str], map_index: int | None = None
    ) -> dict[str, dict[str, str]]:
        return {self.run_id: {t: self.states[t] for t in task_ids if t in self.states}}


@dataclasses.dataclass
class Run:
    """How a driven run went: each task's final state, tries and last error."""

    job_uuid: str
    states: dict[str, str]
    tries: dict[str, int]
    errors: dict[str, str]


#: Called as hook(task_id, try_number) before each try of a task.
Hook = Callable[[str, int], None]


def fire(trigger: Any, timeout: float) -> Any:
    """Run a trigger as the triggerer would, until its first event."""

    async def first() -> Any:
        async for event in trigger.run():
            return event.payload
        raise AssertionError(f"{type(trigger).__name__} ended without an event")

    return asyncio.run(asyncio.wait_for(first(), timeout))


def execute(op: Any, context: dict[str, Any]) -> Any:
    """``execute``, then every deferral resumed with its trigger's event, as Airflow does."""
    deadline = time.monotonic() + TASK_DEADLINE_SECONDS
    call: Callable[[], Any] = lambda: op.execute(context)  # noqa: E731
    while True:
        try:
            return call()
        except TaskDeferred as deferred:
            left = deadline - time.monotonic()
            assert left > 0, f"{op.task_id} kept deferring for {TASK_DEADLINE_SECONDS} s"
            event = fire(deferred.trigger, left)
            method = getattr(op, deferred.method_name)
            call = lambda method=method, event=event: method(context, event)  # noqa: E731


def run_job(tasks: dict[str, Any], run_id: str, params: dict[str, Any], hooks: list[Hook]) -> Run:
    """One dag run of the training job, task by task, with Airflow's trigger rules and retries."""
    states: dict[str, str] = {}
    tries: dict[str, int] = {}
    errors: dict[str, str] = {}
    job_uuid = ""
    for task_id in STEP_TASK_IDS:
        op = tasks[task_id]
        upstream = [states[u] for u in op.upstream_task_ids]
        if op.trigger_rule == TriggerRule.ALL_SUCCESS and any(s != "success" for s in upstream):
            states[task_id] = "upstream_failed"
            continue
        for try_number in range(1, op.retries + 2):
            tries[task_id] = try_number
            for hook in hooks:
                hook(task_id, try_number)
            ti = FakeTI(DAG_ID, run_id, try_number, op.retries, states)
            try:
                value = execute(op, {"ti": ti, "params": dict(params)})
            except AirflowFailException as err:
                states[task_id], errors[task_id] = "failed", str(err)
                break
            except Exception as err:
                errors[task_id] = f"{type(err).__name__}: {err}"
                if try_number > op.retries:
                    states[task_id] = "failed"
                continue
            states[task_id] = "success"
            if task_id == "register_job":
                job_uuid = value
            break
    return Run(job_uuid, states, tries, errors)


# --- the world of one cell -------------------------------------------------------------------------


def call_name(method: str, raw_path: str, raw: bytes) -> str:
    """``METHOD /path`` of a fake cloud request (EC2: ``POST Action``)."""
    from urllib.parse import parse_qs, urlsplit

    action = parse_qs(raw.decode(errors="replace")).get("Action") if raw else None
    return f"{method} {action[0] if action else urlsplit(raw_path).path}"


#: The request that launches an instance, per cloud.
LAUNCH_CALL = {
    "lambda": "POST /api/v1/instance-operations/launch",
    "runpod": "POST /v2/pods",
    "vast": "PUT /api/v0/asks/",
    "ec2": "POST RunInstances",
}


def is_launch(cloud: str, call: str) -> bool:
    return call.startswith(LAUNCH_CALL[cloud])


def server_error(rig: Rig) -> Reply:
    """The cloud's own answer to an internal error."""
    if rig.name == "ec2":
        return rig.fake._error(500, "InternalError", "An internal error has occurred")  # type: ignore[no-any-return]
    if rig.name == "lambda":
        from tests.fakeclouds.lambda_cloud import unknown

        return unknown()
    if rig.name == "runpod":
        from tests.fakeclouds.runpod import problem

        return problem(500, "Internal Server Error", "upstream request failed")  # type: ignore[no-any-return]
    from tests.fakeclouds.vast import fail

    return fail(500, "server_error", "Internal server error, please try again later.")  # type: ignore[no-any-return]


def rate_limited(rig: Rig) -> Reply:
    """What the cloud answers when it rate limits (what ``Faults.rate_limit`` answers)."""
    if rig.name == "ec2":
        reply: Reply = rig.fake._error(503, "RequestLimitExceeded", "Request limit exceeded.")
        reply.headers["x-amz-retry-after"] = "50"
        return reply
    return rig.fake.rate_limited()  # type: ignore[no-any-return]


@dataclasses.dataclass
class Cloud:
    rig: Rig
    root: Path  # the work root of its instances on the test sshd
    env: dict[str, str]
    proxy: TcpProxy | None


class World:
    """One cell: the cloud, the store, the SSH proxy (Lambda), the job's params and fault hooks."""

    def __init__(self, cloud: Cloud, store: ResultsStore, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.rig = cloud.rig
        self.root = cloud.root
        self.proxy = cloud.proxy
        self.store = store
        self.tmp = tmp
        self.monkeypatch = monkeypatch  # undone after the cell
        self.run_id = f"manual__faults_{uuid.uuid4().hex[:12]}"
        self.hooks: list[Hook] = []
        self.threads: list[threading.Thread] = []
        self.thread_errors: list[str] = []  # a fault thread that failed: the fault did not happen
        self.stop = threading.Event()
        self.cancels: list[bool] = []  # what each request_cancel answered
        self.outage: Callable[[str], Reply | None] | None = None  # the fault on the cloud's API
        self.params: dict[str, Any] = {
            "project_id": "faultmatrix",
            "provider": self.rig.name,
            "gpu": self.rig.gpu,
            "command": trainer("ok", 2),
            "poll_interval_seconds": 0.5,
            "stall_timeout_minutes": 1,
            "unreachable_timeout_minutes": 0.5,
        }

    # hooks
    def before(self, task_id: str, action: Callable[[int], None]) -> None:
        """``action(try_number)`` before each try of ``task_id``."""
        self.hooks.append(lambda t, n: action(n) if t == task_id else None)

    def while_running(self, task_id: str, action: Callable[[], None]) -> None:
        """Run ``action`` in a thread that starts with the first try of ``task_id``."""

        def guarded() -> None:
            try:
                action()
            except BaseException as err:
                self.thread_errors.append(f"{task_id}: {type(err).__name__}: {err}")

        def start(n: int) -> None:
            if n == 1:
                thread = threading.Thread(target=guarded, daemon=True)
                thread.start()
                self.threads.append(thread)

        self.before(task_id, start)

    def during(self, task_ids: tuple[str, ...], arm: Callable[[], None], disarm: Callable[[], None]) -> None:
        """A fault on from the first try of the first task until any later task starts."""
        order = list(STEP_TASK_IDS)
        last = order.index(task_ids[-1])
        state = {"armed": False}

        def hook(task_id: str, n: int) -> None:
            if task_id == task_ids[0] and n == 1:
                arm()
                state["armed"] = True
            elif state["armed"] and order.index(task_id) > last:
                disarm()
                state["armed"] = False

        self.hooks.append(hook)

    def api_outage(self, task_ids: tuple[str, ...], reply: Callable[[], Reply], *, launch_only: bool = False) -> None:
        """The cloud answers ``reply()`` to every call (or every launch) while these steps run."""

        def fault(call: str) -> Reply | None:
            return reply() if not launch_only or is_launch(self.rig.name, call) else None

        self.during(task_ids, lambda: setattr(self, "outage", fault), lambda: setattr(self, "outage", None))

    def cancel(self) -> None:
        self.cancels.append(self.store.request_cancel(self.job(), by="alice"))

    def job(self) -> str:
        """The job's uuid (once ``register_job`` ran)."""
        job_uuid = self.store.job_uuid_for_run(DAG_ID, self.run_id, -1)
        assert job_uuid is not None, "the job is not registered yet"
        return job_uuid

    def workdir(self) -> Path:
        """The work directory of the job's current instance on the test sshd."""
        return self.root / lifecycle.current_instance(self.store, self.job()).name

    def epochs_stored(self) -> int:
        with self.store.session() as s:
            return int(s.scalar(select(func.count()).select_from(EpochTrain)) or 0)

    def wait_for(self, check: Callable[[], bool], timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while not self.stop.is_set() and time.monotonic() < deadline:
            if check():
                return True
            time.sleep(0.01)
        return False

    def cut_when_bigger(self, path: Callable[[], Path], size: int, then: Callable[[], None]) -> Callable[[], None]:
        """A thread body: once ``path()`` holds ``size`` bytes, ``then()``."""

        def body() -> None:
            def big() -> bool:
                with contextlib.suppress(Exception):
                    return path().stat().st_size >= size
                return False

            assert self.wait_for(big), f"{path()} never reached {size} bytes"
            then()

        return body


def trainer(mode: str, *args: Any) -> list[str]:
    return ["{python}", SCRIPTED, mode, *(str(a) for a in args)]


def shell(script: str) -> list[str]:
    """A trainer command in bash; ``$0`` is the instance's Python, ``$1`` the scripted trainer."""
    return ["bash", "-c", script, "{python}", SCRIPTED]


# --- the cells -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Expect:
    status: str  # completed, failed, cancelled
    reason: tuple[str, ...] = ()  # each must be in the failure reason
    check: Callable[[World, Run], None] | None = None
    #: Parts the failure reason lacks because of the cell's known bug (checked last).
    reason_after_fix: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Cell:
    stage: str
    fault: str
    arrange: Callable[[World], Expect]
    clouds: tuple[str, ...] = ("lambda",)
    bug: str = ""  # a known bug: the cell is xfail(strict) with this reason


CELLS: list[Cell] = []


def cell(stage: str, fault: str, *, clouds: tuple[str, ...] = ("lambda",), bug: str = "") -> Callable[..., Any]:
    def register(arrange: Callable[[World], Expect]) -> Callable[[World], Expect]:
        CELLS.append(Cell(stage, fault, arrange, clouds, bug))
        return arrange

    return register


def http_code(w: World, code: int) -> str:
    if w.rig.name == "ec2":
        return {500: "InternalError", 429: "RequestLimitExceeded"}[code]
    return f"HTTP {code}"


def tried(task_id: str, times: int) -> Callable[[World, Run], None]:
    def check(w: World, run: Run) -> None:
        assert run.tries.get(task_id) == times, (run.tries, run.errors)

    return check


def succeeded(*task_ids: str) -> Callable[[World, Run], None]:
    def check(w: World, run: Run) -> None:
        for task_id in task_ids:
            assert run.states[task_id] == "success", (task_id, run.states, run.errors)

    return check


def all_of(*checks: Callable[[World, Run], None]) -> Callable[[World, Run], None]:
    def check(w: World, run: Run) -> None:
        for c in checks:
            c(w, run)

    return check


def artifacts(*names: str) -> Callable[[World, Run], None]:
    def check(w: World, run: Run) -> None:
        job_id = w.store.job(run.job_uuid).id
        with w.store.session() as s:
            have = set(s.scalars(select(Artifact.name).where(Artifact.job_id == job_id)))
        assert set(names) <= have, have

    return check


def never_launched(w: World, run: Run) -> None:
    assert w.rig.fake.launched() == [], "nothing may be launched"


def trainer_stopped(w: World) -> Callable[[World, Run], None]:
    """The job itself stopped the trainer: none of its processes runs once ``sense_progress`` is
    over. Looked at when ``upload_outputs`` starts, as teardown's termination kills them anyway."""
    left: list[str] = []

    def look(n: int) -> None:
        if n == 1:
            w.wait_for(lambda: not trainer_processes(w), timeout=5)  # a SIGKILL takes a moment
            left.extend(trainer_processes(w))

    w.before("upload_outputs", look)

    def check(w: World, run: Run) -> None:
        assert not left, f"the trainer was left running after sense_progress: {left}"

    return check


# provider 500 and 429: the cloud's API is down for the calls of one stage.


@cell("offer", "500", clouds=PROVIDER_FAULT_CLOUDS)
def offer_500(w: World) -> Expect:
    w.api_outage(("provision",), lambda: server_error(w.rig))
    return Expect("failed", ("provision:", http_code(w, 500)), all_of(never_launched, tried("provision", 3)))


@cell("offer", "429", clouds=PROVIDER_FAULT_CLOUDS)
def offer_429(w: World) -> Expect:
    w.rig.fake.faults.retry_after = 0.05
    faults = w.rig.fake.faults
    w.during(("provision",), lambda: setattr(faults, "rate_limit", 10**9), lambda: setattr(faults, "rate_limit", 0))
    return Expect("failed", ("provision:", http_code(w, 429)), all_of(never_launched, tried("provision", 3)))


@cell("launching", "500", clouds=PROVIDER_FAULT_CLOUDS)
def launching_500(w: World) -> Expect:
    w.api_outage(("provision",), lambda: server_error(w.rig), launch_only=True)
    return Expect("failed", ("provision:", http_code(w, 500)), all_of(never_launched, tried("provision", 3)))


@cell("launching", "429", clouds=PROVIDER_FAULT_CLOUDS)
def launching_429(w: World) -> Expect:
    w.api_outage(("provision",), lambda: rate_limited(w.rig), launch_only=True)
    return Expect("failed", ("provision:", http_code(w, 429)), all_of(never_launched, tried("provision", 3)))


@cell("launching", "half-created", clouds=WHOLE_JOB_CLOUDS)
def launching_half_created(w: World) -> Expect:
    w.rig.fake.faults.error_after_create = 1

    def adopted(w: World, run: Run) -> None:
        assert len(w.rig.fake.launched()) == 1, "the half-created instance is adopted, not launched again"
        assert [r.state for r in w.store.instances_for_job(run.job_uuid)] == ["terminated"]

    return Expect("completed", check=adopted)


@cell("launching", "capacity lie", clouds=WHOLE_JOB_CLOUDS)
def launching_capacity_lie(w: World) -> Expect:
    w.rig.fake.faults.refuse_launch = 1

    def failed_over(w: World, run: Run) -> None:
        rows = w.store.instances_for_job(run.job_uuid)
        assert [r.state for r in rows] == ["failed", "terminated"]
        assert "no capacity" in (rows[0].state_reason or "")

    return Expect("completed", check=failed_over)


@cell("offer", "capacity lie", clouds=PROVIDER_FAULT_CLOUDS)
def offer_capacity_lie(w: World) -> Expect:
    w.rig.fake.faults.refuse_launch = 100  # every listed offer is refused
    w.params["max_launch_attempts"] = 3
    return Expect("failed", ("provision:", "no capacity"), all_of(never_launched, tried("provision", 3)))


@cell("booting", "500")
def booting_500(w: World) -> Expect:
    w.api_outage(("wait_until_ready",), lambda: server_error(w.rig))
    return Expect("failed", ("wait_until_ready:", http_code(w, 500)))


@cell("booting", "429")
def booting_429(w: World) -> Expect:
    w.api_outage(("wait_until_ready",), lambda: rate_limited(w.rig))
    return Expect("failed", ("wait_until_ready:", http_code(w, 429)))


@cell("transferring", "500")
def transferring_500(w: World) -> Expect:
    w.api_outage(("transfer_inputs",), lambda: server_error(w.rig))
    return Expect("failed", ("transfer_inputs:", http_code(w, 500)), tried("transfer_inputs", 3))


@cell("transferring", "429")
def transferring_429(w: World) -> Expect:
    w.api_outage(("transfer_inputs",), lambda: rate_limited(w.rig))
    return Expect("failed", ("transfer_inputs:", http_code(w, 429)), tried("transfer_inputs", 3))


@cell("training", "500")
def training_500(w: World) -> Expect:
    """The API is down while the model trains: following needs SSH only, the job goes on.

    The trainer holds at epoch 1 until the outage is on (a ``gate``, as in ``training_ssh_drop``):
    with a free-running trainer a late follower could end before the outage began, which then
    outlived its disarm and failed teardown's terminate until the cell timed out."""
    release = w.tmp / "release-trainer"
    w.params["command"] = trainer("gate", 4, release, 0.2)

    def outage_while_training() -> None:
        try:
            assert w.wait_for(lambda: w.epochs_stored() >= 1), "the follower never stored epoch 1"
            w.outage = lambda call: server_error(w.rig)
            time.sleep(1)  # the follower polls through it (SSH only) before the trainer goes on
        finally:
            release.touch()

    w.while_running("sense_progress", outage_while_training)
    w.during(("sense_progress",), lambda: None, lambda: setattr(w, "outage", None))

    def every_epoch(w: World, run: Run) -> None:
        assert w.epochs_stored() == 4

    return Expect("completed", check=all_of(succeeded("upload_outputs"), tried("sense_progress", 1), every_epoch))


@cell("training", "429")
def training_429(w: World) -> Expect:
    """The trainer is started while the API rate limits: start_trainer fails on both tries."""
    w.api_outage(("start_trainer",), lambda: rate_limited(w.rig))
    return Expect("failed", ("start_trainer:", http_code(w, 429)), tried("start_trainer", 2))


@cell("uploading", "500")
def uploading_500(w: World) -> Expect:
    w.api_outage(("upload_outputs",), lambda: server_error(w.rig))
    return Expect("failed", ("upload_outputs:", http_code(w, 500)), tried("upload_outputs", 3))


@cell("uploading", "429")
def uploading_429(w: World) -> Expect:
    w.api_outage(("upload_outputs",), lambda: rate_limited(w.rig))
    return Expect("failed", ("upload_outputs:", http_code(w, 429)), tried("upload_outputs", 3))


@cell("teardown", "500", clouds=WHOLE_JOB_CLOUDS)
def teardown_500(w: World) -> Expect:
    """The first terminate calls fail: teardown keeps at it until the cloud shows it gone."""
    w.before("teardown", lambda n: setattr(w.rig.fake.faults, "terminate_fail", 2) if n == 1 else None)
    return Expect("completed", check=tried("teardown", 1))


@cell("teardown", "429", clouds=WHOLE_JOB_CLOUDS)
def teardown_429(w: World) -> Expect:
    w.rig.fake.faults.retry_after = 0.05
    w.before("teardown", lambda n: setattr(w.rig.fake.faults, "rate_limit", 2) if n == 1 else None)
    return Expect("completed", check=tried("teardown", 1))


# SSH drops and cut transfers (Lambda: its SSH connection goes through the proxy).


def refuse_ssh_first_try(w: World, task_id: str) -> None:
    assert w.proxy is not None
    proxy = w.proxy
    w.before(task_id, lambda n: proxy.cut(refuse=True) if n == 1 else proxy.restore())


@cell("booting", "ssh drop")
def booting_ssh_drop(w: World) -> Expect:
    """The instance runs but SSH is refused for a while: the boot wait keeps polling."""
    assert w.proxy is not None
    proxy = w.proxy

    def refuse_for_a_while() -> None:
        proxy.cut(refuse=True)
        time.sleep(2)
        proxy.restore()

    w.while_running("wait_until_ready", refuse_for_a_while)

    def one_instance(w: World, run: Run) -> None:
        assert len(w.rig.fake.launched()) == 1, "a short SSH outage must not replace the instance"

    return Expect("completed", check=one_instance)


@cell("transferring", "ssh drop")
def transferring_ssh_drop(w: World) -> Expect:
    refuse_ssh_first_try(w, "transfer_inputs")
    return Expect("completed", check=tried("transfer_inputs", 2))


@cell("training", "ssh drop")
def training_ssh_drop(w: World) -> Expect:
    """The connection the follower holds is reset mid-training: it reconnects and loses nothing.

    The trainer writes epoch 1, then waits for a release file: once the follower has stored epoch
    1, SSH is refused for 2 s, restored, and only then is the trainer released to write epochs 2-6
    and PROJECT end. So the outage always falls while the job is followed, however late the
    follower starts on a loaded machine (with a free-running trainer it once began after PROJECT
    end was stored, and hit ``upload_outputs`` instead)."""
    assert w.proxy is not None
    proxy = w.proxy
    release = w.tmp / "release-trainer"
    w.params["command"] = trainer("gate", 6, release, 0.2)
    seen: dict[str, int] = {}

    def drop() -> None:
        try:
            assert w.wait_for(lambda: w.epochs_stored() >= 1), "the follower never stored epoch 1"
            proxy.cut(refuse=True)
            seen["at_cut"] = proxy.connections
            time.sleep(2)
            proxy.restore()
            assert w.epochs_stored() == 1 and w.store.job(w.job()).status == "running", "following ended early"
        finally:
            release.touch()  # whatever happened: the trainer must not wait for the stall timeout

    w.while_running("sense_progress", drop)
    w.before("upload_outputs", lambda n: seen.setdefault("after_follow", proxy.connections))

    def every_epoch(w: World, run: Run) -> None:
        assert w.epochs_stored() == 6

    def reconnected(w: World, run: Run) -> None:
        # Its connection was reset by the cut: the follower read epochs 2-6 over a new one.
        assert seen["after_follow"] > seen["at_cut"], seen

    return Expect("completed", check=all_of(every_epoch, tried("sense_progress", 1), reconnected))


@cell("uploading", "ssh drop")
def uploading_ssh_drop(w: World) -> Expect:
    refuse_ssh_first_try(w, "upload_outputs")
    return Expect("completed", check=all_of(tried("upload_outputs", 2), artifacts("global.json")))


@cell("transferring", "transfer cut")
def transferring_cut(w: World) -> Expect:
    """The connection is reset with the dataset half sent: the retry resumes and verifies it."""
    assert w.proxy is not None
    proxy = w.proxy
    dataset = w.tmp / "dataset" / "big.bin"
    dataset.parent.mkdir()
    dataset.write_bytes(os.urandom(BIG))
    w.params["dataset_uri"] = dataset.as_uri()
    w.monkeypatch.setenv("AIRFLOW__GPU_TRAINING__ALLOWED_FILE_ROOTS", str(w.tmp))
    w.while_running(
        "transfer_inputs",
        w.cut_when_bigger(lambda: w.workdir() / "data/big.bin.partial", BIG // 4, lambda: proxy.cut(refuse=True)),
    )
    w.before("transfer_inputs", lambda n: proxy.restore() if n > 1 else None)

    def arrived(w: World, run: Run) -> None:
        workdir = w.root / w.store.instances_for_job(run.job_uuid)[0].name
        assert (workdir / "data" / "big.bin").read_bytes() == dataset.read_bytes()

    def resumed(w: World, run: Run) -> None:
        assert "a retry resumes from there" in run.errors["transfer_inputs"], run.errors

    return Expect("completed", check=all_of(tried("transfer_inputs", 2), resumed, arrived))


@cell("uploading", "transfer cut")
def uploading_cut(w: World) -> Expect:
    """The connection is reset with an output half fetched: the retry fetches it again, verified."""
    assert w.proxy is not None
    proxy = w.proxy
    w.params["command"] = shell(f'head -c {BIG} /dev/urandom > "$TRAINING_OUTPUT_DIR/model.bin" && exec "$0" "$1" ok 1')
    worker_tmp = w.tmp / "worker-tmp"
    worker_tmp.mkdir()
    tempfile.tempdir = str(worker_tmp)  # restored by the cell's fixture

    def fetched() -> Path:
        return next(worker_tmp.glob("gpu-outputs-*/model.bin"))

    w.while_running("upload_outputs", w.cut_when_bigger(fetched, BIG // 4, lambda: proxy.cut(refuse=True)))
    w.before("upload_outputs", lambda n: proxy.restore() if n > 1 else None)
    return Expect("completed", check=all_of(tried("upload_outputs", 2), artifacts("model.bin", "global.json")))


# The trainer misbehaves.


@cell("training", "crash")
def training_crash(w: World) -> Expect:
    w.params["command"] = trainer("crash", 2)
    return Expect(
        "failed",
        ("sense_progress:", "exited with code 3 without PROJECT end", "CUDA error"),
        all_of(succeeded("upload_outputs"), artifacts("logs/trainer.log", "global.json")),
    )


@cell("training", "OOM")
def training_oom(w: World) -> Expect:
    w.params["command"] = shell('"$0" "$1" crash 1 >/dev/null 2>&1; echo "allocating 80 GiB"; kill -KILL $$')
    return Expect("failed", ("sense_progress:", "exited with code 137 (SIGKILL: out of memory?)"))


@cell("training", "stall")
def training_stall(w: World) -> Expect:
    w.params["command"] = trainer("stall", 1)
    w.params["stall_timeout_minutes"] = 0.03
    return Expect("failed", ("sense_progress:", "stalled: no new bytes in global.json"), trainer_stopped(w))


@cell("training", "malformed global.json")
def training_malformed(w: World) -> Expect:
    """Malformed lines are recorded and skipped; the job completes on the good ones."""
    w.params["command"] = shell(
        'printf "not json {\\n{\\"ts\\": 1}\\n" >> "$TRAINING_OUTPUT_DIR/global.json" && exec "$0" "$1" ok 2'
    )

    def recorded(w: World, run: Run) -> None:
        with w.store.session() as s:
            assert s.scalar(select(func.count()).select_from(IngestError)) == 2
        assert w.epochs_stored() == 2

    return Expect("completed", check=recorded)


@cell("training", "missing global.json")
def training_missing_global_json(w: World) -> Expect:
    w.params["command"] = ["{python}", "-c", "print('trained, but wrote no global.json')"]
    return Expect("failed", ("sense_progress:", "exited with code 0 without PROJECT end", "wrote no global.json"))


# Cancel while each stage runs.


@cell("queued", "cancel")
def queued_cancel(w: World) -> Expect:
    w.before("build_config", lambda n: w.cancel())
    return Expect("cancelled", ("cancelled by alice",), never_launched)


def cancel_on_call(w: World, wanted: Callable[[str], bool]) -> None:
    """Cancel the job when the cloud receives a call (before it answers)."""

    def fault(call: str) -> Reply | None:
        if wanted(call):
            w.outage = None
            w.cancel()
        return None

    w.before("provision", lambda n: setattr(w, "outage", fault) if n == 1 else None)


@cell("offer", "cancel")
def offer_cancel(w: World) -> Expect:
    cancel_on_call(w, lambda call: call == "GET /api/v1/instance-types")

    def not_launched(w: World, run: Run) -> None:
        rows = w.store.instances_for_job(run.job_uuid)
        assert [(r.state, r.state_reason) for r in rows] == [("failed", lifecycle.NOT_LAUNCHED_CANCELLED)]

    return Expect("cancelled", ("cancelled by alice",), all_of(never_launched, not_launched))


@cell("launching", "cancel")
def launching_cancel(w: World) -> Expect:
    cancel_on_call(w, lambda call: is_launch(w.rig.name, call))
    return Expect("cancelled", ("cancelled by alice",), succeeded("provision"))


@cell("booting", "cancel")
def booting_cancel(w: World) -> Expect:
    w.rig.fake.faults.boot_seconds = 60

    def cancel_while_booting() -> None:
        w.wait_for(lambda: any(i.phase(w.rig.fake.faults) == "booting" for i in w.rig.fake.launched()))
        time.sleep(0.6)
        w.cancel()

    w.while_running("wait_until_ready", cancel_while_booting)
    return Expect("cancelled", ("cancelled by alice",), tried("wait_until_ready", 1))


@cell("transferring", "cancel")
def transferring_cancel(w: World) -> Expect:
    dataset = w.tmp / "dataset.bin"
    dataset.write_bytes(os.urandom(BIG))
    w.params["dataset_uri"] = dataset.as_uri()
    w.monkeypatch.setenv("AIRFLOW__GPU_TRAINING__ALLOWED_FILE_ROOTS", str(w.tmp))
    w.while_running(
        "transfer_inputs", w.cut_when_bigger(lambda: w.workdir() / "data/dataset.bin.partial", BIG // 4, w.cancel)
    )

    def never_started(w: World, run: Run) -> None:
        assert w.store.job(run.job_uuid).trainer_started_at is None
        assert run.states["start_trainer"] == "failed"

    return Expect("cancelled", ("cancelled by alice",), never_started)


@cell("training", "cancel")
def training_cancel(w: World) -> Expect:
    w.params["command"] = trainer("hang", 1)

    def cancel_after_an_epoch() -> None:
        w.wait_for(lambda: w.epochs_stored() >= 1)
        w.cancel()

    w.while_running("sense_progress", cancel_after_an_epoch)
    return Expect("cancelled", ("sense_progress:", "cancelled"), trainer_stopped(w), ("cancelled by alice",))


@cell("training", "cancel stop refused")
def training_cancel_stop_refused(w: World) -> Expect:
    """The cancel's first stop finds SSH reset and refused: the stop is tried again, not dropped (a
    retry of the task would refuse to start for a cancelled job, leaving the trainer running)."""
    assert w.proxy is not None
    proxy = w.proxy
    expect = training_cancel(w)
    real_stop = SshHost.stop_trainer
    tries: list[int] = []

    def stop_with_ssh_down(host: SshHost, grace_seconds: float = 10.0) -> None:
        tries.append(1)
        if len(tries) > 1:
            return real_stop(host, grace_seconds)
        proxy.cut(refuse=True)
        try:
            return real_stop(host, grace_seconds)
        finally:
            proxy.restore()

    w.monkeypatch.setattr(SshHost, "stop_trainer", stop_with_ssh_down)

    def stopped_on_the_second_try(w: World, run: Run) -> None:
        assert expect.check is not None
        expect.check(w, run)
        assert len(tries) == 2, f"the trainer's stop was tried {len(tries)} times, not twice"

    return dataclasses.replace(expect, check=all_of(stopped_on_the_second_try, tried("sense_progress", 1)))


@cell("uploading", "cancel")
def uploading_cancel(w: World) -> Expect:
    """The job completed at PROJECT end: a cancel while its outputs upload is refused (as the API
    refuses to cancel an ended job), and the outputs still arrive."""
    w.before("upload_outputs", lambda n: w.cancel() if n == 1 else None)

    def refused(w: World, run: Run) -> None:
        assert w.cancels == [False]

    return Expect("completed", check=all_of(refused, artifacts("global.json", "logs/trainer.log")))


# --- running the cells -----------------------------------------------------------------------------


def trainer_processes(w: World) -> list[str]:
    """The trainer and its process group (the wrapper, what the trainer started) still running on
    this cell's own boxes. Only its own: every cell's boxes share the cloud's work root. And only
    processes that still run for the box: a dead trainer's pid in ``run/trainer.pid`` is soon
    another process's (pid_max 32768 wraps every few cells on a busy machine), which is how a
    stale pid once failed the stall and cancel cells."""
    left = []
    for inst in w.rig.fake.launched():
        box = w.root / inst.name
        ids = set()
        for name in ("trainer.pid", "pgid"):
            with contextlib.suppress(ValueError, OSError):
                ids.add(int((box / "run" / name).read_text().strip()))
        for pid in box_processes(box):
            with contextlib.suppress(OSError, IndexError, ValueError):
                pgid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
                if pid in ids or pgid in ids:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    left.append(f"{inst.name}: pid {pid} {cmdline.strip()}")
    return left


@pytest.fixture(scope="module")
def clouds(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Cloud]]:
    """Each fake cloud, started on first use; Lambda's SSH goes through a proxy that can be cut."""
    started: dict[str, Cloud] = {}

    def get(name: str) -> Cloud:
        if name not in started:
            root = tmp_path_factory.mktemp(f"{name}-faults")
            rig = STARTERS[name](sshd_server, root)
            env = dict(rig.env)
            conn_var = f"AIRFLOW_CONN_{CLOUD_CONNECTIONS[name].upper()}"
            api = json.loads(env[conn_var])
            api["extra"].update(QUICK_API if name != "ec2" else {"retry_attempts": 3})
            env[conn_var] = json.dumps(api)
            proxy = None
            if name == "lambda":
                proxy = TcpProxy(sshd_server.port)
                proxy.start()
                ssh = json.loads(env[rig.conn_var()])
                ssh["port"] = proxy.port
                ssh["extra"]["conn_retry_attempts"] = 1
                env[rig.conn_var()] = json.dumps(ssh)
            started[name] = Cloud(rig, root, env, proxy)
        return started[name]

    yield get
    for cloud in started.values():
        if cloud.proxy is not None:
            cloud.proxy.stop()
        cloud.rig.stop()


@pytest.fixture(scope="module")
def dag_tasks() -> dict[str, Any]:
    return load_dag_tasks()


def kill_boxes(w: World) -> None:
    """Kill what still runs on the cell's own boxes (teardown's terminate did, unless it failed).
    Never by the pgids written in boxes: those of earlier cells are other processes' by now."""
    for inst in w.rig.fake.launched():
        if inst.name:
            kill_box(w.root / inst.name)


def check_cell(w: World, run: Run, expect: Expect, context: str) -> None:
    """What every cell ends with: the cloud's record and the DB show every instance terminated
    (or never launched), teardown succeeded, and the job's status and reason are right."""
    job = w.store.job(run.job_uuid)
    assert not w.thread_errors, w.thread_errors
    w.rig.fake.assert_all_terminated()
    for row in w.store.instances_for_job(run.job_uuid):
        assert row.state == "terminated" or (row.state == "failed" and not row.instance_id), (row.name, row.state)
    assert run.states["teardown"] == "success", context
    assert job.status == expect.status, f"{job.status}: {job.failure_reason}; {context}"
    if expect.status == "completed":
        assert job.failure_reason is None and run.states["finalize"] == "success", context
    else:
        assert run.states["finalize"] == "failed", context
        for part in expect.reason:
            assert part in (job.failure_reason or ""), f"{part!r} not in {job.failure_reason!r}; {context}"
    if expect.check is not None:
        expect.check(w, run)


PARAMS = [
    pytest.param(
        cloud_name,
        c,
        id=f"{c.stage}-{c.fault.replace(' ', '_')}-{cloud_name}",
        marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=c.bug)] if c.bug else [],
    )
    for c in CELLS
    for cloud_name in c.clouds
]


@pytest.mark.parametrize(("cloud_name", "the_cell"), PARAMS)
def test_fault_cell(
    cloud_name: str,
    the_cell: Cell,
    clouds: Callable[[str], Cloud],
    dag_tasks: dict[str, Any],
    store: ResultsStore,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    cloud = clouds(cloud_name)
    rig = cloud.rig
    rig.fake.reset()
    if cloud.proxy is not None:
        cloud.proxy.restore()
    for key, value in cloud.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GPU_TRAINING_STORAGE", str(tmp_path / "storage"))
    monkeypatch.setattr("gpu_training.hooks.results.ResultsDbHook.get_store", lambda self: store)
    monkeypatch.setattr(follow, "results_store", lambda conn_id: store)
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(job_following, "STOP_BACKOFF_SECONDS", 0.05)
    monkeypatch.setattr(job_teardown, "LAUNCH_SETTLE_POLL_SECONDS", 0.1)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)

    w = World(cloud, store, tmp_path, monkeypatch)
    real_dispatch = rig.fake._dispatch

    def dispatch(method: str, raw_path: str, headers: Any, raw: bytes) -> Reply:
        fault = w.outage
        reply = fault(call_name(method, raw_path, raw)) if fault else None
        if reply is None:
            return real_dispatch(method, raw_path, headers, raw)  # type: ignore[no-any-return]
        with rig.fake.lock:
            rig.fake.calls.append((method, raw_path, reply.status))
        return reply

    monkeypatch.setattr(rig.fake, "_dispatch", dispatch)
    expect = the_cell.arrange(w)
    started = time.monotonic()
    try:
        run = run_job(dag_tasks, w.run_id, w.params, w.hooks)
    finally:
        w.stop.set()
        w.outage = None
        if cloud.proxy is not None:
            cloud.proxy.restore()
        for thread in w.threads:
            thread.join(30)
    took = time.monotonic() - started
    try:
        reason = store.job(run.job_uuid).failure_reason
        context = f"reason={reason!r} states={run.states} tries={run.tries} errors={run.errors} ({took:.1f} s)"
        if the_cell.bug:  # only the bug's own assertion may fail the cell
            try:
                check_cell(w, run, expect, context)
            except AssertionError as err:
                pytest.fail(f"fails beyond the known bug: {err}")
        else:
            check_cell(w, run, expect, context)
        for part in expect.reason_after_fix:
            reason = store.job(run.job_uuid).failure_reason or ""
            assert part in reason, f"{part!r} not in {reason!r}; {context}"
    finally:
        kill_boxes(w)
