"""``VastHook``: the Vast.ai REST API (``https://console.vast.ai``), and nothing else.

Follows Vast's OpenAPI document as published today (``vast-ai/docs`` ``api-reference/openapi.yaml``,
"Vast.ai API" 1.0.0; the operations used are kept in ``tests/contracts/vast.openapi.json``, against
which the tests check every request) and the calls of the official client (``vast-ai/vast-cli``
``vastai/api``: ``offers.search_offers``, ``instances.create_instance``, ``show_instance``,
``show_instances``, ``destroy_instance``):

- ``POST /api/v0/bundles/`` (``searchOffers``) with a query object ``{field: {op: value}, "type":
  "on-demand"|"bid", "order": [[field, "asc"|"desc"]], "limit": n, "allocated_storage": GB}`` (ops
  ``eq, neq, gt, gte, lt, lte, in, notin``) -> ``{"offers": [Ask]}``. Like the client, every search
  names ``verified``, ``external``, ``rentable: {eq: true}`` and ``rented: {eq: false}`` (the spec's
  defaults for the last two): only asks that can be rented now come back. An ask has ``id``,
  ``machine_id``, ``gpu_name``, ``num_gpus``, ``dph_total`` ($/h on demand, storage included),
  ``min_bid``, ``geolocation``, ``disk_space``. Each ask is ONE machine. A bad key answers this
  operation 404 (the spec: "Unauthorized - invalid or missing API key"), not 401.
- ``PUT /api/v0/asks/{id}/`` (``createInstance``) ``{client_id: "me", image, label, disk, runtype,
  onstart, price?}`` (``price`` = the bid, interruptible only; ``client_id`` is not in the spec but
  the official client sends it) -> ``{"success": true, "new_contract": <instance id>}``. An ask
  taken meanwhile answers 410 ``no_such_ask`` (the spec: "Offer no longer available"); an id that
  never was one 404 ``invalid_args`` ``no_such_ask ... is not available``. Both are "this offer
  cannot be had": the provider tries the next one.
- ``GET /api/v1/instances/`` (``showInstances``): keyset pages of at most 25, ``select_filters``
  (JSON; ``label`` is filterable), ``order_by`` (JSON), ``limit``, ``after_token`` = the previous
  page's ``next_token`` (``null`` on the last page) -> ``{instances, next_token, total_instances,
  ...}``. The v0 listing ``GET /api/v0/instances/?owner=me`` was deprecated on 2026-03-25 and is
  gone from the spec (the live API answers it 410 ``deprecated_endpoint``): it is not used.
- ``GET /api/v0/instances/{id}/?owner=me`` (``showInstance``; ``owner`` as the client sends it) ->
  ``{"instances": Instance}``; the spec declares no answer for a destroyed instance: a 404 or
  ``{"instances": null}`` (what the client reads as gone) both mean not found.
- ``DELETE /api/v0/instances/{id}/`` (``destroyInstance``) -> ``{"success": true, ...}``; 404
  ``not_found`` once gone; idempotent, so retried on 5xx. Sent with ``{}`` as the client does.

An instance has ``id, label, actual_status`` (null, created, loading, running, stopped, frozen,
exited, rebooting, unknown, offline), ``intended_status``, ``cur_state`` (running, stopped,
unloaded = released on destroy), ``status_msg``, ``ssh_host``, ``ssh_port`` (Vast's SSH proxy),
``public_ipaddr``, ``machine_id``, ``gpu_name``, ``num_gpus``, ``dph_total``, ``is_bid``,
``geolocation``; fields the instance does not have yet may be absent.

Auth: ``Authorization: Bearer <API key>``. Errors are ``{"success": false, "error": code, "msg":
"..."}`` (``Error`` in the spec); rate limits answer 429 ``{"detail": "API requests too frequent
endpoint threshold=..."}`` with no ``Retry-After``, so the base hook's exponential backoff with
jitter does the waiting (a ``Retry-After`` is honoured if one comes).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import cached_property
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit

import requests

from gpu_training.errors import BadRequestError, InstanceNotFoundError, NoCapacityError, ProviderError
from gpu_training.hooks.cloud_api import AuthorizationError, CloudApiHook
from gpu_training.hooks.connection_types import VASTAI

#: The error code of an ask that is gone (rented by someone else, or withdrawn by its host).
NO_SUCH_ASK = "no_such_ask"
#: Phrases of the same refusal where the code is only in the message.
_GONE_PHRASES = ("no_such_ask", "no longer available", "already rented")
#: The most instances one ``GET /api/v1/instances/`` page holds (the spec's ``limit`` maximum).
PAGE_SIZE = 25
#: Pages read at most in one listing (25 000 instances): a server that kept answering a
#: ``next_token`` would otherwise keep us paging forever.
MAX_PAGES = 1000
#: What the official client puts in every offer search (vast-cli ``search_offers`` defaults): only
#: asks that can be rented now, on Vast's own (not external) machines.
SEARCH_DEFAULTS: dict[str, Any] = {
    "external": {"eq": False},
    "rentable": {"eq": True},
    "rented": {"eq": False},
}


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
    """Vast.ai API (v0 and v1 operations) over the ``vast_default`` connection (API key in the password)."""

    default_conn_name = "vast_default"
    connection_type = VASTAI
    conn_type = VASTAI.conn_type
    hook_name = VASTAI.hook_name
    provider: ClassVar[str] = "vast"
    default_url: ClassVar[str] = "https://console.vast.ai"
    api_path: ClassVar[str] = ""

    @cached_property
    def base_url(self) -> str:
        """The API's root: each operation names its version (``/api/v0/...``, ``/api/v1/...``). A
        connection host ending in a version path (as older setups wrote it) is cut back to it."""
        base = str(CloudApiHook.base_url.func(self)).rstrip("/")  # type: ignore[attr-defined]
        for suffix in ("/api/v0", "/api/v1"):
            if urlsplit(base).path.endswith(suffix):
                return base[: -len(suffix)]
        return base

    # --- errors ----------------------------------------------------------------------------------

    def error_message(self, response: requests.Response) -> str:
        """``error: msg`` from a JSON error body; the text itself for Vast's plain-text answers."""
        body = error_body(response)
        text = describe_error(body) if body else ""
        if text:
            return text
        return super().error_message(response)

    def error_for(self, method: str, path: str, response: requests.Response) -> ProviderError:
        status = response.status_code
        if method == "PUT" and path.startswith("/api/v0/asks/") and status in (404, 410):
            body = error_body(response)
            if is_gone_ask(body):  # createInstance: 410 "Offer no longer available", 404 "not available"
                return NoCapacityError(self.provider, f"{method} {path} -> HTTP {status}: {describe_error(body)}")
        if method == "POST" and path.startswith("/api/v0/bundles") and status == 404:
            # searchOffers declares its 404 as "Unauthorized - invalid or missing API key".
            return AuthorizationError(
                self.provider,
                f"{method} {path} -> HTTP 404: {self.scrub(self.error_message(response))}: Vast refused the API "
                f"key; set a valid key as the password of Airflow connection {self.conn_id!r} "
                "(keys: https://cloud.vast.ai/manage-keys/)",
            )
        return super().error_for(method, path, response)

    # --- API calls -------------------------------------------------------------------------------

    def search_offers(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        """``POST /api/v0/bundles/``: the asks matching ``query`` (with :data:`SEARCH_DEFAULTS`
        added where ``query`` does not say otherwise, as the official client does)."""
        body = self.request("POST", "/api/v0/bundles/", json_body={**SEARCH_DEFAULTS, **query})
        offers = body.get("offers") if isinstance(body, dict) else None
        if not isinstance(offers, list):
            raise ProviderError(self.provider, f"unexpected answer to POST /api/v0/bundles/: {str(body)[:300]}")
        return [o for o in offers if isinstance(o, dict)]

    def create_instance(self, ask_id: int, body: dict[str, Any]) -> str | None:
        """``PUT /api/v0/asks/{ask_id}/``: rent the ask; the new instance id (``new_contract``).

        Not idempotent: retried only on 429. After a 5xx the caller looks the label up. ``None``
        when a 2xx carried no id (the caller looks the label up as well).
        """
        path = f"/api/v0/asks/{int(ask_id)}/"
        answer = self.request("PUT", path, json_body=body, idempotent=False)
        if not isinstance(answer, dict):
            return None
        if answer.get("success") is False:
            where = f"PUT {path} -> {describe_error(answer) or answer}"
            if is_gone_ask(answer):
                raise NoCapacityError(self.provider, where)
            raise BadRequestError(self.provider, where)
        contract = answer.get("new_contract")
        return None if contract in (None, "", 0) else str(contract)

    def instance_pages(self, select_filters: dict[str, Any] | None = None) -> Iterator[list[dict[str, Any]]]:
        """``GET /api/v1/instances/``, page after page (25 each, by id) until ``next_token`` is null."""
        params: dict[str, Any] = {
            "select_filters": json.dumps(select_filters or {}),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "limit": PAGE_SIZE,
        }
        for _ in range(MAX_PAGES):
            body = self.request("GET", "/api/v1/instances/", params=params)
            instances = body.get("instances") if isinstance(body, dict) else None
            if not isinstance(instances, list):
                raise ProviderError(self.provider, f"unexpected answer to GET /api/v1/instances/: {str(body)[:300]}")
            yield [i for i in instances if isinstance(i, dict)]
            token = body.get("next_token")
            if not token or not instances:
                return
            params["after_token"] = str(token)
        raise ProviderError(self.provider, f"GET /api/v1/instances/ still had more after {MAX_PAGES} pages")

    def list_instances(self) -> list[dict[str, Any]]:
        """Every instance of the account, all pages (destroyed ones are not listed)."""
        return [instance for page in self.instance_pages() for instance in page]

    def instances_labelled(self, label: str) -> list[dict[str, Any]]:
        """The account's instances with exactly this ``label`` (the server filters, as ``vastai show
        instances --label`` does; still paged, should there be more than 25)."""
        found = [i for page in self.instance_pages({"label": {"eq": label}}) for i in page]
        return [i for i in found if i.get("label") == label]  # the filter is the server's: check it

    def get_instance(self, instance_id: str) -> dict[str, Any]:
        """``GET /api/v0/instances/{id}/?owner=me``; InstanceNotFoundError on a 404 or ``{"instances": null}``."""
        path = f"/api/v0/instances/{quote(str(instance_id), safe='')}/"
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
        """``DELETE /api/v0/instances/{id}/``: destroy the instance (irreversible). Idempotent, so a
        5xx is retried; InstanceNotFoundError when Vast no longer knows it."""
        path = f"/api/v0/instances/{quote(str(instance_id), safe='')}/"
        answer = self.request("DELETE", path, json_body={})
        if isinstance(answer, dict) and answer.get("success") is False:
            text = describe_error(answer) or str(answer)
            if answer.get("error") in ("not_found", "no_such_instance") or "not found" in text.lower():
                raise InstanceNotFoundError(self.provider, f"DELETE {path} -> {text}")
            raise ProviderError(self.provider, f"DELETE {path} -> {text}")
