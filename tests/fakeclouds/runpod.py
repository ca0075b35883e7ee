"""``FakeRunPod``: a local stand-in for the RunPod REST API v2 (pods and GPU catalog), as documented.

Shapes follow the v2 OpenAPI document (``runpod/docs`` ``api-reference-v2/openapi.json``, "Runpod
REST API" 2.0.0, server ``https://api.runpod.io``) and payloads recorded from live v2 calls:

- every path under ``/v2``; auth ``Authorization: Bearer <key>``; a missing or bad key answers 401.
- errors are RFC 9457 problem objects (``application/problem+json``) ``{title, status, detail,
  errors?}``; ``422`` ``"Request validation failed."`` with one ``errors`` entry per violation
  (e.g. ``"$: additional properties 'imageName' not allowed"``); ``429`` with ``Retry-After`` and
  ``RateLimit`` / ``RateLimit-Policy`` headers (the real ``Retry-After`` is whole seconds; the
  fake writes the fault's value as given so tests stay fast).
- ``GET /v2/catalog/gpus`` (``include=AVAILABILITY``, which requires ``product``; ``count`` and
  ``cloud`` only with it) -> ``{"gpus": [GpuType]}`` with ``price {secure, community}`` per GPU,
  ``maxCount``, and with availability ``availability`` plus ``dataCenters [{id, name,
  availability}]`` (omitted when the configuration is offered nowhere).
- ``POST /v2/pods`` (closed ``CreatePodRequest``: ``name``, ``image``, ``gpu {id, count}``,
  ``cloud``, ``dataCenterIds``, ``disk``, ``ports``, ``env``, ``mounts``, ``startSsh``, ...) ->
  ``201`` Pod in ``PROVISIONING``; ``400`` "There are no longer any instances available with the
  requested specifications. Please refresh and try again." when nothing can be placed (the detail
  recorded live; the spec gives capacity no code, so neither does the fake); ``403`` for a GPU pool
  closed to the account (``forbidden_gpus``), and for every write of a key without write access
  (``read_only``: answered before the body is validated, the order a key check comes in; the spec
  does not state it, an assumption the permission probe of ``make validate`` rests on too).
- Every request and answer is checked against RunPod's OpenAPI (``tests/contracts/runpod.openapi.json``).
- ``GET /v2/pods`` -> ``{"pods": [Pod]}`` (unknown query parameters ignored, deleted pods not
  listed); ``GET /v2/pods/{id}`` -> Pod or 404; ``DELETE /v2/pods/{id}`` -> ``204`` or 404.

Booting walks PROVISIONING -> STARTING -> RUNNING (with ``runtime`` null and ``ssh.direct`` null,
as recorded right after creation) over ``boot_seconds``; once booted the pod is RUNNING with
``runtime.ports`` mapping container port 22 to ``ssh_port`` on ``ssh_host`` (only when ``22/tcp``
was exposed). Unhealthy pods report ``ERROR``. A deleted pod reports ``TERMINATED`` on ``GET`` for
``terminate_seconds`` (inferred: the reference has the status but not its timing), then 404.
"""

from __future__ import annotations

import copy
import re
import secrets
import string
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakeclouds.base import FakeCloud, FakeInstance, Reply

API = "/v2"
CAPACITY_DETAIL = (
    "There are no longer any instances available with the requested specifications. Please refresh and try again."
)
LEVELS = ("NONE", "LOW", "MEDIUM", "HIGH")

DATA_CENTERS = {
    "US-KS-2": "US Kansas 2",
    "US-TX-3": "US Texas 3",
    "US-CA-2": "US California 2",
    "EU-RO-1": "EU Romania 1",
    "CA-MTL-1": "CA Montreal 1",
}

#: GPU type id -> GpuType (without availability) as ``GET /v2/catalog/gpus`` returns it.
CATALOG: dict[str, dict[str, Any]] = {
    "NVIDIA A100 80GB PCIe": {
        "name": "A100 PCIe",
        "pool": "AMPERE_80",
        "manufacturer": "NVIDIA",
        "memory": 80,
        "secure": True,
        "community": True,
        "price": {"secure": 1.64, "community": 0.82, "serverless": 2.72},
        "maxCount": {"secure": 8, "community": 4},
    },
    "NVIDIA H100 80GB HBM3": {
        "name": "H100 SXM",
        "pool": "HOPPER_80",
        "manufacturer": "NVIDIA",
        "memory": 80,
        "secure": True,
        "community": True,
        "price": {"secure": 2.69, "community": 1.99, "serverless": 4.18},
        "maxCount": {"secure": 8, "community": 8},
    },
    "NVIDIA GeForce RTX 4090": {
        "name": "RTX 4090",
        "pool": "ADA_24",
        "manufacturer": "NVIDIA",
        "memory": 24,
        "secure": True,
        "community": True,
        "price": {"secure": 0.69, "community": 0.34, "serverless": 1.1},
        "maxCount": {"secure": 8, "community": 4},
    },
    "NVIDIA GeForce RTX 3090": {
        "name": "RTX 3090",
        "pool": None,
        "manufacturer": "NVIDIA",
        "memory": 24,
        "secure": False,
        "community": True,
        "price": {"secure": 0.0, "community": 0.22},
        "maxCount": {"secure": 0, "community": 2},
    },
}

#: GPU type id -> cloud -> data center -> availability level, as the fake starts (tests edit ``fake.stock``).
DEFAULT_STOCK: dict[str, dict[str, dict[str, str]]] = {
    "NVIDIA A100 80GB PCIe": {"SECURE": {"US-KS-2": "HIGH", "EU-RO-1": "LOW"}, "COMMUNITY": {"CA-MTL-1": "MEDIUM"}},
    "NVIDIA H100 80GB HBM3": {"SECURE": {"US-TX-3": "NONE"}, "COMMUNITY": {}},
    "NVIDIA GeForce RTX 4090": {"SECURE": {"EU-RO-1": "HIGH"}, "COMMUNITY": {"US-CA-2": "LOW"}},
    "NVIDIA GeForce RTX 3090": {"SECURE": {}, "COMMUNITY": {"CA-MTL-1": "HIGH"}},
}

#: Keys of the closed ``CreatePodRequest`` (``unevaluatedProperties: false``).
CREATE_KEYS = frozenset(
    {
        "args",
        "disk",
        "env",
        "image",
        "ports",
        "registry",
        "name",
        "cloud",
        "cpu",
        "dataCenterIds",
        "globalNetworking",
        "gpu",
        "mounts",
        "startJupyter",
        "startSsh",
        "templateId",
    }
)
GPU_KEYS = frozenset({"id", "count", "allowedCudaVersions", "minCudaVersion"})
_PORT_RE = re.compile(r"^\d{1,5}/(tcp|http)$")


def problem(
    status: int, title: str, detail: str, errors: list[str] | None = None, *, headers: dict[str, str] | None = None
) -> Reply:
    body: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return Reply(status, body, {"Content-Type": "application/problem+json", **(headers or {})})


def not_found(detail: str = "pod not found") -> Reply:
    return problem(404, "Not Found", detail)


def bad_request(detail: str) -> Reply:
    return problem(400, "Bad Request", detail)


def invalid(errors: list[str]) -> Reply:
    return problem(422, "Unprocessable Entity", "Request validation failed.", errors)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def pod_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(14))


class FakeRunPod(FakeCloud):
    """The RunPod REST API v2 on 127.0.0.1, with the shared fault switches."""

    name = "runpod"
    contract_name = "runpod"

    def __init__(self, *, ssh_host: str = "127.0.0.1", ssh_port: int = 22) -> None:
        super().__init__(ssh_host=ssh_host, ssh_port=ssh_port)
        self.stock: dict[str, dict[str, dict[str, str]]] = copy.deepcopy(DEFAULT_STOCK)
        #: GPU type ids whose pool the account may not use (create answers 403).
        self.forbidden_gpus: set[str] = set()
        #: The key may read but not write (a Read Only key): creates and deletes answer 403.
        self.read_only = False
        #: The account's registered SSH keys, injected as PUBLIC_KEY into pods created with startSsh.
        self.account_ssh_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeAccountKey account@runpod"]
        #: Every accepted create body, in order (what the client really sent).
        self.created: list[dict[str, Any]] = []
        #: (time, method, path, query, status) of every request, for timing and query assertions.
        self.requests: list[tuple[float, str, str, dict[str, list[str]], int]] = []

    def interrupt(self, instance_id: str) -> None:
        """RunPod's API v2 creates no interruptible pods (``CreatePodRequest`` has no such field), so
        there is none to interrupt: refused, like the base fake."""
        raise ValueError(f"runpod: pod {instance_id} is on demand; API v2 has no interruptible (spot) pods")

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.stock = copy.deepcopy(DEFAULT_STOCK)
            self.forbidden_gpus = set()
            self.read_only = False
            self.created.clear()
            self.requests.clear()

    # --- protocol --------------------------------------------------------------------------------

    def authorized(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> bool:
        return headers.get("Authorization") == f"Bearer {self.api_key}"

    def unauthorized(self) -> Reply:
        return problem(401, "Unauthorized", "invalid bearer token")

    def rate_limited(self) -> Reply:
        headers = {
            "RateLimit": '"minute";r=0;t=12, "hour";r=2800;t=1812, "day";r=49500;t=45012',
            "RateLimit-Policy": '"minute";q=60;w=60, "hour";q=3000;w=3600, "day";q=50000;w=86400',
        }
        if self.faults.retry_after is not None:
            headers["Retry-After"] = f"{self.faults.retry_after:g}"
        return problem(429, "Too Many Requests", "rate limit exceeded for the minute window", headers=headers)

    def _dispatch(self, method: str, raw_path: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        if "Authorization" not in headers:
            reply = problem(401, "Unauthorized", "missing bearer token")
            with self.lock:
                self.calls.append((method, raw_path.split("?")[0], reply.status))
        else:
            reply = super()._dispatch(method, raw_path, headers, raw)
        parts = urlsplit(raw_path)
        with self.lock:
            self.requests.append((time.time(), method, parts.path, parse_qs(parts.query), reply.status))
        return reply

    def visible(self, inst: FakeInstance) -> bool:
        lingering = inst.terminated_at is None or time.time() - inst.terminated_at < self.faults.terminate_seconds
        return super().visible(inst) and lingering

    def route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Reply:
        if self.read_only and method in ("POST", "PATCH", "DELETE"):
            return problem(403, "Forbidden", "access denied")
        if path == API + "/catalog/gpus":
            return self._gpu_types(query) if method == "GET" else self._not_allowed("GET")
        if path == API + "/pods":
            if method == "GET":
                pods = [self._render(i) for i in self.instances.values() if self._listed(i)]
                return Reply(200, {"pods": pods})
            return self._create(body) if method == "POST" else self._not_allowed("GET, POST")
        if path.startswith(API + "/pods/") and "/" not in path[len(API + "/pods/") :]:
            inst = self.instances.get(path[len(API + "/pods/") :])
            if method == "GET":
                return not_found() if inst is None or not self.visible(inst) else Reply(200, self._render(inst))
            if method == "DELETE":
                return self._delete(inst)
            return self._not_allowed("GET, PATCH, DELETE")
        return not_found("resource not found")

    def _not_allowed(self, allow: str) -> Reply:
        return problem(
            405, "Method Not Allowed", "The requested method is not allowed for this path.", headers={"Allow": allow}
        )

    # --- catalog ---------------------------------------------------------------------------------

    def _gpu_types(self, query: Mapping[str, list[str]]) -> Reply:
        def one(key: str) -> str | None:
            values = query.get(key)
            return ",".join(values) if values else None

        include, product, count_s, cloud = one("include"), one("product"), one("count"), one("cloud")
        errors = []
        if include is not None and include != "AVAILABILITY":
            errors.append("$.include: value must be one of 'AVAILABILITY'")
        if product is not None and any(p not in ("POD", "CLUSTER", "SERVERLESS") for p in product.split(",")):
            errors.append("$.product: value must be one of 'POD', 'CLUSTER', 'SERVERLESS'")
        if count_s is not None and (not count_s.isdigit() or int(count_s) < 1):
            errors.append("$.count: must be an integer >= 1")
        if cloud is not None and cloud not in ("SECURE", "COMMUNITY"):
            errors.append("$.cloud: value must be one of 'SECURE', 'COMMUNITY'")
        if errors:
            return invalid(errors)
        if include and not product:
            return bad_request("product is required with include=AVAILABILITY")
        if not include and (product or count_s or cloud):
            return bad_request("product, count and cloud are valid only with include=AVAILABILITY")
        gpus = []
        for gpu_id, gpu in CATALOG.items():
            item = {"id": gpu_id, **copy.deepcopy(gpu)}
            if include:
                item.update(self._availability(gpu_id, cloud or "SECURE", int(count_s or 1)))
            gpus.append(item)
        return Reply(200, {"gpus": gpus})

    def _levels(self, gpu_id: str, cloud: str, count: int) -> dict[str, str]:
        """Data center -> availability for ``count`` GPUs of a type in a cloud (empty: offered nowhere)."""
        gpu = CATALOG[gpu_id]
        key = cloud.lower()
        if not gpu[key] or count > gpu["maxCount"][key]:
            return {}
        levels = dict(self.stock.get(gpu_id, {}).get(cloud) or {})
        return {dc: "NONE" for dc in levels} if self.faults.no_capacity else levels

    def _availability(self, gpu_id: str, cloud: str, count: int) -> dict[str, Any]:
        levels = self._levels(gpu_id, cloud, count)
        overall = max(levels.values(), key=LEVELS.index, default="NONE")
        out: dict[str, Any] = {"availability": overall}
        if levels:
            out["dataCenters"] = [
                {"id": dc, "name": DATA_CENTERS.get(dc, dc), "availability": level} for dc, level in levels.items()
            ]
        return out

    # --- pods ------------------------------------------------------------------------------------

    def _validate(self, body: Any) -> list[str]:
        if not isinstance(body, dict):
            return ["$: value must be an object"]
        errors = [f"$: additional properties '{k}' not allowed" for k in body if k not in CREATE_KEYS]
        name = body.get("name")
        if name is None:
            errors.append("$: missing property 'name'")
        elif not isinstance(name, str) or not name:
            errors.append("$.name: must be a non-empty string")
        if "image" not in body and "templateId" not in body:
            errors.append("$: missing property 'image'")
        elif "image" in body and not isinstance(body["image"], str):
            errors.append("$.image: must be a string")
        if "disk" in body and (not isinstance(body["disk"], int) or isinstance(body["disk"], bool) or body["disk"] < 1):
            errors.append("$.disk: must be an integer >= 1")
        ports = body.get("ports", [])
        if not isinstance(ports, list) or not all(isinstance(p, str) and _PORT_RE.match(p) for p in ports):
            errors.append("$.ports: must be an array of 'port/protocol' strings (protocol tcp or http)")
        env = body.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            errors.append("$.env: must be an object of string values")
        if body.get("cloud", "SECURE") not in ("SECURE", "COMMUNITY"):
            errors.append("$.cloud: value must be one of 'SECURE', 'COMMUNITY'")
        dcs = body.get("dataCenterIds", [])
        if not isinstance(dcs, list) or not all(isinstance(d, str) for d in dcs):
            errors.append("$.dataCenterIds: must be an array of strings")
        for flag in ("startSsh", "startJupyter", "globalNetworking"):
            if flag in body and not isinstance(body[flag], bool):
                errors.append(f"$.{flag}: must be a boolean")
        errors += self._validate_gpu(body.get("gpu"))
        errors += self._validate_mounts(body.get("mounts"))
        return errors

    def _validate_gpu(self, gpu: Any) -> list[str]:
        if gpu is None:
            return []
        if not isinstance(gpu, dict):
            return ["$.gpu: must be an object"]
        errors = [f"$.gpu: additional properties '{k}' not allowed" for k in gpu if k not in GPU_KEYS]
        if not isinstance(gpu.get("id"), str) or not gpu["id"]:
            errors.append("$.gpu: missing property 'id'")
        count = gpu.get("count", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            errors.append("$.gpu.count: must be an integer >= 1")
        return errors

    def _validate_mounts(self, mounts: Any) -> list[str]:
        if mounts is None:
            return []
        if not isinstance(mounts, dict):
            return ["$.mounts: must be an object"]
        errors = [
            f"$.mounts: additional properties '{k}' not allowed" for k in mounts if k not in ("persistent", "network")
        ]
        persistent = mounts.get("persistent")
        if persistent is not None:
            if not isinstance(persistent, dict) or set(persistent) != {"size", "path"}:
                errors.append("$.mounts.persistent: must have exactly 'size' and 'path'")
            elif not isinstance(persistent["size"], int) or persistent["size"] < 10:
                errors.append("$.mounts.persistent.size: must be an integer >= 10")
        network = mounts.get("network")
        if network is not None and (not isinstance(network, list) or len(network) > 1):
            errors.append("$.mounts.network: must be an array of at most 1 item")
        return errors

    def _create(self, body: Any) -> Reply:
        errors = self._validate(body)
        if errors:
            return invalid(errors)
        if ("gpu" in body) == ("cpu" in body):
            return bad_request("exactly one of gpu or cpu must be set")
        if "cpu" in body:
            return bad_request("CPU pods are not available in this fake")
        if "templateId" in body:
            return not_found("template not found")
        mounts = body.get("mounts") or {}
        if "persistent" in mounts and "network" in mounts:
            return bad_request("mounts.persistent and mounts.network are mutually exclusive")
        gpu_id, count = body["gpu"]["id"], int(body["gpu"].get("count", 1))
        cloud = body.get("cloud", "SECURE")
        if gpu_id not in CATALOG:
            return bad_request(f"unknown GPU type {gpu_id!r}")
        if gpu_id in self.forbidden_gpus:
            return problem(403, "Forbidden", "access denied")
        refused = self.capacity_refused()
        wanted = body.get("dataCenterIds") or []
        levels = {
            dc: level
            for dc, level in self._levels(gpu_id, cloud, count).items()
            if level != "NONE" and (not wanted or dc in wanted)
        }
        if refused or not levels:
            return bad_request(CAPACITY_DETAIL)
        dc = max(levels, key=lambda d: LEVELS.index(levels[d]))
        env = dict(body.get("env") or {})
        if body.get("startSsh") and "PUBLIC_KEY" not in env and self.account_ssh_keys:
            env["PUBLIC_KEY"] = "\n".join(self.account_ssh_keys)
        price = CATALOG[gpu_id]["price"][cloud.lower()]
        inst = FakeInstance(
            id=pod_id(),
            name=body["name"],
            instance_type=gpu_id,
            region=dc,
            price_per_hour=round(price * count, 4),
            extra={
                "count": count,
                "cloud": cloud,
                "image": body.get("image") or "",
                "args": body.get("args") or "",
                "disk": body.get("disk", 50),
                "ports": list(body.get("ports") or []),
                "env": env,
                "mounts": copy.deepcopy(mounts),
            },
        )
        self.instances[inst.id] = inst
        self.created.append(copy.deepcopy(body))
        if self.faults.error_after_create > 0:
            self.faults.error_after_create -= 1
            return problem(500, "Internal Server Error", "upstream request failed")
        return Reply(201, self._render(inst, status="PROVISIONING"))

    def _delete(self, inst: FakeInstance | None) -> Reply:
        if self.faults.terminate_fail > 0:
            self.faults.terminate_fail -= 1
            return problem(500, "Internal Server Error", "upstream request failed")
        if inst is None or not self.visible(inst) or inst.terminate_requested_at is not None:
            return not_found()
        # A 204 means the pod is gone (billing stops); GET still shows it TERMINATED for a while.
        inst.terminate_requested_at = inst.terminated_at = time.time()
        self.power_off(inst)
        return Reply(204)

    def _listed(self, inst: FakeInstance) -> bool:
        return self.visible(inst) and inst.terminate_requested_at is None

    # --- rendering -------------------------------------------------------------------------------

    def _status(self, inst: FakeInstance) -> tuple[str, bool]:
        """The pod's status now, and whether its ports are published."""
        phase = inst.phase(self.faults)
        if phase == "booting":
            elapsed = (time.time() - inst.launched_at) / max(self.faults.boot_seconds, 1e-9)
            return ("PROVISIONING" if elapsed < 1 / 3 else "STARTING" if elapsed < 2 / 3 else "RUNNING"), False
        if phase == "running":
            return "RUNNING", True
        if phase == "unhealthy":
            return "ERROR", False
        return "TERMINATED", False

    def _render(self, inst: FakeInstance, status: str | None = None) -> dict[str, Any]:
        published = False
        if status is None:
            status, published = self._status(inst)
        extra = inst.extra
        mapped = published and "22/tcp" in extra["ports"]
        actions = {
            "PROVISIONING": ["start", "terminate"],
            "STARTING": ["stop", "terminate"],
            "RUNNING": ["stop", "restart", "terminate"],
            "EXITED": ["start", "terminate"],
            "ERROR": ["terminate"],
            "TERMINATED": [],
        }[status]
        proxy = None
        if status != "PROVISIONING":
            user = f"{inst.id}-{inst.id[:8]}"
            proxy = {"host": "ssh.runpod.io", "port": 22, "username": user, "command": f"ssh {user}@ssh.runpod.io"}
        direct = None
        runtime = None
        if mapped:
            direct = {
                "host": self.ssh_host,
                "port": self.ssh_port,
                "username": "root",
                "command": f"ssh root@{self.ssh_host} -p {self.ssh_port}",
            }
            runtime = {
                "uptime": int(time.time() - inst.launched_at),
                "gpus": [{"util": 0, "memoryUtil": 0} for _ in range(extra["count"])],
                "cpu": {"util": 0},
                "memory": {"util": 0},
                "ports": [{"private": 22, "public": self.ssh_port, "type": "tcp", "ip": self.ssh_host}],
            }
        return {
            "id": inst.id,
            "name": inst.name,
            "image": extra["image"],
            "args": extra["args"],
            "disk": extra["disk"],
            "ports": list(extra["ports"]),
            "env": dict(extra["env"]),
            "registry": None,
            "status": status,
            "actions": actions,
            "mounts": copy.deepcopy(extra["mounts"]),
            "gpu": {"id": inst.instance_type, "count": extra["count"]},
            "cloud": extra["cloud"],
            "dataCenterId": inst.region,
            "cudaVersion": "12.8",
            "ssh": {"proxy": proxy, "direct": direct},
            "template": None,
            "cost": 0.0 if status in ("EXITED", "TERMINATED") else inst.price_per_hour,
            "locked": False,
            "globalNetworking": {"enabled": False},
            "runtime": runtime,
            "createdAt": iso(inst.launched_at),
            "startedAt": None if status == "PROVISIONING" else iso(inst.launched_at),
        }
