"""``VastProvider``: GPU instances rented on the Vast.ai marketplace (on-demand and interruptible).

Talks to the API through :class:`~gpu_training.hooks.vast.VastHook` (see its docstring for the
endpoints and fields followed). Configuration is the ``vast_default`` connection: the API key is its
password; its extras are the provider's settings:

- ``image`` (default :data:`DEFAULT_IMAGE`): the Docker image the instance runs; Vast pulls it on
  the host (``runtype`` ``ssh``: Vast's entrypoint starts sshd in it, reached through Vast's SSH
  proxy at the instance's ``ssh_host:ssh_port``).
- ``disk_gb`` (default 40): the instance's disk; only machines with that much free disk are offered.
- ``verified_only`` (default true): only asks of verified hosts.
- ``bid_multiplier`` (default 1.0, at least 1): interruptible offers bid this times the ask's
  ``min_bid``. An interruptible instance is stopped when outbid; it then reports FAILED,
  interrupted, and is replaced.
- ``ssh_conn_id`` (default ``gpu_instance_ssh``): the Airflow SSH connection with the private key.
  Vast installs the SSH keys registered in the account on every new instance (user ``root``).
- ``onstart`` (optional): shell commands appended to the instance's on-start script.

Offers: one per ask, ``instance_type`` ``"{num_gpus}x {gpu_name} (ask {id})"`` (the ask id is what
launch rents), region = the ask's ``geolocation``, price = ``dph_total`` on demand; with spot
allowed, a second search (``type: bid``) adds interruptible offers priced at the bid. The search
asks only for rentable asks (``rentable``/``rented``, as Vast's client does), so no Vast offer is
listed without capacity; one that says otherwise anyway is kept unavailable. Launch rents the ask
with ``label`` = our instance name, by which instances are found again (the v1 listing filtered by
``label``, every page read).

States (``actual_status``; ``cur_state`` ``unloaded`` means released on destroy): null/created/
loading/scheduling/rebooting -> BOOTING, running -> RUNNING, exited/stopped/frozen/offline/unknown
-> FAILED, destroying or ``cur_state`` unloaded -> STOPPING; a destroyed instance is no longer
listed and ``GET /instances/{id}/`` answers 404 or ``{"instances": null}`` (not found). The SSH
address is ``ssh_host`` with ``details["ssh_port"]`` = ``ssh_port`` (Vast's proxy).

Outbid: Vast stops (pauses) an interruptible instance that loses its machine to a higher bid or an
on-demand rental, and does not destroy it ("When outbid, the instance moves to ``stopped``",
vast-ai/vast-cli ``vastai/SKILL.md``; the ``client:outbid`` notification, "Your interruptible
instance was outbid and paused", docs.vast.ai). Such an instance, ``is_bid`` with ``actual_status``
``stopped`` while ``intended_status`` is still ``running`` (we never stop instances, only destroy
them, so the stop was Vast's) and not being released, is ``interrupted`` (state FAILED) with
``details["interruption"]`` built from those fields and ``status_msg``. The API has no outbid flag:
that combination is the mark (inferred from the documented field meanings).
"""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from gpu_training.errors import BadRequestError, InstanceNotFoundError, ProviderError
from gpu_training.hooks.cloud_api import ServerError
from gpu_training.hooks.vast import VastHook
from gpu_training.offers import fits
from gpu_training.providers.base import NAME_PREFIX, GpuRequest, InstanceInfo, InstanceState, Offer
from gpu_training.providers.cloud import HttpCloudProvider

#: A PyTorch image with CUDA; Vast pulls it on the rented host.
DEFAULT_IMAGE = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
DEFAULT_DISK_GB = 40.0
#: How many asks one search returns at most (cheapest first, so only dearer ones are cut).
SEARCH_LIMIT = 500
#: Vast's SSH sessions start tmux unless this file exists; our commands want a plain shell.
BASE_ONSTART = "touch ~/.no_auto_tmux"

STATES = {
    "null": InstanceState.BOOTING,
    "created": InstanceState.BOOTING,
    "loading": InstanceState.BOOTING,
    "scheduling": InstanceState.BOOTING,
    "rebooting": InstanceState.BOOTING,
    "restarting": InstanceState.BOOTING,
    "running": InstanceState.RUNNING,
    "exited": InstanceState.FAILED,
    "stopped": InstanceState.FAILED,
    "frozen": InstanceState.FAILED,
    "offline": InstanceState.FAILED,
    "unknown": InstanceState.FAILED,
    "destroying": InstanceState.STOPPING,
}

_ASK_RE = re.compile(r"\(ask (?P<id>\d+)\)\s*$")


def offer_type(ask: dict[str, Any]) -> str:
    """``1x RTX 4090 (ask 4101)``: GPUs, model and the ask id launch rents."""
    return f"{int(ask.get('num_gpus') or 0)}x {ask.get('gpu_name') or 'GPU'} (ask {int(ask['id'])})"


def ask_id_of(instance_type: str) -> int | None:
    """The ask id in an offer's instance type (``None`` if it has none)."""
    match = _ASK_RE.search(instance_type)
    return int(match["id"]) if match else None


def raw_status(data: dict[str, Any]) -> str:
    """Vast's ``actual_status`` as text (``null`` while the contract is being created)."""
    status = data.get("actual_status")
    return "null" if status is None or status == "" else str(status).lower()


def state_of(data: dict[str, Any]) -> InstanceState:
    if str(data.get("cur_state") or "").lower() == "unloaded":  # released on destroy
        return InstanceState.STOPPING
    return STATES.get(raw_status(data), InstanceState.UNKNOWN)


def interruption_of(data: dict[str, Any]) -> str | None:
    """Vast's words when it stopped an interruptible instance (outbid), else None."""
    intended = str(data.get("intended_status") or "").lower()
    if not data.get("is_bid") or raw_status(data) != "stopped" or intended != "running":
        return None
    if str(data.get("cur_state") or "").lower() == "unloaded":  # being destroyed: our doing
        return None
    words = "outbid: interruptible instance (is_bid) stopped by Vast: actual_status stopped, intended_status running"
    bid = _price(data.get("dph_total"))
    if bid is not None:
        words += f", bid ${bid:g}/h"
    if data.get("status_msg"):
        words += f"; status_msg: {data['status_msg']}"
    return words


def _flag(value: Any, default: bool) -> bool:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean")


def _price(value: Any) -> float | None:
    try:
        return None if value is None else round(float(value), 6)
    except (TypeError, ValueError):
        return None


class VastProvider(HttpCloudProvider[VastHook]):
    """Vast.ai marketplace GPU instances."""

    #: ``details["status"]`` of an instance launched but not queryable yet.
    launching_status = "null"
    name = "vast"
    default_conn_id = "vast_default"
    provision_timeout = timedelta(minutes=20)
    default_ssh_user = "root"
    hook_class = VastHook

    # --- settings --------------------------------------------------------------------------------

    def _bad_setting(self, key: str, value: Any, wanted: str) -> BadRequestError:
        return BadRequestError(
            self.name, f"connection {self.conn_id!r} extra {key!r} is {value!r}; it must be {wanted}"
        )

    @property
    def image(self) -> str:
        return str(self.settings.get("image") or DEFAULT_IMAGE).strip()

    @property
    def disk_gb(self) -> float:
        value = self.settings.get("disk_gb", DEFAULT_DISK_GB)
        try:
            disk = float(value)
        except (TypeError, ValueError):
            disk = 0.0
        if disk <= 0:
            raise self._bad_setting("disk_gb", value, "a positive number of GB")
        return disk

    @property
    def verified_only(self) -> bool:
        value = self.settings.get("verified_only")
        try:
            return _flag(value, True)
        except ValueError:
            raise self._bad_setting("verified_only", value, "true or false") from None

    @property
    def bid_multiplier(self) -> float:
        value = self.settings.get("bid_multiplier", 1.0)
        try:
            multiplier = float(value)
        except (TypeError, ValueError):
            multiplier = 0.0
        if multiplier < 1.0:
            raise self._bad_setting("bid_multiplier", value, "a number of at least 1 (times the ask's min_bid)")
        return multiplier

    # --- offers ----------------------------------------------------------------------------------

    def _query(self, kind: str, request: GpuRequest) -> dict[str, Any]:
        """The search for ``kind`` (``on-demand`` or ``bid``): enough disk, verified hosts if so
        configured, at least the GPUs asked for, cheapest first; the hook adds the client's
        rentable-now filters."""
        disk = self.disk_gb
        query: dict[str, Any] = {
            "disk_space": {"gte": disk},
            "type": kind,
            "order": [["dph_total", "asc"]],
            "limit": SEARCH_LIMIT,
            "allocated_storage": disk,
        }
        # Vast's spec defaults an omitted `verified` to {"eq": true}: leaving it out does not widen
        # the search, so "any host" has to be said (with the spec's `in` operator).
        query["verified"] = {"eq": True} if self.verified_only else {"in": [True, False]}
        if request.gpu is not None:
            query["num_gpus"] = {"gte": request.gpu_count}
        return query

    def list_offers(self, request: GpuRequest) -> list[Offer]:
        offers = [self._offer(ask, spot=False) for ask in self.hook.search_offers(self._query("on-demand", request))]
        if request.spot:
            multiplier = self.bid_multiplier
            asks = self.hook.search_offers(self._query("bid", request))
            offers += [self._offer(ask, spot=True, multiplier=multiplier) for ask in asks]
        return [offer for offer in offers if offer is not None and fits(offer, request)]

    def _offer(self, ask: dict[str, Any], *, spot: bool, multiplier: float = 1.0) -> Offer | None:
        if ask.get("id") is None:
            return None
        if spot:
            min_bid = _price(ask.get("min_bid"))
            price = None if min_bid is None else round(min_bid * multiplier, 6)
        else:
            price = _price(ask.get("dph_total"))
        if price is None:
            return None
        return Offer(
            provider=self.name,
            instance_type=offer_type(ask),
            price_per_hour=price,
            region=str(ask.get("geolocation") or "") or None,
            gpu_name=str(ask.get("gpu_name") or "") or None,
            gpu_count=int(ask.get("num_gpus") or 0),
            spot=spot,
            available=ask.get("rentable") is not False and not ask.get("rented"),
        )

    # --- instances -------------------------------------------------------------------------------

    def _info(self, data: dict[str, Any]) -> InstanceInfo:
        gpu_count = int(data.get("num_gpus") or 0)
        interruption = interruption_of(data)
        details = {
            "status": raw_status(data),
            "cur_state": data.get("cur_state"),
            "intended_status": data.get("intended_status"),
            "status_msg": data.get("status_msg"),
            "ssh_port": int(data["ssh_port"]) if data.get("ssh_port") else None,
            "public_ipaddr": data.get("public_ipaddr"),
            "machine_id": data.get("machine_id"),
            "is_bid": data.get("is_bid"),
            "image": data.get("image_uuid"),
            "interruption": interruption,
        }
        return InstanceInfo(
            provider=self.name,
            instance_id=str(data.get("id") or ""),
            name=str(data.get("label") or ""),
            state=state_of(data),
            instance_type=f"{gpu_count}x {data.get('gpu_name')}" if data.get("gpu_name") else None,
            region=data.get("geolocation") or None,
            price_per_hour=_price(data.get("dph_total")),
            address=data.get("ssh_host") or None,
            details={k: v for k, v in details.items() if v not in (None, "")},
            interrupted=interruption is not None,
        )

    def find_instance(self, name: str) -> InstanceInfo | None:
        for data in self.hook.instances_labelled(name):
            return self._info(data)
        return None

    def list_instances(self, name_prefix: str = NAME_PREFIX) -> list[InstanceInfo]:
        return [self._info(d) for d in self.hook.list_instances() if str(d.get("label") or "").startswith(name_prefix)]

    def get_instance(self, instance_id: str) -> InstanceInfo:
        return self._info(self.hook.get_instance(instance_id))

    # --- launch / terminate ----------------------------------------------------------------------

    def _create_body(self, offer: Offer, name: str) -> dict[str, Any]:
        onstart = BASE_ONSTART
        extra = str(self.settings.get("onstart") or "").strip()
        if extra:
            onstart += "\n" + extra
        body: dict[str, Any] = {
            "client_id": "me",
            "image": self.image,
            "label": name,
            "disk": self.disk_gb,
            "runtype": "ssh",
            "onstart": onstart,
        }
        if offer.spot:
            body["price"] = offer.price_per_hour
        return body

    def launch(self, offer: Offer, name: str) -> InstanceInfo:
        existing = self.find_instance(name)
        if existing is not None:
            return existing
        ask_id = ask_id_of(offer.instance_type)
        if ask_id is None:
            raise BadRequestError(
                self.name, f"offer {offer.instance_type!r} names no Vast ask; launch only offers listed by list_offers"
            )
        body = self._create_body(offer, name)
        try:
            instance_id = self.hook.create_instance(ask_id, body)
        except ServerError:
            found = self.find_instance(name)  # the rent may have happened before the error
            if found is not None:
                return found
            raise
        if instance_id is None:
            found = self.find_instance(name)
            if found is not None:
                return found
            raise ProviderError(self.name, f"renting ask {ask_id} for {name} answered no instance id")
        return self._launched(instance_id, offer, name)

    def terminate(self, instance_id: str) -> None:
        try:
            self.hook.destroy_instance(instance_id)
        except InstanceNotFoundError:
            return
