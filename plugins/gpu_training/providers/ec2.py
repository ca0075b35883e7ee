"""``Ec2Provider``: GPU instances on AWS EC2, on-demand and spot, through :class:`~gpu_training.hooks.ec2.Ec2ApiHook`.

Configuration is the Airflow ``aws`` connection ``aws_default`` (the same one S3 uses): credentials,
``region_name``, ``endpoint_url`` and ``config_kwargs`` are boto's as usual; this provider's own
settings live under the extra key ``gpu_training`` (a dict), so boto's extras stay untouched:

- ``ami_id`` (required to launch): the AMI to boot, e.g. a Deep Learning AMI with NVIDIA drivers and
  Docker. AMIs are regional: a string, or a dict ``{region: ami}`` when several regions are used.
- ``key_name``: the EC2 key pair installed for the AMI's user (``ubuntu`` unless the SSH connection
  names a login); its private half is in the SSH connection ``ssh_conn_id`` (default
  ``gpu_instance_ssh``).
- ``security_group_ids`` (list or comma-separated), ``subnet_id``, ``iam_instance_profile`` (name or
  ARN): where the instance goes and what it may reach; each may also be a ``{region: value}`` dict.
  The security group must let SSH (port 22) in from where Airflow runs.
- ``root_volume_gb``: size of the root EBS volume (gp3, deleted on termination).
- ``regions`` (list or comma-separated; default: the connection's ``region_name``): where offers are
  listed and instances looked for.
- ``use_private_ip`` (default false): SSH to ``PrivateIpAddress`` instead of ``PublicIpAddress``
  (Airflow inside the VPC, or a VPN).
- ``prices``: ``{instance_type: USD per hour}`` overriding the on-demand price (the price list's and
  the table's), or ``{instance_type: {"price": ..., "gpu": ..., "gpu_count": ...}}`` adding a type.
- ``pricing_region`` (default ``us-east-1``; or ``eu-central-1``, ``ap-south-1``): where the AWS
  Price List Query API is asked (it answers for every region).
- ``price_cache`` (default ``$AIRFLOW_HOME/cache/ec2_prices.json``): the file of price list answers
  (:mod:`gpu_training.providers.ec2_prices`); a path on a volume every worker mounts shares it.
- ``spot_max_price``: the spot ``MaxPrice`` (USD/hour; default: EC2's, the on-demand price).
- ``retry_attempts`` (default 5): botocore's attempts per API call, the first included (``standard``
  retry mode, ``total_max_attempts``), unless the connection's ``config_kwargs`` sets ``retries`` itself.
- ``ssh_conn_id``: the Airflow SSH connection holding the key pair's private key.

API calls follow the Amazon EC2 API Reference (Query API, version 2016-11-15), made by one
:class:`~gpu_training.hooks.ec2.Ec2ApiHook` per region (the amazon provider's EC2 client from the
connection: credentials, region, ``endpoint_url``); this module maps them onto ``ComputeProvider``:

- Offers: the GPU instance types of :data:`INSTANCE_TYPES` in each configured region;
  ``DescribeInstanceTypeOfferings`` (``LocationType=region``, filter ``instance-type``) says which
  types the region offers (the others are listed without capacity, at the table's price, and never
  launched). EC2 publishes no on-demand capacity, so a listed type may still be refused at launch.
  On-demand prices: the ``prices`` setting, else the AWS Price List (``GetProducts``, Linux,
  shared tenancy, per region; cached for a day; :class:`~gpu_training.hooks.ec2_pricing.Ec2PricingHook`,
  :class:`~gpu_training.providers.ec2_prices.Ec2OnDemandPrices`); a type the price list does not
  have in a region is not offered there. When the Price List API cannot be used (the connection's
  IAM principal needs ``pricing:GetProducts``), the table's prices (dated :data:`PRICE_TABLE_DATE`,
  us-east-1, for every region), with a warning saying why.
  With ``request.spot``, ``DescribeSpotPriceHistory``
  (``ProductDescriptions=["Linux/UNIX"]``, ``StartTime`` = now) adds one spot offer per type and
  region at the cheapest Availability Zone's latest price; launch then places it in that zone when
  no ``subnet_id`` is set. If that call fails (e.g. not allowed by IAM), spot offers are skipped.
- Launch: ``RunInstances`` with ``MinCount=MaxCount=1``, ``ClientToken`` derived from the name (EC2's
  own idempotency: a repeated request returns the same instance), ``TagSpecifications`` (instance and
  volume) ``Name=<name>``, ``gpu-training:managed=true``, ``gpu-training:price=<offer price>``,
  ``InstanceInitiatedShutdownBehavior=terminate``, and for spot offers ``InstanceMarketOptions``
  ``{"MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time",
  "InstanceInterruptionBehavior": "terminate"}}``.
- Lookup: ``DescribeInstances`` with filters ``tag:Name`` and ``instance-state-name`` in pending,
  running, stopping, stopped, shutting-down; ``DescribeInstanceStatus`` for the health checks of
  running instances. Terminate: ``TerminateInstances``.

States: pending -> BOOTING; running -> RUNNING, or FAILED when the instance or system status check is
``impaired``; shutting-down -> STOPPING; terminated -> TERMINATED; stopping/stopped -> FAILED (the
instance no longer runs the job). ``details["status"]`` is EC2's state name,
``details["instance_status"]``/``["system_status"]`` the status checks.

Spot interruptions ("Spot Instance interruptions" and "Find interrupted Spot Instances" in the EC2
User Guide; API_StateReason): EC2 terminates or stops an interrupted spot instance, as its
``InstanceInterruptionBehavior`` says, with ``StateReason`` ``Server.SpotInstanceTermination`` (or
``Server.SpotInstanceShutdown`` when stopped), and its spot request's status code tells why
(``instance-terminated-by-price``, ``instance-terminated-no-capacity``, ...; "Spot request status").
For a spot instance that is neither pending nor running, ``DescribeSpotInstanceRequests`` (by its
``SpotInstanceRequestId``) is read too; if that call fails (IAM, or a request long gone) the state
reason alone decides. Either mark makes the instance ``interrupted``, its state gone (shutting-down
reads FAILED, not STOPPING) and ``details["interruption"]`` EC2's words: the state reason message
and/or ``spot request <id> <code>: <message>``.

Errors (EC2 API Reference, "Error codes for the Amazon EC2 API"; typed by the hook): the capacity and
limit codes of :data:`~gpu_training.hooks.ec2.CAPACITY_CODES` -> :class:`NoCapacityError` (EC2 answers
InsufficientInstanceCapacity with HTTP 500; botocore would retry it, the hook's ``needs-retry`` handler
stops that, as ``errors.is_retryable`` decides, so the next offer is tried at once);
AuthFailure/UnauthorizedOperation and other client errors -> :class:`BadRequestError`;
RequestLimitExceeded (503), InternalError and other 5xx -> retried by botocore (``standard`` mode,
which backs off longer on throttling and honours ``x-amz-retry-after``), then
:class:`ProviderUnavailableError`; InvalidInstanceID.NotFound/.Malformed ->
:class:`InstanceNotFoundError`. A 5xx on ``RunInstances`` is retried with the same ``ClientToken``
(safe), and when it still fails, the instance is looked up by name and adopted if EC2 created it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from functools import cached_property
from typing import Any

from gpu_training.errors import (
    BadRequestError,
    InstanceNotFoundError,
    NoCapacityError,
    ProviderError,
    ProviderUnavailableError,
)
from gpu_training.hooks.ec2 import DEFAULT_RETRY_ATTEMPTS, Ec2ApiHook, botocore_config
from gpu_training.offers import fits
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceInfo, InstanceState, Offer
from gpu_training.providers.cloud import CloudProvider
from gpu_training.providers.ec2_prices import Ec2OnDemandPrices, PriceCache

log = logging.getLogger(__name__)

#: The connection extra holding this provider's settings.
SETTINGS_KEY = "gpu_training"
TAG_MANAGED = "gpu-training:managed"
TAG_PRICE = "gpu-training:price"


@dataclasses.dataclass(frozen=True)
class GpuType:
    gpu_name: str
    gpu_count: int
    price: float  # USD per hour, on demand


#: When the prices of :data:`INSTANCE_TYPES` were last checked.
PRICE_TABLE_DATE = "2026-12-07"

#: GPU instance types with their on-demand Linux price in us-east-1 (USD/hour), the fallback when the
#: AWS Price List API cannot be asked (and then used for every region). Checked on
#: :data:`PRICE_TABLE_DATE` against SkyPilot's AWS catalog (github.com/skypilot-org/skypilot-catalog,
#: catalogs/v8/aws/vms.csv at commit 00148f2a, generated from the AWS price list): p3.16xlarge,
#: p4d.24xlarge, p4de.24xlarge and p5.48xlarge as it lists them for us-east-1, i.e. after AWS's June
#: 2025 cut of P4 and P5 on-demand prices (p5.48xlarge was 98.32, p4d.24xlarge 32.7726, p4de.24xlarge
#: 40.9657). The G types and the other P3 sizes are the 2024 snapshot's, not checked again (the June
#: 2025 cut was of P4 and P5 prices only).
INSTANCE_TYPES: dict[str, GpuType] = {
    "g4dn.xlarge": GpuType("NVIDIA T4", 1, 0.526),
    "g4dn.2xlarge": GpuType("NVIDIA T4", 1, 0.752),
    "g4dn.12xlarge": GpuType("NVIDIA T4", 4, 3.912),
    "g5.xlarge": GpuType("NVIDIA A10G", 1, 1.006),
    "g5.2xlarge": GpuType("NVIDIA A10G", 1, 1.212),
    "g5.12xlarge": GpuType("NVIDIA A10G", 4, 5.672),
    "g5.48xlarge": GpuType("NVIDIA A10G", 8, 16.288),
    "g6.xlarge": GpuType("NVIDIA L4", 1, 0.8048),
    "g6.12xlarge": GpuType("NVIDIA L4", 4, 4.6016),
    "g6.48xlarge": GpuType("NVIDIA L4", 8, 13.3504),
    "g6e.xlarge": GpuType("NVIDIA L40S", 1, 1.861),
    "g6e.12xlarge": GpuType("NVIDIA L40S", 4, 10.493),
    "g6e.48xlarge": GpuType("NVIDIA L40S", 8, 30.131),
    "p3.2xlarge": GpuType("NVIDIA V100", 1, 3.06),
    "p3.8xlarge": GpuType("NVIDIA V100", 4, 12.24),
    "p3.16xlarge": GpuType("NVIDIA V100", 8, 24.48),
    "p4d.24xlarge": GpuType("NVIDIA A100 40GB", 8, 21.957642),
    "p4de.24xlarge": GpuType("NVIDIA A100 80GB", 8, 27.44705),
    "p5.48xlarge": GpuType("NVIDIA H100", 8, 55.04),
}

STATES = {
    "pending": InstanceState.BOOTING,
    "running": InstanceState.RUNNING,
    "shutting-down": InstanceState.STOPPING,
    "terminated": InstanceState.TERMINATED,
    "stopping": InstanceState.FAILED,
    "stopped": InstanceState.FAILED,
}
#: ``instance-state-name`` values of instances that still exist (and may bill).
LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")
#: ``StateReason`` codes of a spot instance EC2 interrupted (API_StateReason).
INTERRUPTION_REASONS = frozenset({"Server.SpotInstanceTermination", "Server.SpotInstanceShutdown"})
#: Spot request status codes of an interruption (EC2 User Guide, "Spot request status"); not
#: ``instance-terminated-by-user``, which our own terminate gives.
INTERRUPTION_STATUSES = frozenset(
    {
        "marked-for-termination",
        "marked-for-stop",
        "instance-terminated-by-price",
        "instance-terminated-no-capacity",
        "instance-terminated-capacity-oversubscribed",
        "instance-terminated-launch-group-constraint",
        "instance-stopped-by-price",
        "instance-stopped-no-capacity",
    }
)


def client_token(name: str, region: str, instance_type: str, spot: bool) -> str:
    """The ``ClientToken`` of a launch (at most 64 ASCII characters, unique per region and request).

    The same name and offer give the same token, so EC2 answers a repeated launch with the instance
    it already started; another offer under the same name is another request.
    """
    digest = hashlib.sha256(f"{name}\0{region}\0{instance_type}\0{'spot' if spot else 'on-demand'}".encode())
    return f"gpu-training-{digest.hexdigest()[:48]}"


def _as_list(value: Any) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [str(v).strip() for v in value if str(v).strip()]


def _tags(data: dict[str, Any]) -> dict[str, str]:
    return {str(t.get("Key")): str(t.get("Value") or "") for t in data.get("Tags") or []}


def _price(value: Any) -> float | None:
    try:
        return None if value in (None, "") else round(float(value), 6)
    except (TypeError, ValueError):
        return None


def interruption_of(data: dict[str, Any], spot_request: dict[str, Any] | None = None) -> str | None:
    """EC2's words for the interruption of an instance (``DescribeInstances`` data and its spot
    request), or None when EC2 did not interrupt it. A pending or running instance is not interrupted
    (a persistent request's instance may run again)."""
    if str((data.get("State") or {}).get("Name") or "") in ("pending", "running"):
        return None
    words = []
    reason = data.get("StateReason") or {}
    if reason.get("Code") in INTERRUPTION_REASONS:
        words.append(str(reason.get("Message") or reason["Code"]))
    status = (spot_request or {}).get("Status") or {}
    if status.get("Code") in INTERRUPTION_STATUSES:
        request_id = (spot_request or {}).get("SpotInstanceRequestId") or data.get("SpotInstanceRequestId")
        message = f": {status['Message']}" if status.get("Message") else ""
        words.append(f"spot request {request_id} {status['Code']}{message}")
    return "; ".join(words) or None


def _escape_filter(value: str) -> str:
    """A literal for an EC2 filter value, where ``*`` and ``?`` are wildcards and ``\\`` escapes."""
    return value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")


class Ec2Provider(CloudProvider):
    """AWS EC2 GPU instances, on-demand and spot."""

    name = "ec2"
    default_conn_id = "aws_default"
    provision_timeout = timedelta(minutes=10)
    default_ssh_user = "ubuntu"

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__(conn_id)
        #: API requests sent (botocore's retries included), counted by a ``before-send`` handler.
        self.calls = 0
        self._hooks: dict[str, Ec2ApiHook] = {}
        self._region_of: dict[str, str] = {}  # instance id -> region
        self._spot_zone: dict[tuple[str, str], str] = {}  # (region, type) -> cheapest zone

    # --- configuration ---------------------------------------------------------------------------

    @cached_property
    def connection(self) -> Any:
        from airflow.sdk import BaseHook

        try:
            return BaseHook.get_connection(self.conn_id)
        except Exception as err:  # AirflowNotFoundException: a retry will not define it
            raise BadRequestError(
                self.name, f"Airflow connection {self.conn_id!r} (the AWS credentials) is not defined: {err}"
            ) from err

    @cached_property
    def extras(self) -> dict[str, Any]:
        return dict(self.connection.extra_dejson or {})

    @cached_property
    def settings(self) -> dict[str, Any]:
        value = self.extras.get(SETTINGS_KEY) or {}
        if not isinstance(value, dict):
            raise BadRequestError(
                self.name, f"extra {SETTINGS_KEY!r} of connection {self.conn_id!r} must be an object (a dict)"
            )
        return dict(value)

    @property
    def api_calls(self) -> int:
        return self.calls

    @cached_property
    def regions(self) -> tuple[str, ...]:
        regions = _as_list(self.settings.get("regions"))
        if not regions:
            default = (
                self.extras.get("region_name") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            )
            regions = _as_list(default)
        if not regions:
            raise BadRequestError(
                self.name,
                f"no region: set extra 'region_name' (or '{SETTINGS_KEY}.regions') of connection {self.conn_id!r}",
            )
        return tuple(dict.fromkeys(regions))

    def regional(self, key: str, region: str) -> Any:
        """A setting that may be one value or a ``{region: value}`` dict."""
        value = self.settings.get(key)
        if isinstance(value, dict):
            return value.get(region)
        return value

    @cached_property
    def instance_types(self) -> dict[str, GpuType]:
        """:data:`INSTANCE_TYPES` with the ``prices`` setting applied."""
        types = dict(INSTANCE_TYPES)
        for itype, value in (self.settings.get("prices") or {}).items():
            if isinstance(value, dict):
                base = types.get(itype)
                gpu = value.get("gpu") or (base.gpu_name if base else None)
                count = int(value.get("gpu_count") or (base.gpu_count if base else 0))
                price = _price(value.get("price"))
                if price is None and base is not None:
                    price = base.price
            else:
                base = types.get(itype)
                gpu, count, price = (base.gpu_name, base.gpu_count, _price(value)) if base else (None, 0, None)
            if not gpu or count < 1 or price is None:
                raise BadRequestError(
                    self.name,
                    f"{SETTINGS_KEY}.prices[{itype!r}] of connection {self.conn_id!r} needs a price (and for a type "
                    'not built in, "gpu" and "gpu_count"), e.g. {"price": 1.2, "gpu": "L4", "gpu_count": 1}',
                )
            types[itype] = GpuType(str(gpu), count, price)
        return types

    @cached_property
    def price_overrides(self) -> frozenset[str]:
        """The types whose on-demand price the ``prices`` setting gives (the price list is not asked)."""
        return frozenset(self.settings.get("prices") or {})

    @cached_property
    def on_demand_prices(self) -> Ec2OnDemandPrices:
        """On-demand prices from the AWS Price List, cached; the dated table when it cannot be asked."""
        from gpu_training.hooks.results import airflow_home

        path = self.settings.get("price_cache") or airflow_home() / "cache" / "ec2_prices.json"
        table = {itype: gpu.price for itype, gpu in INSTANCE_TYPES.items()}
        return Ec2OnDemandPrices(self._pricing_hook, PriceCache(path), table, PRICE_TABLE_DATE, conn_id=self.conn_id)

    def _pricing_hook(self) -> Any:
        """The Price List hook (made on the first lookup the cache cannot answer), its requests counted."""
        from gpu_training.hooks.ec2_pricing import PRICING_REGIONS, Ec2PricingHook

        region = str(self.settings.get("pricing_region") or PRICING_REGIONS[0])
        if region not in PRICING_REGIONS:
            raise BadRequestError(
                self.name,
                f"{SETTINGS_KEY}.pricing_region of connection {self.conn_id!r} is {region!r}; the AWS Price List "
                f"Query API answers in {', '.join(PRICING_REGIONS)}",
            )
        hook = Ec2PricingHook(self.conn_id, region_name=region, config=self._botocore_config())
        hook.client.meta.events.register("before-send.pricing", self._count_call)
        return hook

    # --- the API ---------------------------------------------------------------------------------

    def _botocore_config(self) -> Any:
        """The hooks' botocore config: the connection's ``config_kwargs`` plus standard-mode retries
        (``retry_attempts``); ``None`` when ``config_kwargs`` sets ``retries`` itself."""
        attempts = int(self.settings.get("retry_attempts") or DEFAULT_RETRY_ATTEMPTS)
        return botocore_config(self.extras, attempts)

    def hook(self, region: str) -> Ec2ApiHook:
        """The EC2 API of ``region`` (one hook per region), its requests counted in :attr:`calls`."""
        if region not in self._hooks:
            self._hooks[region] = Ec2ApiHook(
                self.conn_id, region_name=region, config=self._botocore_config(), on_request=self._count_call
            )
        return self._hooks[region]

    def client(self, region: str) -> Any:
        """The boto3 EC2 client of ``region`` (its hook's)."""
        return self.hook(region).client

    def _count_call(self, **_: Any) -> None:
        self.calls += 1

    # --- offers ----------------------------------------------------------------------------------

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        anywhere = dataclasses.replace(request, regions=())
        wanted = {
            itype: gpu
            for itype, gpu in self.instance_types.items()
            if fits(Offer(self.name, itype, gpu.price, None, gpu.gpu_name, gpu.gpu_count), anywhere)
        }
        if not wanted:
            return []
        offers: list[Offer] = []
        for region in self.regions:
            if request.regions and region not in request.regions:
                continue
            offered = self._offered_types(region, wanted)
            on_sale = [t for t in wanted if offered is None or t in offered]
            prices = self.on_demand_prices.prices(region, [t for t in on_sale if t not in self.price_overrides])
            for itype, gpu in wanted.items():
                if itype not in on_sale:  # listed without capacity (never launched): the table's price will do
                    offers.append(Offer(self.name, itype, gpu.price, region, gpu.gpu_name, gpu.gpu_count, False, False))
                    continue
                price = gpu.price if itype in self.price_overrides else prices.get(itype)
                if price is not None:
                    offers.append(Offer(self.name, itype, price, region, gpu.gpu_name, gpu.gpu_count))
            if request.spot:
                for itype, (price, zone) in self._spot_prices(region, on_sale).items():
                    self._spot_zone[(region, itype)] = zone
                    gpu = wanted[itype]
                    offers.append(Offer(self.name, itype, price, region, gpu.gpu_name, gpu.gpu_count, spot=True))
        return [offer for offer in offers if fits(offer, request)]

    def _offered_types(self, region: str, types: Iterable[str]) -> set[str] | None:
        """The types ``region`` offers (``DescribeInstanceTypeOfferings``); None if not allowed to ask."""
        try:
            items = self.hook(region).instance_type_offerings(types)
        except BadRequestError as err:
            if "UnauthorizedOperation" not in str(err):
                raise
            log.warning("%s; listing every instance type as offered", err)
            return None
        return {str(item.get("InstanceType")) for item in items}

    def _spot_prices(self, region: str, types: list[str]) -> dict[str, tuple[float, str]]:
        """Per type, the cheapest zone's latest Linux/UNIX spot price: ``{type: (price, zone)}``.

        ``DescribeSpotPriceHistory`` with ``StartTime`` = now answers the price in effect in each zone;
        if it fails, there are no spot offers (a warning says why).
        """
        if not types:
            return {}
        try:
            history = self.hook(region).spot_price_history(types, datetime.now(UTC))
        except ProviderError as err:
            log.warning("no spot offers in %s: %s", region, err)
            return {}
        latest: dict[tuple[str, str], tuple[datetime, float]] = {}
        for item in history:
            itype, zone = str(item.get("InstanceType") or ""), str(item.get("AvailabilityZone") or "")
            price = _price(item.get("SpotPrice"))
            when = item.get("Timestamp") or datetime.min.replace(tzinfo=UTC)
            if itype not in types or not zone or price is None:
                continue
            if not str(item.get("ProductDescription") or "").startswith("Linux/UNIX"):
                continue
            if (itype, zone) not in latest or when > latest[itype, zone][0]:
                latest[itype, zone] = (when, price)
        cheapest: dict[str, tuple[float, str]] = {}
        for (itype, zone), (_, price) in sorted(latest.items()):
            if itype not in cheapest or price < cheapest[itype][0]:
                cheapest[itype] = (price, zone)
        return cheapest

    # --- instances -------------------------------------------------------------------------------

    def _info(
        self,
        region: str,
        data: dict[str, Any],
        health: dict[str, str] | None = None,
        spot_request: dict[str, Any] | None = None,
    ) -> InstanceInfo:
        status = str((data.get("State") or {}).get("Name") or "")
        tags = _tags(data)
        state = STATES.get(status, InstanceState.UNKNOWN)
        health = health or {}
        if state == InstanceState.RUNNING and "impaired" in health.values():
            state = InstanceState.FAILED
        interruption = interruption_of(data, spot_request)
        if interruption and not state.is_gone:
            state = InstanceState.FAILED  # shutting down for EC2's reasons: it no longer runs the job
        instance_id = str(data.get("InstanceId") or "")
        self._region_of[instance_id] = region
        use_private = bool(self.settings.get("use_private_ip"))
        details = {
            "status": status,
            **health,
            "market": "spot" if data.get("InstanceLifecycle") == "spot" else "on-demand",
            "availability_zone": (data.get("Placement") or {}).get("AvailabilityZone"),
            "public_ip": data.get("PublicIpAddress"),
            "private_ip": data.get("PrivateIpAddress"),
            "image_id": data.get("ImageId"),
            "state_reason": (data.get("StateReason") or {}).get("Message"),
            "spot_request": data.get("SpotInstanceRequestId"),
            "spot_request_status": ((spot_request or {}).get("Status") or {}).get("Code"),
            "interruption": interruption,
        }
        return InstanceInfo(
            provider=self.name,
            instance_id=instance_id,
            name=tags.get("Name", ""),
            state=state,
            instance_type=data.get("InstanceType"),
            region=region,
            price_per_hour=_price(tags.get(TAG_PRICE)),
            address=(data.get("PrivateIpAddress") if use_private else data.get("PublicIpAddress")) or None,
            details={k: v for k, v in details.items() if v not in (None, "")},
            interrupted=interruption is not None,
        )

    def _health(self, region: str, instance_ids: list[str]) -> dict[str, dict[str, str]]:
        """``DescribeInstanceStatus`` of running instances: ``{id: {"instance_status": .., "system_status": ..}}``."""
        if not instance_ids:
            return {}
        try:
            items = self.hook(region).instance_statuses(instance_ids)
        except InstanceNotFoundError:  # gone between the two calls: DescribeInstances tells next time
            return {}
        health: dict[str, dict[str, str]] = {}
        for item in items:
            checks = {
                "instance_status": str((item.get("InstanceStatus") or {}).get("Status") or ""),
                "system_status": str((item.get("SystemStatus") or {}).get("Status") or ""),
            }
            health[str(item.get("InstanceId"))] = {k: v for k, v in checks.items() if v}
        return health

    def _spot_requests(self, region: str, request_ids: list[str]) -> dict[str, dict[str, Any]]:
        """``DescribeSpotInstanceRequests`` by id: ``{request id: request}``; empty if EC2 will not say."""
        if not request_ids:
            return {}
        try:
            requests = self.hook(region).spot_instance_requests(request_ids)
        except ProviderError as err:
            log.warning("spot request status not read (%s); the instances' state reasons decide", err)
            return {}
        return {str(r.get("SpotInstanceRequestId")): r for r in requests}

    def _describe(self, region: str, **params: Any) -> list[InstanceInfo]:
        """``DescribeInstances`` in one region, with the health of the running ones and the spot
        request of spot instances no longer running (was it an interruption?)."""
        found = self.hook(region).describe_instances(**params)
        running = [str(d["InstanceId"]) for d in found if (d.get("State") or {}).get("Name") == "running"]
        health = self._health(region, running)
        stopped_spot = [
            str(d["SpotInstanceRequestId"])
            for d in found
            if d.get("SpotInstanceRequestId") and (d.get("State") or {}).get("Name") not in ("pending", "running")
        ]
        requests = self._spot_requests(region, stopped_spot)
        return [
            self._info(
                region,
                d,
                health.get(str(d.get("InstanceId"))),
                requests.get(str(d.get("SpotInstanceRequestId") or "")),
            )
            for d in found
        ]

    def _live_by_name(self, region: str, name_filter: str) -> list[InstanceInfo]:
        return self._describe(
            region,
            Filters=[
                {"Name": "tag:Name", "Values": [name_filter]},
                {"Name": "instance-state-name", "Values": list(LIVE_STATES)},
            ],
        )

    def _find_in_region(self, region: str, name: str) -> InstanceInfo | None:
        found = [i for i in self._live_by_name(region, _escape_filter(name)) if i.name == name]
        found.sort(key=lambda i: i.state != InstanceState.RUNNING and i.state != InstanceState.BOOTING)
        return found[0] if found else None

    def find_instance(self, name: str) -> InstanceInfo | None:
        for region in self.regions:
            found = self._find_in_region(region, name)
            if found is not None:
                return found
        return None

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        pattern = _escape_filter(name_prefix) + "*"
        return [
            info
            for region in self.regions
            for info in self._live_by_name(region, pattern)
            if info.name.startswith(name_prefix)
        ]

    def _regions_for(self, instance_id: str) -> tuple[str, ...]:
        known = self._region_of.get(instance_id)
        return (known,) if known else self.regions

    def get_instance(self, instance_id: str) -> InstanceInfo:
        regions = self._regions_for(instance_id)
        answers = []
        for region in regions:
            try:
                found = self._describe(region, InstanceIds=[instance_id])
            except InstanceNotFoundError as err:
                answers.append(str(err).removeprefix(self.name + ": "))
                continue
            if found:
                return found[0]
        said = f" ({'; '.join(answers)})" if answers else ""
        raise InstanceNotFoundError(self.name, f"instance {instance_id} not found in {', '.join(regions)}{said}")

    # --- launch / terminate ----------------------------------------------------------------------

    def _ami(self, region: str) -> str:
        ami = str(self.regional("ami_id", region) or "").strip()
        if not ami:
            raise BadRequestError(
                self.name,
                f"connection {self.conn_id!r} has no '{SETTINGS_KEY}.ami_id' for {region}: set extra "
                f'{{"{SETTINGS_KEY}": {{"ami_id": "ami-..."}}}} (or {{"{region}": "ami-..."}}) to the AMI to boot, '
                "e.g. an AWS Deep Learning AMI with NVIDIA drivers and Docker",
            )
        return ami

    def _root_device(self, region: str, ami: str) -> str:
        for image in self.hook(region).images([ami]):
            if image.get("RootDeviceName"):
                return str(image["RootDeviceName"])
        raise BadRequestError(self.name, f"AMI {ami} ({SETTINGS_KEY}.ami_id) not found in {region}")

    def run_params(self, offer: Offer, name: str, region: str) -> dict[str, Any]:
        """The ``RunInstances`` parameters for ``offer`` under ``name``."""
        ami = self._ami(region)
        tags = [
            {"Key": "Name", "Value": name},
            {"Key": TAG_MANAGED, "Value": "true"},
            {"Key": TAG_PRICE, "Value": f"{offer.price_per_hour:g}"},
        ]
        params: dict[str, Any] = {
            "ImageId": ami,
            "InstanceType": offer.instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "ClientToken": client_token(name, region, offer.instance_type, offer.spot),
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tags}, {"ResourceType": "volume", "Tags": tags}],
        }
        if key_name := self.regional("key_name", region):
            params["KeyName"] = str(key_name)
        if groups := _as_list(self.regional("security_group_ids", region)):
            params["SecurityGroupIds"] = groups
        subnet = self.regional("subnet_id", region)
        if subnet:
            params["SubnetId"] = str(subnet)
        if profile := str(self.regional("iam_instance_profile", region) or ""):
            params["IamInstanceProfile"] = {"Arn": profile} if profile.startswith("arn:") else {"Name": profile}
        if size := self.settings.get("root_volume_gb"):
            params["BlockDeviceMappings"] = [
                {
                    "DeviceName": self._root_device(region, ami),
                    "Ebs": {"VolumeSize": int(size), "VolumeType": "gp3", "DeleteOnTermination": True},
                }
            ]
        if offer.spot:
            spot: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if (max_price := _price(self.settings.get("spot_max_price"))) is not None:
                spot["MaxPrice"] = f"{max_price:g}"
            params["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
            zone = self._spot_zone.get((region, offer.instance_type))
            if zone and not subnet:
                params["Placement"] = {"AvailabilityZone": zone}
        return params

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        existing = self.find_instance(name)
        if existing is not None:
            return existing
        region = offer.region or self.regions[0]
        params = self.run_params(offer, name, region)
        try:
            reply = self.hook(region).run_instances(params)
        except NoCapacityError as err:
            what = f"{offer.instance_type}{' spot' if offer.spot else ''}"
            raise NoCapacityError(self.name, f"{what}: {str(err).removeprefix(self.name + ': ')}") from err
        except ProviderUnavailableError as err:
            # A 5xx may come after EC2 acted (botocore already retried with the same ClientToken).
            try:
                found = self._find_in_region(region, name)
            except ProviderError:
                raise err from None
            if found is not None:
                log.warning("%s; adopting %s, which EC2 started anyway", err, found.instance_id)
                return found
            raise
        instances = reply.get("Instances") or []
        if not instances:
            found = self._find_in_region(region, name)
            if found is not None:
                return found
            raise ProviderError(self.name, f"RunInstances in {region} for {name} answered no instance")
        info = self._info(region, instances[0])
        # The reply carries the tags as requested; should it not, what was asked for is what was launched.
        return dataclasses.replace(
            info, name=info.name or name, price_per_hour=info.price_per_hour or offer.price_per_hour
        )

    def terminate(self, instance_id: str) -> None:
        for region in self._regions_for(instance_id):
            try:
                self.hook(region).terminate_instances([instance_id])
            except InstanceNotFoundError:
                continue  # not in this region, or already gone for good
            return
