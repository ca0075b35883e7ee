"""``VastHook``: the Vast.ai REST API (``https://console.vast.ai/api/v0``), and nothing else.

Follows Vast.ai's API reference (https://docs.vast.ai/api-reference: "Creating instances with the
API", the ``create instance`` / ``show instances`` / ``destroy instance`` endpoint pages, "Rate
limits and errors") and the calls the official CLI (vast-ai/vast-python ``vast.py``:
``search__offers``, ``create__instance``, ``show__instance(s)``, ``destroy_instance``) and
SkyPilot's ``sky/provision/vast`` make:

- ``POST /bundles/`` with a query object ``{field: {op: value}, "type": "on-demand"|"bid",
  "order": [[field, "asc"|"desc"]], "limit": n, "allocated_storage": GB}`` (ops ``eq, neq, gt,
  gte, lt, lte, in, notin``) -> ``{"offers": [Ask]}``; an ask has ``id`` (= ``ask_contract_id``),
  ``machine_id``, ``gpu_name`` (``RTX 4090``, ``A100 SXM4``, ``H100 SXM``), ``num_gpus``,
  ``dph_total`` ($/h on demand, storage included), ``min_bid`` ($/h, the lowest interruptible bid),
  ``geolocation`` (``Sweden, SE``), ``disk_space``, ``verified``, ``rentable``, ``rented``.
  Each ask is ONE machine: once rented it is no longer rentable.
- ``PUT /asks/{ask_id}/`` ``{client_id: "me", image, label, disk, runtype, onstart, env, price?}``
  (``price`` = the bid, for interruptible instances only) -> ``{"success": true, "new_contract":
  <instance id>}``. An ask taken in the meantime answers 410 ``{"success": false, "error":
  "no_such_ask", "msg": "error 410/3907: no_such_ask Instance type N is no longer available."}``
  (or 404 ``invalid_args`` with ``no_such_ask ... is not available`` for an id that never was).
- ``GET /instances/?owner=me`` -> ``{"instances_found": n, "instances": [Instance]}``;
  ``GET /instances/{id}/?owner=me`` -> ``{"instances": Instance}`` (``{"instances": null}`` or a
  404 once it is gone). An instance has ``id, label, actual_status`` (null, created, loading,
  running, stopped, frozen, exited, rebooting, unknown, offline), ``intended_status``,
  ``cur_state`` (running, stopped, unloaded = released on destroy), ``status_msg``, ``ssh_host``,
  ``ssh_port`` (Vast's SSH proxy), ``public_ipaddr``, ``machine_id``, ``gpu_name``, ``num_gpus``,
  ``dph_total``, ``is_bid``, ``geolocation``.
- ``DELETE /instances/{id}/`` -> ``{"success": true, ...}``; idempotent, so retried on 5xx.

Auth: ``Authorization: Bearer <API key>`` (the API also takes ``?api_key=``; the header keeps the
key out of URLs and logs). Errors are mostly ``{"success": false, "error": "invalid_args", "msg":
"..."}``; some bodies omit ``success`` or ``error`` or say ``message``. Rate limits are per endpoint
and identity: HTTP 429 with a PLAIN TEXT body ("API requests too frequent" or "API requests too
frequent: endpoint threshold=...") and, per the docs, no ``Retry-After``, so the base hook's
exponential backoff with jitter does the waiting (a ``Retry-After`` is honoured if one comes).
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

import requests

from gpu_training.errors import BadRequestError, InstanceNotFoundError, NoCapacityError, ProviderError
from gpu_training.hooks.cloud_api import CloudApiHook

#: The error code of an ask that is gone (rented by someone else, or withdrawn by its host).
NO_SUCH_ASK = "no_such_ask"
#: Phrases of the same refusal where the code is only in the message.
_GONE_PHRASES = ("no_such_ask", "no longer available", "already rented")


def error_body(response: requests.Response) -> dict[str, Any]:
    """A Vast error body as a dict (empty when it is plain text or another shape)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def describe_error(body: dict[str, Any]) -> str:
    """``error: msg`` from a Vast error body (either part may be missing; ``error`` may be a bool)."""
    code = body.get("error")
    message = body.get("msg") or body.get("message") or body.get("detail")
    parts = [str(code)] if isinstance(code, str) and code else []
    if message:
        parts.append(str(message))
    return ": ".join(parts)


def is_gone_ask(body: dict[str, Any]) -> bool:
    """Whether a Vast answer says the ask cannot be rented any more (the capacity refusal)."""
    if body.get("error") == NO_SUCH_ASK:
        return True
    text = describe_error(body).lower()
    return any(phrase in text for phrase in _GONE_PHRASES)


class VastHook(CloudApiHook):
    """Vast.ai API v0 over the ``vast_default`` connection (API key in the password)."""

    default_conn_name = "vast_default"
    hook_name = "Vast.ai"
    provider: ClassVar[str] = "vast"
    default_url: ClassVar[str] = "https://console.vast.ai"
    api_path: ClassVar[str] = "/api/v0"

    # --- errors ----------------------------------------------------------------------------------

    def error_message(self, response: requests.Response) -> str:
        """``error: msg`` from a JSON error body; the text itself for Vast's plain-text answers."""
        body = error_body(response)
        text = describe_error(body) if body else ""
        if text:
            return text
        return super().error_message(response)

    def is_capacity_error(self, response: requests.Response, message: str) -> bool:
        """The ask is gone (``no_such_ask``, 404 or 410). Never for a 429 or a 5xx: a 5xx may hide
        a rented instance, which the provider looks up by label instead."""
        if response.status_code == 429 or response.status_code >= 500:
            return False
        return is_gone_ask(error_body(response))

    # --- API calls -------------------------------------------------------------------------------

    def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /bundles/``: the asks matching ``query`` (the CLI's ``search offers``)."""
        body = self.request("POST", "/bundles/", json_body=query)
        offers = body.get("offers") if isinstance(body, dict) else None
        if not isinstance(offers, list):
            raise ProviderError(self.provider, f"unexpected answer to POST /bundles/: {str(body)[:300]}")
        return [o for o in offers if isinstance(o, dict)]

    def create_instance(self, ask_id: int, body: dict[str, Any]) -> str | None:
        """``PUT /asks/{ask_id}/``: rent the ask; the new instance id (``new_contract``).

        Not idempotent: retried only on 429. After a 5xx the caller looks the label up. ``None``
        when a 2xx carried no id (the caller looks the label up as well).
        """
        answer = self.request("PUT", f"/asks/{int(ask_id)}/", json_body=body, idempotent=False)
        if not isinstance(answer, dict):
            return None
        if answer.get("success") is False:
            where = f"PUT /asks/{int(ask_id)}/ -> {describe_error(answer) or answer}"
            if is_gone_ask(answer):
                raise NoCapacityError(self.provider, where)
            raise BadRequestError(self.provider, where)
        contract = answer.get("new_contract")
        return None if contract in (None, "", 0) else str(contract)

    def list_instances(self) -> list[dict[str, Any]]:
        """``GET /instances/?owner=me``: the account's instances (destroyed ones are not listed)."""
        body = self.request("GET", "/instances/", params={"owner": "me"})
        instances = body.get("instances") if isinstance(body, dict) else None
        if not isinstance(instances, list):
            raise ProviderError(self.provider, f"unexpected answer to GET /instances/: {str(body)[:300]}")
        return [i for i in instances if isinstance(i, dict)]

    def get_instance(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}/?owner=me``; InstanceNotFoundError on a 404 or ``{"instances": null}``."""
        path = f"/instances/{quote(str(instance_id), safe='')}/"
        body = self.request("GET", path, params={"owner": "me"})
        instance = body.get("instances") if isinstance(body, dict) else None
        if isinstance(instance, list):  # older answers wrap the one instance in a list
            instance = instance[0] if instance else None
        if instance is None:
            raise InstanceNotFoundError(
                self.provider, f"GET {path} -> no instance {instance_id} (destroyed or never rented)"
            )
        if not isinstance(instance, dict):
            raise ProviderError(self.provider, f"unexpected answer to GET {path}: {str(body)[:300]}")
        return instance

    def destroy_instance(self, instance_id: str) -> None:
        """``DELETE /instances/{id}/``: destroy the instance (irreversible). Idempotent, so a 5xx is
        retried; InstanceNotFoundError when Vast no longer knows it."""
        path = f"/instances/{quote(str(instance_id), safe='')}/"
        answer = self.request("DELETE", path, json_body={})
        if isinstance(answer, dict) and answer.get("success") is False:
            text = describe_error(answer) or str(answer)
            if "no_such_instance" in text or "not found" in text.lower():
                raise InstanceNotFoundError(self.provider, f"DELETE {path} -> {text}")
            raise ProviderError(self.provider, f"DELETE {path} -> {text}")
