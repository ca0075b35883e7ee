"""Each request our hooks send and each answer our fakes give, checked against the vendor's OpenAPI.

The documents are the vendors' own (subsets, see ``README.md``), loaded and compiled once per test
session. A request is checked *closed*: a path, method, query parameter or body field the operation
does not describe is a violation even where the spec leaves its object open, because "outside the
spec" is exactly what a fake written by the client's authors would let through. The few things the
vendor's own official client sends beyond its spec are listed in :data:`SDK_EXTRAS` with the line
that sends them; places where the spec contradicts itself and its client are patched in
:data:`ERRATA`, each with its evidence.

An answer must be one the operation declares (status, media type, body schema). Where the spec is
silent (an undeclared status) a fake may still answer, but only with a reply marked
``assumed="why"`` (:class:`tests.fakeclouds.base.Reply`): the check then records the assumption
instead of failing. An assumption never excuses a body that contradicts a declared schema.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

HERE = Path(__file__).parent
METHODS = ("get", "put", "post", "delete", "patch")

#: Body probe of ``make validate`` (``RunPodHook.PERMISSION_PROBE``) is deliberately outside the
#: ``createPod`` schema so that no pod can come of it; see the hook. Only that exact body is let by.
DELIBERATELY_INVALID: dict[tuple[str, str], Callable[[Any], bool]] = {
    ("runpod", "createPod"): lambda body: body == _runpod_probe(),
}


def _runpod_probe() -> Any:
    from gpu_training.hooks.runpod import PERMISSION_PROBE

    return PERMISSION_PROBE


@dataclasses.dataclass(frozen=True)
class SdkExtra:
    """A request part the vendor's official client sends although its spec does not describe it."""

    operation: str
    where: str  # "query" or "body"
    name: str
    evidence: str


SDK_EXTRAS: tuple[SdkExtra, ...] = (
    SdkExtra(
        "createInstance",
        "body",
        "client_id",
        "vast-ai/vast-cli vastai/api/instances.py create_instance: json_blob = {'client_id': 'me', ...}",
    ),
    SdkExtra(
        "showInstance",
        "query",
        "owner",
        "vast-ai/vast-cli vastai/api/instances.py show_instance: client.get(f'/instances/{id}/', "
        "query_args={'owner': 'me'})",
    ),
)

#: Vast sends ``{}`` as the body of every DELETE (vast-cli ``VastClient.delete``: ``json_data if
#: json_data is not None else {}``; ``destroy_instance`` passes ``json_data={}``); the spec declares
#: no body for ``destroyInstance``. An empty object, and only that, is let by.
EMPTY_BODY_OK = frozenset({"destroyInstance"})


def _vast_errata(spec: dict[str, Any]) -> None:
    # searchOffers: the spec's enum says "ondemand" while its own request example, the official
    # client (vast-cli vastai/api/offers.py search_offers: offer_type="on-demand") and Vast's CLI docs
    # say "on-demand". We send what the client sends.
    body = spec["paths"]["/api/v0/bundles"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body["properties"]["type"]["enum"].append("on-demand")
    # searchOffers `order`: minItems/maxItems 2 sit on the list of entries, while the description
    # ("Each entry should contain two elements") and the official client's default
    # ([["score", "desc"]], one entry) put them on each [field, direction] entry.
    order = body["properties"]["order"]
    order["items"]["minItems"] = order.pop("minItems")
    order["items"]["maxItems"] = order.pop("maxItems")


ERRATA: dict[str, Callable[[dict[str, Any]], None]] = {"vast": _vast_errata}
ERRATA_NOTES = {
    "vast": [
        "searchOffers `type`: enum ondemand|bid|reserved, but its example, vast-cli and the CLI docs "
        "send `on-demand`: `on-demand` is accepted too.",
        "searchOffers `order`: minItems/maxItems 2 moved from the list to each [field, direction] entry, "
        "as its description and vast-cli's default [['score', 'desc']] have them.",
    ]
}


class ContractViolation(AssertionError):
    """A request or answer that the vendor's OpenAPI document does not allow."""


@dataclasses.dataclass
class Operation:
    method: str
    template: str
    spec: dict[str, Any]
    pointer: str
    path_params: dict[str, str]

    @property
    def operation_id(self) -> str:
        return str(self.spec.get("operationId") or f"{self.method.upper()} {self.template}")


def _coerce(value: str, schema: Mapping[str, Any]) -> Any:
    kinds = schema.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    for kind in kinds:
        try:
            if kind == "integer":
                return int(value)
            if kind == "number":
                return float(value)
        except ValueError:
            continue
        if kind == "boolean" and value in ("true", "false"):
            return value == "true"
        if kind == "array":
            return value.split(",")
    return value


class Contract:
    """One vendor's OpenAPI document with its schemas compiled (build through :func:`contract`)."""

    def __init__(self, name: str) -> None:
        self.name = name
        spec = json.loads((HERE / f"{name}.openapi.json").read_text())
        ERRATA.get(name, lambda s: None)(spec)
        self.spec = spec
        self.uri = f"urn:contract:{name}"
        self.registry: Registry[Any] = Registry().with_resource(self.uri, Resource(spec, DRAFT202012))
        self._validators: dict[str, Draft202012Validator] = {}
        self._routes: list[tuple[re.Pattern[str], str]] = []
        for template in spec["paths"]:
            pattern = re.sub(r"\\\{([^}]+)\\\}", r"(?P<\1>[^/]+)", re.escape(template))
            self._routes.append((re.compile(f"^{pattern}$"), template))
        # Literal paths before templated ones ("/pods/x" is not "/pods").
        self._routes.sort(key=lambda route: route[1].count("{"))

    # --- lookups -----------------------------------------------------------------------------------

    def resolve(self, node: Any) -> Any:
        while isinstance(node, dict) and isinstance(node.get("$ref"), str) and node["$ref"].startswith("#/"):
            target: Any = self.spec
            for part in node["$ref"][2:].split("/"):
                target = target[part]
            node = target
        return node

    def validator(self, pointer: str) -> Draft202012Validator:
        if pointer not in self._validators:
            self._validators[pointer] = Draft202012Validator({"$ref": f"{self.uri}#{pointer}"}, registry=self.registry)
        return self._validators[pointer]

    def errors(self, pointer: str, instance: Any) -> list[str]:
        found = sorted(self.validator(pointer).iter_errors(instance), key=lambda e: list(e.absolute_path))
        return [f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message[:300]}" for e in found[:5]]

    def operation(self, method: str, path: str) -> Operation | None:
        path = path.rstrip("/") or "/"  # Vast: the client sends "/bundles/", the spec lists "/bundles"
        for pattern, template in self._routes:
            match = pattern.match(path)
            op = self.spec["paths"][template].get(method.lower()) if match else None
            if match and op is not None:
                pointer = "/paths/" + template.replace("~", "~0").replace("/", "~1") + "/" + method.lower()
                return Operation(method.lower(), template, op, pointer, match.groupdict())
        return None

    def _parameters(self, op: Operation) -> list[tuple[str, dict[str, Any]]]:
        path_item = self.spec["paths"][op.template]
        out = []
        for where, params in (
            ("path-item", path_item.get("parameters") or []),
            ("op", op.spec.get("parameters") or []),
        ):
            for index, param in enumerate(params):
                base = op.pointer.rsplit("/", 1)[0] if where == "path-item" else op.pointer
                pointer = f"{base}/parameters/{index}"
                while isinstance(param, dict) and str(param.get("$ref", "")).startswith("#/"):
                    pointer = param["$ref"][1:]
                    param = self.resolve({"$ref": param["$ref"]})
                out.append((pointer, param))
        return out

    def _declared_keys(self, schema: Any) -> set[str] | None:
        """Property names of an object schema (through allOf), or None when it takes anything."""
        schema = self.resolve(schema)
        if not isinstance(schema, dict):
            return None
        keys = set((schema.get("properties") or {}).keys())
        for part in schema.get("allOf") or []:
            more = self._declared_keys(part)
            if more is None:
                return None
            keys |= more
        if schema.get("additionalProperties") not in (None, False) and schema.get("additionalProperties") != {}:
            return None
        return keys

    # --- checks ------------------------------------------------------------------------------------

    def check_request(
        self, method: str, path: str, query: Mapping[str, list[str]], body: Any
    ) -> tuple[Operation | None, list[str]]:
        op = self.operation(method, path)
        if op is None:
            return None, [f"{method} {path}: no such operation in {self.name}'s OpenAPI document"]
        where = f"{op.operation_id} ({method} {path})"
        problems: list[str] = []
        extras = {(x.where, x.name) for x in SDK_EXTRAS if x.operation == op.operation_id}
        declared: set[str] = set()
        for pointer, param in self._parameters(op):
            name, location = param["name"], param.get("in")
            schema_pointer = pointer + "/schema"
            if location == "query":
                declared.add(name)
                values = query.get(name)
                if not values:
                    if param.get("required"):
                        problems.append(f"{where}: required query parameter {name!r} missing")
                    continue
                value = ",".join(values) if len(values) > 1 else values[0]
                problems += [f"{where}: query {name}: {e}" for e in self._check_param(schema_pointer, param, value)]
            elif location == "path":
                value = op.path_params.get(name)
                if value is not None:
                    problems += [f"{where}: path {name}: {e}" for e in self._check_param(schema_pointer, param, value)]
        for name in query:
            if name not in declared and ("query", name) not in extras:
                problems.append(f"{where}: query parameter {name!r} is not in the spec")
        problems += [f"{where}: {p}" for p in self._check_body(op, body, extras)]
        if problems and DELIBERATELY_INVALID.get((self.name, op.operation_id), lambda b: False)(body):
            return op, []
        return op, problems

    def _check_param(self, pointer: str, param: dict[str, Any], raw: str) -> list[str]:
        schema = self.resolve(param.get("schema") or {})
        value = _coerce(raw, schema)
        return self.errors(pointer, value) if param.get("schema") else []

    def _check_body(self, op: Operation, body: Any, extras: set[tuple[str, str]]) -> list[str]:
        request = self.resolve(op.spec.get("requestBody"))
        if not request:
            if body is None or (body == {} and op.operation_id in EMPTY_BODY_OK):
                return []
            return [f"a body is sent but the operation takes none: {json.dumps(body)[:200]}"]
        if body is None:
            return ["request body missing"] if request.get("required") else []
        content = request.get("content") or {}
        if "application/json" not in content:
            return [f"no application/json request body in the spec (has {sorted(content)})"]
        pointer = op.pointer + "/requestBody/content/application~1json/schema"
        if "$ref" in (op.spec.get("requestBody") or {}):
            ref = op.spec["requestBody"]["$ref"][1:]
            pointer = ref + "/content/application~1json/schema"
        problems = self.errors(pointer, body)
        keys = self._declared_keys(content["application/json"].get("schema"))
        if keys is not None and isinstance(body, dict):
            problems += [
                f"body field {k!r} is not in the spec"
                for k in body
                if k not in keys and ("body", k) not in extras and not problems
            ]
        return problems

    def check_response(
        self, op: Operation, status: int, content_type: str | None, body: Any, assumed: str | None
    ) -> tuple[list[str], list[str]]:
        """(violations, assumptions) of one answer to ``op``."""
        where = f"{op.operation_id} -> {status}"
        responses = op.spec.get("responses") or {}
        key = next((k for k in (str(status), f"{str(status)[0]}XX", "default") if k in responses), None)
        if key is None or (key == "default" and status < 400):
            if assumed:
                return [], [f"{where}: undeclared status, assumed: {assumed}"]
            return [f"{where}: status not declared (declared: {sorted(responses)})"], []
        response = self.resolve(responses[key])
        base = op.pointer + "/responses/" + key
        if "$ref" in responses[key]:
            base = responses[key]["$ref"][1:]
        content = response.get("content") or {}
        if body is None or body == b"" or body == "":
            return [], []
        media = (content_type or "").split(";")[0].strip()
        if media not in content:
            if assumed:
                return [], [f"{where}: media type {media!r} not declared, assumed: {assumed}"]
            return [f"{where}: media type {media!r} not declared (declared: {sorted(content)})"], []
        if "schema" not in content[media]:
            return [], []
        pointer = base + "/content/" + media.replace("~", "~0").replace("/", "~1") + "/schema"
        return [f"{where}: {e}" for e in self.errors(pointer, body)], []


@functools.cache
def contract(name: str) -> Contract:
    """The compiled contract of one cloud (once per session)."""
    return Contract(name)


def copy_spec(name: str) -> dict[str, Any]:
    return copy.deepcopy(contract(name).spec)
