"""``RunPodHook``: the RunPod REST API v2 (pods and the GPU catalog), and nothing else.

Follows the RunPod REST API v2 reference (https://docs.runpod.io/api-reference-v2, OpenAPI
"Runpod REST API" 2.0.0, server ``https://api.runpod.io``; the published ``openapi.json`` of
``runpod/docs``, August 2026). v2 replaces REST v1 (``https://rest.runpod.io/v1``, deprecated and
retired on 2026-11-15) and the legacy GraphQL API. The calls made here:

- ``GET /v2/catalog/gpus?include=AVAILABILITY&product=POD&count=N&cloud=SECURE|COMMUNITY``
  (``listGpuTypes``) -> ``{"gpus": [GpuType]}``; ``GpuType`` has ``id`` (the id pods are created
  with, e.g. ``NVIDIA A100 80GB PCIe``), ``name``, ``manufacturer``, ``memory`` (GB), ``secure`` /
  ``community`` (offered in that cloud), ``price {secure, community, serverless?}`` (USD per hour
  for ONE GPU: a pod costs that times ``gpu.count``), ``maxCount {secure, community}`` (GPUs per pod
  at most) and, with ``include=AVAILABILITY`` (which requires ``product``), ``availability``
  (``NONE|LOW|MEDIUM|HIGH``) and ``dataCenters [{id, name, availability}]`` (only the data centers
  offering the type in that configuration; omitted when it is unavailable everywhere). ``count``
  and ``cloud`` are valid only with ``include=AVAILABILITY``.
- ``POST /v2/pods`` (``createPod``) with ``CreatePodRequest`` ``{name, image, gpu: {id, count},
  cloud, dataCenterIds, disk, ports, env, mounts: {persistent: {size, path}}, startSsh}`` ->
  ``201`` with the ``Pod`` (status ``PROVISIONING``). The body is closed
  (``unevaluatedProperties: false``): any other key, a v1 one included, is a ``422``.
- ``GET /v2/pods`` (``listPods``) -> ``{"pods": [Pod]}``. v2 has no server-side name or status
  filter (unknown query parameters are ignored), so :meth:`RunPodHook.list_pods` filters by name here.
- ``GET /v2/pods/{id}`` (``getPod``) -> ``Pod``; ``404`` for an unknown or deleted pod.
- ``DELETE /v2/pods/{id}`` (``deletePod``) -> ``204`` without body; the pod is terminated for good
  and no longer listed; ``404`` when it does not exist (any more); ``409`` for an Instant Cluster
  member.

``Pod`` fields read by the provider: ``id, name, status (PROVISIONING|STARTING|RUNNING|EXITED|
ERROR|TERMINATED), gpu {id, count}, cloud, dataCenterId, cost`` (USD/h), ``ports``, ``runtime``
(null unless running; ``runtime.ports [{private, public, type, ip}]`` are the live port mappings)
and ``ssh {proxy, direct}`` (``direct`` = ``{host, port, username, command}`` of the published
``22/tcp`` mapping, null until it exists).

Auth: ``Authorization: Bearer <API key>``. Errors are RFC 9457 problem objects
(``application/problem+json``) ``{title, status, detail, errors?}`` and nothing more: no code field.
What they mean on ``createPod`` is the spec's own table: ``401`` the key is missing or invalid (an
:class:`~gpu_training.hooks.cloud_api.AuthorizationError`, no retry, no next offer); ``403`` "your
account cannot access the requested pool: skip this candidate" (:class:`PoolNotOpenError`, which
skips the offer and is never called capacity; the provider then checks whether the key may create
pods at all, see :meth:`RunPodHook.check_create_permission`); ``422`` the body breaks the contract
(fix the request, never retry); ``402`` insufficient balance (stop: no candidate will succeed);
``429`` rate limited with ``Retry-After`` (integer seconds) and ``RateLimit``/``RateLimit-Policy``
headers; ``5xx`` transient. Capacity has no code: the spec says "``400`` covers both 'your request
breaks a rule' and 'no capacity', because capacity exhaustion currently carries no machine-readable
code of its own — only a human-readable ``detail``", and that a ``400`` on every candidate means the
request, not capacity. So a ``400`` on create is :class:`CreateRefusedError` (try the next offer, the
message says what the spec says of it), never matched against English phrases; neither of RunPod's
official clients has better evidence (``runpodctl`` matches "no longer any instances available" in
GraphQL errors; ``runpod-python`` speaks only GraphQL).

Not in v2: interruptible (spot) pods and bids. REST v1 had them (``POST /v1/pods`` took
``interruptible: true``, ``Pod.gpu`` carried ``communitySpotPrice``/``secureSpotPrice``; the v1
``openapi.json`` of ``runpod/docs``), as does the legacy GraphQL
``podRentInterruptable(bidPerGpu)``. v2's create body has neither (a request carrying them is a
``422``), its ``Pod`` says nothing of interruptions, RunPod removed spot pods from its
documentation on 2026-05-06 (``runpod/docs`` commit 8e5aebdb) and retired v1 on 2026-11-15;
GraphQL is deprecated, to be retired early 2027. So pods made here are never interrupted.
Inferred, as the reference does not say it: the ``dataCenters`` of the catalog are scoped by
``count`` and ``cloud`` like ``availability``.
"""

from __future__ import annotations

from typing import Any, ClassVar
from urllib.parse import quote

import requests

from gpu_training.errors import (
    AuthorizationError,
    BadRequestError,
    CreateRefusedError,
    PoolNotOpenError,
    ProviderError,
)
from gpu_training.hooks.cloud_api import CloudApiHook
from gpu_training.hooks.connection_types import RUNPOD

CLOUDS = ("SECURE", "COMMUNITY")
#: The name of ``make validate``'s create that must fail (see :meth:`RunPodHook.check_create_permission`).
PERMISSION_PROBE_NAME = "gpujob-permission-probe"
#: A ``createPod`` body the spec must refuse with 422 (no ``image``, which ``CreatePodRequest``
#: requires without a ``templateId``; no ``gpu`` or ``cpu``): no pod can come of it.
PERMISSION_PROBE: dict[str, Any] = {"name": PERMISSION_PROBE_NAME}


def problem(response: requests.Response) -> dict[str, Any]:
    """The RFC 9457 problem object of a v2 error answer (empty when the body is not one)."""
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) and ("detail" in body or "title" in body) else {}


class RunPodHook(CloudApiHook):
    """RunPod REST API v2 over the ``runpod_default`` connection (API key in the password)."""

    default_conn_name = "runpod_default"
    connection_type = RUNPOD
    conn_type = RUNPOD.conn_type
    hook_name = RUNPOD.hook_name
    provider: ClassVar[str] = "runpod"
    default_url: ClassVar[str] = "https://api.runpod.io"
    api_path: ClassVar[str] = "/v2"

    # --- errors ----------------------------------------------------------------------------------

    def error_message(self, response: requests.Response) -> str:
        """``title: detail (errors)`` from the problem object, else the base rendering."""
        body = problem(response)
        if not body:
            return super().error_message(response)
        title, detail = str(body.get("title") or "").strip(), str(body.get("detail") or "").strip()
        text = f"{title}: {detail}" if title and detail and title != detail else (detail or title)
        errors = [str(e) for e in body.get("errors") or [] if e]
        return text + (f" ({'; '.join(errors)})" if errors else "")

    def error_for(self, method: str, path: str, response: requests.Response) -> ProviderError:
        if not (method == "POST" and path == "/pods"):
            return super().error_for(method, path, response)
        status = response.status_code
        message = self.scrub(self.error_message(response))
        where = f"POST /v2/pods -> HTTP {status}: {message}"
        if status == 400:
            return CreateRefusedError(
                self.provider,
                f"{where} (RunPod refused this GPU and data center; its API gives no code to tell 'no capacity' "
                "from a rule the request breaks: if every offer answers 400, the request is at fault)",
            )
        if status == 403:
            return PoolNotOpenError(
                self.provider, f"{where} (this GPU pool is not open to the account: not a capacity refusal)"
            )
        if status == 402:
            return BadRequestError(
                self.provider, f"{where}: the RunPod account's balance is too low to create a pod; add funds"
            )
        return super().error_for(method, path, response)

    def check_create_permission(self) -> None:
        """Whether the key may create pods, without creating one; AuthorizationError if not.

        RunPod defines no dry run. This sends a create the spec must refuse (:data:`PERMISSION_PROBE`
        has no ``image``, which ``CreatePodRequest`` requires, so no pod can come of it): a key
        without the right is answered 401/403 ("requests may return 403 when a valid key lacks access
        to the requested resource or action", the spec's security scheme), a key with it 422 (the
        request got through authentication and authorization to body validation). The spec does not
        state that order; should RunPod ever validate first, a 422 would prove the key only, and the
        launch's own 403 is still caught (the provider asks again, then fails on the key).
        """
        try:
            answer = self.request("POST", "/pods", json_body=PERMISSION_PROBE, idempotent=False)
        except PoolNotOpenError as err:
            raise AuthorizationError(
                self.provider,
                f"the API key in Airflow connection {self.conn_id!r} may not create pods ({err}); give it "
                "read/write access to Pods (RunPod console > Settings > API Keys: All, or Restricted with Pods "
                "read/write) or use a key that has it",
            ) from None
        except BadRequestError as err:
            if "HTTP 422" in str(err):
                return
            raise
        # A 2xx cannot happen for this body; if it ever did, do not leave a pod behind.
        if isinstance(answer, dict) and answer.get("id"):
            self.delete_pod(str(answer["id"]))
        raise ProviderError(self.provider, f"POST /v2/pods accepted the permission probe: {str(answer)[:300]}")

    # --- catalog ---------------------------------------------------------------------------------

    def gpu_types(self, *, cloud: str = "SECURE", count: int = 1) -> list[dict[str, Any]]:
        """``GET /v2/catalog/gpus`` with pod stock for ``count`` GPUs in ``cloud``."""
        params = {"include": "AVAILABILITY", "product": "POD", "count": max(1, int(count)), "cloud": cloud}
        body = self.request("GET", "/catalog/gpus", params=params)
        return list(self._field(body, "gpus"))

    # --- pods ------------------------------------------------------------------------------------

    def create_pod(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /v2/pods``: the created pod. Not idempotent: retried only on 429."""
        pod = self.request("POST", "/pods", json_body=body, idempotent=False)
        if not isinstance(pod, dict):
            raise ProviderError(self.provider, f"unexpected answer to POST /pods: {str(pod)[:300]}")
        return pod

    def list_pods(self, name: str | None = None) -> list[dict[str, Any]]:
        """``GET /v2/pods``, optionally only those named ``name`` (filtered here: v2 has no filter)."""
        pods = [p for p in self._field(self.request("GET", "/pods"), "pods") if isinstance(p, dict)]
        return pods if name is None else [p for p in pods if p.get("name") == name]

    def get_pod(self, pod_id: str) -> dict[str, Any]:
        """``GET /v2/pods/{id}``; raises InstanceNotFoundError on 404."""
        pod = self.request("GET", f"/pods/{quote(pod_id, safe='')}")
        if not isinstance(pod, dict):
            raise ProviderError(self.provider, f"unexpected answer to GET /pods/{pod_id}: {str(pod)[:300]}")
        return pod

    def delete_pod(self, pod_id: str) -> None:
        """``DELETE /v2/pods/{id}`` (terminate for good). Idempotent, so retried on 5xx too; 404 raises."""
        self.request("DELETE", f"/pods/{quote(pod_id, safe='')}")

    def _field(self, body: Any, key: str) -> list[Any]:
        if not isinstance(body, dict) or not isinstance(body.get(key), list):
            raise ProviderError(self.provider, f"unexpected answer from the RunPod API (no {key!r}): {str(body)[:300]}")
        return list(body[key])
