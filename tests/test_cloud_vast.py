"""VastProvider against FakeVast: offers (on-demand and interruptible bids), idempotent launch by
label, states, terminate, outbid interruptible instances, and every fault switch (capacity,
plain-text 429 bursts, 5xx after create, failing destroy, unhealthy, vanished, bad key)."""

from __future__ import annotations

import contextlib
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
    ProviderUnavailableError,
)
from gpu_training.hooks.cloud_api import AuthorizationError, RateLimitedError, ServerError
from gpu_training.offers import gpu_matches, rank_offers
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceState, Offer
from gpu_training.providers.vast import DEFAULT_IMAGE, VastProvider, ask_id_of, interruption_of, state_of
from tests.fakeclouds.base import terminate_all, wait_state
from tests.fakeclouds.vast import FakeVast

SETTINGS: dict[str, Any] = {"retry_initial_seconds": 0.05, "retry_max_wait_seconds": 2}
CONN_VAR = "AIRFLOW_CONN_VAST_DEFAULT"


@pytest.fixture(scope="module")
def fake_server() -> Iterator[FakeVast]:
    fake = FakeVast(ssh_host="127.0.0.1", ssh_port=2222)
    yield fake
    fake.stop()


@pytest.fixture
def fake(fake_server: FakeVast, monkeypatch: pytest.MonkeyPatch) -> FakeVast:
    fake_server.reset()
    monkeypatch.setenv(CONN_VAR, fake_server.connection(**SETTINGS))
    return fake_server


@pytest.fixture
def provider(fake: FakeVast) -> VastProvider:
    return VastProvider()


def configured(fake: FakeVast, monkeypatch: pytest.MonkeyPatch, **extra: Any) -> VastProvider:
    monkeypatch.setenv(CONN_VAR, fake.connection(**{**SETTINGS, **extra}))
    return VastProvider()


def offer_for(provider: VastProvider, ask_id: int, *, spot: bool = False) -> Offer:
    offers = provider.list_offers(GpuRequest(spot=spot))
    return next(o for o in offers if ask_id_of(o.instance_type) == ask_id and o.spot == spot)


def creates(fake: FakeVast) -> list[tuple[str, int]]:
    return [(p, s) for m, p, s in fake.calls if m == "PUT" and p.startswith("/api/v0/asks/")]


# --- offers ----------------------------------------------------------------------------------------


def test_ask_id_and_state_helpers() -> None:
    assert ask_id_of("1x RTX 4090 (ask 4101)") == 4101
    assert ask_id_of("gpu_1x_a10") is None
    assert state_of({"actual_status": None}) == InstanceState.BOOTING
    assert state_of({"actual_status": "loading"}) == InstanceState.BOOTING
    assert state_of({"actual_status": "running"}) == InstanceState.RUNNING
    for failed in ("exited", "offline", "unknown", "stopped"):
        assert state_of({"actual_status": failed}) == InstanceState.FAILED
    assert state_of({"actual_status": "running", "cur_state": "unloaded"}) == InstanceState.STOPPING
    assert state_of({"actual_status": "something new"}) == InstanceState.UNKNOWN


def test_offers_one_per_ask_on_demand(fake: FakeVast, provider: VastProvider) -> None:
    offers = provider.list_offers(GpuRequest())
    table = {(o.instance_type, o.region): o for o in offers}
    assert set(table) == {
        ("1x RTX 4090 (ask 4101)", "Sweden, SE"),
        ("1x RTX 4090 (ask 4102)", "Texas, US"),
        ("1x A100 SXM4 (ask 4201)", "US"),
        ("1x A100 SXM4 (ask 4202)", "Quebec, CA"),
        ("1x H100 SXM (ask 4301)", "US"),
        ("8x H100 SXM (ask 4308)", "Texas, US"),
    }  # the unverified RTX 3090 is left out (verified_only defaults to true)
    rtx = table["1x RTX 4090 (ask 4101)", "Sweden, SE"]
    assert (rtx.provider, rtx.price_per_hour, rtx.gpu_count, rtx.available, rtx.spot) == ("vast", 0.35, 1, True, False)
    assert gpu_matches("RTX4090", rtx.gpu_name) and not gpu_matches("RTX 3090", rtx.gpu_name)
    a100 = table["1x A100 SXM4 (ask 4201)", "US"]
    assert (a100.price_per_hour, a100.gpu_count) == (1.10, 1) and gpu_matches("A100", a100.gpu_name)
    eight = table["8x H100 SXM (ask 4308)", "Texas, US"]
    assert (eight.price_per_hour, eight.gpu_count) == (17.60, 8) and gpu_matches("H100", eight.gpu_name)
    assert all(o.available and not o.spot for o in offers)
    query = fake.queries[-1]
    assert query["type"] == "on-demand" and query["verified"] == {"eq": True}
    assert query["disk_space"] == {"gte": 40.0} and query["order"] == [["dph_total", "asc"]]
    assert "num_gpus" not in query  # any GPU: no count filter
    assert [m for m, p, _ in fake.calls] == ["POST"] and provider.api_calls == 1


def test_interruptible_offers_are_priced_at_the_bid(fake: FakeVast, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = configured(fake, monkeypatch)
    offers = provider.list_offers(GpuRequest(gpu="RTX 4090", spot=True))
    assert {(ask_id_of(o.instance_type), o.spot, o.price_per_hour) for o in offers} == {
        (4101, False, 0.35),
        (4102, False, 0.42),
        (4101, True, 0.20),
        (4102, True, 0.25),
    }
    assert [q["type"] for q in fake.queries] == ["on-demand", "bid"]
    ranked = rank_offers(offers, GpuRequest(gpu="RTX 4090", spot=True))
    assert (ranked[0].spot, ranked[0].price_per_hour, ranked[0].region) == (True, 0.20, "Sweden, SE")
    assert not any(o.spot for o in provider.list_offers(GpuRequest(gpu="RTX 4090")))  # on-demand only

    bidder = configured(fake, monkeypatch, bid_multiplier=1.5)
    bids = [o for o in bidder.list_offers(GpuRequest(gpu="A100", spot=True)) if o.spot]
    assert sorted(o.price_per_hour for o in bids) == [0.9, 1.05]


def test_offers_follow_the_request_and_settings(fake: FakeVast, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = VastProvider()
    eight = provider.list_offers(GpuRequest(gpu="H100", gpu_count=8))
    assert [o.instance_type for o in eight] == ["8x H100 SXM (ask 4308)"]
    assert fake.queries[-1]["num_gpus"] == {"gte": 8}
    assert [o.instance_type for o in provider.list_offers(GpuRequest(gpu="A100", regions=("US",)))] == [
        "1x A100 SXM4 (ask 4201)"
    ]

    everyone = configured(fake, monkeypatch, verified_only=False, disk_gb=500)
    offers = everyone.list_offers(GpuRequest())
    assert [o.instance_type for o in offers] == ["8x H100 SXM (ask 4308)"]  # the only ask with 500 GB free
    assert fake.queries[-1]["verified"] == {"in": [True, False]} and fake.queries[-1]["allocated_storage"] == 500
    cheap = configured(fake, monkeypatch, verified_only="false").list_offers(GpuRequest(gpu="RTX 3090"))
    assert [(o.instance_type, o.price_per_hour) for o in cheap] == [("1x RTX 3090 (ask 4050)", 0.15)]


def test_bad_settings_are_bad_requests(fake: FakeVast, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BadRequestError, match=r"bid_multiplier.*at least 1"):
        configured(fake, monkeypatch, bid_multiplier=0.5).list_offers(GpuRequest(spot=True))
    with pytest.raises(BadRequestError, match="disk_gb"):
        configured(fake, monkeypatch, disk_gb="lots").list_offers(GpuRequest())
    with pytest.raises(BadRequestError, match="verified_only"):
        configured(fake, monkeypatch, verified_only="maybe").list_offers(GpuRequest())
    provider = VastProvider()
    with pytest.raises(BadRequestError, match="names no Vast ask"):
        provider.launch(Offer("vast", "1x RTX 4090", 0.35), NAME_PREFIX + "vast-noask-1")
    assert fake.launched() == []


# --- launch, states, find/list, terminate ----------------------------------------------------------


def test_launch_is_idempotent_by_label_and_boots(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.boot_seconds = 0.3
    offer = offer_for(provider, 4101)
    name = NAME_PREFIX + "vast-idem-1"
    info = provider.launch(offer, name)
    assert info.state == InstanceState.BOOTING and info.address is None
    assert info.details["status"] in ("null", "loading") and "ssh_port" not in info.details
    assert (info.name, info.region, info.price_per_hour, info.instance_type) == (
        name,
        "Sweden, SE",
        0.35,
        "1x RTX 4090",
    )
    again = provider.launch(offer, name)
    assert again.instance_id == info.instance_id
    assert len(fake.launched()) == 1 and creates(fake) == [("/api/v0/asks/4101/", 200)]

    request = fake.launched()[0].extra["request"]
    assert request == {
        "client_id": "me",
        "image": DEFAULT_IMAGE,
        "label": name,
        "disk": 40.0,
        "runtype": "ssh",
        "onstart": "touch ~/.no_auto_tmux",
    }  # no price: on demand

    running = wait_state(provider, info.instance_id, InstanceState.RUNNING)
    assert (running.address, running.details["ssh_port"]) == (fake.ssh_host, fake.ssh_port)
    assert running.details["status"] == "running" and running.details["is_bid"] is False
    assert provider.api_calls == len(fake.calls)

    provider.terminate(info.instance_id)
    with pytest.raises(InstanceNotFoundError, match="no_such_instance"):
        provider.get_instance(info.instance_id)
    assert provider.find_instance(name) is None
    fake.assert_all_terminated()


def test_bid_offer_creates_an_interruptible_instance_at_its_price(
    fake: FakeVast, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = configured(fake, monkeypatch, bid_multiplier=1.25, image="me/trainer:1", disk_gb=60, onstart="echo hi")
    offer = offer_for(provider, 4201, spot=True)
    assert (offer.spot, offer.price_per_hour) == (True, 0.75)
    info = provider.launch(offer, NAME_PREFIX + "vast-bid-1")
    request = fake.launched()[0].extra["request"]
    assert (request["price"], request["image"], request["disk"]) == (0.75, "me/trainer:1", 60.0)
    assert request["onstart"] == "touch ~/.no_auto_tmux\necho hi"
    assert (info.price_per_hour, info.details["is_bid"], fake.launched()[0].spot) == (0.75, True, True)
    terminate_all(provider, fake)


def test_a_rented_ask_is_taken_until_destroyed(fake: FakeVast, provider: VastProvider) -> None:
    offer = offer_for(provider, 4102)
    first = provider.launch(offer, NAME_PREFIX + "vast-taken-1")
    listed = {ask_id_of(o.instance_type): o.available for o in provider.list_offers(GpuRequest(gpu="RTX 4090"))}
    assert listed == {4101: True}  # the search asks for rentable asks only, as Vast's client does
    with pytest.raises(NoCapacityError) as caught:
        provider.launch(offer, NAME_PREFIX + "vast-taken-2")
    assert "no_such_ask" in str(caught.value) and "Instance type 4102 is no longer available" in str(caught.value)
    assert creates(fake) == [("/api/v0/asks/4102/", 200), ("/api/v0/asks/4102/", 410)]
    provider.terminate(first.instance_id)
    assert offer_for(provider, 4102).available  # the machine is free again
    fake.assert_all_terminated()


def test_find_and_list_by_label_prefix(fake: FakeVast, provider: VastProvider) -> None:
    ours = [
        provider.launch(offer_for(provider, ask), f"{NAME_PREFIX}vast-list-{n}") for n, ask in ((1, 4201), (2, 4202))
    ]
    other = provider.launch(offer_for(provider, 4301), "someone-elses-box")
    assert {i.name for i in provider.list_instances()} == {i.name for i in ours}
    assert [i.name for i in provider.list_instances(NAME_PREFIX + "vast-list-2")] == [ours[1].name]
    found = provider.find_instance(ours[0].name)
    assert found is not None and found.instance_id == ours[0].instance_id and found.region == "US"
    assert provider.find_instance(NAME_PREFIX + "nobody") is None
    provider.terminate(ours[0].instance_id)
    assert provider.find_instance(ours[0].name) is None  # destroyed instances are not listed
    assert [i.name for i in provider.list_instances()] == [ours[1].name]
    provider.terminate(ours[1].instance_id)
    provider.terminate(other.instance_id)
    fake.assert_all_terminated()


def test_terminate_is_quiet_when_already_gone(fake: FakeVast, provider: VastProvider) -> None:
    info = provider.launch(offer_for(provider, 4301), NAME_PREFIX + "vast-twice-1")
    provider.terminate(info.instance_id)
    provider.terminate(info.instance_id)  # 404 no_such_instance: nothing left to do
    provider.terminate("123456789")  # never existed
    deletes = [s for m, p, s in fake.calls if m == "DELETE"]
    assert deletes == [200, 404, 404]
    fake.assert_all_terminated()


def test_destroying_then_gone(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.terminate_seconds = 0.3
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-slowterm-1")
    provider.terminate(info.instance_id)
    stopping = provider.get_instance(info.instance_id)
    assert (stopping.state, stopping.details["cur_state"]) == (InstanceState.STOPPING, "unloaded")
    assert provider.find_instance(info.name) is not None  # being destroyed is not gone yet
    provider.terminate(info.instance_id)  # asked again meanwhile: quiet
    deadline = time.monotonic() + 5
    while provider.find_instance(info.name) is not None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(InstanceNotFoundError):
        provider.get_instance(info.instance_id)
    fake.assert_all_terminated()


def test_destroyed_instance_answered_as_null_is_not_found(fake: FakeVast, provider: VastProvider) -> None:
    """``{"instances": null}`` contradicts showInstance's schema, but the official client reads it as
    gone, so the hook does too (the contract check says the fake went outside the spec)."""
    fake.destroyed_as_null = True
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-null-1")
    provider.terminate(info.instance_id)
    with (
        fake.expect_violations("showInstance -> 200", "None is not of type 'object'"),
        pytest.raises(InstanceNotFoundError, match="destroyed or never rented"),
    ):
        provider.get_instance(info.instance_id)
    fake.assert_all_terminated()


# --- capacity --------------------------------------------------------------------------------------


def test_launch_without_capacity_raises_no_capacity(fake: FakeVast, provider: VastProvider) -> None:
    offer = offer_for(provider, 4101)
    fake.faults.no_capacity = True
    assert provider.list_offers(GpuRequest()) == []  # rentable asks only: none is listed
    with pytest.raises(NoCapacityError) as caught:
        provider.launch(offer, NAME_PREFIX + "vast-nocap-1")
    message = str(caught.value)
    assert "no_such_ask" in message and "error 410/3907" in message and "no longer available" in message
    assert fake.launched() == []


def test_refused_launch_although_listed(fake: FakeVast, provider: VastProvider) -> None:
    offer = offer_for(provider, 4201)
    assert offer.available
    fake.faults.refuse_launch = 1
    with pytest.raises(NoCapacityError, match="no longer available"):
        provider.launch(offer, NAME_PREFIX + "vast-refuse-1")
    info = provider.launch(offer, NAME_PREFIX + "vast-refuse-1")
    assert [i.id for i in fake.launched()] == [info.instance_id]
    terminate_all(provider, fake)


def test_unknown_ask_is_no_capacity(fake: FakeVast, provider: VastProvider) -> None:
    with pytest.raises(NoCapacityError, match="Instance type by id 999 is not available"):
        provider.launch(Offer("vast", "1x RTX 4090 (ask 999)", 0.3), NAME_PREFIX + "vast-gone-1")
    assert creates(fake) == [("/api/v0/asks/999/", 404)] and fake.launched() == []


# --- rate limits and server errors -----------------------------------------------------------------


def test_plain_text_429_burst_is_retried_after_retry_after(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.rate_limit = 2
    fake.faults.retry_after = 0.2
    offers = provider.list_offers(GpuRequest(gpu="H100"))
    assert {o.instance_type for o in offers} == {"1x H100 SXM (ask 4301)", "8x H100 SXM (ask 4308)"}
    calls = [(t, status) for t, _, path, status in fake.timed_calls if path == "/api/v0/bundles/"]
    assert [status for _, status in calls] == [429, 429, 200]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert provider.api_calls == 3


def test_429_body_is_the_documented_detail_and_reaches_the_error(
    fake: FakeVast, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.faults.rate_limit = 1
    answer = requests.get(
        f"{fake.url}/api/v1/instances/", headers={"Authorization": f"Bearer {fake.api_key}"}, timeout=5
    )
    assert answer.status_code == 429 and answer.headers["Content-Type"].startswith("application/json")
    assert answer.json()["detail"].startswith("API requests too frequent")

    fake.calls.clear()
    fake.faults.rate_limit = 10
    fake.faults.retry_after = None  # as Vast: no Retry-After, the hook's backoff waits
    provider = configured(fake, monkeypatch, retry_attempts=2)
    with pytest.raises(RateLimitedError) as caught:
        provider.list_instances()
    assert "HTTP 429: API requests too frequent endpoint threshold" in str(caught.value)
    assert caught.value.retry_after is None
    assert [s for _, p, s in fake.calls if p == "/api/v1/instances/"] == [429, 429]


def test_rate_limited_create_is_retried(fake: FakeVast, provider: VastProvider) -> None:
    offer = offer_for(provider, 4101)
    name = NAME_PREFIX + "vast-429-1"
    fake.faults.rate_limit = 1  # a 429 means the rent was not acted on: safe to send again
    fake.faults.retry_after = 0.05
    instance_id = provider.hook.create_instance(4101, provider._create_body(offer, name))
    assert creates(fake) == [("/api/v0/asks/4101/", 429), ("/api/v0/asks/4101/", 200)]
    assert [i.id for i in fake.launched()] == [instance_id]
    found = provider.find_instance(name)
    assert found is not None and found.instance_id == instance_id
    terminate_all(provider, fake)


def test_error_after_create_returns_the_created_instance(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.error_after_create = 1
    name = NAME_PREFIX + "vast-5xx-1"
    info = provider.launch(offer_for(provider, 4101), name)
    assert [i.id for i in fake.launched()] == [info.instance_id]
    assert info.name == name
    assert creates(fake) == [("/api/v0/asks/4101/", 500)]  # not retried: the lookup found it
    terminate_all(provider, fake)


def test_server_error_without_instance_is_raised(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.error_after_create = 1
    offer = offer_for(provider, 4202)
    fake.faults.vanish = True  # created, answered 500, and lost at once: nothing to adopt
    with pytest.raises(ServerError, match="server_error"):
        provider.launch(offer, NAME_PREFIX + "vast-5xx-2")
    assert len(creates(fake)) == 1
    fake.assert_all_terminated()


def test_destroy_failure_is_retried_by_the_hook(fake: FakeVast, provider: VastProvider) -> None:
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-termfail-1")
    fake.faults.terminate_fail = 1
    provider.terminate(info.instance_id)  # DELETE is idempotent: the 500 is retried
    assert [s for m, _, s in fake.calls if m == "DELETE"] == [500, 200]
    fake.assert_all_terminated()


def test_persistent_destroy_failure_raises(fake: FakeVast, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = configured(fake, monkeypatch, retry_attempts=2)
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-termfail-2")
    fake.faults.terminate_fail = 5
    with pytest.raises(ProviderUnavailableError, match="server_error"):
        provider.terminate(info.instance_id)
    assert fake.live() and provider.get_instance(info.instance_id).state == InstanceState.RUNNING
    fake.faults.terminate_fail = 0
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()


# --- broken instances ------------------------------------------------------------------------------


def test_unhealthy_instance_is_failed(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.unhealthy = True
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-sick-1")
    state = provider.get_instance(info.instance_id)
    assert (state.state, state.details["status"]) == (InstanceState.FAILED, "exited")
    assert "exited unexpectedly" in state.details["status_msg"]
    assert provider.find_instance(info.name) is not None  # still billing: the reaper must see it
    terminate_all(provider, fake)


# --- outbid ----------------------------------------------------------------------------------------


def wait_destroyed(provider: VastProvider, instance_id: str) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            provider.get_instance(instance_id)
        except InstanceNotFoundError:
            return
        assert time.monotonic() < deadline, f"{instance_id} still there"
        time.sleep(0.05)


def test_outbid_interruptible_instance_is_interrupted(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.terminate_seconds = 0.3
    info = provider.launch(offer_for(provider, 4201, spot=True), NAME_PREFIX + "vast-outbid-1")
    running = wait_state(provider, info.instance_id, InstanceState.RUNNING)
    assert not running.interrupted and "interruption" not in running.details
    fake.interrupt(info.instance_id, status_msg="outbid by a higher priority rental")
    raw = requests.get(
        f"{fake.url}/api/v0/instances/{info.instance_id}/",
        headers={"Authorization": f"Bearer {fake.api_key}"},
        timeout=5,
    ).json()["instances"]
    assert (raw["actual_status"], raw["intended_status"], raw["cur_state"], raw["is_bid"]) == (
        "stopped",
        "running",
        "stopped",
        True,
    )
    outbid = provider.get_instance(info.instance_id)
    assert outbid.state == InstanceState.FAILED and outbid.state.is_gone and outbid.interrupted
    words = outbid.details["interruption"]
    assert words.startswith("outbid: interruptible instance (is_bid) stopped by Vast: actual_status stopped")
    assert "bid $0.6/h" in words and words.endswith("; status_msg: outbid by a higher priority rental")
    found = provider.find_instance(info.name)  # stopped, not destroyed: its disk still bills
    assert found is not None and found.interrupted
    provider.terminate(info.instance_id)
    destroying = provider.get_instance(info.instance_id)  # released on our destroy: no longer "outbid"
    assert destroying.details["cur_state"] == "unloaded" and not destroying.interrupted
    assert fake.ask(4201)["rented"]  # the machine stays with the higher bidder
    wait_destroyed(provider, info.instance_id)
    fake.assert_all_terminated()


def test_on_demand_instance_destroyed_by_us_is_not_interrupted(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.terminate_seconds = 0.3
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-ours-1")
    with pytest.raises(ValueError, match="only interruptible"):
        fake.interrupt(info.instance_id)  # on-demand rentals are never outbid
    provider.terminate(info.instance_id)
    destroying = provider.get_instance(info.instance_id)
    assert (destroying.state, destroying.interrupted) == (InstanceState.STOPPING, False)
    assert interruption_of({"is_bid": True, "actual_status": "stopped", "intended_status": "stopped"}) is None
    assert interruption_of({"is_bid": False, "actual_status": "stopped", "intended_status": "running"}) is None
    wait_destroyed(provider, info.instance_id)
    fake.assert_all_terminated()


def test_vanished_instance_is_not_found(fake: FakeVast, provider: VastProvider) -> None:
    fake.faults.vanish = True
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-vanish-1")
    with pytest.raises(InstanceNotFoundError, match="no_such_instance"):
        provider.get_instance(info.instance_id)
    assert provider.list_instances() == []
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()


# --- credentials and the fake's protocol -----------------------------------------------------------


def test_wrong_api_key_is_a_bad_request_without_the_key(fake: FakeVast, monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = "0123456789abcdef0123456789abcdef-wrong"
    conn = json.loads(fake.connection(**SETTINGS))
    conn["password"] = wrong
    monkeypatch.setenv(CONN_VAR, json.dumps(conn))
    with pytest.raises(AuthorizationError) as caught:
        VastProvider().list_offers(GpuRequest())
    message = str(caught.value)
    # searchOffers declares a refused key as its 404 ("Unauthorized - invalid or missing API key").
    assert "vast_default" in message and "Invalid user key" in message and "HTTP 404" in message
    assert wrong not in message and fake.api_key not in message
    assert fake.calls == [("POST", "/api/v0/bundles/", 404)]  # not retried
    with pytest.raises(AuthorizationError, match="HTTP 401"):
        VastProvider().get_instance("123")


def test_the_fake_serves_only_what_the_spec_lists(fake: FakeVast) -> None:
    """The v0 listing answers 410 ``deprecated_endpoint`` (and the check says it is outside the spec);
    an unknown search field is a 400 ``invalid_request``."""
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    with fake.expect_violations("GET /api/v0/instances/: no such operation"):
        answer = requests.get(f"{fake.url}/api/v0/instances/", params={"owner": "me"}, headers=auth, timeout=5)
    assert answer.status_code == 410 and answer.json()["error"] == "deprecated_endpoint"
    assert any("deprecated_endpoint" in a or "deprecated" in a for a in fake.contract_assumptions)
    with fake.expect_violations("body field 'colour' is not in the spec"):
        answer = requests.post(f"{fake.url}/api/v0/bundles/", json={"colour": {"eq": "red"}}, headers=auth, timeout=5)
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
    with fake.expect_violations("no such operation"):
        requests.put(f"{fake.url}/api/v0/search/asks/", json={"q": {}}, headers=auth, timeout=5)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"client_id": "me", "label": "x"}, "image is required"),
        ({"client_id": "me", "image": "i", "runtype": "telnet"}, "Unknown runtype"),
        ({"client_id": "me", "image": "i", "disk": -1}, "disk must be"),
        ({"client_id": "me", "image": "i", "price": 0.01}, "below the minimum bid"),
        ({"client_id": "me", "image": "i", "env": {"A": "1"}}, "env must be a string"),
    ],
)
def test_fake_validates_create_body(fake: FakeVast, body: dict[str, Any], words: str) -> None:
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    outside = "image" not in body or body.get("runtype") == "telnet" or isinstance(body.get("env"), dict)
    with contextlib.ExitStack() as stack:
        if outside:  # bodies the spec itself refuses: the contract check objects too
            stack.enter_context(fake.expect_violations("createInstance"))
        answer = requests.put(f"{fake.url}/api/v0/asks/4101/", json=body, headers=auth, timeout=5)
    assert answer.status_code == 400
    assert answer.json()["error"] in ("invalid_args", "invalid_price") and words in answer.json()["msg"]
    assert fake.launched() == []


def test_ssh_box_uses_the_proxy_host_and_port(
    fake: FakeVast, provider: VastProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_GPU_INSTANCE_SSH", json.dumps({"conn_type": "ssh", "extra": {"no_host_key_check": True}})
    )
    info = provider.launch(offer_for(provider, 4101), NAME_PREFIX + "vast-ssh-1")
    box = provider.ssh_box(info)
    assert (box.hook.remote_host, box.hook.port, box.hook.username) == (fake.ssh_host, fake.ssh_port, "root")
    terminate_all(provider, fake)


# --- the v1 listing: pages of 25 ---------------------------------------------------------------------


def test_launch_finds_its_instance_on_a_later_page(fake: FakeVast, provider: VastProvider) -> None:
    """An account with 60 instances: the lookup by label before renting pages through the v1 listing,
    and a relaunch finds the instance it made (past the first 25) instead of renting twice."""
    fake.add_foreign_instances(60)
    name = NAME_PREFIX + "vast-page-1"
    info = provider.launch(offer_for(provider, 4101), name)
    assert provider.launch(offer_for(provider, 4102), name).instance_id == info.instance_id
    assert len([i for i in fake.launched() if i.name == name]) == 1
    everything = provider.hook.list_instances()
    assert len(everything) == 61 and everything[-1]["label"] == name  # page 3 of 25s, by id
    pages = [path for _, method, path, _ in fake.timed_calls if path == "/api/v1/instances/" and method == "GET"]
    assert len(pages) >= 3
    assert [i.name for i in provider.list_instances()] == [name]  # only ours (the prefix), from every page
    provider.terminate(info.instance_id)
    for inst in fake.launched():
        fake.instances[inst.id].terminate_requested_at = fake.instances[inst.id].terminated_at = time.time()
    fake.assert_all_terminated()


def test_the_listing_follows_next_token_until_null(fake: FakeVast) -> None:
    fake.add_foreign_instances(51, label=NAME_PREFIX + "stray")
    auth = {"Authorization": f"Bearer {fake.api_key}"}
    first = requests.get(f"{fake.url}/api/v1/instances/", headers=auth, timeout=5).json()
    assert (first["instances_found"], first["total_instances"]) == (25, 51) and first["next_token"]
    hook = VastProvider().hook
    seen = [len(page) for page in hook.instance_pages()]
    assert seen == [25, 25, 1]
    with fake.expect_violations("showInstances", "query limit"):
        bad = requests.get(f"{fake.url}/api/v1/instances/", params={"limit": 26}, headers=auth, timeout=5)
    assert bad.status_code == 200 and bad.json()["instances_found"] == 25  # the spec's maximum
    for inst in fake.launched():
        fake.instances[inst.id].terminated_at = time.time()
