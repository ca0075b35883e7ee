"""EC2 on-demand prices from the AWS Price List API: the ``GetProducts`` request, the parsing of its
price list, paging, the day-long cache and the dated table as fallback.

The Price List API is met with botocore's ``Stubber`` on a real ``pricing`` client (made by the
hook from an Airflow ``aws`` connection): moto has no ``pricing`` service at all, and the stubber
checks each request against the service model and its expected parameters exactly. The "no
network" case is a real client against a closed port. Products are in the shape AWS publishes
(``tests.fakeclouds.ec2.ec2_price_item``; the AWS CLI's ``get-products`` example for the EBS one).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from botocore.stub import Stubber

from gpu_training.errors import BadRequestError, ProviderUnavailableError
from gpu_training.hooks.ec2_pricing import Ec2PricingHook, on_demand_price, product_filters
from gpu_training.providers.ec2 import INSTANCE_TYPES, PRICE_TABLE_DATE
from gpu_training.providers.ec2_prices import CACHE_TTL, RETRY_AFTER_FAILURE, Ec2OnDemandPrices, PriceCache
from tests.fakeclouds.ec2 import ec2_price_item
from tests.servers import free_port

T0 = datetime(2026, 12, 7, 9, 0, tzinfo=UTC)
TABLE = {itype: gpu.price for itype, gpu in INSTANCE_TYPES.items()}
#: The filters of p5.48xlarge in us-east-1, as the request must carry them.
P5_FILTERS = [
    {"Type": "TERM_MATCH", "Field": "instanceType", "Value": "p5.48xlarge"},
    {"Type": "TERM_MATCH", "Field": "regionCode", "Value": "us-east-1"},
    {"Type": "TERM_MATCH", "Field": "operatingSystem", "Value": "Linux"},
    {"Type": "TERM_MATCH", "Field": "tenancy", "Value": "Shared"},
    {"Type": "TERM_MATCH", "Field": "preInstalledSw", "Value": "NA"},
    {"Type": "TERM_MATCH", "Field": "capacitystatus", "Value": "Used"},
    {"Type": "TERM_MATCH", "Field": "marketoption", "Value": "OnDemand"},
]
#: The AWS CLI's example answer item (``aws pricing get-products``, awscli/examples/pricing): an EBS
#: volume, priced per GB-month, in Singapore.
EBS_ITEM = (
    '{"product":{"productFamily":"Storage","attributes":{"storageMedia":"SSD-backed","maxThroughputvolume":'
    '"320 MB/sec","volumeType":"Provisioned IOPS","maxIopsvolume":"20000","servicecode":"AmazonEC2","usagetype":'
    '"APS1-EBS:VolumeUsage.piops","locationType":"AWS Region","location":"Asia Pacific (Singapore)","servicename":'
    '"Amazon Elastic Compute Cloud","maxVolumeSize":"16 TiB","operation":""},"sku":"3MKHN58N7RDDVGKJ"},'
    '"serviceCode":"AmazonEC2","terms":{"OnDemand":{"3MKHN58N7RDDVGKJ.JRTCKXETXF":{"priceDimensions":'
    '{"3MKHN58N7RDDVGKJ.JRTCKXETXF.6YS6EN2CT7":{"unit":"GB-Mo","endRange":"Inf","description":"$0.138 per '
    'GB-month of Provisioned IOPS SSD (io1)  provisioned storage - Asia Pacific (Singapore)","appliesTo":[],'
    '"rateCode":"3MKHN58N7RDDVGKJ.JRTCKXETXF.6YS6EN2CT7","beginRange":"0","pricePerUnit":{"USD":"0.1380000000"}}},'
    '"sku":"3MKHN58N7RDDVGKJ","effectiveDate":"2018-08-01T00:00:00Z","offerTermCode":"JRTCKXETXF",'
    '"termAttributes":{}}}},"version":"20180808005701","publicationDate":"2018-08-08T00:57:01Z"}'
)


def item(region: str, itype: str, usd: float, **attributes: str) -> str:
    """A ``PriceList`` entry as the API sends it: the product as a JSON string."""
    return json.dumps(ec2_price_item(region, itype, usd, **attributes))


def request(itype: str = "p5.48xlarge", region: str = "us-east-1", **more: Any) -> dict[str, Any]:
    return {"ServiceCode": "AmazonEC2", "Filters": product_filters(region, itype), "FormatVersion": "aws_v1", **more}


def answer(*entries: str, next_token: str | None = None) -> dict[str, Any]:
    page: dict[str, Any] = {"FormatVersion": "aws_v1", "PriceList": list(entries)}
    if next_token:
        page["NextToken"] = next_token
    return page


def aws_connection(monkeypatch: pytest.MonkeyPatch, **extra: Any) -> None:
    conn = {"conn_type": "aws", "login": "AKIATESTTESTTEST", "password": "secret", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(conn))


@pytest.fixture
def hook(monkeypatch: pytest.MonkeyPatch) -> Ec2PricingHook:
    aws_connection(monkeypatch, region_name="eu-west-1")  # the instances' region: not the pricing client's
    return Ec2PricingHook("aws_default")


@pytest.fixture
def stubber(hook: Ec2PricingHook) -> Iterator[Stubber]:
    with Stubber(hook.client) as stub:
        yield stub
        stub.assert_no_pending_responses()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def never() -> Any:
    raise AssertionError("the price list API was asked although the cache had the answer")


def price_book(hook: Any, path: Path, clock: Clock) -> Ec2OnDemandPrices:
    """One provider's prices (a new one stands for a new task process: only the file is shared)."""
    factory = hook if callable(hook) else (lambda: hook)
    return Ec2OnDemandPrices(factory, PriceCache(path), TABLE, PRICE_TABLE_DATE, conn_id="aws_default", now=clock)


def fallback_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "built-in table" in r.getMessage()
    ]


# --- the request and the price list --------------------------------------------------------------


def test_the_price_is_the_linux_on_demand_hourly_usd_of_the_product_asked_for() -> None:
    entries = [
        item("us-east-1", "p5.48xlarge", 71.0, operatingSystem="Windows", operation="RunInstances:0002"),
        item("us-east-1", "p5.48xlarge", 31.464, marketoption="CapacityBlock"),
        item("us-east-1", "p5.48xlarge", 55.04),
        item("us-west-2", "p5.48xlarge", 54.0),  # another region's product
        EBS_ITEM,
    ]
    assert on_demand_price(entries, "us-east-1", "p5.48xlarge") == 55.04  # "55.0400000000" per Hrs
    assert on_demand_price([EBS_ITEM], "ap-southeast-1", "p5.48xlarge") is None  # GB-Mo, not an instance
    assert on_demand_price([], "us-east-1", "p5.48xlarge") is None
    product = ec2_price_item("us-east-1", "g5.xlarge", 1.006)
    assert on_demand_price([product], "us-east-1", "g5.xlarge") == 1.006  # decoded entries too
    assert product["terms"]["Reserved"]  # a reserved term is there, and not taken
    free = ec2_price_item("us-east-1", "g5.xlarge", 0.0)
    assert on_demand_price([free], "us-east-1", "g5.xlarge") is None  # a $0 row prices nothing


def test_two_prices_for_one_product_take_the_highest(caplog: pytest.LogCaptureFixture) -> None:
    entries = [item("us-east-1", "g5.xlarge", 1.006), item("us-east-1", "g5.xlarge", 1.2, operation="RunInstances:x")]
    assert on_demand_price(entries, "us-east-1", "g5.xlarge") == 1.2
    assert "2 on-demand prices for g5.xlarge in us-east-1 (1.006, 1.2); taking the highest" in caplog.text


def test_get_products_request_and_paging(hook: Ec2PricingHook, stubber: Stubber) -> None:
    assert hook.client.meta.region_name == "us-east-1"  # the Price List endpoint, whatever the instances' region
    first = answer(item("us-east-1", "p5.48xlarge", 71.0, operatingSystem="Windows"), next_token="page-2")
    stubber.add_response(
        "get_products", first, {"ServiceCode": "AmazonEC2", "Filters": P5_FILTERS, "FormatVersion": "aws_v1"}
    )
    stubber.add_response("get_products", answer(item("us-east-1", "p5.48xlarge", 55.04)), request(NextToken="page-2"))
    assert hook.on_demand_price("us-east-1", "p5.48xlarge") == 55.04


@pytest.mark.parametrize(
    ("code", "error"),
    [("AccessDeniedException", BadRequestError), ("ThrottlingException", ProviderUnavailableError)],
)
def test_refusals_are_typed_errors(hook: Ec2PricingHook, stubber: Stubber, code: str, error: type) -> None:
    stubber.add_client_error("get_products", code, "no", 400, expected_params=request())
    with pytest.raises(error, match=code):
        hook.on_demand_price("us-east-1", "p5.48xlarge")


# --- the cache -------------------------------------------------------------------------------------


def test_answers_are_cached_for_a_day_across_processes(hook: Ec2PricingHook, stubber: Stubber, tmp_path: Path) -> None:
    path = tmp_path / "cache" / "ec2_prices.json"
    clock = Clock()
    stubber.add_response("get_products", answer(item("us-east-1", "p5.48xlarge", 55.04)), request())
    assert price_book(hook, path, clock).prices("us-east-1", ["p5.48xlarge"]) == {"p5.48xlarge": 55.04}
    stubber.assert_no_pending_responses()
    stored = json.loads(path.read_text())
    assert stored["prices"] == {"us-east-1/p5.48xlarge": {"price": 55.04, "fetched_at": T0.isoformat()}}

    clock.now = T0 + CACHE_TTL - timedelta(seconds=1)  # another task, within the day: no call
    assert price_book(never, path, clock).prices("us-east-1", ["p5.48xlarge"]) == {"p5.48xlarge": 55.04}

    clock.now = T0 + CACHE_TTL  # a day later: asked again, once
    stubber.add_response("get_products", answer(item("us-east-1", "p5.48xlarge", 49.5)), request())
    book = price_book(hook, path, clock)
    assert book.prices("us-east-1", ["p5.48xlarge"]) == {"p5.48xlarge": 49.5}
    assert book.prices("us-east-1", ["p5.48xlarge"]) == {"p5.48xlarge": 49.5}  # and kept
    stored = json.loads(path.read_text())
    assert stored["prices"]["us-east-1/p5.48xlarge"] == {"price": 49.5, "fetched_at": clock.now.isoformat()}


def test_a_broken_cache_file_is_an_empty_cache(hook: Ec2PricingHook, stubber: Stubber, tmp_path: Path) -> None:
    path = tmp_path / "ec2_prices.json"
    path.write_text("{not json")
    stubber.add_response("get_products", answer(item("us-east-1", "g5.xlarge", 1.006)), request("g5.xlarge"))
    assert price_book(hook, path, Clock()).prices("us-east-1", ["g5.xlarge"]) == {"g5.xlarge": 1.006}
    assert json.loads(path.read_text())["format"] == 1


def test_a_type_the_price_list_lacks_is_left_out_and_that_is_cached(
    hook: Ec2PricingHook, stubber: Stubber, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "gpu_training.providers.ec2_prices")
    path, clock = tmp_path / "ec2_prices.json", Clock()
    stubber.add_response(
        "get_products", answer(item("eu-west-1", "g5.xlarge", 1.123)), request("g5.xlarge", "eu-west-1")
    )
    stubber.add_response("get_products", answer(), request("p4de.24xlarge", "eu-west-1"))
    prices = price_book(hook, path, clock).prices("eu-west-1", ["p4de.24xlarge", "g5.xlarge"])
    assert prices == {"g5.xlarge": 1.123}  # no p4de.24xlarge: not at the table's 27.44705 either
    assert "no Linux on-demand price for p4de.24xlarge in eu-west-1: not offered there" in caplog.text
    assert not fallback_warnings(caplog)
    assert price_book(never, path, clock).prices("eu-west-1", ["p4de.24xlarge"]) == {}  # cached as unknown


# --- the dated table when the API cannot be used ---------------------------------------------------


@pytest.mark.parametrize(
    ("code", "why"),
    [
        ("AccessDeniedException", "needs permission pricing:GetProducts"),
        ("ThrottlingException", "after botocore's retries"),
    ],
)
def test_a_refused_price_list_falls_back_to_the_dated_table_said_once(
    hook: Ec2PricingHook,
    stubber: Stubber,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    code: str,
    why: str,
) -> None:
    path, clock = tmp_path / "ec2_prices.json", Clock()
    stubber.add_client_error("get_products", code, "Rate exceeded", 400, expected_params=request("g5.xlarge"))
    book = price_book(hook, path, clock)
    types = ["g5.xlarge", "p5.48xlarge", "no-such.type"]
    assert book.prices("us-east-1", types) == {"g5.xlarge": 1.006, "p5.48xlarge": 55.04}  # one call, not one per type
    assert book.prices("us-west-2", types) == {"g5.xlarge": 1.006, "p5.48xlarge": 55.04}  # not asked again
    [warning] = fallback_warnings(caplog)
    assert f"built-in table dated {PRICE_TABLE_DATE} (us-east-1 prices, used for every region)" in warning
    assert code in warning and why in warning

    # The next task does not ask again for a while (it would only wait for the same refusal), and says why.
    caplog.clear()
    clock.now = T0 + RETRY_AFTER_FAILURE - timedelta(seconds=1)
    assert price_book(never, path, clock).prices("us-east-1", ["p5.48xlarge"]) == {"p5.48xlarge": 55.04}
    [remembered] = fallback_warnings(caplog)
    assert f"it failed at {T0.isoformat(timespec='seconds')}" in remembered and code in remembered

    clock.now = T0 + RETRY_AFTER_FAILURE  # then it asks again, and a success clears the failure
    stubber.add_response("get_products", answer(item("us-east-1", "p5.48xlarge", 50.0)), request())
    assert price_book(hook, path, clock).prices("us-east-1", ["p5.48xlarge"]) == {"p5.48xlarge": 50.0}
    assert json.loads(path.read_text())["failures"] == {}


def test_no_network_falls_back_to_the_dated_table(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real client, a closed port: botocore's EndpointConnectionError."""
    aws_connection(monkeypatch, endpoint_url=f"http://127.0.0.1:{free_port()}")
    config = {"retries": {"mode": "standard", "total_max_attempts": 1}, "connect_timeout": 2}
    with pytest.raises(ProviderUnavailableError, match="EndpointConnectionError"):
        Ec2PricingHook("aws_default", config=config).on_demand_price("us-east-1", "g5.xlarge")
    book = price_book(lambda: Ec2PricingHook("aws_default", config=config), tmp_path / "p.json", Clock())
    assert book.prices("us-east-1", ["g5.xlarge"]) == {"g5.xlarge": 1.006}
    [warning] = fallback_warnings(caplog)
    assert "EndpointConnectionError" in warning and "no answer" in warning


def test_a_connection_without_a_pricing_client_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Any:
        raise BadRequestError("ec2", "cannot create a pricing client from connection 'aws_default': boom")

    assert price_book(broken, tmp_path / "p.json", Clock()).prices("us-east-1", ["g6.xlarge"]) == {"g6.xlarge": 0.8048}
    assert "cannot create a pricing client" in fallback_warnings(caplog)[0]


def test_an_unwritable_cache_only_costs_lookups(
    hook: Ec2PricingHook, stubber: Stubber, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    stubber.add_response("get_products", answer(item("us-east-1", "g5.xlarge", 1.006)), request("g5.xlarge"))
    book = price_book(hook, blocker / "ec2_prices.json", Clock())  # its directory cannot be made
    assert book.prices("us-east-1", ["g5.xlarge"]) == {"g5.xlarge": 1.006}
    assert "not written" in caplog.text
