"""RunPodProvider against FakeRunPod (REST API v2): catalog offers, idempotent launch, states and SSH
mapping, terminate, and every fault switch (capacity, 429 bursts, 5xx after create, failing
terminate, unhealthy, vanished, bad key)."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from gpu_training.errors import (
    BadRequestError,
    InstanceNotFoundError,
    NoCapacityError,
    OfferRefusedError,
    ProviderUnavailableError,
)
from gpu_training.hooks.cloud_api import AuthorizationError
from gpu_training.hooks.runpod import CreateRefusedError, PoolNotOpenError
from gpu_training.offers import gpu_matches, rank_offers
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceState, Offer
from gpu_training.providers.runpod import DEFAULT_IMAGE, RunPodProvider, parse_instance_type, state_of
from tests.fakeclouds.base import terminate_all, wait_state
from tests.fakeclouds.runpod import CAPACITY_DETAIL, FakeRunPod

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAITestKey tests@gpu-training"
SETTINGS: dict[str, Any] = {
    "retry_initial_seconds": 0.05,
    "retry_max_wait_seconds": 2,
    "ssh_public_key": PUBLIC_KEY,
}
A100 = "NVIDIA A100 80GB PCIe"
H100 = "NVIDIA H100 80GB HBM3"
RTX4090 = "NVIDIA GeForce RTX 4090"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeRunPod]:
    fake = FakeRunPod(ssh_host="127.0.0.1", ssh_port=2222)
    yield fake
    fake.stop()


@pytest.fixture
def fake(fake_server: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> FakeRunPod:
    fake_server.reset()
    monkeypatch.setenv("AIRFLOW_CONN_RUNPOD_DEFAULT", fake_server.connection(**SETTINGS))
    return fake_server


@pytest.fixture
def provider(fake: FakeRunPod) -> RunPodProvider:
    return RunPodProvider()


def use_settings(monkeypatch: pytest.MonkeyPatch, fake: FakeRunPod, **settings: Any) -> RunPodProvider:
    monkeypatch.setenv("AIRFLOW_CONN_RUNPOD_DEFAULT", fake.connection(**{**SETTINGS, **settings}))
    return RunPodProvider()


def offer_for(provider: RunPodProvider, gpu_id: str, region: str | None = None, count: int = 1) -> Offer:
    offers = provider.list_offers(GpuRequest(gpu_count=count))
    return next(o for o in offers if o.gpu_name == gpu_id and (region is None or o.region == region))


def posts(fake: FakeRunPod) -> list[int]:
    return [status for method, path, status in fake.calls if (method, path) == ("POST", "/v2/pods")]


# --- offers ----------------------------------------------------------------------------------------


def test_offers_per_gpu_type_and_data_center_in_secure_cloud(fake: FakeRunPod, provider: RunPodProvider) -> None:
    offers = provider.list_offers(GpuRequest())
    table = {(o.instance_type, o.region): o for o in offers}
    assert set(table) == {
        (f"1x {A100} (SECURE)", "US-KS-2"),
        (f"1x {A100} (SECURE)", "EU-RO-1"),
        (f"1x {H100} (SECURE)", "US-TX-3"),
        (f"1x {RTX4090} (SECURE)", "EU-RO-1"),
    }  # the RTX 3090 is Community Cloud only
    a100 = table[f"1x {A100} (SECURE)", "EU-RO-1"]
    assert (a100.provider, a100.price_per_hour, a100.gpu_name, a100.gpu_count) == ("runpod", 1.64, A100, 1)
    assert a100.available and not a100.spot
    assert not table[f"1x {H100} (SECURE)", "US-TX-3"].available  # stock NONE
    assert table[f"1x {RTX4090} (SECURE)", "EU-RO-1"].price_per_hour == 0.69
    assert gpu_matches("A100", A100) and gpu_matches("H100", H100) and gpu_matches("RTX4090", RTX4090)
    catalog = [q for _, m, p, q, _ in fake.requests if (m, p) == ("GET", "/v2/catalog/gpus")]
    assert catalog == [{"include": ["AVAILABILITY"], "product": ["POD"], "count": ["1"], "cloud": ["SECURE"]}]


def test_offers_for_a_gpu_count_and_both_clouds(fake: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = use_settings(monkeypatch, fake, cloud_type="ALL")
    request = GpuRequest(gpu="A100", gpu_count=2)
    offers = provider.list_offers(request)
    assert {(o.instance_type, o.region, o.price_per_hour, o.gpu_count) for o in offers} == {
        (f"2x {A100} (SECURE)", "US-KS-2", 3.28, 2),
        (f"2x {A100} (SECURE)", "EU-RO-1", 3.28, 2),
        (f"2x {A100} (COMMUNITY)", "CA-MTL-1", 1.64, 2),
    }
    ranked = rank_offers(offers, request)
    assert ranked[0].instance_type == f"2x {A100} (COMMUNITY)"
    clouds = sorted(q["cloud"][0] for _, _, p, q, _ in fake.requests if p == "/v2/catalog/gpus")
    assert clouds == ["COMMUNITY", "SECURE"]
    # More GPUs than the largest Community machine: Secure offers only; a 3090 pod holds at most 2.
    eight = provider.list_offers(GpuRequest(gpu="A100", gpu_count=8))
    assert {o.instance_type for o in eight} == {f"8x {A100} (SECURE)"}
    assert provider.list_offers(GpuRequest(gpu="RTX3090", gpu_count=4)) == []
    assert [o.region for o in provider.list_offers(GpuRequest(gpu="RTX3090", gpu_count=2))] == ["CA-MTL-1"]


def test_offers_follow_stock(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.stock[H100]["SECURE"] = {"US-TX-3": "MEDIUM", "US-KS-2": "NONE"}
    fake.stock[RTX4090]["SECURE"] = {}
    h100 = {(o.region, o.available) for o in provider.list_offers(GpuRequest(gpu="H100"))}
    assert h100 == {("US-TX-3", True), ("US-KS-2", False)}
    rtx = provider.list_offers(GpuRequest(gpu="4090"))
    assert [(o.region, o.available, o.price_per_hour) for o in rtx] == [(None, False, 0.69)]  # offered nowhere now
    ranked = rank_offers(provider.list_offers(GpuRequest(gpu="A100", regions=("EU-RO-1",))), GpuRequest(gpu="A100"))
    assert [(o.instance_type, o.region) for o in ranked] == [(f"1x {A100} (SECURE)", "EU-RO-1")]


def test_no_spot_offers_and_a_spot_offer_is_refused(fake: FakeRunPod, provider: RunPodProvider) -> None:
    """RunPod's v2 API has no interruptible pods: spot-allowed requests get on-demand offers only."""
    offers = provider.list_offers(GpuRequest(gpu="A100", spot=True))
    assert offers and not any(o.spot for o in offers)
    spot = Offer("runpod", f"1x {A100} (SECURE)", 0.82, "US-KS-2", A100, 1, spot=True)
    with pytest.raises(BadRequestError, match="no interruptible"):
        provider.launch(spot, NAME_PREFIX + "runpod-spot-1")
    assert posts(fake) == [] and fake.launched() == []
    # And the API itself refuses the v1/GraphQL spot fields (the create body is closed).
    body = provider.pod_body(offer_for(provider, A100, "US-KS-2"), "x-spot") | {"interruptible": True, "bidPerGpu": 0.8}
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    with fake.expect_violations("Unevaluated properties are not allowed", "interruptible"):
        answer = requests.post(f"{fake.url}/v2/pods", json=body, headers=auth, timeout=5)
    assert answer.status_code == 422
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert "$: additional properties 'interruptible' not allowed" in answer.json()["errors"]
    assert fake.launched() == []
    # So there is no interruptible pod to interrupt: the fake's control refuses, as RunPod cannot.
    pod = provider.launch(offer_for(provider, A100, "US-KS-2"), NAME_PREFIX + "runpod-spot-2")
    with pytest.raises(ValueError, match="no interruptible"):
        fake.interrupt(pod.instance_id)
    assert not provider.get_instance(pod.instance_id).interrupted
    terminate_all(provider, fake)


def test_instance_type_round_trip() -> None:
    assert parse_instance_type(f"2x {A100} (COMMUNITY)") == (A100, 2, "COMMUNITY")
    with pytest.raises(BadRequestError, match="not a RunPod offer"):
        parse_instance_type("gpu_1x_a100")


# --- launch, states, find/list, terminate ----------------------------------------------------------


def test_launch_is_idempotent_by_name_and_boots(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.boot_seconds = 0.45
    offer = offer_for(provider, A100, "EU-RO-1")
    name = NAME_PREFIX + "runpod-idem-1"
    info = provider.launch(offer, name)
    assert (info.state, info.address, info.details["status"]) == (InstanceState.BOOTING, None, "PROVISIONING")
    assert (info.name, info.instance_type, info.region, info.price_per_hour) == (
        name,
        offer.instance_type,
        "EU-RO-1",
        1.64,
    )
    again = provider.launch(offer, name)
    assert again.instance_id == info.instance_id
    assert len(fake.launched()) == 1 and posts(fake) == [201]
    assert fake.created == [
        {
            "name": name,
            "image": DEFAULT_IMAGE,
            "gpu": {"id": A100, "count": 1},
            "cloud": "SECURE",
            "dataCenterIds": ["EU-RO-1"],
            "disk": 50,
            "ports": ["22/tcp"],
            "env": {"PUBLIC_KEY": PUBLIC_KEY},
        }
    ]

    seen = set()
    while (state := provider.get_instance(info.instance_id)).state != InstanceState.RUNNING:
        assert state.state == InstanceState.BOOTING and state.address is None
        seen.add(state.details["status"])
        time.sleep(0.02)
    assert seen == {"PROVISIONING", "STARTING", "RUNNING"}  # RUNNING without a 22/tcp mapping is still booting
    assert (state.address, state.details["ssh_port"], state.details["status"]) == (fake.ssh_host, 2222, "RUNNING")
    assert provider.api_calls == len(fake.calls)

    provider.terminate(info.instance_id)
    assert provider.find_instance(name) is None
    with pytest.raises(InstanceNotFoundError):
        provider.get_instance(info.instance_id)
    fake.assert_all_terminated()


def test_pod_without_ssh_port_never_reads_running() -> None:
    ssh: dict[str, Any] = {"direct": None, "proxy": {"host": "ssh.runpod.io"}}
    pod: dict[str, Any] = {"status": "RUNNING", "runtime": None, "ssh": ssh}
    assert state_of(pod) == InstanceState.BOOTING
    pod["runtime"] = {"ports": [{"private": 8888, "public": 43210, "type": "http", "ip": "1.2.3.4"}]}
    assert state_of(pod) == InstanceState.BOOTING
    ssh["direct"] = {"host": "1.2.3.4", "port": 34446, "username": "root", "command": "ssh ..."}
    assert state_of(pod) == InstanceState.RUNNING
    assert state_of({"status": "EXITED"}) == InstanceState.FAILED
    assert state_of({"status": "SOMETHING_NEW"}) == InstanceState.UNKNOWN


def test_find_and_list_by_name_prefix(fake: FakeRunPod, provider: RunPodProvider) -> None:
    offer = offer_for(provider, RTX4090)
    ours = [provider.launch(offer, f"{NAME_PREFIX}runpod-list-{n}") for n in (1, 2)]
    other = provider.launch(offer, "someone-elses-pod")
    assert {i.name for i in provider.list_instances()} == {i.name for i in ours}
    assert [i.name for i in provider.list_instances(NAME_PREFIX + "runpod-list-2")] == [ours[1].name]
    found = provider.find_instance(ours[0].name)
    assert found is not None and found.instance_id == ours[0].instance_id and found.region == "EU-RO-1"
    assert found.state == InstanceState.RUNNING and found.details["ssh_port"] == 2222
    assert provider.find_instance(NAME_PREFIX + "nobody") is None

    provider.terminate(ours[0].instance_id)
    assert provider.find_instance(ours[0].name) is None
    assert [i.name for i in provider.list_instances()] == [ours[1].name]
    provider.terminate(ours[1].instance_id)
    provider.terminate(other.instance_id)
    fake.assert_all_terminated()


def test_terminate_is_quiet_when_already_gone(fake: FakeRunPod, provider: RunPodProvider) -> None:
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-twice-1")
    provider.terminate(info.instance_id)
    provider.terminate(info.instance_id)  # deleted: 404, quiet
    provider.terminate("nosuchpod00000")  # unknown: 404, quiet
    deletes = [s for m, p, s in fake.calls if m == "DELETE"]
    assert deletes == [204, 404, 404]
    fake.assert_all_terminated()


def test_deleted_pod_reads_terminated_then_not_found(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.terminate_seconds = 0.3
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-slowterm-1")
    provider.terminate(info.instance_id)
    gone = provider.get_instance(info.instance_id)
    assert (gone.state, gone.details["status"]) == (InstanceState.TERMINATED, "TERMINATED")
    assert not gone.interrupted and "interruption" not in gone.details  # deleted by us
    assert provider.find_instance(info.name) is None and provider.list_instances() == []
    provider.terminate(info.instance_id)  # asked again: quiet
    deadline = time.monotonic() + 3
    with pytest.raises(InstanceNotFoundError):
        while time.monotonic() < deadline:
            provider.get_instance(info.instance_id)
            time.sleep(0.05)
    fake.assert_all_terminated()


def test_settings_shape_the_pod(fake: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = use_settings(
        monkeypatch,
        fake,
        ssh_public_key="",
        image="runpod/pytorch:custom",
        cloud_type="community",
        container_disk_gb="80",
        volume_gb=20,
    )
    info = provider.launch(offer_for(provider, RTX4090), NAME_PREFIX + "runpod-settings-1")
    body = fake.created[0]
    assert body["startSsh"] is True and "env" not in body  # the account's registered keys instead
    assert (body["image"], body["cloud"], body["disk"]) == ("runpod/pytorch:custom", "COMMUNITY", 80)
    assert body["mounts"] == {"persistent": {"size": 20, "path": "/workspace"}}
    assert (info.region, info.price_per_hour, info.details["cloud"]) == ("US-CA-2", 0.34, "COMMUNITY")
    assert fake.launched()[0].extra["env"]["PUBLIC_KEY"] == fake.account_ssh_keys[0]
    terminate_all(provider, fake)


@pytest.mark.parametrize(("settings", "match"), [({"volume_gb": 5}, "volume_gb"), ({"container_disk_gb": "x"}, "disk")])
def test_bad_settings_are_bad_requests(
    fake: FakeRunPod, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], match: str
) -> None:
    offer = offer_for(use_settings(monkeypatch, fake), A100)
    provider = use_settings(monkeypatch, fake, **settings)
    with pytest.raises(BadRequestError, match=match) as caught:
        provider.launch(offer, NAME_PREFIX + "runpod-badsettings-1")
    assert "runpod_default" in str(caught.value)
    assert fake.launched() == []


def test_unknown_cloud_type_is_a_bad_request(fake: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadRequestError, match="cloud_type 'SPOT' must be SECURE, COMMUNITY or ALL"):
        use_settings(monkeypatch, fake, cloud_type="spot").list_offers(GpuRequest())
    assert fake.calls == []


# --- faults ----------------------------------------------------------------------------------------


def test_launch_without_capacity_raises_no_capacity(fake: FakeRunPod, provider: RunPodProvider) -> None:
    offer = offer_for(provider, A100, "US-KS-2")
    fake.faults.no_capacity = True
    assert not any(o.available for o in provider.list_offers(GpuRequest()))
    with pytest.raises(OfferRefusedError) as caught:  # the next offer is tried; capacity is not claimed
        provider.launch(offer, NAME_PREFIX + "runpod-nocap-1")
    assert not isinstance(caught.value, NoCapacityError)
    assert CAPACITY_DETAIL in str(caught.value) and "HTTP 400" in str(caught.value)
    assert fake.launched() == [] and posts(fake) == [400]

    fake.faults.no_capacity = False
    fake.stock[RTX4090]["SECURE"] = {}
    nowhere = offer_for(provider, RTX4090)
    assert nowhere.region is None
    with pytest.raises(NoCapacityError, match="no data center"):
        provider.launch(nowhere, NAME_PREFIX + "runpod-nocap-2")
    assert posts(fake) == [400]


def test_refused_launch_although_listed(fake: FakeRunPod, provider: RunPodProvider) -> None:
    offer = offer_for(provider, A100, "US-KS-2")
    assert offer.available
    fake.faults.refuse_launch = 1
    with pytest.raises(OfferRefusedError, match="no longer any instances available"):
        provider.launch(offer, NAME_PREFIX + "runpod-refuse-1")
    info = provider.launch(offer, NAME_PREFIX + "runpod-refuse-1")
    assert len(fake.launched()) == 1 and info.instance_id == fake.launched()[0].id
    terminate_all(provider, fake)


def test_closed_gpu_pool_is_skipped_as_not_open_never_as_capacity(fake: FakeRunPod, provider: RunPodProvider) -> None:
    """A 403 on create: "your account cannot access the requested pool, skip this candidate". The key
    itself may create pods (the probe answers 422), so the offer is skipped, named for what it is."""
    fake.forbidden_gpus.add(H100)
    fake.stock[H100]["SECURE"] = {"US-TX-3": "HIGH"}
    with pytest.raises(PoolNotOpenError) as caught:
        provider.launch(offer_for(provider, H100), NAME_PREFIX + "runpod-403-1")
    message = str(caught.value)
    assert "HTTP 403: Forbidden: access denied" in message and "not open to the account" in message
    assert "not a capacity refusal" in message
    assert fake.launched() == [] and [s for _, m, p, _, s in fake.requests if m == "POST"] == [403, 422]
    with pytest.raises(PoolNotOpenError):  # the key was cleared once: no second probe
        provider.launch(offer_for(provider, H100), NAME_PREFIX + "runpod-403-2")
    assert [s for _, m, p, _, s in fake.requests if m == "POST"] == [403, 422, 403]


def test_a_key_that_may_not_create_pods_fails_at_once_naming_the_connection(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    """A read-only key: the first 403 on create leads to the permission probe, which is refused too, so
    the launch fails on the key (an AuthorizationError, not capacity) instead of trying every offer."""
    fake.read_only = True
    with pytest.raises(AuthorizationError) as caught:
        provider.launch(offer_for(provider, A100, "US-KS-2"), NAME_PREFIX + "runpod-ro-1")
    message = str(caught.value)
    assert "'runpod_default' may not create pods" in message and "Pods" in message and "API Keys" in message
    assert not isinstance(caught.value, NoCapacityError) and fake.launched() == []
    assert fake.api_key not in message


def test_the_permission_probe_creates_nothing(fake: FakeRunPod, provider: RunPodProvider) -> None:
    provider.hook.check_create_permission()  # 422: through authorization, refused as a body
    assert [s for _, m, _, _, s in fake.requests if m == "POST"] == [422] and fake.launched() == []
    fake.read_only = True
    with pytest.raises(AuthorizationError, match="may not create pods"):
        provider.hook.check_create_permission()


def test_a_400_on_create_tries_the_next_offer_without_calling_it_capacity(
    fake: FakeRunPod, provider: RunPodProvider
) -> None:
    """The spec gives capacity no code: any 400 on create ("a rule, or could not be placed") skips the
    offer, and the message says a 400 everywhere points at the request."""
    bogus = Offer("runpod", "1x NVIDIA Imaginary 9000 (SECURE)", 1.0, "US-KS-2", "NVIDIA Imaginary 9000", 1)
    with pytest.raises(CreateRefusedError, match="unknown GPU type") as caught:
        provider.launch(bogus, NAME_PREFIX + "runpod-bogus-1")
    assert "no code to tell 'no capacity' from a rule" in str(caught.value)


def test_rate_limit_burst_is_retried_after_retry_after(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.rate_limit = 2
    fake.faults.retry_after = 0.2
    offers = provider.list_offers(GpuRequest(gpu="4090"))
    assert [o.instance_type for o in offers] == [f"1x {RTX4090} (SECURE)"]
    calls = [(t, status) for t, _, path, _, status in fake.requests if path == "/v2/catalog/gpus"]
    assert [status for _, status in calls] == [429, 429, 200]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert provider.api_calls == 3


def test_rate_limited_launch_is_retried(fake: FakeRunPod, provider: RunPodProvider) -> None:
    body = provider.pod_body(offer_for(provider, A100), NAME_PREFIX + "runpod-429-1")
    fake.faults.rate_limit = 1  # a 429 means the create was not acted on: safe to send again
    fake.faults.retry_after = 0.05
    pod = provider.hook.create_pod(body)
    assert posts(fake) == [429, 201]
    assert [i.id for i in fake.launched()] == [pod["id"]]
    terminate_all(provider, fake)


def test_error_after_create_returns_the_created_pod(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.error_after_create = 1
    name = NAME_PREFIX + "runpod-5xx-1"
    info = provider.launch(offer_for(provider, A100), name)
    assert [i.id for i in fake.launched()] == [info.instance_id]
    assert info.name == name and posts(fake) == [500]  # not sent again: it had been created
    terminate_all(provider, fake)


def test_error_after_create_without_a_pod_reraises(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.error_after_create = 1
    fake.faults.vanish = True  # created, then lost: the name finds nothing
    with pytest.raises(ProviderUnavailableError, match="HTTP 500"):
        provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-5xx-2")
    fake.assert_all_terminated()


def test_failed_terminate_is_retried_by_the_hook(fake: FakeRunPod, provider: RunPodProvider) -> None:
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-termfail-1")
    fake.faults.terminate_fail = 1
    provider.terminate(info.instance_id)  # DELETE is idempotent: retried after the 500
    assert [s for m, _, s in fake.calls if m == "DELETE"] == [500, 204]
    fake.assert_all_terminated()


def test_terminate_failing_throughout_raises(fake: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = use_settings(monkeypatch, fake, retry_attempts=2)
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-termfail-2")
    fake.faults.terminate_fail = 2
    with pytest.raises(ProviderUnavailableError, match="Internal Server Error"):
        provider.terminate(info.instance_id)
    assert provider.get_instance(info.instance_id).state == InstanceState.RUNNING
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()


def test_unhealthy_pod_is_failed(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.unhealthy = True
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-sick-1")
    state = provider.get_instance(info.instance_id)
    assert (state.state, state.details["status"], state.address) == (InstanceState.FAILED, "ERROR", None)
    assert provider.find_instance(info.name) is not None  # still billing: the reaper must see it
    terminate_all(provider, fake)


def test_vanished_pod_is_not_found(fake: FakeRunPod, provider: RunPodProvider) -> None:
    fake.faults.vanish = True
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-vanish-1")
    with pytest.raises(InstanceNotFoundError, match="Not Found: pod not found"):
        provider.get_instance(info.instance_id)
    assert provider.list_instances() == []
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()


# --- configuration and credentials -----------------------------------------------------------------


def test_wrong_api_key_is_a_bad_request_without_the_key(fake: FakeRunPod, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "rpa_WRONGKEY0123456789abcdef"
    conn = json.loads(fake.connection(**SETTINGS))
    conn["password"] = wrong
    monkeypatch.setenv("AIRFLOW_CONN_RUNPOD_DEFAULT", json.dumps(conn))
    with pytest.raises(AuthorizationError) as caught:
        RunPodProvider().list_offers(GpuRequest())
    message = str(caught.value)
    assert "runpod_default" in message and "HTTP 401" in message and "invalid bearer token" in message
    assert wrong not in message and fake.api_key not in message
    assert fake.calls == [("GET", "/v2/catalog/gpus", 401)]  # not retried


def test_fake_speaks_the_documented_errors(fake: FakeRunPod) -> None:
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    missing = requests.get(f"{fake.url}/v2/pods", timeout=5)
    assert missing.status_code == 401 and missing.json()["detail"] == "missing bearer token"
    v1_body: dict[str, Any] = {"name": "x", "imageName": "img", "gpuTypeIds": [A100], "gpuCount": 1}
    with fake.expect_violations("'image' is a required property"):
        answer = requests.post(f"{fake.url}/v2/pods", json=v1_body, headers=auth, timeout=5)
    assert answer.status_code == 422 and answer.json()["detail"] == "Request validation failed."
    assert "$: missing property 'image'" in answer.json()["errors"]
    with fake.expect_violations("createPod"):
        both = requests.post(
            f"{fake.url}/v2/pods",
            json={"name": "x", "image": "i", "gpu": {"id": A100}, "cpu": {}},
            headers=auth,
            timeout=5,
        )
    assert both.status_code == 400 and both.json()["title"] == "Bad Request"
    product = requests.get(f"{fake.url}/v2/catalog/gpus", params={"include": "AVAILABILITY"}, headers=auth, timeout=5)
    assert product.status_code == 400
    plain = requests.get(f"{fake.url}/v2/catalog/gpus", headers=auth, timeout=5).json()["gpus"]
    assert plain and "availability" not in plain[0] and plain[0]["price"]["secure"] > 0
    with fake.expect_violations("query parameter 'name' is not in the spec"):
        listed = requests.get(f"{fake.url}/v2/pods", params={"name": "ignored"}, headers=auth, timeout=5)
    assert listed.json() == {"pods": []}
    assert fake.launched() == []


def test_ssh_box_uses_the_pod_ip_and_mapped_port(
    fake: FakeRunPod, provider: RunPodProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh_conn = {"conn_type": "ssh", "extra": {"no_host_key_check": True}}
    monkeypatch.setenv("AIRFLOW_CONN_GPU_INSTANCE_SSH", json.dumps(ssh_conn))
    info = provider.launch(offer_for(provider, A100), NAME_PREFIX + "runpod-ssh-1")
    running = wait_state(provider, info.instance_id, InstanceState.RUNNING)
    box = provider.ssh_box(running)
    assert (box.hook.remote_host, box.hook.port, box.hook.username) == (fake.ssh_host, fake.ssh_port, "root")
    terminate_all(provider, fake)
