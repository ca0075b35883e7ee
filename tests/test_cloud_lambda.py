"""LambdaProvider against FakeLambda: offers, idempotent launch, states, terminate, and every fault
switch (capacity, 429 bursts, 5xx after create, failing terminate, unhealthy, vanished, bad key)."""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gpu_training.errors import (
    BadRequestError,
    InstanceNotFoundError,
    NoCapacityError,
    ProviderUnavailableError,
)
from gpu_training.offers import gpu_matches, rank_offers
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceState, Offer
from gpu_training.providers.lambda_cloud import LambdaProvider, gpu_from_type
from tests.fakeclouds.base import terminate_all, wait_state
from tests.fakeclouds.lambda_cloud import FakeLambda

SETTINGS = {"retry_initial_seconds": 0.05, "retry_max_wait_seconds": 2, "ssh_key_name": "test-key"}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeLambda]:
    fake = FakeLambda(ssh_host="127.0.0.1", ssh_port=2222)
    yield fake
    fake.stop()


@pytest.fixture
def fake(fake_server: FakeLambda, monkeypatch: pytest.MonkeyPatch) -> FakeLambda:
    fake_server.reset()
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", fake_server.connection(**SETTINGS))
    return fake_server


@pytest.fixture
def provider(fake: FakeLambda) -> LambdaProvider:
    return LambdaProvider()


def offer_for(provider: LambdaProvider, instance_type: str, region: str | None = None) -> Offer:
    offers = [o for o in provider.list_offers(GpuRequest()) if o.instance_type == instance_type]
    return next(o for o in offers if region is None or o.region == region)


# --- offers ----------------------------------------------------------------------------------------


def test_gpu_from_type_name() -> None:
    assert gpu_from_type("gpu_1x_a100_sxm4") == ("A100", 1)
    assert gpu_from_type("gpu_8x_h100_sxm5") == ("H100", 8)
    assert gpu_from_type("gpu_1x_a10") == ("A10", 1)
    assert gpu_from_type("cpu_4x_general") == (None, 0)


def test_offers_one_per_type_and_region_with_capacity(provider: LambdaProvider) -> None:
    offers = provider.list_offers(GpuRequest())
    table = {(o.instance_type, o.region): o for o in offers}
    assert set(table) == {
        ("gpu_1x_a10", "us-east-1"),
        ("gpu_1x_a100_sxm4", "us-east-1"),
        ("gpu_1x_a100_sxm4", "us-west-2"),
        ("gpu_1x_h100_pcie", "us-west-1"),
        ("gpu_8x_h100_sxm5", None),
    }
    a10 = table["gpu_1x_a10", "us-east-1"]
    assert (a10.price_per_hour, a10.gpu_count, a10.available, a10.spot) == (0.75, 1, True, False)
    assert gpu_matches("A10", a10.gpu_name) and not gpu_matches("A100", a10.gpu_name)
    a100 = table["gpu_1x_a100_sxm4", "us-west-2"]
    assert (a100.price_per_hour, a100.gpu_count) == (1.29, 1) and gpu_matches("A100", a100.gpu_name)
    eight = table["gpu_8x_h100_sxm5", None]
    assert (eight.price_per_hour, eight.gpu_count, eight.available) == (23.92, 8, False)
    assert gpu_matches("H100", eight.gpu_name) and eight.provider == "lambda"
    assert not any(o.spot for o in offers)


def test_offers_follow_capacity_and_request(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.capacity["gpu_8x_h100_sxm5"] = ["us-south-1"]
    fake.capacity["gpu_1x_h100_pcie"] = []
    offers = provider.list_offers(GpuRequest(gpu="H100", gpu_count=8))
    assert [(o.instance_type, o.region, o.available) for o in offers] == [("gpu_8x_h100_sxm5", "us-south-1", True)]
    h100 = provider.list_offers(GpuRequest(gpu="H100"))
    assert {(o.instance_type, o.region, o.available) for o in h100} == {
        ("gpu_1x_h100_pcie", None, False),
        ("gpu_8x_h100_sxm5", "us-south-1", True),
    }
    ranked = rank_offers(provider.list_offers(GpuRequest(gpu="A100")), GpuRequest(gpu="A100"))
    assert [(o.instance_type, o.region) for o in ranked] == [
        ("gpu_1x_a100_sxm4", "us-east-1"),
        ("gpu_1x_a100_sxm4", "us-west-2"),
    ]


# --- launch, states, find/list, terminate ----------------------------------------------------------


def test_launch_is_idempotent_by_name_and_boots(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.boot_seconds = 0.3
    offer = offer_for(provider, "gpu_1x_a10")
    name = NAME_PREFIX + "lambda-idem-1"
    info = provider.launch(offer, name)
    assert (info.state, info.address, info.details["status"]) == (InstanceState.BOOTING, None, "booting")
    assert (info.name, info.instance_type, info.region, info.price_per_hour) == (name, "gpu_1x_a10", "us-east-1", 0.75)
    again = provider.launch(offer, name)
    assert again.instance_id == info.instance_id
    assert len(fake.launched()) == 1
    assert sum(1 for m, p, _ in fake.calls if (m, p) == ("POST", "/api/v1/instance-operations/launch")) == 1

    running = wait_state(provider, info.instance_id, InstanceState.RUNNING)
    assert running.address == fake.ssh_host and running.details["status"] == "active"
    assert "ssh_port" not in running.details  # Lambda reports none: SSH on 22 unless the SSH connection says
    assert provider.api_calls == len(fake.calls)

    provider.terminate(info.instance_id)
    gone = wait_state(provider, info.instance_id, InstanceState.TERMINATED, InstanceState.STOPPING)
    assert gone.details["status"] in ("terminated", "terminating")
    assert provider.find_instance(name) is None
    fake.assert_all_terminated()


def test_find_and_list_by_name_prefix(fake: FakeLambda, provider: LambdaProvider) -> None:
    offer = offer_for(provider, "gpu_1x_a100_sxm4", "us-west-2")
    ours = [provider.launch(offer, f"{NAME_PREFIX}lambda-list-{n}") for n in (1, 2)]
    other = provider.launch(offer, "someone-elses-box")
    assert {i.name for i in provider.list_instances()} == {i.name for i in ours}
    assert [i.name for i in provider.list_instances(NAME_PREFIX + "lambda-list-2")] == [ours[1].name]
    found = provider.find_instance(ours[0].name)
    assert found is not None and found.instance_id == ours[0].instance_id and found.region == "us-west-2"
    assert provider.find_instance(NAME_PREFIX + "nobody") is None

    provider.terminate(ours[0].instance_id)
    assert provider.find_instance(ours[0].name) is None  # still in GET /instances, as terminated
    assert any(i["id"] == ours[0].instance_id for i in provider.hook.list_instances())
    assert [i.name for i in provider.list_instances()] == [ours[1].name]
    provider.terminate(ours[1].instance_id)
    provider.terminate(other.instance_id)
    fake.assert_all_terminated()


def test_terminate_is_quiet_when_already_gone(fake: FakeLambda, provider: LambdaProvider) -> None:
    info = provider.launch(offer_for(provider, "gpu_1x_h100_pcie"), NAME_PREFIX + "lambda-twice-1")
    provider.terminate(info.instance_id)
    provider.terminate(info.instance_id)  # Lambda answers global/unknown for it; the state says it is done
    assert ("POST", "/api/v1/instance-operations/terminate", 500) in fake.calls
    provider.terminate("0" * 32)  # unknown id: 404
    fake.terminated_linger_seconds = 0
    with pytest.raises(InstanceNotFoundError):
        provider.get_instance(info.instance_id)
    provider.terminate(info.instance_id)  # forgotten by the API: 404
    fake.assert_all_terminated()


def test_terminating_then_terminated(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.terminate_seconds = 0.3
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-slowterm-1")
    provider.terminate(info.instance_id)
    stopping = provider.get_instance(info.instance_id)
    assert (stopping.state, stopping.details["status"]) == (InstanceState.STOPPING, "terminating")
    assert provider.find_instance(info.name) is not None  # terminating is not gone yet
    provider.terminate(info.instance_id)  # asked again while terminating: quiet
    gone = wait_state(provider, info.instance_id, InstanceState.TERMINATED)
    assert not gone.interrupted  # Lambda has no spot instances: nothing but us terminates one
    with pytest.raises(ValueError, match="no spot or interruptible"):
        fake.interrupt(info.instance_id)
    assert provider.find_instance(info.name) is None and provider.list_instances() == []
    fake.assert_all_terminated()


def test_launch_without_capacity_raises_no_capacity(fake: FakeLambda, provider: LambdaProvider) -> None:
    offer = offer_for(provider, "gpu_1x_a10")
    fake.faults.no_capacity = True
    assert not any(o.available for o in provider.list_offers(GpuRequest()))
    with pytest.raises(NoCapacityError) as caught:
        provider.launch(offer, NAME_PREFIX + "lambda-nocap-1")
    message = str(caught.value)
    assert "instance-operations/launch/insufficient-capacity" in message
    assert "Not enough capacity to fulfill launch request." in message
    assert fake.launched() == []

    unavailable = offer_for(provider, "gpu_8x_h100_sxm5")
    with pytest.raises(NoCapacityError, match="no region has capacity"):
        provider.launch(unavailable, NAME_PREFIX + "lambda-nocap-2")


def test_refused_launch_although_listed(fake: FakeLambda, provider: LambdaProvider) -> None:
    offer = offer_for(provider, "gpu_1x_a100_sxm4", "us-east-1")
    assert offer.available
    fake.faults.refuse_launch = 1
    with pytest.raises(NoCapacityError, match="Not enough capacity"):
        provider.launch(offer, NAME_PREFIX + "lambda-refuse-1")
    info = provider.launch(offer, NAME_PREFIX + "lambda-refuse-1")
    assert len(fake.launched()) == 1 and info.instance_id == fake.launched()[0].id
    terminate_all(provider, fake)


def test_rate_limit_burst_is_retried_after_retry_after(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.rate_limit = 2
    fake.faults.retry_after = 0.2
    offers = provider.list_offers(GpuRequest(gpu="A10"))
    assert [o.instance_type for o in offers] == ["gpu_1x_a10"]
    calls = [(t, status) for t, _, path, status in fake.timed_calls if path == "/api/v1/instance-types"]
    assert [status for _, status in calls] == [429, 429, 200]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert provider.api_calls == 3


def test_rate_limited_launch_is_retried(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.rate_limit = 1  # a 429 means the launch was not acted on: safe to send again
    fake.faults.retry_after = 0.05
    ids = provider.hook.launch(
        region_name="us-east-1", instance_type_name="gpu_1x_a10", ssh_key_names=["test-key"], name="x-429"
    )
    launches = [s for m, p, s in fake.calls if (m, p) == ("POST", "/api/v1/instance-operations/launch")]
    assert launches == [429, 200]
    assert [i.id for i in fake.launched()] == ids
    terminate_all(provider, fake)


def test_error_after_create_returns_the_created_instance(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.error_after_create = 1
    name = NAME_PREFIX + "lambda-5xx-1"
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), name)
    assert [i.id for i in fake.launched()] == [info.instance_id]
    assert info.name == name
    assert ("POST", "/api/v1/instance-operations/launch", 500) in fake.calls
    terminate_all(provider, fake)


def test_terminate_failure_raises_then_succeeds(fake: FakeLambda, provider: LambdaProvider) -> None:
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-termfail-1")
    fake.faults.terminate_fail = 1
    with pytest.raises(ProviderUnavailableError, match="global/unknown"):
        provider.terminate(info.instance_id)
    assert fake.live() and provider.get_instance(info.instance_id).state == InstanceState.RUNNING
    provider.terminate(info.instance_id)
    assert provider.get_instance(info.instance_id).state == InstanceState.TERMINATED
    fake.assert_all_terminated()


def test_unhealthy_instance_is_failed(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.unhealthy = True
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-sick-1")
    state = provider.get_instance(info.instance_id)
    assert (state.state, state.details["status"]) == (InstanceState.FAILED, "unhealthy")
    assert provider.find_instance(info.name) is not None  # still billing: the reaper must see it
    terminate_all(provider, fake)


def test_vanished_instance_is_not_found(fake: FakeLambda, provider: LambdaProvider) -> None:
    fake.faults.vanish = True
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-vanish-1")
    with pytest.raises(InstanceNotFoundError, match="global/object-does-not-exist"):
        provider.get_instance(info.instance_id)
    assert provider.list_instances() == []
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()


# --- configuration and credentials -----------------------------------------------------------------


def test_wrong_api_key_is_a_bad_request_without_the_key(fake: FakeLambda, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "secret_wrong_0123456789abcdef"
    conn = json.loads(fake.connection(**SETTINGS))
    conn["password"] = wrong
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", json.dumps(conn))
    with pytest.raises(BadRequestError) as caught:
        LambdaProvider().list_offers(GpuRequest())
    message = str(caught.value)
    assert "lambda_default" in message and "global/invalid-api-key" in message
    assert wrong not in message and fake.api_key not in message
    assert fake.calls == [("GET", "/api/v1/instance-types", 401)]  # not retried


def test_basic_auth_with_the_key_as_user_is_accepted(fake: FakeLambda) -> None:
    answer = requests.get(f"{fake.url}/api/v1/instances", auth=(fake.api_key, ""), timeout=5)
    assert answer.status_code == 200 and answer.json() == {"data": []}


def test_launch_needs_ssh_key_name(fake: FakeLambda, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {k: v for k, v in SETTINGS.items() if k != "ssh_key_name"}
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", fake.connection(**settings))
    provider = LambdaProvider()
    with pytest.raises(BadRequestError) as caught:
        provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-nokey-1")
    assert "ssh_key_name" in str(caught.value) and "lambda_default" in str(caught.value)
    assert fake.launched() == []


def test_unknown_ssh_key_is_a_bad_request(fake: FakeLambda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", fake.connection(**{**SETTINGS, "ssh_key_name": "nope"}))
    provider = LambdaProvider()
    with pytest.raises(BadRequestError, match="Specified SSH key does not exist"):
        provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-badkey-1")
    assert fake.launched() == []


def test_file_systems_are_attached(fake: FakeLambda, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", fake.connection(**SETTINGS, file_system_names="data, ckpt"))
    provider = LambdaProvider()
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-fs-1")
    assert info.details["file_system_names"] == ["data", "ckpt"]
    assert info.details["ssh_key_names"] == ["test-key"]
    terminate_all(provider, fake)


@pytest.mark.parametrize(
    "body",
    [
        {"instance_type_name": "gpu_1x_a10", "ssh_key_names": ["test-key"], "name": "x"},
        {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": [], "name": "x"},
        {"region_name": "us-east-1", "instance_type_name": "gpu_1x_a10", "ssh_key_names": ["test-key"]},
    ],
)
def test_fake_validates_launch_body(fake: FakeLambda, body: dict[str, Any]) -> None:
    with contextlib.ExitStack() as stack:
        if "region_name" not in body:  # the spec requires it: the contract check objects as well
            stack.enter_context(fake.expect_violations("'region_name' is a required property"))
        answer = requests.post(
            f"{fake.url}/api/v1/instance-operations/launch",
            json=body,
            headers={"Authorization": f"Bearer {fake.api_key}"},
            timeout=5,
        )
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "global/invalid-parameters"
    assert fake.launched() == []


def test_ssh_box_uses_the_instance_ip_and_the_ssh_connection(
    fake: FakeLambda, provider: LambdaProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh_conn = {"conn_type": "ssh", "port": fake.ssh_port, "extra": {"no_host_key_check": True}}
    monkeypatch.setenv("AIRFLOW_CONN_GPU_INSTANCE_SSH", json.dumps(ssh_conn))
    info = provider.launch(offer_for(provider, "gpu_1x_a10"), NAME_PREFIX + "lambda-ssh-1")
    box = provider.ssh_box(info)
    assert (box.hook.remote_host, box.hook.port, box.hook.username) == (fake.ssh_host, fake.ssh_port, "ubuntu")
    terminate_all(provider, fake)
