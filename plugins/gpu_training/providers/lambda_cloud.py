"""``LambdaProvider``: GPU instances on Lambda Cloud (on-demand; Lambda has no spot market).

Talks to the API through :class:`~gpu_training.hooks.lambda_cloud.LambdaCloudHook` (see its
docstring for the endpoints and fields followed). Configuration is the ``lambda_default``
connection: the API key is its password; its extras are the provider's settings:

- ``ssh_key_name`` (required to launch): the name of an SSH key registered in the Lambda Cloud
  console; Lambda installs it for user ``ubuntu``. Its private half is in the SSH connection.
- ``ssh_conn_id`` (default ``gpu_instance_ssh``): the Airflow SSH connection holding that private key.
- ``file_system_names``: Lambda persistent file systems to attach (a list, or a comma-separated string).

Offers: one per instance type and region listed in ``regions_with_capacity_available``; a type
that no region has capacity for gives one unavailable offer without region (so a price cap or "none
free now" can still be explained). GPU model and count come from ``gpu_description`` and
``specs.gpus``, falling back to the type name (``gpu_8x_h100_sxm5`` -> 8x H100). Statuses:
booting -> BOOTING, active -> RUNNING, unhealthy/preempted -> FAILED, terminating -> STOPPING,
terminated -> TERMINATED. The instance's ``ip`` (null while booting) is the SSH address, port 22.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from gpu_training.errors import BadRequestError, InstanceNotFoundError, NoCapacityError, ProviderError
from gpu_training.hooks.cloud_api import ServerError
from gpu_training.hooks.lambda_cloud import LambdaCloudHook
from gpu_training.offers import fits, gpu_matches
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceInfo, InstanceState, Offer
from gpu_training.providers.cloud import HttpCloudProvider

STATES = {
    "booting": InstanceState.BOOTING,
    "active": InstanceState.RUNNING,
    "unhealthy": InstanceState.FAILED,
    "preempted": InstanceState.FAILED,
    "terminating": InstanceState.STOPPING,
    "terminated": InstanceState.TERMINATED,
}
#: Statuses of instances that no longer exist as machines (not "live", never reused by name).
GONE_STATUSES = frozenset({"terminated", "preempted"})

_TYPE_NAME_RE = re.compile(r"^gpu_(?P<count>\d+)x_(?P<model>[a-z0-9]+)(?:_|$)")


def gpu_from_type(type_name: str) -> tuple[str | None, int]:
    """``gpu_1x_a100_sxm4`` -> (A100, 1); ``gpu_8x_h100_sxm5`` -> (H100, 8); ``cpu_4x`` -> (None, 0)."""
    match = _TYPE_NAME_RE.match(type_name.lower())
    if not match:
        return None, 0
    return match["model"].upper(), int(match["count"])


def gpu_of(instance_type: dict[str, Any]) -> tuple[str | None, int]:
    """GPU model and count of an ``instance_type`` object.

    ``gpu_description`` (e.g. ``H100 (80 GB SXM5)``) names the model when it contains the type
    name's model token; ``specs.gpus`` is the count.
    """
    model, count = gpu_from_type(str(instance_type.get("name") or ""))
    description = str(instance_type.get("gpu_description") or "").strip()
    gpus = (instance_type.get("specs") or {}).get("gpus")
    if isinstance(gpus, int) and gpus >= 0:
        count = gpus
    if description and (model is None or gpu_matches(model, description)):
        name: str | None = description
    else:
        name = model
    return (name if count else None), count


def price_of(instance_type: dict[str, Any]) -> float | None:
    cents = instance_type.get("price_cents_per_hour")
    return None if cents is None else round(float(cents) / 100, 4)


class LambdaProvider(HttpCloudProvider[LambdaCloudHook]):
    """Lambda Cloud on-demand GPU instances."""

    name = "lambda"
    default_conn_id = "lambda_default"
    provision_timeout = timedelta(minutes=30)
    default_ssh_user = "ubuntu"
    hook_class = LambdaCloudHook

    # --- offers ----------------------------------------------------------------------------------

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        offers = [offer for item in self.hook.instance_types().values() for offer in self._offers(item)]
        return [offer for offer in offers if fits(offer, request)]

    def _offers(self, item: dict[str, Any]) -> list[Offer]:
        itype = item.get("instance_type") or {}
        type_name = str(itype.get("name") or "")
        price = price_of(itype)
        if not type_name or price is None:
            return []
        gpu_name, gpu_count = gpu_of(itype)
        regions = [str(r["name"]) for r in item.get("regions_with_capacity_available") or [] if r.get("name")]

        def offer(region: str | None, available: bool) -> Offer:
            return Offer(self.name, type_name, price, region, gpu_name, gpu_count, spot=False, available=available)

        return [offer(r, True) for r in regions] or [offer(None, False)]

    # --- instances -------------------------------------------------------------------------------

    def _info(self, data: dict[str, Any]) -> InstanceInfo:
        status = str(data.get("status") or "")
        itype = data.get("instance_type") or {}
        details = {
            "status": status,
            "ip": data.get("ip"),
            "private_ip": data.get("private_ip"),
            "hostname": data.get("hostname"),
            "ssh_key_names": list(data.get("ssh_key_names") or []),
            "file_system_names": list(data.get("file_system_names") or []),
        }
        return InstanceInfo(
            provider=self.name,
            instance_id=str(data.get("id") or ""),
            name=str(data.get("name") or ""),
            state=STATES.get(status, InstanceState.UNKNOWN),
            instance_type=itype.get("name"),
            region=(data.get("region") or {}).get("name"),
            price_per_hour=price_of(itype),
            address=data.get("ip") or None,
            details={k: v for k, v in details.items() if v not in (None, "")},
        )

    def _live(self) -> list[dict[str, Any]]:
        return [i for i in self.hook.list_instances() if str(i.get("status") or "") not in GONE_STATUSES]

    def find_instance(self, name: str) -> InstanceInfo | None:
        for data in self._live():
            if data.get("name") == name:
                return self._info(data)
        return None

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        return [self._info(d) for d in self._live() if str(d.get("name") or "").startswith(name_prefix)]

    def get_instance(self, instance_id: str) -> InstanceInfo:
        return self._info(self.hook.get_instance(instance_id))

    # --- launch / terminate ----------------------------------------------------------------------

    def _ssh_key_name(self) -> str:
        key = str(self.settings.get("ssh_key_name") or "").strip()
        if not key:
            raise BadRequestError(
                self.name,
                f"connection {self.conn_id!r} has no extra 'ssh_key_name': set it to the name of an SSH key "
                "registered in the Lambda Cloud console (its private key goes into the SSH connection "
                f"{self.ssh_conn_id!r})",
            )
        return key

    def _file_system_names(self) -> list[str]:
        value = self.settings.get("file_system_names") or []
        if isinstance(value, str):
            value = value.split(",")
        return [str(v).strip() for v in value if str(v).strip()]

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        existing = self.find_instance(name)
        if existing is not None:
            return existing
        ssh_key = self._ssh_key_name()
        if not offer.region:
            raise NoCapacityError(self.name, f"no region has capacity for {offer.instance_type} now")
        try:
            ids = self.hook.launch(
                region_name=offer.region,
                instance_type_name=offer.instance_type,
                ssh_key_names=[ssh_key],
                name=name,
                file_system_names=self._file_system_names(),
            )
        except ServerError:
            found = self.find_instance(name)  # the launch may have happened before the error
            if found is not None:
                return found
            raise
        except InstanceNotFoundError as err:  # a launch 404 names a missing SSH key, file system or type
            raise BadRequestError(
                self.name,
                f"launch of {offer.instance_type} in {offer.region} refused: {err} (check the extras "
                f"ssh_key_name / file_system_names of connection {self.conn_id!r})",
            ) from err
        if not ids:
            found = self.find_instance(name)
            if found is not None:
                return found
            raise ProviderError(self.name, f"launch of {name} answered no instance id")
        return self._launched(ids[0], offer, name)

    def terminate(self, instance_id: str) -> None:
        try:
            self.hook.terminate([instance_id])
        except InstanceNotFoundError:
            return
        except ProviderError as err:
            # Lambda refuses to terminate an instance that is already terminating (SkyPilot #3410);
            # after any error, its state says whether there is anything left to do.
            try:
                info = self.get_instance(instance_id)
            except InstanceNotFoundError:
                return
            except ProviderError:
                raise err from None
            if (
                info.state in (InstanceState.STOPPING, InstanceState.TERMINATED)
                or info.details.get("status") in GONE_STATUSES
            ):
                return
            raise
