"""``FakeVast``: a local stand-in for the Vast.ai REST API, speaking it as Vast publishes it today.

Checked against Vast's OpenAPI document (``tests/contracts/vast.openapi.json``, from ``vast-ai/docs``
``api-reference/openapi.yaml``) on every request and answer, and shaped after the calls the official
client makes (``vast-ai/vast-cli`` ``vastai/api``: ``search_offers``, ``create_instance``,
``show_instance``, ``show_instances``, ``destroy_instance``):

- auth ``Authorization: Bearer <key>``; a bad key answers 401 ``{"success": false, "error":
  "auth_error", "msg": "Invalid user key"}``, except ``POST /api/v0/bundles/``, whose spec declares
  that answer as a 404 ("Unauthorized - invalid or missing API key").
- ``POST /api/v0/bundles/`` (``searchOffers``): ``{field: {op: value}}`` with ops ``eq, neq, gt, gte,
  lt, lte, in, notin`` on ask fields (an unknown field answers 400 ``invalid_request``), ``type``
  (``on-demand``/``ondemand``, ``bid``, ``reserved``), ``order`` ``[[field, "asc"|"desc"]]``,
  ``limit``, ``allocated_storage``. ``verified``, ``rentable`` and ``rented`` default to the spec's
  ``{"eq": true}``, ``{"eq": true}``, ``{"eq": false}``: an ask that cannot be rented is not listed
  unless the query asks for it.
- ``PUT /api/v0/asks/{id}/`` (``createInstance``) -> ``{"success": true, "new_contract": <id>}``;
  an ask rented meanwhile (or refused by ``refuse_launch``) answers the spec's 410 ``no_such_ask``;
  an id that was never an ask the spec's 404 ``invalid_args`` ``no_such_ask ... is not available``;
  a bad body or a bid under ``min_bid`` 400 ``invalid_args`` (``invalid_price``).
- ``GET /api/v1/instances/`` (``showInstances``): keyset pages of at most 25 (``limit`` default 25,
  ``<= 0`` means 5), ``order_by`` (JSON, ``id`` always appended), ``select_filters`` (JSON; ``label``,
  ``actual_status``, ``gpu_name``, ``verification``, ``id``; computed columns such as ``dph_total``
  answer 400 ``invalid_request``), ``after_token`` (a bad one: 400 ``invalid_token``) ->
  ``{success, instances_found, total_instances, label_counts, next_token, instances}``.
- ``GET /api/v0/instances/`` (the old listing, ``?owner=me``): gone from the spec; answers 410
  ``deprecated_endpoint`` as issue 22 reports the live API does (an assumption the contract check
  records: the spec documents no answer at all).
- ``GET /api/v0/instances/{id}/`` (``showInstance``) -> ``{"instances": Instance}``; for a destroyed
  or vanished instance the spec declares nothing: the fake answers 404 ``no_such_instance``, or
  ``{"instances": null}`` with ``destroyed_as_null`` (the official client reads that shape as
  "gone"), both marked assumed.
- ``DELETE /api/v0/instances/{id}/`` -> ``{"success": true, "msg": ...}``; again while it is being
  destroyed: the same; unknown or gone: the spec's 404 ``not_found``.

Rate limiting answers 429 ``{"detail": "API requests too frequent endpoint threshold=..."}``, the
shape the spec declares; operations that declare no 429 (``searchOffers``) get the same, marked
assumed. Vast sends no ``Retry-After``; the fake adds one only when ``faults.retry_after`` is set.
Fields whose spec type is not nullable (``ssh_host``, ``ssh_port``, ``public_ipaddr``) are left out
until the instance has them, never sent as null. Instance phases map to Vast fields: booting ->
``actual_status`` null then ``loading``, running -> ``running`` with ``ssh_host``/``ssh_port`` = the
fake's SSH endpoint, unhealthy -> ``exited``, terminating -> ``cur_state`` ``unloaded``. A rented
ask is not rentable until its instance is destroyed.

Outbidding, the test control :meth:`FakeVast.interrupt`: an interruptible (bid) instance loses its
machine to a higher-priority rental and is stopped, not destroyed ("When outbid, the instance moves
to ``stopped``", vast-ai/vast-cli ``vastai/SKILL.md``; "Your interruptible instance was outbid and
paused", the ``client:outbid`` notification in docs.vast.ai): ``actual_status`` ``stopped`` while
``intended_status`` stays ``running`` and ``cur_state`` ``stopped`` (inferred: the contract no
longer holds the GPUs). The machine stays with whoever outbid us, so destroying the instance does
not free the ask. On-demand instances cannot be outbid.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Mapping
from typing import Any

from tests.fakeclouds.base import FakeCloud, FakeInstance, Reply

API = "/api/v0"
API_V1 = "/api/v1"
#: The most instances one ``GET /api/v1/instances/`` page holds (the spec's ``limit`` maximum).
PAGE_SIZE = 25
#: Columns ``select_filters`` may filter on (stored on the contract; computed ones answer 400).
FILTERABLE = frozenset({"actual_status", "gpu_name", "verification", "id", "label", "machine_id", "is_bid"})
DEPRECATED_LISTING = (
    "the v0 instance listing is no longer in Vast's OpenAPI (deprecated 2026-03-25); issue 22 reports "
    "the live API answering it 410 deprecated_endpoint"
)

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

_QUERY_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
#: The spec's defaults of the search filters a query leaves out.
_NOT_NULLABLE = frozenset(
    {"ssh_host", "ssh_port", "ssh_idx", "public_ipaddr", "local_ipaddrs", "min_bid", "onstart", "image_uuid"}
)
_SEARCH_DEFAULTS = {"verified": {"eq": True}, "rentable": {"eq": True}, "rented": {"eq": False}}
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


def invalid_request(msg: str) -> Reply:
    return Reply(400, {"error": "invalid_request", "msg": msg})


def no_such_instance(instance_id: str) -> Reply:
    reply = fail(404, "no_such_instance", f"Instance {instance_id} not found.")
    reply.assumed = "showInstance declares no answer for a destroyed instance"
    return reply


def server_error() -> Reply:
    reply = fail(500, "server_error", "Internal server error, please try again later.")
    reply.assumed = "Vast's spec declares no 5xx answers (a fault switch)"
    return reply


def _token(instance_id: int) -> str:
    return base64.b64encode(json.dumps({"values": {"id": instance_id}}).encode()).decode()


def _untoken(token: str) -> int | None:
    try:
        value = json.loads(base64.b64decode(token.encode(), validate=True))["values"]["id"]
    except (ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) else None


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
    contract_name = "vast"

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

    def add_foreign_instances(self, count: int, label: str | None = "someone-elses-notebook") -> list[str]:
        """Rent ``count`` instances in the account that are not ours (test control: a busy account
        whose listing runs over several pages). They stay running until destroyed."""
        ids = []
        with self.lock:
            ask = self.asks[0]
            for n in range(count):
                self._contract += 1
                inst = FakeInstance(
                    id=str(self._contract),
                    name=f"{label}-{n}" if label else "",
                    instance_type=f"{ask['num_gpus']}x {ask['gpu_name']}",
                    region=ask["geolocation"],
                    price_per_hour=float(ask["dph_total"]),
                    launched_at=time.time() - 3600,
                    extra={"ask": copy.deepcopy(ask), "request": {"image": "vastai/base-image", "runtype": "ssh"}},
                )
                self.instances[inst.id] = inst
                ids.append(inst.id)
        return ids

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
        return fail(401, "auth_error", "Invalid user key")

    def unauthorized_for(self, method: str, path: str) -> Reply:
        if method == "POST" and path.rstrip("/") == API + "/bundles":
            return Reply(404, {"error": "auth_error", "msg": "Invalid user key"})  # as searchOffers declares it
        return self.unauthorized()

    def rate_limited(self) -> Reply:
        headers = {} if self.faults.retry_after is None else {"Retry-After": f"{self.faults.retry_after:g}"}
        return Reply(
            429,
            {"detail": "API requests too frequent endpoint threshold=1.0"},
            headers,
            assumed="some operations (searchOffers) declare no 429; answered as the others declare it",
        )

    def _dispatch(self, method: str, raw_path: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        reply = super()._dispatch(method, raw_path, headers, raw)
        with self.lock:
            self.timed_calls.append((time.time(), method, raw_path.split("?")[0], reply.status))
        return reply

    def route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Reply:
        if path.rstrip("/") == API_V1 + "/instances" and method == "GET":
            return self._list(query)
        if not path.startswith(API + "/"):
            return fail(404, "not_found", f"No API endpoint {path}.")
        path = path[len(API) :]
        if path.rstrip("/") == "/bundles" and method == "POST":
            return self._search(body)
        if path.startswith("/asks/") and method == "PUT":
            return self._create(path[len("/asks/") :].strip("/"), body)
        if path.rstrip("/") == "/instances" and method == "GET":
            return Reply(
                410,
                {
                    "success": False,
                    "error": "deprecated_endpoint",
                    "msg": "This endpoint is deprecated: use /api/v1/instances/.",
                },
                assumed=DEPRECATED_LISTING,
            )
        if path.startswith("/instances/") and method in ("GET", "DELETE"):
            instance_id = path[len("/instances/") :].strip("/")
            if method == "GET":
                return self._show(instance_id)
            return self._destroy(instance_id)
        return fail(404, "not_found", f"No API endpoint {method} {API}{path}.")

    # --- listing (v1) --------------------------------------------------------------------------------

    def _list(self, query: Mapping[str, list[str]]) -> Reply:
        def arg(name: str, default: str) -> str:
            return (query.get(name) or [default])[0]

        try:
            filters = json.loads(arg("select_filters", "{}"))
            order = json.loads(arg("order_by", '[{"col": "id", "dir": "asc"}]'))
            limit = int(arg("limit", str(PAGE_SIZE)))
        except ValueError:
            return invalid_request("Error in query parameters: select_filters, order_by and limit must be JSON.")
        if not isinstance(filters, dict) or not isinstance(order, list):
            return invalid_request("Error in query parameters: select_filters is an object, order_by a list.")
        limit = 5 if limit <= 0 else min(limit, PAGE_SIZE)
        rows = [self._render(i) for i in self.instances.values() if self._listed(i)]
        for field, condition in filters.items():
            if field not in FILTERABLE:
                return invalid_request(f"Error in query parameters: {field} is not a valid search key")
            if not isinstance(condition, dict):
                return invalid_request(f"Error in query parameters: {field} needs an operator object")
            try:
                rows = [r for r in rows if all(_matches(r.get(field), op, v) for op, v in condition.items())]
            except (ValueError, TypeError) as err:
                return invalid_request(f"Error in query parameters: {field}: {err}")
        keys = [(str(o.get("col")), o.get("dir") == "desc") for o in order if isinstance(o, dict)]
        if not any(col == "id" for col, _ in keys):
            keys.append(("id", False))
        if [col for col, _ in keys] != ["id"]:
            return invalid_request("Error in query parameters: the fake pages by id only")
        descending = keys[0][1]
        rows.sort(key=lambda r: int(r["id"]), reverse=descending)
        total = len(rows)
        labels: dict[str, int] = {}
        for row in rows:
            labels[row.get("label") or ""] = labels.get(row.get("label") or "", 0) + 1
        after = query.get("after_token")
        if after:
            last = _untoken(after[0])
            if last is None:
                return Reply(400, {"error": "invalid_token", "msg": "after_token could not be decoded"})
            rows = [r for r in rows if (r["id"] < last if descending else r["id"] > last)]
        page = rows[:limit]
        more = len(rows) > limit
        return Reply(
            200,
            {
                "success": True,
                "instances_found": len(page),
                "total_instances": total,
                "label_counts": labels,
                "next_token": _token(page[-1]["id"]) if more else None,
                "instances": page,
            },
        )

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
        if kind == "ondemand":
            kind = "on-demand"
        if kind not in ("on-demand", "bid", "reserved"):
            return invalid_request(f"Unknown offer type {kind!r}.")
        rows = [self._render_ask(a, kind) for a in self.asks if kind != "bid" or a.get("min_bid") is not None]
        for field, condition in {**_SEARCH_DEFAULTS, **query}.items():
            if field in _QUERY_KEYS:
                continue
            if field not in _ASK_DEFAULTS and not any(field in a for a in self.asks):
                return invalid_request(f"Unknown search field {field!r}.")
            if not isinstance(condition, dict):
                condition = {"eq": condition}
            try:
                rows = [r for r in rows if all(_matches(r.get(field), op, v) for op, v in condition.items())]
            except ValueError as err:
                return invalid_request(f"{field}: {err}.")
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
        env = body.get("env", "")
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
        if not isinstance(env, str):
            return invalid("env must be a string of docker flags (-e KEY=value -p 8000:8000).")
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
            return fail(
                400,
                "invalid_price",
                f"Bid price {price} is below the minimum bid {ask.get('min_bid')} for ask {ask_id}.",
            )
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
                return Reply(
                    200,
                    {"instances": None},
                    assumed="showInstance declares no answer for a destroyed instance; vast-cli show_instance reads "
                    "instances null as gone",
                )
            return no_such_instance(instance_id)
        return Reply(200, {"instances": self._render(inst)})

    def _destroy(self, instance_id: str) -> Reply:
        if self.faults.terminate_fail > 0:
            self.faults.terminate_fail -= 1
            return server_error()
        inst = self.instances.get(instance_id)
        if inst is None or not self._listed(inst):
            return fail(404, "not_found", "Instance not found")
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
        env = [flag.split("=", 1) for flag in str(request.get("env") or "").split() if "=" in flag]
        data = {
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
            "extra_env": [[k, v] for k, v in env],
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
            "template_hash_id": request.get("template_hash_id"),
            "jupyter_token": f"tok{inst.id}",
        }
        # The spec types these as plain strings/integers: absent until the instance has them, not null.
        return {k: v for k, v in data.items() if v is not None or k not in _NOT_NULLABLE}
