"""Jobs against fakes of the clouds as their APIs are published today (issue 22): RunPod keys refused
the way REST v2 means it, a Vast account whose listing runs over several pages. Through the
lifecycle's provision step, as the DAG runs it; every fake checks each request against its vendor's
OpenAPI document."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_training import lifecycle
from gpu_training.errors import NoCapacityError, OfferRefusedError
from gpu_training.hooks.cloud_api import AuthorizationError
from gpu_training.job import terminate as job_terminate
from gpu_training.results.store import ResultsStore
from tests.fakeclouds.rigs import STARTERS, Rig


def _rig(name: str, sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = STARTERS[name](sshd_server, tmp_path_factory.mktemp(f"{name}-vendor"))
    yield rig
    rig.stop()


@pytest.fixture(scope="module")
def runpod_server(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from _rig("runpod", sshd_server, tmp_path_factory)


@pytest.fixture(scope="module")
def vast_server(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    yield from _rig("vast", sshd_server, tmp_path_factory)


def use(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> Rig:
    rig.fake.reset()
    for key, value in rig.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(job_terminate, "TERMINATE_BACKOFF_SECONDS", 0.05)
    return rig


def new_job(store: ResultsStore, rig: Rig, **params: Any) -> str:
    merged = {"project_id": "vendor", "provider": rig.name, "gpu": rig.gpu, **params}
    return store.create_job(
        project_id="vendor",
        provider=rig.name,
        runtime="process",
        params=merged,
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )


def test_runpod_key_without_create_rights_fails_naming_it_and_launches_nothing(
    store: ResultsStore, runpod_server: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = use(runpod_server, monkeypatch)
    rig.fake.read_only = True
    job = new_job(store, rig, max_launch_attempts=4)
    with pytest.raises(AuthorizationError) as caught:
        lifecycle.provision(store, job)
    message = str(caught.value)
    assert "'runpod_default' may not create pods" in message and "API Keys" in message
    assert not isinstance(caught.value, NoCapacityError)
    assert rig.fake.launched() == []
    posts = [status for method, path, status in rig.fake.calls if method == "POST"]
    assert posts == [403, 403]  # the first offer, then the probe: not every offer, not max_launch_attempts
    assert [r.state for r in store.instances_for_job(job)] == ["failed"]
    rig.fake.assert_all_terminated()


def test_runpod_key_refused_with_401_fails_at_once(
    store: ResultsStore, runpod_server: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = use(runpod_server, monkeypatch)
    conn = json.loads(rig.env["AIRFLOW_CONN_RUNPOD_DEFAULT"])
    conn["password"] = "rpa_NOT_A_KEY_0123456789"
    monkeypatch.setenv("AIRFLOW_CONN_RUNPOD_DEFAULT", json.dumps(conn))
    job = new_job(store, rig)
    with pytest.raises(AuthorizationError, match="HTTP 401") as caught:
        lifecycle.provision(store, job)
    assert "'runpod_default'" in str(caught.value)
    assert rig.fake.calls == [("GET", "/v2/catalog/gpus", 401)]  # no retry, no offer tried
    assert rig.fake.launched() == [] and store.instances_for_job(job) == []


def test_runpod_pools_closed_to_the_account_are_skipped_then_an_open_one_launches(
    store: ResultsStore, runpod_server: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = use(runpod_server, monkeypatch)
    rig.fake.forbidden_gpus.add("NVIDIA A100 80GB PCIe")
    job = new_job(store, rig, gpu="A100", max_launch_attempts=4)
    with pytest.raises(OfferRefusedError) as caught:  # every A100 offer is in the closed pool
        lifecycle.provision(store, job)
    assert not isinstance(caught.value, NoCapacityError)  # never called capacity
    assert "not open to the account" in str(caught.value) and "not a capacity refusal" in str(caught.value)
    reasons = [r.state_reason or "" for r in store.instances_for_job(job)]
    assert reasons and all(r.startswith("not open: ") for r in reasons), reasons
    assert rig.fake.launched() == []
    rig.fake.assert_all_terminated()


def test_vast_job_finds_its_instance_past_the_first_page(
    store: ResultsStore, vast_server: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An account with 40 other instances (two pages of GET /api/v1/instances/, the one it rents last
    by id): provisioning looks its name up with the listing's label filter (as ``vastai show instances
    --label`` does, following next_token should it page) before renting, and provisioning again finds
    the instance instead of renting a second one; teardown terminates it."""
    rig = use(vast_server, monkeypatch)
    others = rig.fake.add_foreign_instances(40)
    job = new_job(store, rig)
    info = lifecycle.provision(store, job)
    again = lifecycle.provision(store, job)
    assert again.instance_id == info.instance_id
    ours = [i for i in rig.fake.launched() if i.id not in others]
    assert [i.id for i in ours] == [info.instance_id]
    listing = [status for method, path, status in rig.fake.calls if path == "/api/v1/instances/"]
    assert listing and set(listing) == {200} and len(listing) >= 2
    assert ("GET", "/api/v0/instances/", 410) not in rig.fake.calls
    lifecycle.teardown(store, job)
    for instance_id in others:
        rig.fake.instances[instance_id].terminated_at = time.time()
    rig.fake.assert_all_terminated()
