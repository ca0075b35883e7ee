"""The clouds' HTTP client: which failures are retried, how long it waits, where it sends requests."""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest

from gpu_training.errors import BadRequestError, InstanceNotFoundError
from gpu_training.hooks.cloud_api import CloudApiHook, RateLimitedError, ServerError, parse_retry_after
from tests.fakeclouds.base import FakeCloud, Reply
from tests.servers import free_port


class EchoCloud(FakeCloud):
    """Answers from a script of statuses, then 200."""

    name = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.script: list[int] = []

    def route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Reply:
        status = self.script.pop(0) if self.script else 200
        if status == 429:
            return Reply(429, "slow down", {"Retry-After": "0.3"})
        if status == 422:  # a cloud (or a proxy in front of it) that echoes the request's credentials
            return Reply(422, {"error": f"invalid request: Authorization: Bearer {self.api_key}"})
        return Reply(status, {"error": f"status {status}"} if status >= 400 else {"ok": True, "path": path})


class EchoHook(CloudApiHook):
    provider = "echo"
    default_conn_name = "echo_default"
    default_url = "https://api.echo.example"
    api_path: ClassVar[str] = "/v9"


@pytest.fixture(scope="module")
def server() -> Iterator[EchoCloud]:
    fake = EchoCloud()
    yield fake
    fake.stop()


@pytest.fixture
def hook(server: EchoCloud, monkeypatch: pytest.MonkeyPatch) -> EchoHook:
    server.reset()
    server.script = []
    monkeypatch.setenv(
        "AIRFLOW_CONN_ECHO_DEFAULT",
        server.connection(retry_initial_seconds=0.05, retry_max_wait_seconds=1, retry_attempts=4),
    )
    return EchoHook()


def test_retry_after_as_seconds_or_http_date() -> None:
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (parse_retry_after(later) or 0) <= 31


def test_the_api_path_is_kept_when_the_host_is_overridden(hook: EchoHook, server: EchoCloud) -> None:
    assert hook.base_url == server.url + "/v9"
    assert hook.request("GET", "/things") == {"ok": True, "path": "/v9/things"}


def test_the_public_address_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_ECHO_DEFAULT", json.dumps({"conn_type": "http", "password": "k"}))
    assert EchoHook().base_url == "https://api.echo.example/v9"


def test_429_waits_what_retry_after_asks_then_succeeds(hook: EchoHook, server: EchoCloud) -> None:
    server.script = [429, 429]
    t0 = time.monotonic()
    assert hook.request("POST", "/launch", json_body={}, idempotent=False)["ok"]
    assert time.monotonic() - t0 >= 0.6  # two Retry-After: 0.3
    assert [c[2] for c in server.calls] == [429, 429, 200] and hook.calls == 3


def test_a_5xx_is_retried_for_idempotent_requests_only(hook: EchoHook, server: EchoCloud) -> None:
    server.script = [503, 500]
    assert hook.request("GET", "/x")["ok"]
    assert [c[2] for c in server.calls] == [503, 500, 200]
    server.reset()
    server.script = [500]
    with pytest.raises(ServerError, match="HTTP 500"):
        hook.request("POST", "/launch", json_body={}, idempotent=False)  # the cloud may have acted
    assert len(server.calls) == 1


def test_retries_stop_after_the_configured_attempts(hook: EchoHook, server: EchoCloud) -> None:
    server.script = [429] * 10
    with pytest.raises(RateLimitedError) as err:
        hook.request("GET", "/x")
    assert err.value.retry_after == pytest.approx(0.3) and len(server.calls) == 4


def test_client_errors_are_typed_and_not_retried(hook: EchoHook, server: EchoCloud) -> None:
    server.script = [404, 400, 401]
    with pytest.raises(InstanceNotFoundError):
        hook.request("GET", "/x")
    with pytest.raises(BadRequestError, match="status 400"):
        hook.request("GET", "/x")
    with pytest.raises(
        BadRequestError,
        match="the API key was not accepted; set a valid key as the password of Airflow connection 'echo_default'",
    ) as err:
        hook.request("GET", "/x")
    assert server.api_key not in str(err.value)
    assert len(server.calls) == 3


def test_an_echoed_api_key_never_reaches_the_error(hook: EchoHook, server: EchoCloud) -> None:
    """Error messages go to exceptions, logs and the job's failure_reason: the key is cut out."""
    server.script = [422]
    with pytest.raises(BadRequestError) as err:
        hook.request("POST", "/instances", json_body={})
    assert server.api_key not in str(err.value) and "Authorization: Bearer ***" in str(err.value)


def test_no_answer_is_a_server_error_after_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_ECHO_DEFAULT",
        json.dumps(
            {
                "conn_type": "http",
                "host": f"http://127.0.0.1:{free_port()}",
                "password": "k",
                "extra": {"retry_initial_seconds": 0.01, "retry_attempts": 3},
            }
        ),
    )
    hook = EchoHook()
    with pytest.raises(ServerError, match="no answer"):
        hook.request("GET", "/x")
    assert hook.calls == 3


def test_a_missing_connection_or_key_is_a_clear_bad_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIRFLOW_CONN_ECHO_DEFAULT", raising=False)
    with pytest.raises(BadRequestError, match="connection 'echo_default' is not defined"):
        EchoHook().request("GET", "/x")
    monkeypatch.setenv("AIRFLOW_CONN_ECHO_DEFAULT", json.dumps({"conn_type": "http", "host": "http://127.0.0.1:1"}))
    with pytest.raises(BadRequestError, match="has no API key"):
        EchoHook().request("GET", "/x")
