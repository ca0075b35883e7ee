"""``CloudApiHook``: the HTTP client every GPU cloud's hook builds on.

One Airflow connection per cloud (``lambda_default``, ``runpod_default``, ``vast_default``), of the
cloud's own connection type (``lambda_cloud``, ``runpod``, ``vastai``: ``connection_types.py``) or a
plain ``http`` one: the API key is the connection's password (masked in every log as soon as it is
read); the host is the API's public address unless the connection sets one (a proxy, or a local fake
in the tests); the settings are its extra's keys. Requests are
retried by tenacity on 429, 5xx and connection errors, with exponential backoff and jitter, waiting
what a ``Retry-After`` header asks for. A request that is not idempotent (a launch) is retried only
on 429 (the cloud did not act on it); after a 5xx the caller asks the cloud what happened. Which
errors are sent again is decided by ``errors.is_retryable`` from the hierarchy's flags.

Subclasses say how to authenticate and how to read the cloud's error bodies; each talks to one API
and nothing else.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from functools import cached_property
from typing import Any, ClassVar
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseHook
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_exponential_jitter

from gpu_training.errors import (
    AuthorizationError,
    BadRequestError,
    InstanceNotFoundError,
    NoCapacityError,
    ProviderError,
    RateLimitedError,
    ServerError,
    is_retryable,
)
from gpu_training.hooks.connection_types import CloudConnectionType, connection_settings


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class CloudApiHook(BaseHook):
    """Base of the GPU clouds' API hooks: connection, auth, typed errors, retries."""

    conn_name_attr = "conn_id"
    default_conn_name: ClassVar[str]
    #: The cloud's connection type and its form (a subclass sets it); a connection of type ``http``
    #: with the same password and extras works as well.
    connection_type: ClassVar[CloudConnectionType | None] = None
    conn_type = "http"
    #: Provider name used in errors and records (``lambda``, ``runpod``, ``vast``).
    provider: ClassVar[str]
    #: The API's public base URL, and the path prefix kept when the connection overrides the host.
    default_url: ClassVar[str]
    api_path: ClassVar[str] = ""

    #: Retry policy (connection extras ``retry_attempts``, ``retry_max_wait_seconds``,
    #: ``retry_initial_seconds`` and ``timeout_seconds`` override it).
    retry_attempts = 8
    retry_budget_seconds = 300.0
    retry_initial_seconds = 1.0
    retry_max_wait_seconds = 60.0
    timeout_seconds = 30.0

    def __init__(self, conn_id: str | None = None) -> None:
        super().__init__()
        self.conn_id = conn_id or self.default_conn_name
        #: HTTP requests sent (retries included): bench/provision.py reports them per job.
        self.calls = 0

    @cached_property
    def connection(self) -> Any:
        try:
            return self.get_connection(self.conn_id)
        except Exception as err:  # AirflowNotFoundException: a retry will not define it
            raise BadRequestError(
                self.provider, f"Airflow connection {self.conn_id!r} is not defined (it holds the API key): {err}"
            ) from err

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """The connection form's standard fields: hidden, relabelled, placeholders (Airflow 3.3 reads the
        same from the provider info, with the extra fields: ``connection_types.py``)."""
        if cls.connection_type is None:
            return {"hidden_fields": [], "relabeling": {}, "placeholders": {}}
        return cls.connection_type.field_behaviour()

    @cached_property
    def extras(self) -> dict[str, Any]:
        """The connection's settings: its extra's keys, those left empty dropped (the defaults apply)."""
        return connection_settings(self.connection.extra_dejson, self.conn_type)

    @cached_property
    def api_key(self) -> str:
        key = self.connection.password or ""
        if not key:
            raise BadRequestError(self.provider, f"connection {self.conn_id!r} has no API key (its password field)")
        from airflow.sdk.log import mask_secret

        mask_secret(key)
        return key

    @cached_property
    def base_url(self) -> str:
        conn = self.connection
        host = (conn.host or "").strip()
        if not host:
            return self.default_url.rstrip("/") + self.api_path
        if "://" not in host:
            host = f"{conn.schema or 'https'}://{host}" + (f":{conn.port}" if conn.port else "")
        parts = urlsplit(host)
        return host.rstrip("/") if parts.path not in ("", "/") else host.rstrip("/") + self.api_path

    @cached_property
    def session(self) -> requests.Session:
        session = requests.Session()
        session.headers.update({"Accept": "application/json", "User-Agent": "gpu-training-orchestrator"})
        self.authenticate(session)
        return session

    def authenticate(self, session: requests.Session) -> None:
        """Put the API key on the session (default: a bearer token)."""
        session.headers["Authorization"] = f"Bearer {self.api_key}"

    def _setting(self, name: str) -> float:
        return float(self.extras.get(name, getattr(self, name)))

    # --- requests --------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        idempotent: bool = True,
    ) -> Any:
        """Send a request, retrying what is safe to retry; the decoded JSON body (or text)."""

        retrying = Retrying(
            # 429 always (not acted on); 5xx and no answer only when idempotent: errors.is_retryable.
            retry=retry_if_exception(lambda err: is_retryable(err, resend=True, idempotent=idempotent)),
            wait=self._wait,
            stop=stop_after_attempt(int(self._setting("retry_attempts")))
            | stop_after_delay(self._setting("retry_budget_seconds")),
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(self._send, method, path, json_body, params)

    def _send(self, method: str, path: str, json_body: Any, params: Mapping[str, Any] | None) -> Any:
        url = self.base_url + path
        self.calls += 1
        try:
            response = self.session.request(
                method, url, json=json_body, params=params, timeout=self._setting("timeout_seconds")
            )
        except requests.RequestException as err:
            raise ServerError(
                self.provider, self.scrub(f"{method} {path}: no answer ({type(err).__name__}: {err})")
            ) from err
        if response.status_code < 400:
            if not response.content:
                return None
            try:
                return response.json()
            except ValueError:
                return response.text
        raise self.error_for(method, path, response)

    def error_for(self, method: str, path: str, response: requests.Response) -> ProviderError:
        """The typed error for an HTTP error answer."""
        status = response.status_code
        message = self.scrub(self.error_message(response))
        where = f"{method} {path} -> HTTP {status}: {message}"
        if status == 429:
            return RateLimitedError(
                self.provider, where, retry_after=parse_retry_after(response.headers.get("Retry-After"))
            )
        if self.is_capacity_error(response, message):
            return NoCapacityError(self.provider, where)
        if status >= 500:
            return ServerError(self.provider, where)
        if status == 401:
            return AuthorizationError(
                self.provider,
                f"{where}: the API key was not accepted; set a valid key as the password of Airflow "
                f"connection {self.conn_id!r}",
            )
        if status == 403:
            return AuthorizationError(
                self.provider,
                f"{where}: the API key in Airflow connection {self.conn_id!r} (or its account) may not do this; "
                "give the key the access it needs or use another key",
            )
        if status == 404:
            return InstanceNotFoundError(self.provider, where)
        return BadRequestError(self.provider, where)

    def scrub(self, text: str) -> str:
        """``text`` without the API key: error messages end up in exceptions, task logs and the
        job's ``failure_reason`` in the results DB, where log masking does not reach (a cloud
        that echoes the request, a proxy error page)."""
        key = self.connection.password or ""
        return text.replace(key, "***") if len(key) >= 4 else text

    def error_message(self, response: requests.Response) -> str:
        """The human part of an error body (subclasses know their cloud's shape)."""
        try:
            body = response.json()
        except ValueError:
            return response.text.strip()[:500] or response.reason
        if isinstance(body, dict):
            for key in ("error", "message", "msg", "detail"):
                value = body.get(key)
                if isinstance(value, dict):
                    return "; ".join(str(v) for v in value.values() if v)
                if value:
                    return str(value)
        return json.dumps(body)[:500]

    def is_capacity_error(self, response: requests.Response, message: str) -> bool:
        """Whether the cloud refused for lack of capacity (subclasses know their codes)."""
        return False

    # --- retry policy ----------------------------------------------------------------------------

    def _wait(self, state: RetryCallState) -> float:
        backoff = wait_exponential_jitter(
            initial=self._setting("retry_initial_seconds"), max=self._setting("retry_max_wait_seconds")
        )(state)
        err = state.outcome.exception() if state.outcome else None
        retry_after = getattr(err, "retry_after", None)
        if retry_after is not None:  # the cloud said how long; a little jitter spreads the herd
            return min(float(retry_after) + backoff * 0.1, self._setting("retry_max_wait_seconds"))
        return backoff

    def _log_retry(self, state: RetryCallState) -> None:
        err = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0
        self.log.warning("%s (attempt %d); retrying in %.1f s", err, state.attempt_number, wait)
