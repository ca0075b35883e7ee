"""``RunPodProvider``: GPU pods on RunPod (Secure and Community Cloud, on demand).

Talks to the RunPod REST API v2 through :class:`~gpu_training.hooks.runpod.RunPodHook` (see its
docstring for the endpoints and fields followed). Configuration is the ``runpod_default``
connection: the API key is its password; its extras are the provider's settings:

- ``image`` (default :data:`DEFAULT_IMAGE`): the pod's container image (RunPod pulls it; only its
  name is used here). It must start sshd from ``PUBLIC_KEY``, as RunPod's official images do.
- ``ssh_public_key``: the public half of the key in the SSH connection; sent as the pod's
  ``PUBLIC_KEY`` environment variable. Without it the pod is created with ``startSsh`` and RunPod
  injects the account's registered SSH keys instead (``PUT /v2/account/ssh-keys``).
- ``cloud_type`` (default ``SECURE``): ``SECURE``, ``COMMUNITY`` or ``ALL`` (offers from both).
  Community hosts may have no public IP, so their pods may never publish SSH.
- ``container_disk_gb`` (default 50): the container disk (``disk``).
- ``volume_gb`` (default 0: none): a persistent pod volume (``mounts.persistent``, at least 10 GB)
  mounted at ``volume_mount_path`` (default ``/workspace``).
- ``ssh_conn_id`` (default ``gpu_instance_ssh``): the Airflow SSH connection with the private key.
  RunPod images log in as ``root``.

Offers: per GPU type offered in a selected cloud for the request's GPU count (``maxCount`` not
exceeded), one per data center listed for it, priced ``price.<cloud>`` x count, available unless
the data center's ``availability`` is ``NONE``; a type no data center stocks gives one unavailable
offer without region. ``instance_type`` is ``"{count}x {gpu type id} ({cloud})"`` (what launch
creates), ``gpu_name`` the GPU type id (``NVIDIA A100 80GB PCIe``), ``region`` the data center id.
Launch creates the pod pinned to that data center (``dataCenterIds``) with ``22/tcp`` exposed.

There are no spot offers: RunPod's v2 API has no interruptible pods or bids, and REST v1, which
had them (``interruptible: true``), was retired on 2026-11-15 (see the hook). A request allowing
spot gets the on-demand offers, a spot offer is refused at launch, and no pod reports
``interrupted``: an EXITED pod is FAILED like any other.

Refusals of a create: 400 and 403 skip the offer (the spec: "try your next candidate" / "skip this
candidate"); after the first 403 the key's right to create pods is checked once, and a key without
it fails the job at once, naming the connection, with nothing launched. 401 fails at once.

States (``status``): PROVISIONING/STARTING -> BOOTING; RUNNING -> RUNNING once the pod publishes a
public port for container port 22 (until then BOOTING: v2 says RUNNING before the container's ports
are mapped); EXITED/ERROR -> FAILED; TERMINATED -> TERMINATED. A deleted pod is no longer listed
and answers 404. The address is the public IP of the ``22/tcp`` mapping (``runtime.ports``, else
``ssh.direct``) with ``details["ssh_port"]`` its public port.
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from gpu_training.errors import BadRequestError, InstanceNotFoundError, NoCapacityError, ProviderError
from gpu_training.hooks.cloud_api import ServerError
from gpu_training.hooks.runpod import CLOUDS, PoolNotOpenError, RunPodHook
from gpu_training.offers import fits, gpu_matches
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceInfo, InstanceState, Offer
from gpu_training.providers.cloud import HttpCloudProvider

#: A RunPod PyTorch image with CUDA and sshd started from PUBLIC_KEY.
DEFAULT_IMAGE = "runpod/pytorch:2.4.0-py3.11-cuda12.4.1-devel-ubuntu22.04"
DEFAULT_CONTAINER_DISK_GB = 50
DEFAULT_VOLUME_MOUNT_PATH = "/workspace"
#: The smallest persistent volume RunPod creates (``PersistentMount.size`` minimum).
MIN_VOLUME_GB = 10
SSH_PORT = "22/tcp"

STATES = {
    "PROVISIONING": InstanceState.BOOTING,
    "STARTING": InstanceState.BOOTING,
    "RUNNING": InstanceState.RUNNING,
    "EXITED": InstanceState.FAILED,
    "ERROR": InstanceState.FAILED,
    "TERMINATED": InstanceState.TERMINATED,
}
#: Availability levels of the catalog that mean "can be placed now".
IN_STOCK = frozenset({"LOW", "MEDIUM", "HIGH"})

_INSTANCE_TYPE_RE = re.compile(r"^(?P<count>\d+)x (?P<gpu>.+) \((?P<cloud>SECURE|COMMUNITY)\)$")


def instance_type_of(gpu_id: str, count: int, cloud: str) -> str:
    """``(NVIDIA A100 80GB PCIe, 2, SECURE)`` -> ``2x NVIDIA A100 80GB PCIe (SECURE)``."""
    return f"{count}x {gpu_id} ({cloud})"


def parse_instance_type(instance_type: str) -> tuple[str, int, str]:
    """The GPU type id, count and cloud of an offer's ``instance_type``."""
    match = _INSTANCE_TYPE_RE.match(instance_type)
    if not match:
        raise BadRequestError(
            "runpod", f"instance type {instance_type!r} is not a RunPod offer (expected '1x <GPU type id> (SECURE)')"
        )
    return match["gpu"], int(match["count"]), match["cloud"]


def ssh_endpoint(pod: dict[str, Any]) -> tuple[str | None, int | None]:
    """Public IP and port mapped to the pod's container port 22, or (None, None) while unmapped."""
    for port in (pod.get("runtime") or {}).get("ports") or []:
        if port.get("private") == 22 and port.get("type") == "tcp" and port.get("ip") and port.get("public"):
            return str(port["ip"]), int(port["public"])
    direct = (pod.get("ssh") or {}).get("direct") or {}
    if direct.get("host") and direct.get("port"):
        return str(direct["host"]), int(direct["port"])
    return None, None


def state_of(pod: dict[str, Any]) -> InstanceState:
    status = str(pod.get("status") or "")
    state = STATES.get(status, InstanceState.UNKNOWN)
    if state == InstanceState.RUNNING and ssh_endpoint(pod)[0] is None:
        return InstanceState.BOOTING  # running, but SSH is not published yet
    return state


class RunPodProvider(HttpCloudProvider[RunPodHook]):
    """RunPod GPU pods (on demand, Secure and/or Community Cloud)."""

    name = "runpod"
    default_conn_id = "runpod_default"
    provision_timeout = timedelta(minutes=20)
    default_ssh_user = "root"
    hook_class = RunPodHook
    #: The key was shown to be allowed to create pods (after a 403, once per provider object).
    _may_create = False

    # --- settings --------------------------------------------------------------------------------

    def _clouds(self) -> tuple[str, ...]:
        value = str(self.settings.get("cloud_type") or "SECURE").strip().upper()
        if value == "ALL":
            return CLOUDS
        if value not in CLOUDS:
            raise BadRequestError(
                self.name,
                f"connection {self.conn_id!r}: extra cloud_type {value!r} must be SECURE, COMMUNITY or ALL",
            )
        return (value,)

    def _int_setting(self, key: str, default: int, minimum: int = 0) -> int:
        value = self.settings.get(key)
        try:
            number = default if value in (None, "") else int(value)
        except (TypeError, ValueError):
            number = -1
        if number < minimum:
            raise BadRequestError(
                self.name,
                f"connection {self.conn_id!r}: extra {key} must be a whole number >= {minimum} (got {value!r})",
            )
        return number

    def pod_body(self, offer: Offer, name: str) -> dict[str, Any]:
        """The ``POST /v2/pods`` body for ``offer`` (a ``CreatePodRequest``)."""
        gpu_id, count, cloud = parse_instance_type(offer.instance_type)
        body: dict[str, Any] = {
            "name": name,
            "image": str(self.settings.get("image") or DEFAULT_IMAGE),
            "gpu": {"id": gpu_id, "count": count},
            "cloud": cloud,
            "dataCenterIds": [offer.region] if offer.region else [],
            "disk": self._int_setting("container_disk_gb", DEFAULT_CONTAINER_DISK_GB, minimum=1),
            "ports": [SSH_PORT],
        }
        public_key = str(self.settings.get("ssh_public_key") or "").strip()
        if public_key:
            body["env"] = {"PUBLIC_KEY": public_key}
        else:
            body["startSsh"] = True  # RunPod injects the account's registered SSH keys
        volume_gb = self._int_setting("volume_gb", 0)
        if volume_gb:
            if volume_gb < MIN_VOLUME_GB:
                raise BadRequestError(
                    self.name, f"connection {self.conn_id!r}: extra volume_gb must be 0 or >= {MIN_VOLUME_GB}"
                )
            path = str(self.settings.get("volume_mount_path") or DEFAULT_VOLUME_MOUNT_PATH)
            body["mounts"] = {"persistent": {"size": volume_gb, "path": path}}
        return body

    # --- offers ----------------------------------------------------------------------------------

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        count = max(1, request.gpu_count)
        offers: list[Offer] = []
        for cloud in self._clouds():
            for gpu in self.hook.gpu_types(cloud=cloud, count=count):
                if request.gpu is None or gpu_matches(request.gpu, str(gpu.get("id") or "")):
                    offers.extend(self._offers(gpu, cloud, count))
        return [offer for offer in offers if fits(offer, request)]

    def _offers(self, gpu: dict[str, Any], cloud: str, count: int) -> list[Offer]:
        gpu_id = str(gpu.get("id") or "")
        key = cloud.lower()
        price = (gpu.get("price") or {}).get(key)
        max_count = (gpu.get("maxCount") or {}).get(key) or 0
        if not gpu_id or not gpu.get(key) or not price or count > int(max_count):
            return []  # not offered in this cloud, or not with this many GPUs on one pod
        instance_type = instance_type_of(gpu_id, count, cloud)

        def offer(region: str | None, available: bool) -> Offer:
            total = round(float(price) * count, 4)
            return Offer(self.name, instance_type, total, region, gpu_id, count, spot=False, available=available)

        data_centers = [dc for dc in gpu.get("dataCenters") or [] if dc.get("id")]
        return [offer(str(dc["id"]), dc.get("availability") in IN_STOCK) for dc in data_centers] or [offer(None, False)]

    # --- instances -------------------------------------------------------------------------------

    def _info(self, pod: dict[str, Any]) -> InstanceInfo:
        status = str(pod.get("status") or "")
        gpu = pod.get("gpu") or {}
        host, port = ssh_endpoint(pod)
        instance_type = None
        if gpu.get("id") and pod.get("cloud"):
            instance_type = instance_type_of(str(gpu["id"]), int(gpu.get("count") or 1), str(pod["cloud"]))
        details = {
            "status": status,
            "ssh_port": port,
            "cloud": pod.get("cloud"),
            "gpu_type_id": gpu.get("id"),
            "image": pod.get("image"),
            "actions": list(pod.get("actions") or []),
        }
        cost = pod.get("cost")
        return InstanceInfo(
            provider=self.name,
            instance_id=str(pod.get("id") or ""),
            name=str(pod.get("name") or ""),
            state=state_of(pod),
            instance_type=instance_type,
            region=pod.get("dataCenterId") or None,
            price_per_hour=float(cost) if isinstance(cost, int | float) and cost > 0 else None,
            address=host,
            details={k: v for k, v in details.items() if v not in (None, "", [])},
        )

    def _live(self, name: str | None = None) -> list[dict[str, Any]]:
        return [p for p in self.hook.list_pods(name) if str(p.get("status") or "") != "TERMINATED"]

    def find_instance(self, name: str) -> InstanceInfo | None:
        pods = self._live(name)
        return self._info(pods[0]) if pods else None

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        return [self._info(p) for p in self._live() if str(p.get("name") or "").startswith(name_prefix)]

    def get_instance(self, instance_id: str) -> InstanceInfo:
        return self._info(self.hook.get_pod(instance_id))

    # --- launch / terminate ----------------------------------------------------------------------

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        existing = self.find_instance(name)
        if existing is not None:
            return existing
        if offer.spot:
            raise BadRequestError(
                self.name,
                f"{offer.instance_type}: RunPod's API v2 has no interruptible (spot) pods; use on-demand offers",
            )
        if not offer.region:
            raise NoCapacityError(self.name, f"no data center has {offer.instance_type} in stock now")
        body = self.pod_body(offer, name)
        try:
            pod = self.hook.create_pod(body)
        except PoolNotOpenError:
            # A 403 is "skip this candidate", unless the key may not create pods at all: then every
            # offer would answer 403 and burn the job's launch attempts. Ask once.
            if not self._may_create:
                self.hook.check_create_permission()  # AuthorizationError: the job stops here
                self._may_create = True
            raise
        except ServerError:
            found = self.find_instance(name)  # the pod may have been created before the error
            if found is not None:
                return found
            raise
        if not pod.get("id"):
            found = self.find_instance(name)
            if found is not None:
                return found
            raise ProviderError(self.name, f"creating pod {name} answered no pod id: {str(pod)[:300]}")
        return self._info(pod)

    def terminate(self, instance_id: str) -> None:
        try:
            self.hook.delete_pod(instance_id)
        except InstanceNotFoundError:
            return  # already deleted (or never existed)
