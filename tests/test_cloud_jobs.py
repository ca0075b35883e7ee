"""A job's instance on each fake cloud, through the lifecycle steps, with every fault switch.

Provisioning, the boot wait (a real SSH check against the test sshd), replacement of a broken
instance, and teardown run as the DAG runs them. Each test ends with the fake cloud's own record
showing every instance it ever launched terminated.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training import lifecycle
from gpu_training.errors import OfferRefusedError
from gpu_training.job import terminate as job_terminate
from gpu_training.offers import NoOfferError
from gpu_training.results.store import ResultsStore
from tests.fakeclouds.boxes import box_processes
from tests.fakeclouds.rigs import STARTERS, Rig, unreachable
from tests.servers import free_port


@pytest.fixture(scope="module", params=sorted(STARTERS))
def rig_server(
    request: pytest.FixtureRequest, sshd_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    rig = STARTERS[request.param](sshd_server, tmp_path_factory.mktemp(f"{request.param}-boxes"))
    yield rig
    rig.stop()


@pytest.fixture
def rig(rig_server: Rig, monkeypatch: pytest.MonkeyPatch) -> Rig:
    rig_server.fake.reset()
    for key, value in rig_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    return rig_server


def new_job(store: ResultsStore, rig: Rig, **params: Any) -> str:
    merged = {"project_id": "cloudjob", "provider": rig.name, "gpu": rig.gpu, **params}
    return store.create_job(
        project_id="cloudjob",
        provider=rig.name,
        runtime="process",
        params=merged,
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )


def wait_ready(store: ResultsStore, job: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not lifecycle.check_ready(store, job):
        assert time.monotonic() < deadline, "instance never became ready"
        time.sleep(0.1)


def states(store: ResultsStore, job: str) -> list[tuple[str, str]]:
    return [(r.state, r.state_reason or "") for r in store.instances_for_job(job)]


def statuses(rig: Rig, code: int) -> int:
    return sum(1 for call in rig.fake.calls if call[-1] == code)


def test_instance_boots_answers_ssh_and_is_terminated_with_its_cost(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.boot_seconds = 2.5  # long enough that a loaded CI machine still sees it booting
    job = new_job(store, rig)
    info = lifecycle.provision(store, job)
    record = store.instances_for_job(job)[0]
    assert record.instance_id == info.instance_id and record.price_per_hour and record.launched_at
    # The offer's GPUs are on the row (the job page shows them): what the job asked for, at least.
    assert record.gpu_name and rig.gpu.split(":")[0].lower() in record.gpu_name.lower() and record.gpu_count >= 1
    assert lifecycle.check_ready(store, job) is False  # still booting: the boot wait defers
    wait_ready(store, job)
    assert store.instances_for_job(job)[0].ready_at is not None
    scripts = {f.path.rsplit("/", 1)[-1] for f in lifecycle.host_for(store, job).list_files("bin")}
    assert "run_trainer.sh" in scripts  # the boot wait prepared a real SSH box

    assert lifecycle.teardown(store, job) == [record.name]
    done = store.instances_for_job(job)[0]
    assert done.state == "terminated" and done.billable_seconds and done.billable_seconds > 0.5
    assert done.cost_usd == pytest.approx(done.billable_seconds / 3600 * done.price_per_hour, rel=1e-3)
    assert store.job(job).cost_usd == pytest.approx(done.cost_usd, rel=1e-3)
    rig.fake.assert_all_terminated()


def test_no_capacity_anywhere_fails_before_launching(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.no_capacity = True
    job = new_job(store, rig)
    # Vast.ai searches rentable offers only (as its client does): none free lists none at all.
    with pytest.raises(NoOfferError, match="none has capacity" if rig.name != "vast" else "no offer matches"):
        lifecycle.provision(store, job)
    assert store.instances_for_job(job) == [] and rig.fake.launched() == []
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_capacity_listed_but_refused_tries_each_offer_and_records_each(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.refuse_launch = 2
    job = new_job(store, rig, max_launch_attempts=2)
    with pytest.raises(OfferRefusedError) as err:
        lifecycle.provision(store, job)
    rows = states(store, job)
    # RunPod's 400 on create names no cause (its spec gives "no capacity" no code): refused, not capacity.
    said = "refused: " if rig.name == "runpod" else "no capacity: "
    assert len(rows) == 2 and all(state == "failed" and why.startswith(said) for state, why in rows), rows
    assert "max_launch_attempts" in str(err.value) or "refused or given up" in str(err.value)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_one_refusal_then_the_next_offer_runs(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.refuse_launch = 1
    job = new_job(store, rig)
    lifecycle.provision(store, job)
    assert states(store, job)[0][0] == "failed"
    wait_ready(store, job)
    lifecycle.teardown(store, job)
    assert len(rig.fake.launched()) == 1
    rig.fake.assert_all_terminated()


def test_a_burst_of_429s_is_waited_out(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.rate_limit = 3
    rig.fake.faults.retry_after = 0.2
    job = new_job(store, rig)
    lifecycle.provision(store, job)
    assert statuses(rig, 429) + statuses(rig, 503) >= 3
    wait_ready(store, job)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_launch_answered_500_after_creating_still_ends_terminated(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.error_after_create = 1
    job = new_job(store, rig)
    lifecycle.provision(store, job)
    assert statuses(rig, 500) >= 1
    assert len(rig.fake.launched()) == 1  # adopted by name, not launched twice
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_terminate_failing_first_is_retried_until_verified_gone(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig)
    lifecycle.provision(store, job)
    rig.fake.faults.terminate_fail = 1
    rig.fake.faults.terminate_seconds = 0.3
    lifecycle.teardown(store, job)
    assert statuses(rig, 500) >= 1
    assert [s for s, _ in states(store, job)] == ["terminated"]
    rig.fake.assert_all_terminated()


#: A trainer that runs until killed, and starts a process in a session of its own (out of reach of
#: a stop by process group; a machine that is switched off kills it all the same).
RUNS_ON = ["bash", "-c", "setsid sleep 600 & exec sleep 600"]


def running_trainer(store: ResultsStore, rig: Rig, job: str) -> Path:
    """Start ``RUNS_ON`` on the job's instance; returns its box once all three processes run."""
    lifecycle.provision(store, job)
    wait_ready(store, job)
    lifecycle.start_trainer(store, job)
    assert rig.fake.box_root is not None
    box = rig.fake.box_root / store.instances_for_job(job)[0].name
    deadline = time.monotonic() + 20
    while len(box_processes(box)) < 3:  # the wrapper, the trainer, the one in its own session
        assert time.monotonic() < deadline, box_processes(box)
        time.sleep(0.05)
    return box


def test_terminating_an_instance_kills_what_runs_on_it(store: ResultsStore, rig: Rig) -> None:
    """The fake instance is a directory on the shared sshd: its terminate kills every process of
    that box, as a terminated machine's die, or a test's trainers would leak past it."""
    job = new_job(store, rig, command=RUNS_ON)
    box = running_trainer(store, rig, job)
    other = new_job(store, rig, command=RUNS_ON)
    other_box = running_trainer(store, rig, other)
    assert lifecycle.teardown(store, job) == [box.name]
    assert box_processes(box) == []
    assert len(box_processes(other_box)) == 3  # another instance's box is not touched
    lifecycle.teardown(store, other)
    assert box_processes(other_box) == []
    rig.fake.assert_all_terminated()


def test_stopping_the_rig_kills_what_runs_on_its_instances(
    store: ResultsStore, sshd_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rig stopped with an instance still running (a test that failed before its teardown)
    leaves nothing running either."""
    rig = STARTERS["lambda"](sshd_server, tmp_path / "boxes")
    try:
        for key, value in rig.env.items():
            monkeypatch.setenv(key, value)
        box = running_trainer(store, rig, new_job(store, rig, command=RUNS_ON))
    finally:
        rig.stop()
    assert box_processes(box) == []


@pytest.mark.parametrize("fault", ["unhealthy", "vanish"])
def test_a_broken_instance_is_terminated_and_the_next_offer_tried(store: ResultsStore, rig: Rig, fault: str) -> None:
    setattr(rig.fake.faults, fault, True)
    rig.fake.faults.boot_seconds = 0.5  # the fault strikes once an instance is up
    job = new_job(store, rig)
    first = lifecycle.provision(store, job)
    deadline = time.monotonic() + 10
    while len(store.instances_for_job(job)) < 2:
        assert time.monotonic() < deadline
        assert lifecycle.check_ready(store, job) is False
        time.sleep(0.1)
    setattr(rig.fake.faults, fault, False)  # the replacement, still booting, stays healthy
    wait_ready(store, job)
    rows = store.instances_for_job(job)
    assert rows[0].instance_id == first.instance_id and rows[0].state == "terminated"
    assert (rows[0].state_reason or "").startswith("replaced:")
    assert (rows[0].instance_type, rows[0].region) != (rows[1].instance_type, rows[1].region)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_never_reachable_by_ssh_is_replaced_after_the_timeout(
    store: ResultsStore, rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(rig.conn_var(), unreachable(rig.env[rig.conn_var()], free_port()))
    job = new_job(store, rig, boot_timeout_minutes=0.02)
    lifecycle.provision(store, job)
    assert lifecycle.check_ready(store, job) is False  # runs, but SSH does not answer yet
    time.sleep(1.3)
    assert lifecycle.check_ready(store, job) is False  # over the timeout: replaced
    rows = store.instances_for_job(job)
    assert len(rows) == 2 and "not reachable by SSH" in (rows[0].state_reason or "")
    monkeypatch.setenv(rig.conn_var(), rig.env[rig.conn_var()])
    wait_ready(store, job)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_a_slow_boot_past_the_timeout_is_replaced(store: ResultsStore, rig: Rig) -> None:
    rig.fake.faults.boot_seconds = 600
    job = new_job(store, rig, boot_timeout_minutes=0.01)
    lifecycle.provision(store, job)
    time.sleep(0.7)
    assert lifecycle.check_ready(store, job) is False
    rows = store.instances_for_job(job)
    assert len(rows) == 2 and "provisioning timeout" in (rows[0].state_reason or "")
    rig.fake.faults.boot_seconds = 0
    wait_ready(store, job)
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_provider_cloud_takes_the_clouds_that_have_a_connection(store: ResultsStore, rig: Rig) -> None:
    job = new_job(store, rig, provider="cloud")
    info = lifecycle.provision(store, job)
    assert info.provider == rig.name  # the only cloud whose connection is defined here
    lifecycle.teardown(store, job)
    rig.fake.assert_all_terminated()


def test_provider_cloud_without_any_cloud_connection_is_refused(
    store: ResultsStore, rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpu_training.errors import JobParamsError
    from gpu_training.providers.registry import CLOUD_CONNECTIONS

    for conn_id in CLOUD_CONNECTIONS.values():
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)
    with pytest.raises(JobParamsError, match="'cloud' needs at least one cloud connection"):
        lifecycle.register_job(store, {"project_id": "nocloud", "provider": "cloud"}, dag_id="d", run_id="r")
