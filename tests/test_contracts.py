"""The vendor OpenAPI documents under tests/contracts/ and the check the fakes run with them."""

from __future__ import annotations

import time

import pytest

from tests.contracts.openapi import ERRATA_NOTES, SDK_EXTRAS, contract

SPECS = {
    "vast": ("Vast.ai API", "1.0.0"),
    "runpod": ("Runpod REST API", "2.0.0"),
    "lambda": ("Lambda Cloud API", "1.6.0"),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_each_vendor_document_loads_and_compiles_fast(name: str) -> None:
    started = time.monotonic()
    spec = contract(name)
    assert (spec.spec["info"]["title"], spec.spec["info"]["version"]) == SPECS[name]
    for template, item in spec.spec["paths"].items():
        for method in item:
            if method in ("get", "put", "post", "delete", "patch"):
                op = spec.operation(method, template.replace("{id}", "1"))
                assert op is not None and op.operation_id
    assert time.monotonic() - started < 5


def test_requests_outside_the_spec_are_violations() -> None:
    vast = contract("vast")
    _, problems = vast.check_request("GET", "/api/v0/instances/", {"owner": ["me"]}, None)
    assert problems == ["GET /api/v0/instances/: no such operation in vast's OpenAPI document"]
    _, problems = vast.check_request("GET", "/api/v1/instances/", {"limit": ["26"]}, None)
    assert any("query limit" in p for p in problems)
    _, problems = vast.check_request("PUT", "/api/v0/asks/41/", {}, {"image": "i", "env": {"A": "1"}})
    assert any("env" in p for p in problems)
    _, problems = vast.check_request("PUT", "/api/v0/asks/41/", {}, {"image": "i", "colour": "red"})
    assert problems == ["createInstance (PUT /api/v0/asks/41/): body field 'colour' is not in the spec"]
    # What the official client sends beyond the spec passes, and only that.
    assert vast.check_request("PUT", "/api/v0/asks/41/", {}, {"image": "i", "client_id": "me"})[1] == []
    assert vast.check_request("GET", "/api/v0/instances/7/", {"owner": ["me"]}, None)[1] == []
    assert {x.operation for x in SDK_EXTRAS} == {"createInstance", "showInstance"} and ERRATA_NOTES["vast"]
    runpod = contract("runpod")
    _, problems = runpod.check_request("POST", "/v2/pods", {}, {"name": "x", "image": "i", "interruptible": True})
    assert any("interruptible" in p for p in problems)
    _, problems = runpod.check_request("GET", "/v2/pods", {"name": ["x"]}, None)
    assert problems == ["listPods (GET /v2/pods): query parameter 'name' is not in the spec"]


def test_answers_outside_the_spec_are_violations_unless_assumed() -> None:
    runpod = contract("runpod")
    op = runpod.operation("POST", "/v2/pods")
    assert op is not None
    bad, _ = runpod.check_response(op, 400, "application/problem+json", {"title": "Bad Request"}, None)
    assert bad and "'status' is a required property" in bad[0]
    vast = contract("vast")
    show = vast.operation("GET", "/api/v0/instances/5/")
    assert show is not None
    assert vast.check_response(show, 404, "application/json", {"error": "x"}, None)[0]
    assert vast.check_response(show, 404, "application/json", {"error": "x"}, "silent")[1]
    # An assumption never excuses a body that contradicts a declared schema.
    assert vast.check_response(show, 200, "application/json", {"instances": 5}, "anything")[0]
