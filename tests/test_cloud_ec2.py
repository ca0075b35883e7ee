"""Ec2Provider against moto's EC2 behind Ec2FaultProxy: offers (on-demand prices from the price
list the proxy serves, or the dated table; instance type offerings, spot prices), idempotent launch
(by name and by ClientToken), spot launch, states, terminate, spot interruptions, and every fault
switch (capacity, throttling, 5xx after create, failing terminate, impaired, vanished, wrong
credentials)."""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from botocore.exceptions import ClientError

from gpu_training.errors import (
    BadRequestError,
    InstanceNotFoundError,
    NoCapacityError,
    ProviderUnavailableError,
)
from gpu_training.offers import NoOfferError, gpu_matches, rank_offers
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceState, Offer
from gpu_training.providers.ec2 import (
    INSTANCE_TYPES,
    PRICE_TABLE_DATE,
    TAG_MANAGED,
    TAG_PRICE,
    Ec2Provider,
    client_token,
    interruption_of,
)
from tests.fakeclouds.base import terminate_all, wait_state
from tests.fakeclouds.ec2 import Ec2FaultProxy, SpotPrice

REGION = "us-east-1"


@pytest.fixture(scope="module")
def proxy(moto_server: Any) -> Iterator[Ec2FaultProxy]:
    proxy = Ec2FaultProxy(moto_server.endpoint, region=REGION)
    yield proxy
    proxy.reset()  # terminates in moto whatever a failed test left
    proxy.stop()


def ubuntu_ami(proxy: Ec2FaultProxy, region: str) -> str:
    """One of moto's Ubuntu AMIs in ``region`` (moto ships AWS's public images)."""
    images = proxy.moto(region).describe_images(Owners=["amazon"], Filters=[{"Name": "name", "Values": ["*ubuntu*"]}])
    return str(sorted(i["ImageId"] for i in images["Images"] if i.get("RootDeviceName"))[0])


@pytest.fixture(scope="module")
def ami(proxy: Ec2FaultProxy) -> str:
    return ubuntu_ami(proxy, REGION)


@pytest.fixture
def settings(ami: str) -> dict[str, Any]:
    return {"ami_id": ami, "retry_attempts": 3}


@pytest.fixture
def fake(proxy: Ec2FaultProxy, settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Ec2FaultProxy:
    proxy.reset()
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", proxy.connection(**settings))
    return proxy


@pytest.fixture(scope="module")
def shared_provider() -> Ec2Provider:
    return Ec2Provider()  # reads the connection on first use, inside a test that set it


@pytest.fixture
def provider(fake: Ec2FaultProxy, shared_provider: Ec2Provider) -> Ec2Provider:
    """One provider for the tests with the default settings: a boto3 client costs ~0.3 s to create."""
    return shared_provider


def configure(fake: Ec2FaultProxy, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Ec2Provider:
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", fake.connection(**settings))
    return Ec2Provider()


def offer_for(provider: Ec2Provider, instance_type: str = "g5.xlarge", *, spot: bool = False) -> Offer:
    offers = provider.list_offers(GpuRequest(spot=spot))
    return next(o for o in offers if o.instance_type == instance_type and o.spot == spot)


def actions(fake: Ec2FaultProxy, action: str) -> list[int]:
    return [status for _, name, status in fake.calls if name == action]


def offered_by_moto(fake: Ec2FaultProxy, region: str) -> set[str]:
    reply = fake.moto(region).describe_instance_type_offerings(
        LocationType="region", Filters=[{"Name": "instance-type", "Values": sorted(INSTANCE_TYPES)}]
    )
    return {o["InstanceType"] for o in reply["InstanceTypeOfferings"]}


# --- offers ----------------------------------------------------------------------------------------


def test_on_demand_offers_from_the_price_list_and_the_region_offerings(
    fake: Ec2FaultProxy, provider: Ec2Provider
) -> None:
    offers = provider.list_offers(GpuRequest())
    table = {o.instance_type: o for o in offers}
    assert set(table) == set(INSTANCE_TYPES) and len(offers) == len(INSTANCE_TYPES)
    assert all(o.region == REGION and not o.spot and o.provider == "ec2" for o in offers)
    g5 = table["g5.xlarge"]
    assert (g5.price_per_hour, g5.gpu_count) == (1.006, 1) and gpu_matches("A10G", g5.gpu_name)
    assert (table["g4dn.xlarge"].price_per_hour, table["g6.xlarge"].price_per_hour) == (0.526, 0.8048)
    p5 = table["p5.48xlarge"]
    assert p5.gpu_count == 8 and gpu_matches("H100", p5.gpu_name)
    assert gpu_matches("A100", table["p4d.24xlarge"].gpu_name) and table["p4d.24xlarge"].gpu_count == 8
    assert table["p3.2xlarge"].gpu_count == 1 and gpu_matches("V100", table["p3.2xlarge"].gpu_name)
    offered = offered_by_moto(fake, REGION)
    assert {t for t, o in table.items() if o.available} == offered
    assert "g5.xlarge" in offered and offered != set(INSTANCE_TYPES)  # moto's data lacks some types here
    assert actions(fake, "DescribeInstanceTypeOfferings") == [200]
    assert actions(fake, "DescribeSpotPriceHistory") == []  # no spot asked for, no spot lookup
    # One GetProducts per type the region offers (the others are never launched, so not priced).
    assert sorted(fake.pricing_requests) == sorted((REGION, t) for t in offered)


def test_offers_follow_the_gpu_request(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    assert [o.instance_type for o in provider.list_offers(GpuRequest(gpu="H100"))] == ["p5.48xlarge"]
    a100 = provider.list_offers(GpuRequest(gpu="A100", gpu_count=8))
    assert {o.instance_type for o in a100} == {"p4d.24xlarge", "p4de.24xlarge"}
    l4 = provider.list_offers(GpuRequest(gpu="L4", gpu_count=4))
    assert {o.instance_type for o in l4} == {"g6.12xlarge", "g6.48xlarge"}
    assert provider.list_offers(GpuRequest(instance_type="g4dn.xlarge"))[0].instance_type == "g4dn.xlarge"
    calls = len(fake.calls)
    assert provider.list_offers(GpuRequest(gpu="TPUv5")) == []
    assert len(fake.calls) == calls  # nothing fits: no API call


def test_regions_prices_and_region_filter(fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = configure(
        fake,
        monkeypatch,
        ami_id=ami,
        regions="us-east-1, eu-west-1",
        prices={"g5.xlarge": 0.9, "g6.2xlarge": {"price": 0.98, "gpu": "NVIDIA L4", "gpu_count": 1}},
    )
    offers = provider.list_offers(GpuRequest(gpu="L4"))
    assert {(o.instance_type, o.region) for o in offers} >= {("g6.2xlarge", "us-east-1"), ("g6.xlarge", "eu-west-1")}
    added = next(o for o in offers if o.instance_type == "g6.2xlarge")
    assert (added.price_per_hour, added.gpu_count) == (0.98, 1)
    eu = {o.instance_type: o.available for o in offers if o.region == "eu-west-1"}
    assert eu["g6.xlarge"] == ("g6.xlarge" in offered_by_moto(fake, "eu-west-1"))
    g5 = provider.list_offers(GpuRequest(instance_type="g5.xlarge", regions=("eu-west-1",)))
    assert [(o.region, o.price_per_hour) for o in g5] == [("eu-west-1", 0.9)]


def test_spot_offers_at_the_cheapest_zones_latest_price(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    now = time.time()
    fake.spot_prices = [
        SpotPrice("g5.xlarge", "us-east-1a", 0.30, now - 7200),  # an old price: superseded
        SpotPrice("g5.xlarge", "us-east-1a", 0.45, now - 60),
        SpotPrice("g5.xlarge", "us-east-1b", 0.39, now - 300),
        SpotPrice("g5.xlarge", "us-east-1c", 0.20, now - 30, product_description="Windows"),
        SpotPrice("p5.48xlarge", "us-east-1d", 31.5, now - 10),
    ]
    offers = provider.list_offers(GpuRequest(spot=True))
    spot = {o.instance_type: o for o in offers if o.spot}
    assert set(spot) == {"g5.xlarge", "p5.48xlarge"}  # types without a spot price: no spot offer
    assert (spot["g5.xlarge"].price_per_hour, spot["g5.xlarge"].available) == (0.39, True)
    assert spot["p5.48xlarge"].price_per_hour == 31.5 and spot["p5.48xlarge"].gpu_count == 8
    assert len([o for o in offers if not o.spot]) == len(INSTANCE_TYPES)  # on-demand ones too
    assert not any(o.spot for o in provider.list_offers(GpuRequest()))


def test_spot_offers_skipped_when_the_price_history_is_refused(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.spot_history_error = "UnauthorizedOperation"
    offers = provider.list_offers(GpuRequest(gpu="A10G", spot=True))
    assert offers and not any(o.spot for o in offers)
    assert actions(fake, "DescribeSpotPriceHistory") == [403]


def test_spot_prices_from_moto_itself(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    spot = [o for o in provider.list_offers(GpuRequest(gpu="A10G", spot=True)) if o.spot]
    assert {o.instance_type for o in spot} >= {"g5.xlarge"} and all(o.price_per_hour > 0 for o in spot)


# --- on-demand prices -----------------------------------------------------------------------------


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "built-in table" in r.getMessage()
    ]


def test_on_demand_prices_follow_the_price_list_and_are_cached(
    fake: Ec2FaultProxy, provider: Ec2Provider, caplog: pytest.LogCaptureFixture
) -> None:
    fake.on_demand[(REGION, "p5.48xlarge")] = 41.5  # the table says 55.04
    fake.on_demand[(REGION, "g5.xlarge")] = 0.95  # the table says 1.006
    offers = {o.instance_type: o for o in provider.list_offers(GpuRequest())}
    assert (offers["p5.48xlarge"].price_per_hour, offers["g5.xlarge"].price_per_hour) == (41.5, 0.95)
    assert offers["g4dn.xlarge"].price_per_hour == 0.526  # the fake's price list has the table's price for it
    asked = len(fake.pricing_requests)
    assert asked == len(set(fake.pricing_requests)) and actions(fake, "GetProducts") == [200] * asked
    assert not fallback_warnings(caplog)

    fake.on_demand[(REGION, "p5.48xlarge")] = 60.0  # AWS changes it: seen tomorrow, not today
    again = Ec2Provider()  # another task: only the cache file is shared
    assert {o.instance_type: o.price_per_hour for o in again.list_offers(GpuRequest(gpu="H100"))} == {
        "p5.48xlarge": 41.5
    }
    assert len(fake.pricing_requests) == asked  # no GetProducts: the cache answered

    info = provider.launch(offers["g5.xlarge"], NAME_PREFIX + "ec2-listprice-1")
    assert info.price_per_hour == 0.95
    assert {t["Key"]: t["Value"] for t in fake.moto_instance(info.instance_id)["Tags"]}[TAG_PRICE] == "0.95"
    terminate_all(provider, fake)


def test_a_type_the_price_list_lacks_in_a_region_is_not_offered_there(
    fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = configure(fake, monkeypatch, ami_id=ami, regions=[REGION, "us-west-2"])
    fake.on_demand[("us-west-2", "p5.48xlarge")] = None
    offers = provider.list_offers(GpuRequest(gpu="H100"))
    assert [(o.region, o.price_per_hour) for o in offers] == [(REGION, 55.04)]  # no made-up us-west-2 price
    assert fake.pricing_requests == [(REGION, "p5.48xlarge"), ("us-west-2", "p5.48xlarge")]
    with pytest.raises(NoOfferError, match="no offer matches"):
        rank_offers(offers, GpuRequest(gpu="H100", regions=("us-west-2",)))


def test_the_prices_setting_overrides_the_price_list(
    fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = configure(fake, monkeypatch, ami_id=ami, prices={"g5.xlarge": 0.9})
    fake.on_demand[(REGION, "g5.xlarge")] = 1.5
    offers = {o.instance_type: o.price_per_hour for o in provider.list_offers(GpuRequest(gpu="A10G")) if o.available}
    assert offers["g5.xlarge"] == 0.9 and offers["g5.48xlarge"] == 16.288
    # The others are asked for; the overridden type is not.
    assert sorted(fake.pricing_requests) == sorted((REGION, t) for t in offers if t != "g5.xlarge")


@pytest.mark.parametrize("error", ["AccessDeniedException", "ThrottlingException"])
def test_a_refused_price_list_means_the_dated_table_said_once(
    fake: Ec2FaultProxy,
    ami: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: str,
) -> None:
    provider = configure(fake, monkeypatch, ami_id=ami, retry_attempts=2)
    fake.pricing_error = error
    fake.on_demand[(REGION, "p4d.24xlarge")] = 1.0  # what the API would have said
    offers = provider.list_offers(GpuRequest(gpu="A100"))
    assert {o.instance_type: o.price_per_hour for o in offers} == {"p4d.24xlarge": 21.957642, "p4de.24xlarge": 27.44705}
    provider.list_offers(GpuRequest(gpu="A10G"))
    # Refused once (throttling: botocore's two attempts), then the table for every type, said once.
    assert actions(fake, "GetProducts") == [400] * (2 if error == "ThrottlingException" else 1)
    [warning] = fallback_warnings(caplog)
    assert PRICE_TABLE_DATE in warning and error in warning


# --- launch ----------------------------------------------------------------------------------------


def test_launch_and_idempotent_relaunch_by_name(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.boot_seconds = 0.3
    offer = offer_for(provider)
    name = NAME_PREFIX + "ec2-launch-1"
    info = provider.launch(offer, name)
    assert (info.state, info.details["status"], info.name) == (InstanceState.BOOTING, "pending", name)
    assert (info.instance_type, info.region, info.price_per_hour) == ("g5.xlarge", REGION, 1.006)
    again = provider.launch(offer, name)
    assert again.instance_id == info.instance_id
    assert actions(fake, "RunInstances") == [200] and len(fake.launched()) == 1

    running = wait_state(provider, info.instance_id, InstanceState.RUNNING)
    moto = fake.moto_instance(info.instance_id)
    assert running.address == moto["PublicIpAddress"] and running.details["private_ip"] == moto["PrivateIpAddress"]
    assert running.details["instance_status"] == "ok" and running.details["market"] == "on-demand"
    assert running.price_per_hour == 1.006  # read back from the price tag
    tags = {t["Key"]: t["Value"] for t in moto["Tags"]}
    assert tags == {"Name": name, TAG_MANAGED: "true", TAG_PRICE: "1.006"}
    params = fake.instances[info.instance_id].extra["params"]
    assert params["ClientToken"] == client_token(name, REGION, "g5.xlarge", False)
    assert (params["MinCount"], params["MaxCount"], params["InstanceInitiatedShutdownBehavior"]) == (
        "1",
        "1",
        "terminate",
    )
    assert "InstanceMarketOptions.MarketType" not in params
    terminate_all(provider, fake)


def test_client_token_makes_a_repeated_run_instances_return_the_same_instance(
    fake: Ec2FaultProxy, provider: Ec2Provider
) -> None:
    offer = offer_for(provider)
    params = provider.run_params(offer, NAME_PREFIX + "ec2-token-1", REGION)
    client = provider.client(REGION)
    first = client.run_instances(**params)["Instances"][0]["InstanceId"]
    second = client.run_instances(**params)["Instances"][0]["InstanceId"]
    assert first == second and [i.id for i in fake.launched()] == [first]
    in_moto = fake.moto().describe_instances(Filters=[{"Name": "tag:Name", "Values": [NAME_PREFIX + "ec2-token-1"]}])
    assert [i["InstanceId"] for r in in_moto["Reservations"] for i in r["Instances"]] == [first]
    with pytest.raises(ClientError) as caught:  # same token, other parameters
        client.run_instances(**{**params, "InstanceType": "g6.xlarge"})
    assert caught.value.response["Error"]["Code"] == "IdempotentParameterMismatch"
    terminate_all(provider, fake)


def test_spot_offer_launches_a_spot_instance(fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = configure(fake, monkeypatch, ami_id=ami, spot_max_price=0.5)
    fake.spot_prices = [SpotPrice("g5.xlarge", "us-east-1a", 0.41), SpotPrice("g5.xlarge", "us-east-1c", 0.37)]
    offer = offer_for(provider, spot=True)
    assert (offer.spot, offer.price_per_hour) == (True, 0.37)
    info = provider.launch(offer, NAME_PREFIX + "ec2-spot-1")
    moto = fake.moto_instance(info.instance_id)
    assert moto["InstanceLifecycle"] == "spot" and moto["Placement"]["AvailabilityZone"] == "us-east-1c"
    assert info.details["market"] == "spot" and info.price_per_hour == 0.37
    params = fake.instances[info.instance_id].extra["params"]
    assert params["InstanceMarketOptions.MarketType"] == "spot"
    assert params["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert params["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    assert params["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.5"
    assert params["ClientToken"] == client_token(info.name, REGION, "g5.xlarge", True)
    terminate_all(provider, fake)


def test_launch_settings_become_run_instances_parameters(
    fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = fake.moto()
    moto.create_key_pair(KeyName=f"gpu-key-{time.monotonic_ns()}")
    key_name = moto.describe_key_pairs()["KeyPairs"][-1]["KeyName"]
    subnet = moto.describe_subnets()["Subnets"][0]
    group = moto.create_security_group(
        GroupName=f"gpu-ssh-{time.monotonic_ns()}", Description="ssh", VpcId=subnet["VpcId"]
    )["GroupId"]
    provider = configure(
        fake,
        monkeypatch,
        ami_id={REGION: ami},
        key_name=key_name,
        security_group_ids=[group],
        subnet_id=subnet["SubnetId"],
        root_volume_gb=120,
        use_private_ip=True,
    )
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-settings-1")
    data = fake.moto_instance(info.instance_id)
    assert data["KeyName"] == key_name and data["SubnetId"] == subnet["SubnetId"]
    assert group in [g["GroupId"] for g in data["SecurityGroups"]]
    assert info.address == data["PrivateIpAddress"]  # use_private_ip
    params = fake.instances[info.instance_id].extra["params"]
    root = moto.describe_images(ImageIds=[ami])["Images"][0]["RootDeviceName"]
    assert params["BlockDeviceMapping.1.DeviceName"] == root
    assert (params["BlockDeviceMapping.1.Ebs.VolumeSize"], params["BlockDeviceMapping.1.Ebs.VolumeType"]) == (
        "120",
        "gp3",
    )
    terminate_all(provider, fake)


def test_launch_needs_an_ami(fake: Ec2FaultProxy, monkeypatch: pytest.MonkeyPatch) -> None:
    provider = configure(fake, monkeypatch, retry_attempts=3)
    with pytest.raises(BadRequestError) as caught:
        provider.launch(offer_for(provider), NAME_PREFIX + "ec2-noami-1")
    message = str(caught.value)
    assert "ami_id" in message and "aws_default" in message and "gpu_training" in message
    assert actions(fake, "RunInstances") == [] and fake.launched() == []


def test_regions_are_searched_for_instances_of_another_region(
    fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    west_ami = ubuntu_ami(fake, "us-west-2")
    settings = {"ami_id": {REGION: ami, "us-west-2": west_ami}, "regions": [REGION, "us-west-2"]}
    provider = configure(fake, monkeypatch, **settings)
    offer = next(o for o in provider.list_offers(GpuRequest(gpu="T4")) if o.region == "us-west-2")
    info = provider.launch(offer, NAME_PREFIX + "ec2-west-1")
    assert info.region == "us-west-2" and fake.instances[info.instance_id].region == "us-west-2"
    assert fake.moto_instance(info.instance_id)["ImageId"] == west_ami

    fresh = Ec2Provider()  # knows nothing of the instance: looks in each region
    assert fresh.get_instance(info.instance_id).region == "us-west-2"
    found = fresh.find_instance(info.name)
    assert found is not None and found.instance_id == info.instance_id
    fake.calls.clear()
    Ec2Provider().terminate(info.instance_id)  # NotFound in us-east-1, terminated in us-west-2
    assert fake.calls == [("POST", "TerminateInstances", 400), ("POST", "TerminateInstances", 200)]
    fake.assert_all_terminated()


# --- states, find, list, terminate -----------------------------------------------------------------


def test_states_through_boot_and_termination(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.boot_seconds = 0.3
    fake.faults.terminate_seconds = 0.5
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-states-1")
    assert provider.get_instance(info.instance_id).state == InstanceState.BOOTING
    wait_state(provider, info.instance_id, InstanceState.RUNNING)
    provider.terminate(info.instance_id)
    stopping = provider.get_instance(info.instance_id)
    assert (stopping.state, stopping.details["status"]) == (InstanceState.STOPPING, "shutting-down")
    assert provider.find_instance(info.name) is not None  # shutting-down still bills
    provider.terminate(info.instance_id)  # again while shutting down: quiet
    gone = wait_state(provider, info.instance_id, InstanceState.TERMINATED)
    assert gone.details["status"] == "terminated"
    assert provider.find_instance(info.name) is None and provider.list_instances() == []
    fake.assert_all_terminated()


def test_stopped_instance_is_failed(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-stopped-1")
    fake.moto().stop_instances(InstanceIds=[info.instance_id])  # e.g. a shutdown inside, or a spot stop
    stopped = provider.get_instance(info.instance_id)
    assert stopped.state == InstanceState.FAILED and stopped.details["status"] in ("stopping", "stopped")
    assert provider.find_instance(info.name) is not None  # its volume still bills: the reaper must see it
    terminate_all(provider, fake)


def test_find_and_list_by_name_prefix(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    offer = offer_for(provider)
    ours = [provider.launch(offer, f"{NAME_PREFIX}ec2-list-{n}") for n in (1, 2)]
    other = provider.launch(offer, "someone-elses-box")
    assert {i.name for i in provider.list_instances()} == {i.name for i in ours}
    assert [i.name for i in provider.list_instances(NAME_PREFIX + "ec2-list-2")] == [ours[1].name]
    found = provider.find_instance(ours[0].name)
    assert found is not None and found.instance_id == ours[0].instance_id
    assert provider.find_instance(NAME_PREFIX + "nobody") is None
    assert provider.find_instance(NAME_PREFIX + "ec2-list-*") is None  # a name is not a pattern

    provider.terminate(ours[0].instance_id)
    assert provider.find_instance(ours[0].name) is None
    assert provider.get_instance(ours[0].instance_id).state == InstanceState.TERMINATED  # still described
    assert [i.name for i in provider.list_instances()] == [ours[1].name]
    provider.terminate(ours[1].instance_id)
    provider.terminate(other.instance_id)
    fake.assert_all_terminated()


def test_terminate_and_get_of_gone_or_unknown_ids(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-twice-1")
    provider.terminate(info.instance_id)
    provider.terminate(info.instance_id)  # already terminated: EC2 answers it again, quietly
    provider.terminate("i-0123456789abcdef0")  # unknown: InvalidInstanceID.NotFound
    provider.terminate("not-an-id")  # malformed: InvalidInstanceID.Malformed
    assert actions(fake, "TerminateInstances") == [200, 200, 400, 400]
    with pytest.raises(InstanceNotFoundError, match=r"InvalidInstanceID\.NotFound"):
        provider.get_instance("i-0123456789abcdef0")
    with pytest.raises(InstanceNotFoundError, match=r"InvalidInstanceID\.Malformed"):
        provider.get_instance("not-an-id")
    fake.assert_all_terminated()


# --- faults ----------------------------------------------------------------------------------------


def test_no_capacity_lists_nothing_available_and_refuses_at_once(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    offer = offer_for(provider)
    fake.faults.no_capacity = True
    assert not any(o.available for o in provider.list_offers(GpuRequest()))
    with pytest.raises(NoCapacityError) as caught:
        provider.launch(offer, NAME_PREFIX + "ec2-nocap-1")
    message = str(caught.value)
    assert "InsufficientInstanceCapacity" in message and "We currently do not have sufficient g5.xlarge" in message
    assert actions(fake, "RunInstances") == [500]  # EC2's 500, not retried by botocore: the next offer now
    assert fake.launched() == []


def test_refused_launch_although_listed(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    offer = offer_for(provider)
    assert offer.available
    fake.faults.refuse_launch = 1
    with pytest.raises(NoCapacityError, match="InsufficientInstanceCapacity"):
        provider.launch(offer, NAME_PREFIX + "ec2-refuse-1")
    info = provider.launch(offer, NAME_PREFIX + "ec2-refuse-1")
    assert actions(fake, "RunInstances") == [500, 200]
    assert [i.id for i in fake.launched()] == [info.instance_id]
    terminate_all(provider, fake)


def test_throttling_is_retried_by_botocore_after_the_retry_after(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    before = provider.api_calls
    fake.faults.rate_limit = 2
    fake.faults.retry_after = 0.2
    offers = provider.list_offers(GpuRequest(gpu="H100"))
    assert [o.instance_type for o in offers] == ["p5.48xlarge"]
    calls = [(t, status) for t, _, action, status in fake.timed_calls if action == "DescribeInstanceTypeOfferings"]
    assert [status for _, status in calls] == [503, 503, 200]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
    assert all(gap >= 0.2 for gap in gaps), gaps
    assert actions(fake, "GetProducts") == [200]  # p5.48xlarge's price: the price list API is not throttled
    assert provider.api_calls - before == 4


def test_throttling_past_the_retries_is_provider_unavailable(
    fake: Ec2FaultProxy, ami: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    provider = configure(fake, monkeypatch, ami_id=ami, retry_attempts=2)
    fake.faults.rate_limit = 5
    fake.faults.retry_after = None
    with pytest.raises(ProviderUnavailableError, match="RequestLimitExceeded"):
        provider.list_offers(GpuRequest())
    assert actions(fake, "DescribeInstanceTypeOfferings") == [503, 503]


def test_error_after_create_is_retried_with_the_same_client_token(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.error_after_create = 1
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-5xx-1")
    assert actions(fake, "RunInstances") == [500, 200]  # botocore retried; EC2 answered the first instance
    assert [i.id for i in fake.launched()] == [info.instance_id]
    terminate_all(provider, fake)


def test_error_after_create_past_the_retries_adopts_the_instance(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.error_after_create = 10
    name = NAME_PREFIX + "ec2-5xx-2"
    info = provider.launch(offer_for(provider), name)
    assert actions(fake, "RunInstances") == [500, 500, 500]  # retry_attempts=3, all with one ClientToken
    assert [i.id for i in fake.launched()] == [info.instance_id] and info.name == name
    terminate_all(provider, fake)


def test_terminate_failure_is_retried_by_botocore(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-termfail-1")
    fake.faults.terminate_fail = 1
    provider.terminate(info.instance_id)  # TerminateInstances is idempotent: botocore retries the 500
    assert actions(fake, "TerminateInstances") == [500, 200]
    assert provider.get_instance(info.instance_id).state == InstanceState.TERMINATED
    fake.assert_all_terminated()


def test_terminate_failing_past_the_retries_raises(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-termfail-2")
    fake.faults.terminate_fail = 3
    with pytest.raises(ProviderUnavailableError, match="InternalError"):
        provider.terminate(info.instance_id)
    assert provider.get_instance(info.instance_id).state == InstanceState.RUNNING
    assert fake.moto_instance(info.instance_id)["State"]["Name"] == "running"
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()


def test_impaired_instance_is_failed(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.unhealthy = True
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-sick-1")
    sick = provider.get_instance(info.instance_id)
    assert sick.state == InstanceState.FAILED
    assert (sick.details["status"], sick.details["instance_status"]) == ("running", "impaired")
    listed = provider.list_instances()
    assert [(i.instance_id, i.state) for i in listed] == [(info.instance_id, InstanceState.FAILED)]
    terminate_all(provider, fake)


def test_vanished_instance_is_not_found(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.vanish = True
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-vanish-1")
    with pytest.raises(InstanceNotFoundError, match=r"InvalidInstanceID\.NotFound"):
        provider.get_instance(info.instance_id)
    assert provider.list_instances() == [] and provider.find_instance(info.name) is None
    provider.terminate(info.instance_id)
    fake.assert_all_terminated()  # moto lost it too


# --- spot interruptions ---------------------------------------------------------------------------


def spot_offer(fake: Ec2FaultProxy, provider: Ec2Provider) -> Offer:
    fake.spot_prices = [SpotPrice("g5.xlarge", "us-east-1b", 0.42)]
    return offer_for(provider, spot=True)


def spot_request(provider: Ec2Provider, request_id: str) -> dict[str, Any]:
    """What DescribeSpotInstanceRequests says through the proxy (EC2's own record)."""
    reply = provider.client(REGION).describe_spot_instance_requests(SpotInstanceRequestIds=[request_id])
    return dict(reply["SpotInstanceRequests"][0])


def test_interrupted_spot_instance_is_gone_with_ec2s_reasons(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    fake.faults.terminate_seconds = 0.4
    info = provider.launch(spot_offer(fake, provider), NAME_PREFIX + "ec2-interrupt-1")
    running = wait_state(provider, info.instance_id, InstanceState.RUNNING)
    request_id = running.details["spot_request"]
    assert request_id.startswith("sir-") and not running.interrupted and "interruption" not in running.details
    fulfilled = spot_request(provider, request_id)
    assert (fulfilled["State"], fulfilled["Status"]["Code"], fulfilled["InstanceId"]) == (
        "active",
        "fulfilled",
        info.instance_id,
    )
    assert fulfilled["InstanceInterruptionBehavior"] == "terminate" and fulfilled["Type"] == "one-time"

    fake.interrupt(info.instance_id, "no-capacity")
    fake.calls.clear()
    going = provider.get_instance(info.instance_id)
    assert going.details["status"] == "shutting-down" and going.state == InstanceState.FAILED  # gone, not STOPPING
    assert going.interrupted and going.state.is_gone
    words = going.details["interruption"]
    assert words.startswith("Server.SpotInstanceTermination: Spot instance termination; ")
    assert f"spot request {request_id} instance-terminated-no-capacity: " in words and "no Spot capacity" in words
    assert going.details["spot_request_status"] == "instance-terminated-no-capacity"
    # One DescribeSpotInstanceRequests for a spot instance that no longer runs; none for running ones.
    assert [a for _, a, _ in fake.calls] == ["DescribeInstances", "DescribeSpotInstanceRequests"]

    gone = wait_state(provider, info.instance_id, InstanceState.TERMINATED)
    assert gone.interrupted and gone.details["status"] == "terminated"
    assert provider.find_instance(info.name) is None and provider.list_instances() == []
    closed = spot_request(provider, request_id)
    assert (closed["State"], closed["Status"]["Code"]) == ("closed", "instance-terminated-no-capacity")
    moto = fake.moto_instance(info.instance_id)  # moto itself terminated it, as EC2 would
    assert moto["State"]["Name"] == "terminated"
    provider.terminate(info.instance_id)  # already gone: quiet
    fake.assert_all_terminated()


def test_spot_instance_stopped_by_price_is_interrupted_and_still_listed(
    fake: Ec2FaultProxy, provider: Ec2Provider
) -> None:
    """A persistent request with interruption behavior ``stop``: EC2 stops the instance instead."""
    params = provider.run_params(spot_offer(fake, provider), NAME_PREFIX + "ec2-stop-1", REGION)
    params["InstanceMarketOptions"]["SpotOptions"].update(
        SpotInstanceType="persistent", InstanceInterruptionBehavior="stop"
    )
    instance_id = provider.client(REGION).run_instances(**params)["Instances"][0]["InstanceId"]
    fake.interrupt(instance_id, "by-price")
    stopped = provider.get_instance(instance_id)
    assert stopped.state == InstanceState.FAILED and stopped.interrupted
    assert stopped.details["status"] == "stopped"
    assert stopped.details["interruption"].startswith("Server.SpotInstanceShutdown: Spot instance shutdown; ")
    assert "instance-stopped-by-price" in stopped.details["interruption"]
    assert spot_request(provider, stopped.details["spot_request"])["State"] == "disabled"
    found = provider.find_instance(stopped.name)  # its volume still bills: the reaper must see it
    assert found is not None and found.interrupted
    terminate_all(provider, fake)


def test_instances_we_terminate_are_not_interrupted(fake: Ec2FaultProxy, provider: Ec2Provider) -> None:
    on_demand = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-ours-1")
    spot = provider.launch(spot_offer(fake, provider), NAME_PREFIX + "ec2-ours-2")
    with pytest.raises(ValueError, match="spot only"):
        fake.interrupt(on_demand.instance_id)  # EC2 does not interrupt on-demand instances
    for info in (on_demand, spot):
        provider.terminate(info.instance_id)
        gone = provider.get_instance(info.instance_id)
        assert (gone.state, gone.interrupted) == (InstanceState.TERMINATED, False)
        assert "interruption" not in gone.details
        assert gone.details["state_reason"] == "Client.UserInitiatedShutdown: User initiated shutdown"
    assert provider.get_instance(spot.instance_id).details["spot_request_status"] == "instance-terminated-by-user"
    fake.assert_all_terminated()


def test_interruption_of_reads_the_state_reason_and_the_spot_request() -> None:
    terminated = {"State": {"Name": "terminated"}, "SpotInstanceRequestId": "sir-12345678"}
    by_price = {"SpotInstanceRequestId": "sir-12345678", "Status": {"Code": "instance-terminated-by-price"}}
    reason = {"Code": "Server.SpotInstanceTermination", "Message": "Server.SpotInstanceTermination: Spot instance"}
    assert interruption_of(terminated) is None
    assert interruption_of(terminated, by_price) == "spot request sir-12345678 instance-terminated-by-price"
    assert interruption_of({**terminated, "StateReason": reason}) == reason["Message"]
    ours = {"Code": "Client.UserInitiatedShutdown", "Message": "Client.UserInitiatedShutdown: User initiated"}
    by_user = {"Status": {"Code": "instance-terminated-by-user", "Message": "terminated by user"}}
    assert interruption_of({**terminated, "StateReason": ours}, by_user) is None
    running = {"State": {"Name": "running"}, "StateReason": reason}  # a persistent request's instance again
    assert interruption_of(running, by_price) is None


# --- credentials and SSH ---------------------------------------------------------------------------


def test_wrong_credentials_are_a_bad_request_without_the_key(
    fake: Ec2FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWRONGKEY"
    conn = json.loads(fake.connection(ami_id="ami-12345678"))
    conn["password"] = wrong
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))
    with pytest.raises(BadRequestError) as caught:
        Ec2Provider().list_offers(GpuRequest())
    message = str(caught.value)
    assert "aws_default" in message and "AuthFailure" in message
    assert wrong not in message and fake.secret_access_key not in message
    assert fake.calls == [("POST", "DescribeInstanceTypeOfferings", 401)]  # not retried


def test_ssh_box_uses_the_public_ip_and_the_ssh_connection(
    fake: Ec2FaultProxy, provider: Ec2Provider, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh_conn = {"conn_type": "ssh", "extra": {"no_host_key_check": True}}
    monkeypatch.setenv("AIRFLOW_CONN_GPU_INSTANCE_SSH", json.dumps(ssh_conn))
    info = provider.launch(offer_for(provider), NAME_PREFIX + "ec2-ssh-1")
    box = provider.ssh_box(info)
    expected = fake.moto_instance(info.instance_id)["PublicIpAddress"]
    assert (box.hook.remote_host, box.hook.port, box.hook.username) == (expected, 22, "ubuntu")
    terminate_all(provider, fake)
