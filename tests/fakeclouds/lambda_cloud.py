"""``FakeLambda``: a local stand-in for the Lambda Cloud API v1, speaking it as documented.

Shapes follow the Lambda Cloud API reference (OpenAPI "Lambda Cloud API", https://docs-api.lambda.ai/api/cloud):

- every path under ``/api/v1``; auth ``Authorization: Bearer <key>`` or HTTP basic with the key as
  user; a bad key answers 401 ``global/invalid-api-key``.
- ``GET /instance-types`` -> ``{"data": {name: {"instance_type": {name, description,
  gpu_description, price_cents_per_hour, specs: {vcpus, memory_gib, storage_gib, gpus}},
  "regions_with_capacity_available": [{name, description}]}}}``
- ``POST /instance-operations/launch`` (``region_name``, ``instance_type_name``, ``ssh_key_names``
  with exactly one key, ``name``, optional ``file_system_names``/``quantity``) ->
  ``{"data": {"instance_ids": [...]}}``; 400 ``global/invalid-parameters`` for a malformed body,
  404 ``global/object-does-not-exist`` for an unknown SSH key or instance type, 400
  ``instance-operations/launch/insufficient-capacity`` when the region has no capacity.
- ``GET /instances`` -> ``{"data": [Instance]}``; ``GET /instances/{id}`` -> ``{"data": Instance}``,
  404 ``global/object-does-not-exist`` for unknown ids. ``Instance`` has ``id, name, ip,
  private_ip, status, ssh_key_names, file_system_names, region, instance_type, hostname,
  jupyter_token, jupyter_url, is_reserved, actions, tags``; ``ip``/``private_ip``/``hostname`` only
  once booted. No SSH port: Lambda instances take SSH on 22 (tests set the port on the SSH
  connection).
- ``POST /instance-operations/terminate`` ``{instance_ids}`` ->
  ``{"data": {"terminated_instances": [Instance]}}``; an unknown id answers 404; an instance that
  is already terminating or terminated answers ``global/unknown`` (as SkyPilot met, PR #3410).

Statuses: booting, active, unhealthy, terminating, terminated. Terminated instances stay visible
(``GET /instances`` and ``GET /instances/{id}``) for ``terminated_linger_seconds``, then are gone
(404). The 429 body is not in the OpenAPI document; this one uses the same error object.
"""

from __future__ import annotations

import base64
import copy
import secrets
import time
from collections.abc import Mapping
from typing import Any

from tests.fakeclouds.base import FakeCloud, FakeInstance, Reply

API = "/api/v1"

REGIONS = {
    "us-east-1": "Virginia, USA",
    "us-west-1": "California, USA",
    "us-west-2": "Arizona, USA",
    "us-south-1": "Texas, USA",
}

#: name -> instance_type object as ``GET /instance-types`` returns it.
CATALOG: dict[str, dict[str, Any]] = {
    "gpu_1x_a10": {
        "name": "gpu_1x_a10",
        "description": "1x A10 (24 GB PCIe)",
        "gpu_description": "A10 (24 GB PCIe)",
        "price_cents_per_hour": 75,
        "specs": {"vcpus": 30, "memory_gib": 200, "storage_gib": 1400, "gpus": 1},
    },
    "gpu_1x_a100_sxm4": {
        "name": "gpu_1x_a100_sxm4",
        "description": "1x A100 (40 GB SXM4)",
        "gpu_description": "A100 (40 GB SXM4)",
        "price_cents_per_hour": 129,
        "specs": {"vcpus": 30, "memory_gib": 200, "storage_gib": 512, "gpus": 1},
    },
    "gpu_1x_h100_pcie": {
        "name": "gpu_1x_h100_pcie",
        "description": "1x H100 (80 GB PCIe)",
        "gpu_description": "H100 (80 GB PCIe)",
        "price_cents_per_hour": 249,
        "specs": {"vcpus": 26, "memory_gib": 200, "storage_gib": 1024, "gpus": 1},
    },
    "gpu_8x_h100_sxm5": {
        "name": "gpu_8x_h100_sxm5",
        "description": "8x H100 (80 GB SXM5)",
        "gpu_description": "H100 (80 GB SXM5)",
        "price_cents_per_hour": 2392,
        "specs": {"vcpus": 208, "memory_gib": 1800, "storage_gib": 24780, "gpus": 8},
    },
}

#: type -> regions with capacity, as the fake starts (tests edit ``fake.capacity``).
DEFAULT_CAPACITY: dict[str, list[str]] = {
    "gpu_1x_a10": ["us-east-1"],
    "gpu_1x_a100_sxm4": ["us-east-1", "us-west-2"],
    "gpu_1x_h100_pcie": ["us-west-1"],
    "gpu_8x_h100_sxm5": [],
}

STATUS = {
    "booting": "booting",
    "running": "active",
    "unhealthy": "unhealthy",
    "terminating": "terminating",
    "terminated": "terminated",
}


def error(status: int, code: str, message: str, suggestion: str | None = None) -> Reply:
    body: dict[str, Any] = {"code": code, "message": message}
    if suggestion:
        body["suggestion"] = suggestion
    return Reply(status, {"error": body})


def not_found(what: str = "instance") -> Reply:
    return error(404, "global/object-does-not-exist", f"Specified {what} does not exist.")


def invalid(message: str) -> Reply:
    return error(400, "global/invalid-parameters", message, "Check the request body against the API reference.")


def unknown() -> Reply:
    reply = error(500, "global/unknown", "An unknown error occurred.")
    reply.assumed = "Lambda's spec declares no 5xx answers (a fault switch)"
    return reply


class FakeLambda(FakeCloud):
    """The Lambda Cloud API v1 on 127.0.0.1, with the shared fault switches."""

    name = "lambda"
    contract_name = "lambda"

    def __init__(self, *, ssh_host: str = "127.0.0.1", ssh_port: int = 22) -> None:
        super().__init__(ssh_host=ssh_host, ssh_port=ssh_port)
        self.capacity: dict[str, list[str]] = copy.deepcopy(DEFAULT_CAPACITY)
        #: SSH keys registered in the account (a launch naming another answers 404).
        self.ssh_keys: set[str] = {"test-key"}
        #: How long a terminated instance stays visible before the API forgets it.
        self.terminated_linger_seconds = 30.0
        #: (time, method, path, status) of every request, for timing assertions.
        self.timed_calls: list[tuple[float, str, str, int]] = []

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.capacity = copy.deepcopy(DEFAULT_CAPACITY)
            self.ssh_keys = {"test-key"}
            self.terminated_linger_seconds = 30.0
            self.timed_calls.clear()

    # --- protocol --------------------------------------------------------------------------------

    def authorized(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> bool:
        auth = headers.get("Authorization") or ""
        if auth == f"Bearer {self.api_key}":
            return True
        if auth.startswith("Basic "):
            try:
                user = base64.b64decode(auth[6:]).decode().partition(":")[0]
            except ValueError:
                return False
            return user == self.api_key
        return False

    def unauthorized(self) -> Reply:
        return error(
            401,
            "global/invalid-api-key",
            "API key was invalid, expired, or deleted.",
            "Check your API key or create a new one, then try again.",
        )

    def rate_limited(self) -> Reply:
        reply = error(429, "global/too-many-requests", "Too many requests.", "Slow down and try again.")
        reply.assumed = "Lambda documents its rate limits but its spec declares no 429"
        if self.faults.retry_after is not None:
            reply.headers["Retry-After"] = f"{self.faults.retry_after:g}"
        return reply

    def _dispatch(self, method: str, raw_path: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        reply = super()._dispatch(method, raw_path, headers, raw)
        with self.lock:
            self.timed_calls.append((time.time(), method, raw_path.split("?")[0], reply.status))
        return reply

    def visible(self, inst: FakeInstance) -> bool:
        if not super().visible(inst):
            return False
        return inst.terminated_at is None or time.time() - inst.terminated_at < self.terminated_linger_seconds

    def route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Reply:
        if not path.startswith(API + "/"):
            return error(404, "global/not-found", "The requested resource was not found.")
        path = path[len(API) :]
        if method == "GET" and path == "/instance-types":
            return Reply(200, {"data": self._instance_types()})
        if method == "GET" and path == "/instances":
            return Reply(200, {"data": [self._render(i) for i in self.instances.values() if self.visible(i)]})
        if method == "GET" and path.startswith("/instances/"):
            inst = self.instances.get(path[len("/instances/") :])
            if inst is None or not self.visible(inst):
                return not_found()
            return Reply(200, {"data": self._render(inst)})
        if method == "POST" and path == "/instance-operations/launch":
            return self._launch(body)
        if method == "POST" and path == "/instance-operations/terminate":
            return self._terminate(body)
        return error(404, "global/not-found", "The requested resource was not found.")

    # --- endpoints -------------------------------------------------------------------------------

    def _regions_with_capacity(self, type_name: str) -> list[str]:
        if self.faults.no_capacity:
            return []
        return list(self.capacity.get(type_name) or [])

    def _instance_types(self) -> dict[str, Any]:
        return {
            name: {
                "instance_type": copy.deepcopy(itype),
                "regions_with_capacity_available": [
                    {"name": r, "description": REGIONS.get(r, r)} for r in self._regions_with_capacity(name)
                ],
            }
            for name, itype in CATALOG.items()
        }

    def _launch(self, body: Any) -> Reply:
        if not isinstance(body, dict):
            return invalid("Invalid request data: expected a JSON object.")
        region = body.get("region_name")
        type_name = body.get("instance_type_name")
        keys = body.get("ssh_key_names")
        name = body.get("name")
        file_systems = body.get("file_system_names", [])
        quantity = body.get("quantity", 1)
        if not isinstance(region, str) or region not in REGIONS:
            return invalid(f"Invalid region_name: {region!r}.")
        if not isinstance(type_name, str) or not type_name:
            return invalid("instance_type_name is required.")
        if not isinstance(keys, list) or len(keys) != 1 or not all(isinstance(k, str) and k for k in keys):
            return invalid("Exactly one SSH key must be specified in ssh_key_names.")
        if not isinstance(name, str) or not name or len(name) > 64:
            return invalid("name must be a string of 1 to 64 characters.")
        if not isinstance(file_systems, list) or not all(isinstance(f, str) for f in file_systems):
            return invalid("file_system_names must be a list of strings.")
        if not isinstance(quantity, int) or isinstance(quantity, bool) or not 1 <= quantity <= 8:
            return invalid("quantity must be an integer from 1 to 8.")
        if type_name not in CATALOG:
            return error(
                404,
                "global/object-does-not-exist",
                "Specified instance type does not exist.",
                "List the instance types with GET /instance-types.",
            )
        if keys[0] not in self.ssh_keys:
            return error(
                404,
                "global/object-does-not-exist",
                "Specified SSH key does not exist.",
                "Add the SSH key to your account, or check its name.",
            )
        refused = self.capacity_refused()
        if refused or region not in self._regions_with_capacity(type_name):
            return error(
                400,
                "instance-operations/launch/insufficient-capacity",
                "Not enough capacity to fulfill launch request.",
                "Choose a different region or instance type, or try again later.",
            )
        itype = CATALOG[type_name]
        ids = []
        for _ in range(quantity):
            inst = FakeInstance(
                id=secrets.token_hex(16),
                name=name,
                instance_type=type_name,
                region=region,
                price_per_hour=itype["price_cents_per_hour"] / 100,
                extra={"ssh_key_names": list(keys), "file_system_names": list(file_systems)},
            )
            self.instances[inst.id] = inst
            ids.append(inst.id)
        if self.faults.error_after_create > 0:
            self.faults.error_after_create -= 1
            return unknown()
        return Reply(200, {"data": {"instance_ids": ids}})

    def _terminate(self, body: Any) -> Reply:
        ids = body.get("instance_ids") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            return invalid("instance_ids must be a non-empty list of instance ids.")
        if self.faults.terminate_fail > 0:
            self.faults.terminate_fail -= 1
            return unknown()
        targets = []
        for instance_id in ids:
            inst = self.instances.get(instance_id)
            if inst is None or not self.visible(inst):
                return not_found()
            if inst.terminate_requested_at is not None:
                return unknown()  # already terminating or terminated
            targets.append(inst)
        now = time.time()
        for inst in targets:
            inst.terminate_requested_at = now
            self.power_off(inst)
        return Reply(200, {"data": {"terminated_instances": [self._render(i) for i in targets]}})

    # --- rendering -------------------------------------------------------------------------------

    def _render(self, inst: FakeInstance) -> dict[str, Any]:
        phase = inst.phase(self.faults)
        status = STATUS[phase]
        booted = phase != "booting"
        terminating = phase in ("terminating", "terminated")
        action = {"available": booted and not terminating}
        data: dict[str, Any] = {
            "id": inst.id,
            "name": inst.name,
            "status": status,
            "ssh_key_names": list(inst.extra.get("ssh_key_names") or []),
            "file_system_names": list(inst.extra.get("file_system_names") or []),
            "region": {"name": inst.region, "description": REGIONS.get(inst.region, inst.region)},
            "instance_type": copy.deepcopy(CATALOG[inst.instance_type]),
            "jupyter_token": inst.id[:32],
            "jupyter_url": f"https://jupyter-{inst.id}.lambdaspaces.com/?token={inst.id[:32]}",
            "is_reserved": False,
            "actions": {
                "migrate": {"available": False, "reason_code": "vm-has-not-launched"},
                "rebuild": dict(action),
                "restart": dict(action),
                "cold_reboot": dict(action),
                "terminate": {"available": not terminating},
            },
            "tags": [],
        }
        if booted:
            data["ip"] = self.ssh_host
            data["private_ip"] = self.private_ip(inst)
            data["hostname"] = self.ssh_host
        return data
