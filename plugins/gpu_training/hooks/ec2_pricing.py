"""``Ec2PricingHook``: on-demand EC2 prices from the AWS Price List Query API (boto3 ``pricing``).

The Query API ("AWS Price List Query API", Billing and Cost Management User Guide; API reference
``GetProducts``, version 2017-10-15, JSON 1.1 target ``AWSPriceListService.GetProducts``) has
endpoints in a few regions only (:data:`PRICING_REGIONS`); each answers for every region, so the
client's region is not the instances' region. IAM: ``pricing:GetProducts`` (no resource-level
permissions).

One lookup is one ``GetProducts`` with ``ServiceCode=AmazonEC2``, ``FormatVersion=aws_v1`` and
``TERM_MATCH`` filters on the product attributes of :func:`product_filters`: ``instanceType``,
``regionCode``, ``operatingSystem=Linux``, ``tenancy=Shared``, ``preInstalledSw=NA`` (no SQL
Server and the like), ``capacitystatus=Used`` (not the $0 rows of unused capacity reservations) and
``marketoption=OnDemand`` (not the Capacity Block rows GPU types also have), paged by ``NextToken``.
Each ``PriceList`` entry is one product as a JSON document ("Reading the service price list
file"): ``product.attributes``, and ``terms.OnDemand.<offer term>.priceDimensions.<rate code>``
with ``unit`` ``Hrs`` and ``pricePerUnit.USD`` (a decimal string, e.g. ``"55.0400000000"``).

Errors: AccessDeniedException (not allowed ``pricing:GetProducts``) and other refusals ->
:class:`BadRequestError`; ThrottlingException and InternalErrorException (retried by botocore's
``standard`` mode first) and no answer at all (EndpointConnectionError, timeouts) ->
:class:`ProviderUnavailableError`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from gpu_training.errors import BadRequestError, ProviderError, ProviderUnavailableError

log = logging.getLogger(__name__)

PROVIDER = "ec2"
#: Where the Price List Query API answers ("Price List Query API endpoints").
PRICING_REGIONS = ("us-east-1", "eu-central-1", "ap-south-1")
SERVICE_CODE = "AmazonEC2"
FORMAT_VERSION = "aws_v1"
#: The product attributes of a plain Linux on-demand instance on shared hardware.
LINUX_ON_DEMAND = {
    "operatingSystem": "Linux",
    "tenancy": "Shared",
    "preInstalledSw": "NA",
    "capacitystatus": "Used",
    "marketoption": "OnDemand",
}
AUTH_CODES = frozenset(
    {
        "AccessDeniedException",
        "UnrecognizedClientException",
        "InvalidClientTokenId",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "MissingAuthenticationTokenException",
        "ExpiredTokenException",
    }
)
RETRYABLE_CODES = frozenset({"ThrottlingException", "InternalErrorException", "ServiceUnavailableException"})


def product_attributes(region: str, instance_type: str) -> dict[str, str]:
    """The attributes a price list product must have to be ``instance_type``'s Linux on-demand price in ``region``."""
    return {"instanceType": instance_type, "regionCode": region, **LINUX_ON_DEMAND}


def product_filters(region: str, instance_type: str) -> list[dict[str, str]]:
    """The ``GetProducts`` filters of one lookup (all ``TERM_MATCH``)."""
    return [
        {"Type": "TERM_MATCH", "Field": field, "Value": value}
        for field, value in product_attributes(region, instance_type).items()
    ]


def _usd(value: Any) -> float | None:
    try:
        price = float(value)
    except (TypeError, ValueError):
        return None
    return round(price, 6) if price > 0 else None


def hourly_prices(item: Mapping[str, Any]) -> list[float]:
    """The on-demand USD-per-hour prices of one price list product (zero prices left out)."""
    prices = []
    for term in ((item.get("terms") or {}).get("OnDemand") or {}).values():
        for dimension in (term.get("priceDimensions") or {}).values():
            if dimension.get("unit") != "Hrs":
                continue
            usd = _usd((dimension.get("pricePerUnit") or {}).get("USD"))
            if usd is not None:
                prices.append(usd)
    return prices


def on_demand_price(price_list: Iterable[str | Mapping[str, Any]], region: str, instance_type: str) -> float | None:
    """The hourly on-demand price in a ``GetProducts`` answer, or None when it has none.

    Products whose attributes are not the ones asked for are ignored (the filters should have kept
    them out). Should several prices remain, the highest is taken and a warning says so: a ranking
    that underestimates a price would choose wrongly.
    """
    wanted = product_attributes(region, instance_type)
    found: set[float] = set()
    for entry in price_list:
        item = json.loads(entry) if isinstance(entry, str | bytes) else entry
        attributes = (item.get("product") or {}).get("attributes") or {}
        if all(attributes.get(key) == value for key, value in wanted.items()):
            found.update(hourly_prices(item))
    if len(found) > 1:
        log.warning(
            "the AWS price list has %d on-demand prices for %s in %s (%s); taking the highest",
            len(found),
            instance_type,
            region,
            ", ".join(f"{p:g}" for p in sorted(found)),
        )
    return max(found) if found else None


class Ec2PricingHook(AwsBaseHook):
    """The AWS Price List Query API (``pricing`` client) through an Airflow ``aws`` connection."""

    def __init__(
        self, aws_conn_id: str | None = "aws_default", region_name: str = PRICING_REGIONS[0], config: Any = None
    ) -> None:
        super().__init__(aws_conn_id=aws_conn_id, region_name=region_name, client_type="pricing", config=config)

    @property
    def client(self) -> Any:
        """The boto3 ``pricing`` client; a connection that cannot make one is a :class:`BadRequestError`."""
        try:
            return self.conn
        except Exception as err:  # bad extras, unknown region: asking again will not help
            raise BadRequestError(
                PROVIDER, f"cannot create a pricing client from connection {self.aws_conn_id!r}: {err}"
            ) from err

    def price_list(self, region: str, instance_type: str) -> list[str | Mapping[str, Any]]:
        """Every ``PriceList`` entry of the lookup, all pages."""
        from botocore.exceptions import BotoCoreError, ClientError

        paginator = self.client.get_paginator("get_products")
        try:
            return [
                entry
                for page in paginator.paginate(
                    ServiceCode=SERVICE_CODE,
                    Filters=product_filters(region, instance_type),
                    FormatVersion=FORMAT_VERSION,
                )
                for entry in page.get("PriceList") or []
            ]
        except ClientError as err:
            raise self._client_error(err, region, instance_type) from err
        except BotoCoreError as err:
            raise self._botocore_error(err, region, instance_type) from err

    def on_demand_price(self, region: str, instance_type: str) -> float | None:
        """The Linux on-demand USD/hour of ``instance_type`` in ``region``; None if the price list has none."""
        return on_demand_price(self.price_list(region, instance_type), region, instance_type)

    def _client_error(self, err: Any, region: str, instance_type: str) -> ProviderError:
        error = err.response.get("Error") or {}
        code = str(error.get("Code") or "Unknown")
        status = int((err.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        where = f"GetProducts ({instance_type} in {region}) -> {code}: {error.get('Message') or 'no message'}"
        if code in AUTH_CODES or status in (401, 403):
            return BadRequestError(
                PROVIDER, f"{where} (connection {self.aws_conn_id!r} needs permission pricing:GetProducts)"
            )
        if code in RETRYABLE_CODES or status >= 500 or status == 0:
            return ProviderUnavailableError(PROVIDER, f"{where} (HTTP {status}, after botocore's retries)")
        return BadRequestError(PROVIDER, where)

    def _botocore_error(self, err: Exception, region: str, instance_type: str) -> ProviderError:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError

        where = f"GetProducts ({instance_type} in {region}): {type(err).__name__}: {err}"
        if isinstance(err, BotoConnectionError | HTTPClientError):
            return ProviderUnavailableError(PROVIDER, f"{where} (no answer, after botocore's retries)")
        return BadRequestError(PROVIDER, where)
