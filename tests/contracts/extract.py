"""Cut a vendor's OpenAPI document down to the operations this project calls (with every component
they reference), the form committed here (see README.md for why only a subset is kept).

Usage: ``python -m tests.contracts.extract FULL_SPEC.(json|yaml) OUT.json METHOD:/path ...``
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/"):
            found.add(ref)
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def _resolve(spec: dict[str, Any], ref: str) -> Any:
    node: Any = spec
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def subset(spec: dict[str, Any], operations: list[str]) -> dict[str, Any]:
    """``spec`` with only ``operations`` (``METHOD:/path``) and the components they reach."""
    paths: dict[str, Any] = {}
    for item in operations:
        method, path = item.split(":", 1)
        source = spec["paths"][path]
        target = paths.setdefault(path, {k: v for k, v in source.items() if k in ("parameters", "summary")})
        target[method.lower()] = source[method.lower()]
    out: dict[str, Any] = {k: spec[k] for k in ("openapi", "info", "servers", "security") if k in spec}
    out["paths"] = paths
    components: dict[str, Any] = {}
    schemes = spec.get("components", {}).get("securitySchemes")
    if schemes:
        components["securitySchemes"] = schemes
    pending, seen = _refs(paths), set()
    while pending:
        ref = pending.pop()
        if ref in seen:
            continue
        seen.add(ref)
        parts = ref[2:].split("/")
        if parts[0] != "components":
            continue
        components.setdefault(parts[1], {})[parts[2]] = _resolve(spec, "#/" + "/".join(parts[:3]))
        pending |= _refs(components[parts[1]][parts[2]])
    out["components"] = {k: dict(sorted(v.items())) for k, v in sorted(components.items())}
    return out


def main(argv: list[str]) -> None:
    source, target, *operations = argv
    text = Path(source).read_text()
    spec = json.loads(text) if source.endswith(".json") else yaml.safe_load(text)
    Path(target).write_text(json.dumps(subset(spec, operations), indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
