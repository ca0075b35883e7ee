"""``Ec2FaultProxy``: EC2's Query API as moto answers it, with the uniform fault switches on top.

moto's standalone server answers EC2 faithfully (RunInstances, DescribeInstances, spot markets,
instance type offerings) but cannot inject faults, so this proxy on 127.0.0.1 sits between the
provider and moto: the ``aws`` connection's ``endpoint_url`` points at the proxy, which forwards
each request to moto and injects faults the way EC2 reports them. Shapes follow the Amazon EC2 API
Reference (Query API 2016-11-15): the request is form-encoded (``Action=RunInstances&...``), replies
are XML; errors are ``<Response><Errors><Error><Code>..</Code><Message>..</Message></Error></Errors>
<RequestID>..</RequestID></Response>`` with EC2's status codes ("Error codes for the Amazon EC2
API"): 400 for client errors, 401 AuthFailure, 403 UnauthorizedOperation, 500 InternalError and
InsufficientInstanceCapacity (a "server" error, which EC2 answers with HTTP 500), 503
RequestLimitExceeded.

What the proxy adds to moto:

- Authentication: the SigV4 signature (``Authorization: AWS4-HMAC-SHA256 Credential=...``) is checked
  against the proxy's access key pair (:meth:`connection`); a wrong key answers 401 AuthFailure.
- ``ClientToken`` idempotency ("Ensuring idempotency in Amazon EC2 API requests"), which moto lacks:
  a repeated RunInstances with the same token and parameters answers the first reply and starts
  nothing; other parameters answer 400 IdempotentParameterMismatch.
- Malformed instance ids answer 400 ``InvalidInstanceID.Malformed`` (moto says NotFound).
- The :class:`~tests.fakeclouds.base.Faults` switches: ``no_capacity`` (DescribeInstanceTypeOfferings
  lists nothing, RunInstances answers InsufficientInstanceCapacity), ``refuse_launch`` (the next N
  RunInstances answer InsufficientInstanceCapacity), ``rate_limit`` (the next N requests answer 503
  RequestLimitExceeded; EC2 sends no Retry-After, so a ``retry_after`` is sent as
  ``x-amz-retry-after`` in milliseconds, the header botocore's standard retry mode reads),
  ``error_after_create`` (RunInstances is forwarded, then answered 500 InternalError),
  ``terminate_fail`` (TerminateInstances answers 500 InternalError and is not forwarded),
  ``unhealthy`` (DescribeInstanceStatus reports the instance status check ``impaired``), ``vanish``
  (the instance is terminated in moto, answers ``InvalidInstanceID.NotFound`` and is dropped from
  DescribeInstances), ``boot_seconds`` (DescribeInstances says ``pending`` until then) and
  ``terminate_seconds`` (``shutting-down`` before ``terminated``).
- Spot prices: moto's DescribeSpotPriceHistory answers a fixed price from 2006; a test may set
  :attr:`spot_prices` (answered instead, filtered by ``InstanceType.N``) or
  :attr:`spot_history_error` (answered as that error code, 403).
- On-demand prices, which moto does not serve at all (it has no ``pricing`` service): the proxy
  answers the AWS Price List Query API's ``GetProducts`` (JSON 1.1, ``X-Amz-Target:
  AWSPriceListService.GetProducts``; the ``aws`` connection's ``endpoint_url`` sends the pricing
  client here too) from a price list of :func:`ec2_price_item` products, each in the shape of a
  real one ("Reading the service price list file"; the AWS CLI's ``get-products`` example): the
  Linux/shared/on-demand product of every (region, type) asked for, at :attr:`on_demand`'s price
  (default: the provider's built-in table; None: not in the price list), beside the products the
  filters must keep out (Windows, unused capacity reservations, Capacity Blocks). Only
  ``TERM_MATCH`` filters, and ``instanceType`` and ``regionCode`` among them, are served; pages of
  ``MaxResults`` (default 100) with an opaque ``NextToken``; :attr:`pricing_requests` records what
  each asked for. :attr:`pricing_error` answers every GetProducts with that error code (400, as the
  Price List API's errors are). The connection the proxy hands out keeps its price cache
  (``price_cache``) in a file of the proxy's, emptied by :meth:`reset`, so a test never sees prices
  another test cached.
- Spot requests, which moto does not create for ``RunInstances`` with ``InstanceMarketOptions``:
  EC2 does ("Spot request status", EC2 User Guide), so the proxy gives each spot launch a request
  ``sir-...``, sends it as the instance's ``spotInstanceRequestId`` and answers
  DescribeSpotInstanceRequests for it (by ``SpotInstanceRequestId.N``, or all of them without ids
  or filters; anything else goes to moto): state ``active``/``fulfilled`` once launched,
  ``closed``/``instance-terminated-by-user`` after our TerminateInstances.
- Spot interruptions, the test control :meth:`interrupt` (EC2 "Spot Instance interruptions", "Find
  interrupted Spot Instances", API_StateReason): the instance goes the way of its
  ``InstanceInterruptionBehavior``, ``terminate`` (shutting-down for ``terminate_seconds``, then
  terminated) or ``stop``/``hibernate`` (stopping, then stopped), with ``stateReason``
  ``Server.SpotInstanceTermination`` (``Server.SpotInstanceShutdown`` when stopped), and its spot
  request turns ``instance-terminated-by-price``/``-no-capacity`` (``closed``; ``open`` for a
  persistent request) or ``instance-stopped-...`` (``disabled``). The 2-minute notice
  (``marked-for-termination``) is not simulated: the interruption starts at once.

The record: :attr:`instances` (FakeInstance per launched id), :attr:`calls` ``(method, Action,
status)``, :attr:`timed_calls` with a monotonic time first, and :meth:`assert_all_terminated`,
which asks moto directly that every instance launched through the proxy is terminated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import http.client
import json
import re
import secrets
import shutil
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.fakeclouds.base import FakeCloud, FakeInstance, Reply

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
INSTANCE_ID_RE = re.compile(r"^i-(?:[0-9a-f]{8}|[0-9a-f]{17})$")
AUTH_RE = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request,"
    r"\s*SignedHeaders=(?P<signed>[^,]+),\s*Signature=(?P<signature>[0-9a-f]+)"
)
_STATE_CODES = {"pending": 0, "running": 16, "shutting-down": 32, "terminated": 48, "stopping": 64, "stopped": 80}
_PHASE_STATES = {"booting": "pending", "terminating": "shutting-down", "terminated": "terminated"}
SPOT_REQUEST_ID_RE = re.compile(r"^sir-[0-9a-z]{8}$")
#: Why EC2 interrupts (the tail of the spot request status code): the Spot price rose above the
#: request's maximum price, or EC2 needs the capacity back.
INTERRUPTION_CAUSES = ("by-price", "no-capacity")
#: The instance's ``stateReason`` after an interruption, per interruption behavior (API_StateReason).
_INTERRUPTION_REASONS = {
    "terminate": ("Server.SpotInstanceTermination", "Server.SpotInstanceTermination: Spot instance termination"),
    "stop": ("Server.SpotInstanceShutdown", "Server.SpotInstanceShutdown: Spot instance shutdown"),
}
#: Spot request status messages. The no-capacity one is quoted from AWS's knowledge center ("Why did
#: Amazon EC2 terminate my Spot Instance?"); the others follow its pattern (inferred).
_SPOT_MESSAGES = {
    "fulfilled": "Your spot request is fulfilled.",
    "instance-terminated-by-price": "Your Spot Instance was terminated because your maximum price is lower than "
    "the Spot price.",
    "instance-terminated-no-capacity": "Your Spot Instance was terminated because there is no Spot capacity "
    "available that matches your request.",
    "instance-stopped-by-price": "Your Spot Instance was stopped because your maximum price is lower than the "
    "Spot price.",
    "instance-stopped-no-capacity": "Your Spot Instance was stopped because there is no Spot capacity available "
    "that matches your request.",
    "instance-terminated-by-user": "Spot Instance terminated due to user-initiated termination.",
}


@dataclasses.dataclass
class SpotPrice:
    """One DescribeSpotPriceHistory record."""

    instance_type: str
    availability_zone: str
    price: float
    timestamp: float = dataclasses.field(default_factory=time.time)  # epoch seconds
    product_description: str = "Linux/UNIX"


#: Price list locations of a few regions (the ``location`` attribute; ``regionCode`` is the code).
LOCATIONS = {
    "us-east-1": "US East (N. Virginia)",
    "us-east-2": "US East (Ohio)",
    "us-west-2": "US West (Oregon)",
    "eu-west-1": "EU (Ireland)",
    "eu-central-1": "EU (Frankfurt)",
}
#: The region prefixes of ``usagetype`` (none for us-east-1).
USAGE_PREFIXES = {
    "us-east-1": "",
    "us-east-2": "USE2-",
    "us-west-2": "USW2-",
    "eu-west-1": "EU-",
    "eu-central-1": "EUC1-",
}
#: The offer term code of on-demand prices, and the rate code of their one price dimension.
ON_DEMAND_TERM = "JRTCKXETXF"
ON_DEMAND_RATE = "6YS6EN2CT7"
PRICING_JSON = "application/x-amz-json-1.1"
#: The messages of the Price List API's refusals (AccessDenied as IAM words it).
PRICING_MESSAGES = {
    "AccessDeniedException": "User: arn:aws:iam::123456789012:user/gpu-training is not authorized to perform: "
    "pricing:GetProducts because no identity-based policy allows the pricing:GetProducts action",
    "ThrottlingException": "Rate exceeded",
    "InternalErrorException": "An internal error occurred.",
}


def ec2_price_item(region: str, instance_type: str, usd: float, **attributes: str) -> dict[str, Any]:
    """One EC2 product of the price list (``GetProducts``' ``PriceList`` entries, decoded), as AWS
    publishes it: the product's attributes, its on-demand term (USD per ``Hrs``) and a reserved term.
    ``attributes`` replace the defaults (a Windows product: ``operatingSystem="Windows"``)."""
    attrs = {
        "instanceType": instance_type,
        "regionCode": region,
        "location": LOCATIONS.get(region, region),
        "locationType": "AWS Region",
        "servicecode": "AmazonEC2",
        "servicename": "Amazon Elastic Compute Cloud",
        "instanceFamily": "GPU instance",
        "operatingSystem": "Linux",
        "tenancy": "Shared",
        "preInstalledSw": "NA",
        "licenseModel": "No License required",
        "capacitystatus": "Used",
        "marketoption": "OnDemand",
        "operation": "RunInstances",
        "usagetype": USAGE_PREFIXES.get(region, region.upper() + "-") + f"BoxUsage:{instance_type}",
        "currentGeneration": "Yes",
        "processorArchitecture": "64-bit",
        "vpcnetworkingsupport": "true",
        "availabilityzone": "NA",
        **attributes,
    }
    sku = hashlib.sha256(json.dumps(attrs, sort_keys=True).encode()).hexdigest()[:16].upper()
    os_name = attrs["operatingSystem"]
    on_demand = f"{sku}.{ON_DEMAND_TERM}"
    reserved = f"{sku}.4NA7Y494T4"
    return {
        "product": {"productFamily": "Compute Instance", "attributes": attrs, "sku": sku},
        "serviceCode": "AmazonEC2",
        "terms": {
            "OnDemand": {
                on_demand: {
                    "priceDimensions": {
                        f"{on_demand}.{ON_DEMAND_RATE}": {
                            "unit": "Hrs",
                            "endRange": "Inf",
                            "description": f"${usd:g} per On Demand {os_name} {instance_type} Instance Hour",
                            "appliesTo": [],
                            "rateCode": f"{on_demand}.{ON_DEMAND_RATE}",
                            "beginRange": "0",
                            "pricePerUnit": {"USD": f"{usd:.10f}"},
                        }
                    },
                    "sku": sku,
                    "effectiveDate": "2026-11-01T00:00:00Z",
                    "offerTermCode": ON_DEMAND_TERM,
                    "termAttributes": {},
                }
            },
            "Reserved": {
                reserved: {
                    "priceDimensions": {
                        f"{reserved}.6YS6EN2CT7": {
                            "unit": "Hrs",
                            "endRange": "Inf",
                            "description": f"{os_name} ({instance_type}), 1 year no upfront",
                            "appliesTo": [],
                            "rateCode": f"{reserved}.6YS6EN2CT7",
                            "beginRange": "0",
                            "pricePerUnit": {"USD": f"{usd * 0.7:.10f}"},
                        }
                    },
                    "sku": sku,
                    "effectiveDate": "2026-11-01T00:00:00Z",
                    "offerTermCode": "4NA7Y494T4",
                    "termAttributes": {
                        "LeaseContractLength": "1yr",
                        "OfferingClass": "standard",
                        "PurchaseOption": "No Upfront",
                    },
                }
            },
        },
        "version": "20261101000000",
        "publicationDate": "2026-11-01T00:00:00Z",
    }


def error_xml(code: str, message: str) -> bytes:
    """EC2's Query API error body."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{_esc(code)}</Code><Message>{_esc(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(epoch))


class Ec2FaultProxy(FakeCloud):
    """A fault-injecting proxy in front of moto's EC2 (see the module docstring)."""

    name = "ec2"

    def __init__(self, moto_endpoint: str | None = None, *, region: str = "us-east-1", **kwargs: Any) -> None:
        self._own_moto: Any = None
        if moto_endpoint is None:
            from tests.servers import start_moto

            self._own_moto = start_moto()
            moto_endpoint = self._own_moto.endpoint
        self.moto_endpoint = moto_endpoint.rstrip("/")
        self.region = region
        super().__init__(**kwargs)
        self.access_key_id = "AKIA" + uuid.uuid4().hex[:16].upper()
        self.secret_access_key = self.api_key
        self.timed_calls: list[tuple[float, str, str, int]] = []
        self.spot_prices: list[SpotPrice] | None = None
        self.spot_history_error: str | None = None
        self._tokens: dict[tuple[str, str], tuple[tuple[str, ...], bytes]] = {}
        self._moto_clients: dict[str, Any] = {}
        #: (region, instance type) -> the Linux on-demand USD/hour GetProducts answers (None: the
        #: price list has no such product); a pair not set answers the provider's built-in table.
        self.on_demand: dict[tuple[str, str], float | None] = {}
        self.pricing_error: str | None = None
        #: (regionCode, instanceType) of each GetProducts served, in order.
        self.pricing_requests: list[tuple[str, str]] = []
        self._price_dir = Path(tempfile.mkdtemp(prefix="ec2-price-cache-"))
        #: The ``price_cache`` of the connections this proxy hands out.
        self.price_cache = self._price_dir / "ec2_prices.json"

    # --- what tests use --------------------------------------------------------------------------

    def connection(self, **settings: Any) -> str:
        """The Airflow ``aws`` connection (JSON) through this proxy; ``settings`` go to extra ``gpu_training``
        (with ``price_cache`` in the proxy's own file unless they name one)."""
        settings = {"price_cache": str(self.price_cache), **settings}
        extra = {"endpoint_url": self.url, "region_name": self.region, "gpu_training": settings}
        return json.dumps(
            {"conn_type": "aws", "login": self.access_key_id, "password": self.secret_access_key, "extra": extra}
        )

    def moto(self, region: str | None = None) -> Any:
        """A boto3 EC2 client straight to moto (no proxy, no faults)."""
        import boto3

        region = region or self.region
        if region not in self._moto_clients:
            self._moto_clients[region] = boto3.client(
                "ec2",
                endpoint_url=self.moto_endpoint,
                region_name=region,
                aws_access_key_id="testing",
                aws_secret_access_key="testing",
            )
        return self._moto_clients[region]

    def moto_instance(self, instance_id: str) -> dict[str, Any]:
        """What moto itself says about one instance launched through the proxy."""
        inst = self.instances[instance_id]
        reply = self.moto(inst.region).describe_instances(InstanceIds=[instance_id])
        return dict(reply["Reservations"][0]["Instances"][0])

    def interrupt(self, instance_id: str, cause: str = "no-capacity") -> None:
        """Interrupt a spot instance as EC2 does, for ``cause`` ``by-price`` or ``no-capacity`` (test control).

        The instance is terminated (or stopped, as its ``InstanceInterruptionBehavior`` says) in moto
        and reported with EC2's interruption reason and spot request status; see the module docstring.
        """
        if cause not in INTERRUPTION_CAUSES:
            raise ValueError(f"cause must be one of {INTERRUPTION_CAUSES}, not {cause!r}")
        with self.lock:
            inst = self.instances.get(instance_id)
            request = inst.extra.get("spot_request") if inst is not None else None
            if inst is None or request is None:
                raise ValueError(
                    f"{instance_id} is not a spot instance launched through the proxy (EC2 interrupts spot only)"
                )
            if inst.gone or inst.terminate_requested_at is not None or "interruption" in inst.extra:
                raise ValueError(f"{instance_id} is already terminated or interrupted")
            behavior = "terminate" if request["behavior"] == "terminate" else "stop"
            now = time.time()
            inst.extra["interruption"] = {"at": now, "behavior": behavior, "cause": cause}
            inst.extra["state_reason"] = _INTERRUPTION_REASONS[behavior]
            if behavior == "terminate":
                state = "closed" if request["type"] == "one-time" else "open"
                self._set_spot_status(request, f"instance-terminated-{cause}", state, now)
                inst.terminate_requested_at = now
                self._terminate_in_moto([inst])
            else:
                self._set_spot_status(request, f"instance-stopped-{cause}", "disabled", now)
                self.moto(inst.region).stop_instances(InstanceIds=[inst.id])

    def reset(self) -> None:
        with self.lock:
            self._terminate_in_moto([i for i in self.instances.values() if not i.extra.get("moto_terminated")])
            super().reset()
            self.timed_calls.clear()
            self._tokens.clear()
            self.spot_prices = None
            self.spot_history_error = None
            self.on_demand.clear()
            self.pricing_error = None
            self.pricing_requests.clear()
            for cached in self._price_dir.iterdir():
                cached.unlink()

    def assert_all_terminated(self) -> None:
        """moto's own answer: every instance launched through the proxy is terminated."""
        with self.lock:
            by_region: dict[str, list[str]] = {}
            for inst in self.instances.values():
                by_region.setdefault(inst.region, []).append(inst.id)
            left = []
            for region, ids in by_region.items():
                reply = self.moto(region).describe_instances(InstanceIds=ids)
                for reservation in reply["Reservations"]:
                    for data in reservation["Instances"]:
                        if data["State"]["Name"] != "terminated":
                            left.append((data["InstanceId"], self.instances[data["InstanceId"]].name))
        assert not left, f"ec2: instances not terminated in moto: {left}"

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self._price_dir, ignore_errors=True)
        if self._own_moto is not None:
            self._own_moto.stop()

    # --- request handling ------------------------------------------------------------------------

    def _dispatch(self, method: str, raw_path: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        params = dict(parse_qsl(raw.decode(), keep_blank_values=True))
        action = params.get("Action", "")
        lower = {k.lower(): v for k, v in headers.items()}
        target = lower.get("x-amz-target", "")
        with self.lock:
            region = self._authenticated_region(method, raw_path, lower, raw)
            if target.startswith("AWSPriceListService."):
                action = target.rpartition(".")[2]
                reply = self._pricing(action, raw) if region is not None else self._pricing_auth_failure()
            elif region is None:
                reply = self._error(401, "AuthFailure", "AWS was not able to validate the provided access credentials")
            elif self.faults.rate_limit > 0:
                self.faults.rate_limit -= 1
                reply = self._error(503, "RequestLimitExceeded", "Request limit exceeded.")
                if self.faults.retry_after is not None:
                    reply.headers["x-amz-retry-after"] = str(int(self.faults.retry_after * 1000))
            else:
                reply = self._route(action, region, params, raw_path, lower, raw)
            self.calls.append((method, action, reply.status))
            self.timed_calls.append((time.monotonic(), method, action, reply.status))
        return reply

    def _authenticated_region(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str | None:
        """The region of a correctly signed request (SigV4, recomputed with botocore), else None."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        match = AUTH_RE.match(headers.get("authorization", ""))
        if not match or match["key"] != self.access_key_id or "x-amz-date" not in headers:
            return None
        signed = match["signed"].split(";")
        request = AWSRequest(
            method=method,
            url=f"http://{headers.get('host', '')}{path}",
            data=body,
            headers={name: headers.get(name, "") for name in signed},
        )
        request.context["timestamp"] = headers["x-amz-date"]
        signer = SigV4Auth(Credentials(self.access_key_id, self.secret_access_key), match["service"], match["region"])
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        return match["region"] if hmac.compare_digest(expected, match["signature"]) else None

    def _error(self, status: int, code: str, message: str) -> Reply:
        return Reply(status, error_xml(code, message), {"Content-Type": "text/xml;charset=UTF-8"})

    def _forward(self, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, bytes]:
        parts = urlsplit(self.moto_endpoint)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
        try:
            keep = {k: v for k, v in headers.items() if k not in ("host", "connection", "content-length")}
            conn.request("POST", path, body=body, headers=keep)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def _xml(self, status: int, body: bytes) -> Reply:
        return Reply(status, body, {"Content-Type": "text/xml;charset=UTF-8"})

    def _route(
        self, action: str, region: str, params: dict[str, str], path: str, headers: Mapping[str, str], raw: bytes
    ) -> Reply:
        ids = [v for k, v in params.items() if re.fullmatch(r"InstanceId\.\d+", k)]
        if action in ("DescribeInstances", "DescribeInstanceStatus", "TerminateInstances"):
            bad = [i for i in ids if not INSTANCE_ID_RE.match(i)]
            if bad:
                return self._error(400, "InvalidInstanceID.Malformed", f'Invalid id: "{bad[0]}"')
            self._settle()
            lost = [i for i in ids if i in self.instances and self.instances[i].vanished]
            if lost:
                return self._error(400, "InvalidInstanceID.NotFound", f"The instance ID '{lost[0]}' does not exist")
            if action == "TerminateInstances" and self.faults.terminate_fail > 0:
                self.faults.terminate_fail -= 1
                return self._error(500, "InternalError", "An internal error has occurred")
        if action == "RunInstances":
            return self._run_instances(region, params, path, headers, raw)
        if action == "DescribeSpotPriceHistory" and self.spot_history_error:
            return self._error(403, self.spot_history_error, "You are not authorized to perform this operation.")
        if action == "DescribeSpotPriceHistory" and self.spot_prices is not None:
            return self._xml(200, self._spot_history(params))
        if action == "DescribeSpotInstanceRequests":
            answer = self._spot_requests(region, params)
            if answer is not None:
                return answer
        wanted_states: set[str] | None = None
        if action == "DescribeInstances":
            raw, wanted_states = self._without_state_filter(params)
        status, body = self._forward(path, headers, raw)
        if status != 200:
            return self._xml(status, body)
        if action == "DescribeInstances":
            body = self._rewrite_instances(body, wanted_states)
        elif action == "DescribeInstanceStatus":
            body = self._rewrite_status(body)
        elif action == "DescribeInstanceTypeOfferings" and self.faults.no_capacity:
            body = self._rewrite(body, lambda root, q: [s.clear() for s in root.iter(q("instanceTypeOfferingSet"))])
        elif action == "TerminateInstances":
            for instance_id in ids:
                inst = self.instances.get(instance_id)
                if inst is not None and inst.terminate_requested_at is None:
                    inst.terminate_requested_at = time.time()
                    self.power_off(inst)
                    inst.extra["moto_terminated"] = True
                    inst.extra.pop("state_reason", None)  # a stopped spot instance terminated by us: our reason
                    if "spot_request" in inst.extra:
                        self._set_spot_status(
                            inst.extra["spot_request"], "instance-terminated-by-user", "closed", time.time()
                        )
        return self._xml(status, body)

    # --- the Price List Query API ----------------------------------------------------------------

    @staticmethod
    def _json_error(status: int, code: str, message: str) -> Reply:
        return Reply(status, {"__type": code, "message": message}, {"Content-Type": PRICING_JSON})

    def _pricing_auth_failure(self) -> Reply:
        return self._json_error(
            400, "UnrecognizedClientException", "The security token included in the request is invalid."
        )

    def _pricing(self, action: str, raw: bytes) -> Reply:
        if action != "GetProducts":
            return self._json_error(400, "UnknownOperationException", f"{action} is not served by this fake")
        if self.pricing_error:
            return self._json_error(400, self.pricing_error, PRICING_MESSAGES.get(self.pricing_error, "Error"))
        request = json.loads(raw or b"{}")
        filters = request.get("Filters") or []
        if any(f.get("Type") != "TERM_MATCH" for f in filters):
            return self._json_error(400, "InvalidParameterException", "this fake serves TERM_MATCH filters only")
        wanted = {str(f.get("Field")): str(f.get("Value")) for f in filters}
        if "instanceType" not in wanted or "regionCode" not in wanted or request.get("ServiceCode") != "AmazonEC2":
            return self._json_error(
                400, "InvalidParameterException", "this fake serves AmazonEC2 by instanceType and regionCode only"
            )
        self.pricing_requests.append((wanted["regionCode"], wanted["instanceType"]))
        items = [
            item
            for item in self._products(wanted["regionCode"], wanted["instanceType"])
            if all(item["product"]["attributes"].get(field) == value for field, value in wanted.items())
        ]
        size = min(int(request.get("MaxResults") or 100), 100)
        start = int(request.get("NextToken") or "0", 16) if request.get("NextToken") else 0
        page: dict[str, Any] = {
            "FormatVersion": "aws_v1",
            "PriceList": [json.dumps(item) for item in items[start : start + size]],
        }
        if start + size < len(items):
            page["NextToken"] = f"{start + size:x}"
        return Reply(200, page, {"Content-Type": PRICING_JSON})

    def _products(self, region: str, instance_type: str) -> list[dict[str, Any]]:
        """The price list's products of one type in one region: the Linux on-demand one, and its neighbours."""
        if (region, instance_type) in self.on_demand:
            usd = self.on_demand[region, instance_type]
        else:
            from gpu_training.providers.ec2 import INSTANCE_TYPES

            known = INSTANCE_TYPES.get(instance_type)
            usd = known.price if known else None
        if usd is None:
            return []
        return [
            ec2_price_item(region, instance_type, usd),
            ec2_price_item(
                region, instance_type, round(usd * 1.4, 4), operatingSystem="Windows", operation="RunInstances:0002"
            ),
            ec2_price_item(region, instance_type, usd, capacitystatus="UnusedCapacityReservation"),
            ec2_price_item(region, instance_type, round(usd * 0.6, 4), marketoption="CapacityBlock"),
        ]

    # --- RunInstances ----------------------------------------------------------------------------

    def _run_instances(
        self, region: str, params: dict[str, str], path: str, headers: Mapping[str, str], raw: bytes
    ) -> Reply:
        token = params.get("ClientToken", "")
        itype = params.get("InstanceType", "")
        fingerprint = tuple(f"{k}={v}" for k, v in sorted(params.items()) if k != "ClientToken")
        if token and (region, token) in self._tokens:
            first, body = self._tokens[region, token]
            if first != fingerprint:
                return self._error(
                    400,
                    "IdempotentParameterMismatch",
                    f"Arguments on this idempotent request are inconsistent with arguments used in previous request(s) "
                    f"for client token '{token}'.",
                )
            return self._after_create(self._xml(200, body))
        if self.faults.no_capacity or self.capacity_refused():
            zone = params.get("Placement.AvailabilityZone") or f"{region}a"
            return self._error(
                500,
                "InsufficientInstanceCapacity",
                f"We currently do not have sufficient {itype} capacity in the Availability Zone you requested "
                f"({zone}). Our system will be working on provisioning additional capacity. You can currently get "
                f"{itype} capacity by not specifying an Availability Zone in your request or choosing {region}b, "
                f"{region}c.",
            )
        status, body = self._forward(path, headers, raw)
        if status != 200:
            return self._xml(status, body)
        tags = self._launch_tags(params)
        spot = params.get("InstanceMarketOptions.MarketType") == "spot"
        root = ET.fromstring(body)
        q = _qualifier(root)
        for item in root.iter(q("item")):
            instance_id = item.findtext(q("instanceId"))
            if instance_id and item.find(q("instanceState")) is not None:
                inst = FakeInstance(
                    id=instance_id,
                    name=tags.get("Name", ""),
                    instance_type=itype,
                    region=region,
                    price_per_hour=float(tags.get("gpu-training:price") or 0),
                    spot=spot,
                    extra={"client_token": token, "image_id": params.get("ImageId"), "params": params},
                )
                if spot:
                    zone = item.findtext(f"{q('placement')}/{q('availabilityZone')}") or ""
                    inst.extra["spot_request"] = self._new_spot_request(params, zone)
                    _set_text(item, q("spotInstanceRequestId"), inst.extra["spot_request"]["id"])
                self.instances[instance_id] = inst
        if spot:
            ET.register_namespace("", _namespace(root))
            body = b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)
        if token:
            self._tokens[region, token] = (fingerprint, body)
        return self._after_create(self._xml(200, body))

    def _after_create(self, reply: Reply) -> Reply:
        if self.faults.error_after_create > 0:
            self.faults.error_after_create -= 1
            return self._error(500, "InternalError", "An internal error has occurred")
        return reply

    @staticmethod
    def _launch_tags(params: dict[str, str]) -> dict[str, str]:
        tags = {}
        for key, value in params.items():
            match = re.fullmatch(r"TagSpecification\.(\d+)\.Tag\.(\d+)\.Key", key)
            if match and params.get(f"TagSpecification.{match[1]}.ResourceType") == "instance":
                tags[value] = params.get(f"TagSpecification.{match[1]}.Tag.{match[2]}.Value", "")
        return tags

    # --- spot requests ---------------------------------------------------------------------------

    def _new_spot_request(self, params: dict[str, str], zone: str) -> dict[str, Any]:
        options = "InstanceMarketOptions.SpotOptions."
        now = time.time()
        request = {
            "id": "sir-" + secrets.token_hex(4),
            "type": params.get(options + "SpotInstanceType") or "one-time",
            "behavior": params.get(options + "InstanceInterruptionBehavior") or "terminate",
            "max_price": params.get(options + "MaxPrice"),
            "image_id": params.get("ImageId", ""),
            "instance_type": params.get("InstanceType", ""),
            "zone": zone,
            "created": now,
        }
        self._set_spot_status(request, "fulfilled", "active", now)
        return request

    @staticmethod
    def _set_spot_status(request: dict[str, Any], code: str, state: str, when: float) -> None:
        request.update(code=code, state=state, message=_SPOT_MESSAGES[code], updated=when)

    def _spot_requests(self, region: str, params: dict[str, str]) -> Reply | None:
        """DescribeSpotInstanceRequests for the proxy's requests; None: moto answers (other ids, filters)."""
        ids = [v for k, v in params.items() if re.fullmatch(r"SpotInstanceRequestId\.\d+", k)]
        if any(re.fullmatch(r"Filter\.\d+\.Name", k) for k in params):
            return None
        bad = [i for i in ids if not SPOT_REQUEST_ID_RE.match(i)]
        if bad:
            return self._error(400, "InvalidSpotInstanceRequestID.Malformed", f'Invalid id: "{bad[0]}"')
        ours = {
            inst.extra["spot_request"]["id"]: inst
            for inst in self.instances.values()
            if "spot_request" in inst.extra and inst.region == region
        }
        if any(i not in ours for i in ids):
            return None
        items = "".join(_spot_request_xml(ours[i]) for i in (ids or list(ours)))
        return self._xml(
            200,
            (
                '<?xml version="1.0" encoding="UTF-8"?>\n'
                f'<DescribeSpotInstanceRequestsResponse xmlns="{EC2_NS}"><requestId>{uuid.uuid4()}</requestId>'
                f"<spotInstanceRequestSet>{items}</spotInstanceRequestSet></DescribeSpotInstanceRequestsResponse>"
            ).encode(),
        )

    # --- rewriting moto's answers ----------------------------------------------------------------

    def _settle(self) -> None:
        """Advance every record's phase; an instance that just vanished is terminated in moto (lost)."""
        for inst in self.instances.values():
            inst.phase(self.faults)
        self._terminate_in_moto(
            [i for i in self.instances.values() if i.vanished and not i.extra.get("moto_terminated")]
        )

    def _terminate_in_moto(self, lost: list[FakeInstance]) -> None:
        for inst in lost:
            self.moto(inst.region).terminate_instances(InstanceIds=[inst.id])
            inst.extra["moto_terminated"] = True

    @staticmethod
    def _without_state_filter(params: dict[str, str]) -> tuple[bytes, set[str] | None]:
        """The DescribeInstances body without its ``instance-state-name`` filter (applied here instead,
        after the simulated states replace moto's), and that filter's values."""
        filters: dict[str, tuple[str, list[str]]] = {}
        rest: dict[str, str] = {}
        for key, value in params.items():
            match = re.fullmatch(r"Filter\.(\d+)\.(Name|Value\.\d+)", key)
            if not match:
                rest[key] = value
                continue
            name, values = filters.setdefault(match[1], ("", []))
            filters[match[1]] = (value, values) if match[2] == "Name" else (name, [*values, value])
        states: set[str] | None = None
        number = 0
        for name, values in filters.values():
            if name == "instance-state-name":
                states = set(values)
                continue
            number += 1
            rest[f"Filter.{number}.Name"] = name
            rest.update({f"Filter.{number}.Value.{i}": v for i, v in enumerate(values, start=1)})
        return urlencode(rest).encode(), states

    def _simulated_state(self, instance_id: str | None) -> str | None:
        inst = self.instances.get(instance_id or "")
        if inst is None:
            return None
        interruption = inst.extra.get("interruption")
        if interruption and interruption["behavior"] == "stop" and inst.terminate_requested_at is None:
            return "stopping" if time.time() - interruption["at"] < self.faults.terminate_seconds else "stopped"
        return _PHASE_STATES.get(inst.phase(self.faults), "running")

    def _rewrite_instances(self, body: bytes, wanted_states: set[str] | None) -> bytes:
        def edit(root: ET.Element, q: Any) -> None:
            for rset in root.iter(q("reservationSet")):
                for reservation in list(rset):
                    iset = reservation.find(q("instancesSet"))
                    if iset is None:
                        continue
                    for item in list(iset):
                        instance_id = item.findtext(q("instanceId"))
                        inst = self.instances.get(instance_id or "")
                        if inst is not None and inst.vanished:
                            iset.remove(item)
                            continue
                        state = item.find(q("instanceState"))
                        simulated = self._simulated_state(instance_id)
                        moto_state = state.findtext(q("name")) if state is not None else None
                        requested = inst is not None and (
                            inst.terminate_requested_at is not None or "interruption" in inst.extra
                        )
                        if simulated and state is not None and (moto_state in ("pending", "running") or requested):
                            _set_state(state, q, simulated)
                        if inst is not None:
                            _set_spot_fields(item, q, inst)
                        name = state.findtext(q("name")) if state is not None else None
                        if wanted_states is not None and name not in wanted_states:
                            iset.remove(item)
                    if not len(iset):
                        rset.remove(reservation)

        return self._rewrite(body, edit)

    def _rewrite_status(self, body: bytes) -> bytes:
        def edit(root: ET.Element, q: Any) -> None:
            for sset in root.iter(q("instanceStatusSet")):
                for item in list(sset):
                    inst = self.instances.get(item.findtext(q("instanceId")) or "")
                    if inst is None:
                        continue
                    phase = inst.phase(self.faults)
                    if inst.vanished:
                        sset.remove(item)
                        continue
                    state = item.find(q("instanceState"))
                    if state is not None:
                        _set_state(state, q, self._simulated_state(inst.id) or "running")
                    if phase == "unhealthy":
                        check = item.find(q("instanceStatus"))
                        if check is not None:
                            _set_text(check, q("status"), "impaired")
                            for detail in check.iter(q("item")):
                                _set_text(detail, q("status"), "failed")

        return self._rewrite(body, edit)

    @staticmethod
    def _rewrite(body: bytes, edit: Any) -> bytes:
        root = ET.fromstring(body)
        q = _qualifier(root)
        edit(root, q)
        ET.register_namespace("", _namespace(root))
        return b'<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root)

    def _spot_history(self, params: dict[str, str]) -> bytes:
        types = {v for k, v in params.items() if re.fullmatch(r"InstanceType\.\d+", k)}
        items = "".join(
            f"<item><availabilityZone>{p.availability_zone}</availabilityZone>"
            f"<instanceType>{p.instance_type}</instanceType>"
            f"<productDescription>{_esc(p.product_description)}</productDescription>"
            f"<spotPrice>{p.price:.6f}</spotPrice><timestamp>{_iso(p.timestamp)}</timestamp></item>"
            for p in self.spot_prices or []
            if not types or p.instance_type in types
        )
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<DescribeSpotPriceHistoryResponse xmlns="{EC2_NS}"><requestId>{uuid.uuid4()}</requestId>'
            f"<spotPriceHistorySet>{items}</spotPriceHistorySet><nextToken/></DescribeSpotPriceHistoryResponse>"
        ).encode()


def _namespace(root: ET.Element) -> str:
    return root.tag[1:].split("}", 1)[0] if root.tag.startswith("{") else ""


def _qualifier(root: ET.Element) -> Any:
    ns = _namespace(root)
    return (lambda tag: f"{{{ns}}}{tag}") if ns else (lambda tag: tag)


def _set_text(parent: ET.Element, tag: str, text: str) -> None:
    node = parent.find(tag)
    if node is None:
        node = ET.SubElement(parent, tag)
    node.text = text


def _set_state(state: ET.Element, q: Any, name: str) -> None:
    _set_text(state, q("code"), str(_STATE_CODES[name]))
    _set_text(state, q("name"), name)


def _set_spot_fields(item: ET.Element, q: Any, inst: FakeInstance) -> None:
    """What moto leaves out of a spot instance: its request id, and the reason of an interruption."""
    request = inst.extra.get("spot_request")
    if request is not None:
        _set_text(item, q("spotInstanceRequestId"), request["id"])
    reason = inst.extra.get("state_reason")
    if reason is not None:
        node = item.find(q("stateReason"))
        if node is None:
            node = ET.SubElement(item, q("stateReason"))
        _set_text(node, q("code"), reason[0])
        _set_text(node, q("message"), reason[1])
        _set_text(item, q("reason"), "")  # moto's "User initiated (...)" is not what happened


def _spot_request_xml(inst: FakeInstance) -> str:
    """One ``spotInstanceRequestSet`` item (DescribeSpotInstanceRequests)."""
    r = inst.extra["spot_request"]
    price = f"<spotPrice>{_esc(str(r['max_price']))}</spotPrice>" if r["max_price"] else ""
    zone = _esc(r["zone"])
    return (
        f"<item><spotInstanceRequestId>{r['id']}</spotInstanceRequestId>{price}<type>{r['type']}</type>"
        f"<state>{r['state']}</state><status><code>{r['code']}</code><updateTime>{_iso(r['updated'])}</updateTime>"
        f"<message>{_esc(r['message'])}</message></status>"
        f"<launchSpecification><imageId>{_esc(r['image_id'])}</imageId>"
        f"<instanceType>{_esc(r['instance_type'])}</instanceType>"
        f"<placement><availabilityZone>{zone}</availabilityZone></placement></launchSpecification>"
        f"<instanceId>{inst.id}</instanceId><createTime>{_iso(r['created'])}</createTime>"
        f"<productDescription>Linux/UNIX</productDescription><launchedAvailabilityZone>{zone}"
        f"</launchedAvailabilityZone><instanceInterruptionBehavior>{r['behavior']}</instanceInterruptionBehavior>"
        "<tagSet/></item>"
    )
