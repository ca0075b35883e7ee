"""``FakeVast``: a local stand-in for the Vast.ai REST API v0, speaking it as documented.

Shapes follow Vast.ai's API reference (https://docs.vast.ai/api-reference: create instance,
show instance(s), destroy instance, "Rate limits and errors") and the official CLI
(vast-ai/vast-python ``vast.py``):

- every path under ``/api/v0``; auth ``Authorization: Bearer <key>`` or ``?api_key=<key>``; a bad
  key answers 401 ``{"success": false, "msg": "Invalid user key"}``.
- search: ``POST /bundles/`` with the query object as body (the CLI), ``GET /bundles/?q=<json>``
  (the REST quick example) and ``PUT /search/asks/`` ``{"select_cols": ["*"], "q": query}`` (the
  CLI's ``--new``) -> ``{"offers": [Ask]}``. Query: ``{field: {op: value}}`` with ops ``eq, neq,
  gt, gte, lt, lte, in, notin`` on ask fields (an unknown field answers 400 ``invalid_args``),
  ``type`` (``on-demand``, ``bid``, ``reserved``; ``interruptible`` is the CLI's alias of
  ``bid``), ``order`` ``[[field, "asc"|"desc"]]``, ``limit``; ``allocated_storage`` is accepted
  (prices here do not depend on it). Not rentable asks are listed with ``rentable: false`` unless
  the query filters on ``rentable``.
- ``PUT /asks/{id}/`` ``{client_id, image, label, disk, runtype, onstart, env, price?}`` ->
  ``{"success": true, "new_contract": <id>}``; an ask that is rented, not rentable, or refused by
  the ``refuse_launch`` switch answers 410 ``{"success": false, "error": "no_such_ask", "msg":
  "error 410/3907: no_such_ask Instance type N is no longer available.", "ask_id": N}``; an id that
  was never an ask answers 404 ``invalid_args`` ``... no_such_ask Instance type by id N is not
  available.``; a malformed body or a bid under ``min_bid`` answers 400 ``invalid_args``.
- ``GET /instances/`` -> ``{"instances_found": n, "instances": [Instance]}``;
  ``GET /instances/{id}/`` -> ``{"instances": Instance}``; destroyed or vanished instances are not
  listed and answer 404 ``no_such_instance`` (or ``{"instances": null}`` with
  ``destroyed_as_null``, which Vast has also been seen to answer).
- ``DELETE /instances/{id}/`` -> ``{"success": true, "msg": ...}``; again while it is being
  destroyed: the same; unknown or gone: 404 ``no_such_instance``.

Rate limiting answers 429 with a plain-text body ("API requests too frequent: endpoint
threshold=...") as Vast does; Vast sends no ``Retry-After``, the fake adds one only when the test
switch ``faults.retry_after`` is set. Instance phases map to Vast fields: booting -> ``actual_status``
null then ``loading`` (no ``ssh_host`` yet), running -> ``running`` with ``ssh_host``/``ssh_port`` =
the fake's SSH endpoint, unhealthy -> ``exited``, terminating -> ``cur_state`` ``unloaded`` (released
on destroy). A rented ask is not rentable until its instance is destroyed.

Outbidding, the test control :meth:`FakeVast.interrupt`: an interruptible (bid) instance loses its
machine to a higher-priority rental and is stopped, not destroyed ("When outbid, the instance moves
to ``stopped``", vast-ai/vast-cli ``vastai/SKILL.md``; "Your interruptible instance was outbid and
paused", the ``client:outbid`` notification in docs.vast.ai): ``actual_status`` ``stopped`` while
``intended_status`` stays ``running`` (the renter did not stop it; ``intended_status`` is "the
user's desired target state", show-instance reference) and ``cur_state`` ``stopped`` (inferred:
the contract no longer holds the GPUs). Vast documents no ``status_msg`` for it: the control takes
one, else none is sent. The machine stays with whoever outbid us, so destroying the instance does not
free the ask. On-demand instances cannot be outbid.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from typing import Any

from tests.fakeclouds.base import FakeCloud, FakeInstance, Reply

API = "/api/v0"

_ASK_DEFAULTS: dict[str, Any] = {
    "cpu_cores": 16,
    "cpu_cores_effective": 16,
    "cpu_ram": 64000,
    "cuda_max_good": 12.4,
    "datacenter": False,
    "direct_port_count": 20,
    "disk_space": 250.0,
    "driver_version": "550.120",
    "external": False,
    "inet_down": 900.0,
    "inet_up": 500.0,
    "reliability": 0.995,
    "rentable": True,
    "rented": False,
    "storage_cost": 0.15,
    "verified": True,
    "verification": "verified",
}


def _ask(
    ask_id: int, gpu_name: str, num_gpus: int, dph: float, min_bid: float, geo: str, **more: Any
) -> dict[str, Any]:
    ask = {
        **_ASK_DEFAULTS,
        "id": ask_id,
        "ask_contract_id": ask_id,
        "bundle_id": ask_id * 10,
        "machine_id": ask_id - 4000 + 30000,
        "host_id": 900 + ask_id % 100,
        "gpu_name": gpu_name,
        "num_gpus": num_gpus,
        "gpu_ram": 80000 if ("H100" in gpu_name or "A100" in gpu_name) else 24564,
        "dph_base": round(dph - 0.01, 4),
        "dph_total": dph,
        "min_bid": min_bid,
        "geolocation": geo,
        **more,
    }
    ask["gpu_total_ram"] = ask["gpu_ram"] * num_gpus
    if not ask["verified"]:
        ask["verification"] = "unverified"
    return ask


#: The asks the fake starts with (tests edit ``fake.asks``): each is one machine.
DEFAULT_ASKS: list[dict[str, Any]] = [
    _ask(4101, "RTX 4090", 1, 0.35, 0.20, "Sweden, SE"),
    _ask(4102, "RTX 4090", 1, 0.42, 0.25, "Texas, US"),
    _ask(4201, "A100 SXM4", 1, 1.10, 0.60, "US"),
    _ask(4202, "A100 SXM4", 1, 1.25, 0.70, "Quebec, CA"),
    _ask(4301, "H100 SXM", 1, 2.20, 1.40, "US"),
    _ask(4308, "H100 SXM", 8, 17.60, 11.00, "Texas, US", disk_space=2000.0, datacenter=True),
    _ask(4050, "RTX 3090", 1, 0.15, 0.08, "Ontario, CA", verified=False),
]

_QUERY_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling", "select_cols"}
_RUNTYPES = {
    "ssh",
    "jupyter",
    "args",
    "ssh_proxy",
    "ssh_direct",
    "ssh_direc ssh_proxy",
    "jupyter_proxy",
    "jupyter_direct",
}


def fail(status: int, error: str | None, msg: str, **more: Any) -> Reply:
    body: dict[str, Any] = {"success": False}
    if error:
        body["error"] = error
    body["msg"] = msg
    body.update(more)
    return Reply(status, body)


def invalid(msg: str) -> Reply:
    return fail(400, "invalid_args", msg)


def no_such_instance(instance_id: str) -> Reply:
    return fail(404, "no_such_instance", f"Instance {instance_id} not found.")


def server_error() -> Reply:
    return fail(500, "server_error", "Internal server error, please try again later.")


def _matches(value: Any, op: str, operand: Any) -> bool:
    if op == "eq":
        return bool(value == operand)
    if op == "neq":
        return bool(value != operand)
    if op == "in":
        return value in operand
    if op == "notin":
        return value not in operand
    if value is None:
        return False
    try:
        if op == "gt":
            return bool(value > operand)
        if op == "gte":
            return bool(value >= operand)
        if op == "lt":
            return bool(value < operand)
        if op == "lte":
            return bool(value <= operand)
    except TypeError:
        return False
    raise ValueError(f"unknown operator {op!r}")


def _sort_key(row: dict[str, Any], field: str) -> tuple[bool, Any]:
    value = row.get(field)
    return value is None, 0 if value is None else value


class FakeVast(FakeCloud):
    """The Vast.ai API v0 on 127.0.0.1, with the shared fault switches."""

    name = "vast"

    def __init__(self, *, ssh_host: str = "127.0.0.1", ssh_port: int = 22) -> None:
        super().__init__(ssh_host=ssh_host, ssh_port=ssh_port)
        self.asks: list[dict[str, Any]] = copy.deepcopy(DEFAULT_ASKS)
        #: Answer ``{"instances": null}`` (200) instead of 404 for a destroyed or vanished instance.
        self.destroyed_as_null = False
        #: (time, method, path, status) of every request, for timing assertions.
        self.timed_calls: list[tuple[float, str, str, int]] = []
        #: The search queries received, in order.
        self.queries: list[dict[str, Any]] = []
        self._contract = 9_100_000

    def reset(self) -> None:
        with self.lock:
            super().reset()
            self.asks = copy.deepcopy(DEFAULT_ASKS)
            self.destroyed_as_null = False
            self.timed_calls.clear()
            self.queries.clear()

    def ask(self, ask_id: int) -> dict[str, Any]:
        return next(a for a in self.asks if a["id"] == ask_id)

    def interrupt(self, instance_id: str, status_msg: str | None = None) -> None:
        """Outbid an interruptible instance: Vast stops it (test control; see the module docstring)."""
        with self.lock:
            inst = self.instances.get(str(instance_id))
            if inst is None or not self._listed(inst) or inst.terminate_requested_at is not None:
                raise ValueError(f"no live instance {instance_id}")
            if not inst.spot:
                raise ValueError(f"instance {instance_id} is on demand: only interruptible (bid) instances are outbid")
            inst.extra["outbid"] = {"at": time.time(), "status_msg": status_msg}

    # --- protocol --------------------------------------------------------------------------------

    def authorized(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> bool:
        if headers.get("Authorization") == f"Bearer {self.api_key}":
            return True
        return query.get("api_key", [""])[0] == self.api_key

    def unauthorized(self) -> Reply:
        return fail(401, None, "Invalid user key")

    def rate_limited(self) -> Reply:
        headers = {} if self.faults.retry_after is None else {"Retry-After": f"{self.faults.retry_after:g}"}
        return Reply(429, "API requests too frequent: endpoint threshold=1.0s", headers)

    def _dispatch(self, method: str, raw_path: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        reply = super()._dispatch(method, raw_path, headers, raw)
        with self.lock:
            self.timed_calls.append((time.time(), method, raw_path.split("?")[0], reply.status))
        return reply

    def route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Reply:
        if not path.startswith(API + "/"):
            return fail(404, "not_found", f"No API endpoint {path}.")
        path = path[len(API) :]
        if path == "/bundles/" and method == "POST":
            return self._search(body)
        if path == "/bundles/" and method == "GET":
            try:
                q = json.loads(query.get("q", ["{}"])[0])
            except ValueError:
                return invalid("q is not valid JSON.")
            return self._search(q)
        if path == "/search/asks/" and method == "PUT":
            return self._search(body.get("q") if isinstance(body, dict) else None)
        if path.startswith("/asks/") and method == "PUT":
            return self._create(path[len("/asks/") :].strip("/"), body)
        if path == "/instances/" and method == "GET":
            shown = [self._render(i) for i in self.instances.values() if self._listed(i)]
            return Reply(200, {"instances_found": len(shown), "instances": shown})
        if path.startswith("/instances/") and method in ("GET", "DELETE"):
            instance_id = path[len("/instances/") :].strip("/")
            if method == "GET":
                return self._show(instance_id)
            return self._destroy(instance_id)
        return fail(404, "not_found", f"No API endpoint {method} {API}{path}.")

    # --- offers ----------------------------------------------------------------------------------

    def _rentable(self, ask: dict[str, Any]) -> bool:
        return bool(ask.get("rentable")) and not ask.get("rented") and not self.faults.no_capacity

    def _render_ask(self, ask: dict[str, Any], kind: str) -> dict[str, Any]:
        data = copy.deepcopy(ask)
        rentable = self._rentable(ask)
        data["rentable"] = rentable
        data["rented"] = bool(ask.get("rented"))
        data["is_bid"] = kind == "bid"
        return data

    def _search(self, query: Any) -> Reply:
        if not isinstance(query, dict):
            return invalid("The search query must be a JSON object.")
        self.queries.append(copy.deepcopy(query))
        kind = query.get("type") or "on-demand"
        if kind == "interruptible":
            kind = "bid"
        if kind not in ("on-demand", "bid", "reserved"):
            return invalid(f"Unknown offer type {kind!r}.")
        rows = [self._render_ask(a, kind) for a in self.asks if kind != "bid" or a.get("min_bid") is not None]
        for field, condition in query.items():
            if field in _QUERY_KEYS:
                continue
            if field not in _ASK_DEFAULTS and not any(field in a for a in self.asks):
                return invalid(f"Unknown search field {field!r}.")
            if not isinstance(condition, dict):
                condition = {"eq": condition}
            try:
                rows = [r for r in rows if all(_matches(r.get(field), op, v) for op, v in condition.items())]
            except ValueError as err:
                return invalid(f"{field}: {err}.")
        for order in reversed(query.get("order") or []):
            field, direction = [*order, "asc"][:2] if isinstance(order, list) else (order, "asc")
            rows.sort(key=lambda row: _sort_key(row, str(field)), reverse=direction == "desc")
        limit = query.get("limit")
        if isinstance(limit, int) and limit > 0:
            rows = rows[:limit]
        return Reply(200, {"offers": rows})

    # --- create ----------------------------------------------------------------------------------

    def _create(self, raw_id: str, body: Any) -> Reply:
        if not raw_id.isdigit():
            return invalid(f"Invalid ask id {raw_id!r}.")
        ask_id = int(raw_id)
        if not isinstance(body, dict):
            return invalid("The request body must be a JSON object.")
        image = body.get("image")
        label = body.get("label")
        disk = body.get("disk", 8)
        runtype = body.get("runtype", "ssh")
        price = body.get("price")
        env = body.get("env", {})
        if body.get("client_id", "me") != "me":
            return invalid("client_id must be 'me'.")
        if not (isinstance(image, str) and image) and not body.get("template_hash_id"):
            return invalid("image is required (or template_hash_id).")
        if label is not None and not isinstance(label, str):
            return invalid("label must be a string.")
        if not isinstance(disk, (int, float)) or isinstance(disk, bool) or disk <= 0:
            return invalid("disk must be a positive number of GB.")
        if runtype not in _RUNTYPES:
            return invalid(f"Unknown runtype {runtype!r}.")
        if not isinstance(env, dict):
            return invalid("env must be a JSON object.")
        if price is not None and (not isinstance(price, (int, float)) or isinstance(price, bool) or price <= 0):
            return invalid("price must be a positive number ($/hour).")
        ask = next((a for a in self.asks if a["id"] == ask_id), None)
        if ask is None:
            return fail(
                404,
                "invalid_args",
                f"error 404/3603: no_such_ask Instance type by id {ask_id} is not available.",
                ask_id=ask_id,
            )
        refused = self.capacity_refused()
        if refused or not self._rentable(ask):
            return fail(
                410,
                "no_such_ask",
                f"error 410/3907: no_such_ask Instance type {ask_id} is no longer available.",
                ask_id=ask_id,
            )
        if price is not None and (ask.get("min_bid") is None or price < ask["min_bid"]):
            return invalid(f"Bid price {price} is below the minimum bid {ask.get('min_bid')} for ask {ask_id}.")
        if disk > ask["disk_space"]:
            return invalid(f"Requested disk {disk} GB exceeds the {ask['disk_space']} GB available on ask {ask_id}.")
        self._contract += 1
        inst = FakeInstance(
            id=str(self._contract),
            name=label or "",
            instance_type=f"{ask['num_gpus']}x {ask['gpu_name']}",
            region=ask["geolocation"],
            price_per_hour=float(price if price is not None else ask["dph_total"]),
            spot=price is not None,
            extra={"ask": copy.deepcopy(ask), "request": copy.deepcopy(body)},
        )
        self.instances[inst.id] = inst
        ask["rented"] = True
        if self.faults.error_after_create > 0:
            self.faults.error_after_create -= 1
            return server_error()
        return Reply(200, {"success": True, "new_contract": int(inst.id)})

    # --- instances -------------------------------------------------------------------------------

    def _listed(self, inst: FakeInstance) -> bool:
        if not self.visible(inst):
            return False
        return inst.phase(self.faults) != "terminated"

    def _show(self, instance_id: str) -> Reply:
        inst = self.instances.get(instance_id)
        if inst is None or not self._listed(inst):
            if inst is not None and self.destroyed_as_null:
                return Reply(200, {"instances": None})
            return no_such_instance(instance_id)
        return Reply(200, {"instances": self._render(inst)})

    def _destroy(self, instance_id: str) -> Reply:
        if self.faults.terminate_fail > 0:
            self.faults.terminate_fail -= 1
            return server_error()
        inst = self.instances.get(instance_id)
        if inst is None or not self._listed(inst):
            return no_such_instance(instance_id)
        if inst.terminate_requested_at is None:
            inst.terminate_requested_at = time.time()
            self.power_off(inst)
            ask_id = inst.extra["ask"]["id"]
            for ask in self.asks:
                if ask["id"] == ask_id and "outbid" not in inst.extra:  # else the one who outbid us has it
                    ask["rented"] = False  # the machine is free again
        return Reply(200, {"success": True, "msg": f"destroying instance {instance_id}."})

    def _render(self, inst: FakeInstance) -> dict[str, Any]:
        phase = inst.phase(self.faults)
        ask = inst.extra["ask"]
        request = inst.extra["request"]
        image = str(request.get("image") or "")
        booted = phase in ("running", "unhealthy")
        actual: str | None
        cur_state = intended = "running"
        if "outbid" in inst.extra and phase != "terminating":  # stopped by Vast; still wanted running
            actual, status_msg, cur_state = "stopped", inst.extra["outbid"]["status_msg"], "stopped"
        elif phase == "booting":
            early = time.time() - inst.launched_at < self.faults.boot_seconds / 2
            actual = None if early else "loading"
            status_msg = "" if early else f"Pulling image {image}"
        elif phase == "running":
            actual, status_msg = "running", f"success, running {image}/ssh"
        elif phase == "unhealthy":
            actual, status_msg = "exited", "Error: container exited unexpectedly (code 137)"
        else:  # terminating: the contract is being released
            actual, status_msg = "stopped", "destroying"
            cur_state, intended = "unloaded", "stopped"
        env = request.get("env") or {}
        return {
            "id": int(inst.id),
            "label": inst.name or None,
            "actual_status": actual,
            "cur_state": cur_state,
            "next_state": cur_state,
            "intended_status": intended,
            "status_msg": status_msg,
            "image_uuid": image,
            "image_runtype": request.get("runtype", "ssh"),
            "image_args": [],
            "extra_env": [[k, str(v)] for k, v in env.items()],
            "onstart": request.get("onstart") or "",
            "ssh_host": self.ssh_host if booted else None,
            "ssh_port": self.ssh_port if booted else None,
            "ssh_idx": "1" if booted else None,
            "public_ipaddr": self.ssh_host if booted else None,
            "local_ipaddrs": "10.0.0.5 172.17.0.2" if booted else None,
            "machine_id": ask["machine_id"],
            "host_id": ask["host_id"],
            "start_date": inst.launched_at,
            "uptime_mins": (time.time() - inst.launched_at) / 60 if booted else None,
            "gpu_name": ask["gpu_name"],
            "num_gpus": ask["num_gpus"],
            "gpu_ram": ask["gpu_ram"],
            "gpu_totalram": ask["gpu_total_ram"],
            "cpu_cores": ask["cpu_cores"],
            "cpu_ram": ask["cpu_ram"],
            "disk_space": request.get("disk", 8),
            "dph_base": inst.price_per_hour if inst.spot else ask["dph_base"],
            "dph_total": inst.price_per_hour,
            "is_bid": inst.spot,
            "min_bid": ask["min_bid"],
            "geolocation": inst.region,
            "verification": ask["verification"],
            "ports": {},
            "template_hash_id": request.get("template_hash_id"),
            "jupyter_token": f"tok{inst.id}",
        }
