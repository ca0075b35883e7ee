"""``LambdaCloudHook``: the Lambda Cloud (formerly Lambda Labs) public API v1, and nothing else.

Follows the Lambda Cloud API reference (https://docs-api.lambda.ai/api/cloud, OpenAPI "Lambda Cloud
API" 1.x), base ``https://cloud.lambda.ai/api/v1`` (``cloud.lambdalabs.com`` is the deprecated
alias), the same calls SkyPilot's ``sky/provision/lambda_cloud/lambda_utils.py`` and dstack's
``backends/lambdalabs/api_client.py`` make:

- ``GET /instance-types`` -> ``{"data": {type_name: {"instance_type": {name, description,
  gpu_description, price_cents_per_hour, specs: {vcpus, memory_gib, storage_gib, gpus}},
  "regions_with_capacity_available": [{name, description}]}}}``
- ``POST /instance-operations/launch`` ``{region_name, instance_type_name, ssh_key_names (exactly
  one), name, file_system_names}`` -> ``{"data": {"instance_ids": [...]}}`` (one instance: the
  spec's ``InstanceLaunchRequest`` 1.6.0 has no ``quantity``, which older versions took)
- ``GET /instances`` -> ``{"data": [Instance]}``; ``GET /instances/{id}`` -> ``{"data": Instance}``
  with ``id, name, ip, private_ip, status (booting|active|unhealthy|terminating|terminated|
  preempted), ssh_key_names, file_system_names, region {name, description}, instance_type {...},
  hostname, jupyter_url``; ``ip`` is absent or null until the instance has booted.
- ``POST /instance-operations/terminate`` ``{instance_ids: [...]}`` ->
  ``{"data": {"terminated_instances": [Instance]}}``

Auth: ``Authorization: Bearer <API key>`` (the API also takes HTTP basic with the key as user).
Errors are ``{"error": {"code", "message", "suggestion"?}}``: 401 ``global/invalid-api-key``,
403 ``global/account-inactive``, 404 ``global/object-does-not-exist`` (unknown instance, or a launch
naming an SSH key/file system/type that does not exist), 400 ``global/invalid-parameters``,
``global/quota-exceeded`` and ``instance-operations/launch/insufficient-capacity`` (the capacity
refusal). Most endpoints allow about one request per second and launch about one per 10-12 s
(Lambda's rate-limiting page, as SkyPilot notes); over that the API answers HTTP 429, which the base
hook retries honouring ``Retry-After``.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

import requests

from gpu_training.errors import ProviderError
from gpu_training.hooks.cloud_api import CloudApiHook
from gpu_training.hooks.connection_types import LAMBDA_CLOUD

#: The launch refusal that means "no machine of this type free in this region now".
CAPACITY_CODE = "instance-operations/launch/insufficient-capacity"
#: The account's instance quota is used up: no Lambda offer will launch, another cloud may.
QUOTA_CODE = "global/quota-exceeded"


def error_body(response: requests.Response) -> dict[str, Any]:
    """The ``error`` object of a Lambda error answer (empty when the body is not that shape)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {}


class LambdaCloudHook(CloudApiHook):
    """Lambda Cloud API v1 over the ``lambda_default`` connection (API key in the password)."""

    default_conn_name = "lambda_default"
    connection_type = LAMBDA_CLOUD
    conn_type = LAMBDA_CLOUD.conn_type
    hook_name = LAMBDA_CLOUD.hook_name
    provider: ClassVar[str] = "lambda"
    default_url: ClassVar[str] = "https://cloud.lambda.ai"
    api_path: ClassVar[str] = "/api/v1"

    # --- errors ----------------------------------------------------------------------------------

    def error_message(self, response: requests.Response) -> str:
        """``code: message (suggestion)`` from Lambda's error object, else the base rendering."""
        error = error_body(response)
        if not error.get("code") and not error.get("message"):
            return super().error_message(response)
        text = ": ".join(str(error[k]) for k in ("code", "message") if error.get(k))
        if error.get("suggestion"):
            text += f" ({error['suggestion']})"
        return text

    def is_capacity_error(self, response: requests.Response, message: str) -> bool:
        """Insufficient capacity, or the account's instance quota (both: try another offer)."""
        return error_body(response).get("code") in (CAPACITY_CODE, QUOTA_CODE)

    # --- API calls -------------------------------------------------------------------------------

    def instance_types(self) -> dict[str, Any]:
        """``GET /instance-types``: type name -> {instance_type, regions_with_capacity_available}."""
        return dict(self._data(self.request("GET", "/instance-types")) or {})

    def launch(
        self,
        *,
        region_name: str,
        instance_type_name: str,
        ssh_key_names: list[str],
        name: str,
        file_system_names: list[str] | None = None,
    ) -> list[str]:
        """``POST /instance-operations/launch``: the new instance ids.

        Not idempotent: retried only on 429. After a 5xx the caller looks the name up.
        """
        body = {
            "region_name": region_name,
            "instance_type_name": instance_type_name,
            "ssh_key_names": ssh_key_names,
            "file_system_names": list(file_system_names or []),
            "name": name,
        }
        data = self._data(self.request("POST", "/instance-operations/launch", json_body=body, idempotent=False))
        return [str(i) for i in (data or {}).get("instance_ids") or []]

    def list_instances(self) -> list[dict[str, Any]]:
        """``GET /instances``: every instance of the account (recently terminated ones included)."""
        return list(self._data(self.request("GET", "/instances")) or [])

    def get_instance(self, instance_id: str) -> dict[str, Any]:
        """``GET /instances/{id}``; raises InstanceNotFoundError on 404."""
        return dict(self._data(self.request("GET", f"/instances/{quote(instance_id, safe='')}")) or {})

    def terminate(self, instance_ids: list[str]) -> list[dict[str, Any]]:
        """``POST /instance-operations/terminate``: the instances now terminating.

        Sent without 5xx retries: Lambda answers an error for an instance that is already
        terminating, so a blind retry of a request that did act fails again; the provider asks the
        instance's state instead.
        """
        data = self._data(
            self.request(
                "POST", "/instance-operations/terminate", json_body={"instance_ids": instance_ids}, idempotent=False
            )
        )
        return list((data or {}).get("terminated_instances") or [])

    def _data(self, body: Any) -> Any:
        if not isinstance(body, dict) or "data" not in body:
            raise ProviderError(self.provider, f"unexpected answer from the Lambda Cloud API: {str(body)[:300]}")
        return body["data"]
