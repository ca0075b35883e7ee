"""``Ec2ApiHook``: the Amazon EC2 API of one region (boto3 ``ec2`` client) through an Airflow ``aws`` connection.

The client is the amazon provider's, as ``EC2Hook(api_type="client_type")`` makes it (this is an
``AwsBaseHook`` with ``client_type="ec2"``): credentials, ``region_name``, ``endpoint_url`` (a local fake
in the tests) and ``config_kwargs`` come from the connection as boto's usual; :func:`botocore_config`
adds ``standard``-mode retries. The hook talks to the EC2 API and nothing else; what its answers mean
for a job is :class:`~gpu_training.providers.ec2.Ec2Provider`'s.

Calls (Amazon EC2 API Reference, Query API version 2016-11-15): ``DescribeInstanceTypeOfferings``,
``DescribeSpotPriceHistory``, ``DescribeInstances``, ``DescribeInstanceStatus``,
``DescribeSpotInstanceRequests``, ``DescribeImages``, ``RunInstances``, ``TerminateInstances``; the
paginated ones read every page.

Errors ("Error codes for the Amazon EC2 API"): the capacity and limit codes of :data:`CAPACITY_CODES` ->
:class:`NoCapacityError`; :data:`NOT_FOUND_CODES` -> :class:`InstanceNotFoundError`; :data:`AUTH_CODES`,
HTTP 401/403 and other client errors -> :class:`BadRequestError`; :data:`THROTTLE_CODES`, 5xx and no
answer -> :class:`ProviderUnavailableError` (after botocore's retries). botocore resends what it finds
transient; a ``needs-retry`` handler vetoes the resend of an error this package's hierarchy calls final
(``errors.is_retryable(err, resend=True)``): EC2 answers InsufficientInstanceCapacity with HTTP 500,
which botocore would retry, while the next offer should be tried at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import cached_property
from typing import Any

from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

from gpu_training.errors import (
    BadRequestError,
    InstanceNotFoundError,
    NoCapacityError,
    ProviderError,
    ProviderUnavailableError,
    is_retryable,
)

log = logging.getLogger(__name__)

PROVIDER = "ec2"
DEFAULT_RETRY_ATTEMPTS = 5

#: Refusals that say "not this offer now": try the next offer.
CAPACITY_CODES = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "InsufficientReservedInstanceCapacity",
        "UnfulfillableCapacity",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "InstanceLimitExceeded",
        "VcpuLimitExceeded",
        "Unsupported",  # the type is not offered in the chosen zone
    }
)
AUTH_CODES = frozenset(
    {
        "AuthFailure",
        "UnauthorizedOperation",
        "InvalidClientTokenId",
        "SignatureDoesNotMatch",
        "OptInRequired",
        "Blocked",
        "PendingVerification",
    }
)
THROTTLE_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException"})
NOT_FOUND_CODES = frozenset({"InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"})
#: The codes whose meaning this hook knows; botocore alone decides whether to resend any other.
KNOWN_CODES = CAPACITY_CODES | AUTH_CODES | THROTTLE_CODES | NOT_FOUND_CODES


def botocore_config(connection_extras: Mapping[str, Any], attempts: int) -> Any:
    """The hooks' botocore config: the connection's ``config_kwargs`` plus standard-mode retries,
    ``attempts`` per call (the first included).

    ``None`` when ``config_kwargs`` sets ``retries`` itself: the hook then uses it as it is.
    """
    from botocore import UNSIGNED
    from botocore.config import Config

    kwargs = dict(connection_extras.get("config_kwargs") or {})
    if "retries" in kwargs:
        return None
    # ``total_max_attempts`` counts the first attempt; botocore's ``max_attempts`` would count retries only.
    kwargs["retries"] = {"mode": "standard", "total_max_attempts": max(1, attempts)}
    if kwargs.get("signature_version") == "unsigned":
        kwargs["signature_version"] = UNSIGNED
    return Config(**kwargs)


def error_for(code: str, status: int, where: str, conn_id: str | None) -> ProviderError:
    """The typed error of an EC2 error answer (``code``, HTTP ``status``); ``where`` heads its message."""
    if code in CAPACITY_CODES:
        return NoCapacityError(PROVIDER, where)
    if code in NOT_FOUND_CODES:
        return InstanceNotFoundError(PROVIDER, where)
    if code in AUTH_CODES or status in (401, 403):
        return BadRequestError(PROVIDER, f"{where} (check the AWS credentials of connection {conn_id!r})")
    if code in THROTTLE_CODES or status >= 500 or status == 0:
        return ProviderUnavailableError(PROVIDER, f"{where} (HTTP {status}, after botocore's retries)")
    return BadRequestError(PROVIDER, where)


def no_resend_when_final(response: Any = None, **_: Any) -> bool | None:
    """``needs-retry`` handler: an error answer this package calls final is not resent by botocore.

    Returning False (not None) tells botocore's endpoint not to retry whatever the retry handler
    registered after this one says; None leaves the decision to it (codes not in :data:`KNOWN_CODES`,
    no answer at all, or an error worth resending).
    """
    if response is None:
        return None
    error = (response[1] or {}).get("Error") or {}
    code = str(error.get("Code") or "")
    if code not in KNOWN_CODES:
        return None
    status = int(((response[1] or {}).get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
    return None if is_retryable(error_for(code, status, code, None), resend=True) else False


class Ec2ApiHook(AwsBaseHook):
    """The EC2 API of one region: typed errors, every page of a paginated answer, requests counted."""

    def __init__(
        self,
        aws_conn_id: str | None = "aws_default",
        region_name: str | None = None,
        config: Any = None,
        on_request: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(aws_conn_id=aws_conn_id, region_name=region_name, client_type="ec2", config=config)
        self.region = region_name or ""
        #: Called before each HTTP request (botocore's retries included): the provider counts them.
        self.on_request = on_request

    @cached_property
    def client(self) -> Any:
        """The boto3 ``ec2`` client; a connection that cannot make one is a :class:`BadRequestError`."""
        try:
            client = self.conn
        except Exception as err:  # a broken connection (bad extras, unknown region)
            raise BadRequestError(
                PROVIDER, f"cannot create an EC2 client for {self.region} from connection {self.aws_conn_id!r}: {err}"
            ) from err
        client.meta.events.register("before-send.ec2", self._before_send)
        client.meta.events.register("needs-retry.ec2.RunInstances", no_resend_when_final)
        return client

    def _before_send(self, **_: Any) -> None:
        if self.on_request is not None:
            self.on_request()

    # --- calls -----------------------------------------------------------------------------------

    def instance_type_offerings(self, instance_types: Iterable[str]) -> list[dict[str, Any]]:
        """``DescribeInstanceTypeOfferings`` in the region (``LocationType=region``) for these types."""
        return self._paginate(
            "DescribeInstanceTypeOfferings",
            "describe_instance_type_offerings",
            "InstanceTypeOfferings",
            LocationType="region",
            Filters=[{"Name": "instance-type", "Values": sorted(instance_types)}],
        )

    def spot_price_history(self, instance_types: Iterable[str], start: datetime) -> list[dict[str, Any]]:
        """``DescribeSpotPriceHistory`` of Linux/UNIX for these types from ``start`` (now: the prices in effect)."""
        return self._paginate(
            "DescribeSpotPriceHistory",
            "describe_spot_price_history",
            "SpotPriceHistory",
            InstanceTypes=sorted(instance_types),
            ProductDescriptions=["Linux/UNIX"],
            StartTime=start,
        )

    def describe_instances(self, **params: Any) -> list[dict[str, Any]]:
        """``DescribeInstances`` (``Filters`` or ``InstanceIds``): the instances of every reservation."""
        reservations = self._paginate("DescribeInstances", "describe_instances", "Reservations", **params)
        return [data for reservation in reservations for data in reservation.get("Instances") or []]

    def instance_statuses(self, instance_ids: list[str]) -> list[dict[str, Any]]:
        """``DescribeInstanceStatus`` of these (running) instances: their status checks."""
        return self._paginate(
            "DescribeInstanceStatus", "describe_instance_status", "InstanceStatuses", InstanceIds=instance_ids
        )

    def spot_instance_requests(self, request_ids: Iterable[str]) -> list[dict[str, Any]]:
        """``DescribeSpotInstanceRequests`` by id."""
        reply = self._call(
            "DescribeSpotInstanceRequests",
            self.client.describe_spot_instance_requests,
            SpotInstanceRequestIds=sorted(set(request_ids)),
        )
        return list(reply.get("SpotInstanceRequests") or [])

    def images(self, image_ids: list[str]) -> list[dict[str, Any]]:
        """``DescribeImages`` by id."""
        reply = self._call("DescribeImages", self.client.describe_images, ImageIds=image_ids)
        return list(reply.get("Images") or [])

    def run_instances(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``RunInstances`` with these parameters: the reply (``Instances``)."""
        reply: dict[str, Any] = self._call("RunInstances", self.client.run_instances, **params)
        return reply

    def terminate_instances(self, instance_ids: list[str]) -> None:
        """``TerminateInstances``."""
        self._call("TerminateInstances", self.client.terminate_instances, InstanceIds=instance_ids)

    # --- errors ----------------------------------------------------------------------------------

    def _call(self, operation: str, fn: Callable[..., Any], **params: Any) -> Any:
        """Call a client method; botocore errors become this package's typed errors."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**params)
        except ClientError as err:
            raise self._client_error(operation, err) from err
        except BotoCoreError as err:
            raise self._botocore_error(operation, err) from err

    def _paginate(self, operation: str, method: str, key: str, **params: Any) -> list[Any]:
        paginator = self.client.get_paginator(method)

        def pages() -> list[Any]:
            return [item for page in paginator.paginate(**params) for item in page.get(key) or []]

        result: list[Any] = self._call(operation, pages)
        return result

    def _client_error(self, operation: str, err: Any) -> ProviderError:
        error = err.response.get("Error") or {}
        code = str(error.get("Code") or "Unknown")
        status = int((err.response.get("ResponseMetadata") or {}).get("HTTPStatusCode") or 0)
        where = f"{operation} in {self.region} -> {code}: {error.get('Message') or 'no message'}"
        return error_for(code, status, where, self.aws_conn_id)

    def _botocore_error(self, operation: str, err: Exception) -> ProviderError:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, NoCredentialsError, PartialCredentialsError

        where = f"{operation} in {self.region}: {type(err).__name__}: {err}"
        if isinstance(err, (BotoConnectionError, HTTPClientError)):
            return ProviderUnavailableError(PROVIDER, f"{where} (no answer, after botocore's retries)")
        if isinstance(err, (NoCredentialsError, PartialCredentialsError)):
            return BadRequestError(PROVIDER, f"{where} (set the AWS credentials in connection {self.aws_conn_id!r})")
        return BadRequestError(PROVIDER, where)
