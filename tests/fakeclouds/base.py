"""What the fake GPU clouds share: an HTTP server on 127.0.0.1, a record of every instance, and
the same fault switches on every cloud.

Each cloud's fake (``tests/fakeclouds/<cloud>.py``) speaks that cloud's API as documented: paths,
auth, field names, status codes and error bodies. A launched instance "boots" for
``faults.boot_seconds`` and then answers SSH at ``ssh_host:ssh_port`` (the test sshd), so a whole
job runs on it. The record (``instances``, ``calls``) is what the tests assert on: every fault test
ends with :meth:`FakeCloud.assert_all_terminated`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.fakeclouds.boxes import kill_box


@dataclasses.dataclass
class Faults:
    """Fault switches, the same names on every fake cloud. Counters count down as they fire."""

    no_capacity: bool = False  # every offer is listed without capacity
    refuse_launch: int = 0  # the next N launches are refused for capacity although listed as available
    #: Launch calls (1-based, counted since the last reset) refused for capacity although listed as
    #: available: ``(2,)`` lets a multi-node job's first node launch and refuses its second.
    refuse_launches: tuple[int, ...] = ()
    rate_limit: int = 0  # the next N requests are answered 429
    retry_after: float | None = 1.0  # the Retry-After those 429s carry (None: no header)
    error_after_create: int = 0  # the next N launches create the instance, then answer 500
    terminate_fail: int = 0  # the next N terminate calls answer 500 and do nothing
    unhealthy: bool = False  # instances turn unhealthy instead of running once booted
    vanish: bool = False  # instances disappear (404, absent from lists) once booted
    boot_seconds: float = 0.0  # launch -> running
    terminate_seconds: float = 0.0  # terminating -> terminated


@dataclasses.dataclass
class FakeInstance:
    id: str
    name: str
    instance_type: str
    region: str
    price_per_hour: float
    spot: bool = False
    launched_at: float = dataclasses.field(default_factory=time.time)
    terminate_requested_at: float | None = None
    terminated_at: float | None = None
    vanished: bool = False
    unhealthy: bool = False
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def phase(self, faults: Faults) -> str:
        """Provider-neutral phase now: booting, running, unhealthy, terminating, terminated."""
        now = time.time()
        if self.terminated_at is not None:
            return "terminated"
        if self.terminate_requested_at is not None:
            if now - self.terminate_requested_at >= faults.terminate_seconds:
                self.terminated_at = now
                return "terminated"
            return "terminating"
        if now - self.launched_at < faults.boot_seconds:
            return "booting"
        if faults.vanish:
            self.vanished = True
        if faults.unhealthy:
            self.unhealthy = True
        return "unhealthy" if self.unhealthy else "running"

    @property
    def gone(self) -> bool:
        return self.terminated_at is not None or self.vanished


@dataclasses.dataclass
class Reply:
    status: int
    body: Any = None  # dict/list -> JSON; str -> text/plain; bytes -> as is
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    #: Why the fake answers this although the vendor's spec does not declare it (the spec is silent
    #: there, so the fake had to assume): the contract check records it instead of failing.
    assumed: str | None = None

    @property
    def content_type(self) -> str | None:
        if "Content-Type" in self.headers:
            return self.headers["Content-Type"]
        if isinstance(self.body, (dict, list)):
            return "application/json"
        return "text/plain; charset=utf-8" if isinstance(self.body, str) else None


class FakeCloud:
    """Base of the fake clouds. Subclasses implement :meth:`route` (and :meth:`authorized`)."""

    name = "fake"
    #: The vendor OpenAPI document under ``tests/contracts/`` every request and answer is checked
    #: against (None: no published spec to check, as for moto's EC2).
    contract_name: str | None = None

    def __init__(self, *, ssh_host: str = "127.0.0.1", ssh_port: int = 22) -> None:
        self.ssh_host = ssh_host
        self.ssh_port = ssh_port
        self.api_key = f"{self.name}-secret-{secrets.token_hex(8)}"
        self.faults = Faults()
        self.instances: dict[str, FakeInstance] = {}
        self.calls: list[tuple[str, str, int]] = []  # (method, path, status)
        self.lock = threading.RLock()
        self._seq = 0
        self.launch_calls = 0
        #: What the contract check found: requests outside the vendor's spec, answers it does not
        #: declare. Tests fail on them (:meth:`assert_contract`, also run by reset and teardown).
        self.contract_violations: list[str] = []
        #: Undeclared answers the fake gave, marked ``assumed`` (where the spec is silent).
        self.contract_assumptions: set[str] = set()
        #: Requests checked against the spec (a test can assert the check really ran).
        self.contract_checked = 0
        #: Where the instances' boxes are (``<box_root>/<instance name>`` on the test sshd), set by
        #: the rigs; terminating an instance kills what runs in its box (:meth:`power_off`).
        self.box_root: Path | None = None
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out separately: no delayed-ACK wait

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                reply = fake._dispatch(self.command, self.path, dict(self.headers.items()), raw)
                body = reply.body
                headers = dict(reply.headers)
                if isinstance(body, (dict, list)):
                    data = json.dumps(body).encode()
                    headers.setdefault("Content-Type", "application/json")
                elif isinstance(body, str):
                    data = body.encode()
                    headers.setdefault("Content-Type", "text/plain; charset=utf-8")
                else:
                    data = body or b""
                self.send_response(reply.status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    # --- what tests use --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def connection(self, **extra: Any) -> str:
        """The cloud's Airflow connection (JSON form, for ``AIRFLOW_CONN_*``) pointing at this fake."""
        return json.dumps({"conn_type": "http", "host": self.url, "password": self.api_key, "extra": extra})

    def assert_contract(self) -> None:
        """No request the fake received and no answer it gave was outside the vendor's spec."""
        with self.lock:
            found, self.contract_violations = self.contract_violations, []
        assert not found, f"{self.name}: outside the vendor's OpenAPI document:\n" + "\n".join(found[:20])

    @contextlib.contextmanager
    def expect_violations(self, *words: str) -> Iterator[list[str]]:
        """A test that sends (or makes the fake answer) something outside the spec on purpose: the
        block must produce violations containing ``words``; they are consumed, not reported."""
        self.assert_contract()
        found: list[str] = []
        yield found
        with self.lock:
            found += self.contract_violations
            self.contract_violations = []
        assert found, f"{self.name}: expected the contract check to object, it did not"
        text = "\n".join(found)
        assert all(w in text for w in words), f"{words} not in {text}"

    def reset(self) -> None:
        self.assert_contract()  # what the previous test left must not pass unseen
        with self.lock:
            self.faults = Faults()
            self.instances.clear()
            self.calls.clear()
            self.launch_calls = 0

    def launched(self) -> list[FakeInstance]:
        with self.lock:
            return list(self.instances.values())

    def live(self) -> list[FakeInstance]:
        with self.lock:
            return [i for i in self.instances.values() if not i.gone and i.phase(self.faults) != "terminated"]

    def assert_all_terminated(self) -> None:
        """The fake's own record: every instance ever launched is terminated (or was lost by the cloud)."""
        with self.lock:
            phases = {i.id: i.phase(self.faults) for i in self.instances.values()}  # settles due terminations
            left = [(i.id, i.name, phases[i.id]) for i in self.instances.values() if not i.gone]
        assert not left, f"{self.name}: instances not terminated: {left}"
        self.assert_contract()

    def interrupt(self, instance_id: str) -> None:
        """Take a spot / interruptible instance back the way the cloud does (test control).

        Clouds with such instances override this; the others have nothing to interrupt.
        """
        raise ValueError(f"{self.name} has no spot or interruptible instances: nothing interrupts {instance_id}")

    def stop(self) -> None:
        try:
            # Its machines go with the cloud: nothing started on a box outlives the rig (a test that
            # failed before its teardown would leave its trainer running on the shared sshd).
            if self.box_root is not None:
                kill_box(self.box_root)
        finally:
            self.server.shutdown()
            self.server.server_close()
        self.assert_contract()

    # --- for subclasses --------------------------------------------------------------------------

    def new_id(self, prefix: str = "") -> str:
        with self.lock:
            self._seq += 1
            return f"{prefix}{secrets.token_hex(6)}{self._seq:04d}"

    def capacity_refused(self) -> bool:
        """Whether this launch call is refused for capacity by ``refuse_launch`` or ``refuse_launches``
        (a launch call counts whatever its answer)."""
        with self.lock:
            self.launch_calls += 1
            if self.faults.refuse_launch > 0:
                self.faults.refuse_launch -= 1
                return True
            return self.launch_calls in self.faults.refuse_launches

    def private_ip(self, inst: FakeInstance) -> str:
        """A private address of its own per instance, on the loopback network (127.0.0.0/8), so the
        nodes of a multi-node job reach each other at distinct addresses."""
        with self.lock:
            if "private_ip" not in inst.extra:
                taken = sum(1 for i in self.instances.values() if "private_ip" in i.extra)
                inst.extra["private_ip"] = f"127.0.{1 + taken // 250}.{2 + taken % 250}"
            return str(inst.extra["private_ip"])

    def power_off(self, inst: FakeInstance) -> None:
        """Kill every process of the instance's box, as terminating a real machine does (the fakes
        call it when they accept a terminate). The box is only a directory on the shared sshd, so
        without this the trainer of a terminated instance would run on (and leak past the test)."""
        name = inst.name
        if self.box_root is not None and name and "/" not in name and name not in (".", ".."):
            kill_box(self.box_root / name)

    def visible(self, inst: FakeInstance) -> bool:
        """Whether the cloud still shows the instance (terminated ones linger, vanished ones do not)."""
        inst.phase(self.faults)
        return not inst.vanished

    def authorized(self, headers: Mapping[str, str], query: Mapping[str, list[str]]) -> bool:
        return headers.get("Authorization") == f"Bearer {self.api_key}"

    def unauthorized(self) -> Reply:
        return Reply(401, {"error": "unauthorized"})

    def rate_limited(self) -> Reply:
        headers = {} if self.faults.retry_after is None else {"Retry-After": f"{self.faults.retry_after:g}"}
        return Reply(429, {"error": "Too many requests"}, headers)

    def route(self, method: str, path: str, query: Mapping[str, list[str]], body: Any) -> Reply:
        raise NotImplementedError

    def _dispatch(self, method: str, raw_path: str, headers: Mapping[str, str], raw: bytes) -> Reply:
        parts = urlsplit(raw_path)
        query = parse_qs(parts.query, keep_blank_values=True)
        body: Any = None
        with self.lock:
            if not self.authorized(headers, query):
                reply = self.unauthorized_for(method, parts.path)
            elif self.faults.rate_limit > 0:
                self.faults.rate_limit -= 1
                reply = self.rate_limited()
            else:
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    reply = Reply(400, {"error": "malformed JSON body"})
                else:
                    reply = self.route(method, parts.path, query, body)
            self.calls.append((method, parts.path, reply.status))
        self.check_contract(method, parts.path, query, raw, reply)
        return reply

    def check_contract(self, method: str, path: str, query: Mapping[str, list[str]], raw: bytes, reply: Reply) -> None:
        """Check the request and the answer against the vendor's OpenAPI document (if it has one)."""
        if self.contract_name is None:
            return
        from tests.contracts.openapi import contract

        spec = contract(self.contract_name)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        assumptions: list[str] = []
        try:
            op, violations = spec.check_request(method, path, query, body)
            if op is not None:
                more, assumptions = spec.check_response(op, reply.status, reply.content_type, reply.body, reply.assumed)
                violations += more
            elif reply.assumed:  # an endpoint the spec no longer lists: still a request outside it
                assumptions = [f"{method} {path} -> {reply.status}: assumed: {reply.assumed}"]
        except Exception as err:  # a broken check must fail the test, not the fake's answer
            violations = [f"{method} {path}: the contract check itself failed: {type(err).__name__}: {err}"[:500]]
        with self.lock:
            self.contract_checked += 1
            self.contract_violations += violations
            self.contract_assumptions.update(assumptions)

    def unauthorized_for(self, method: str, path: str) -> Reply:
        """The answer to a bad key (some operations answer it differently)."""
        return self.unauthorized()


def wait_state(provider: Any, instance_id: str, *states: Any, timeout: float = 5) -> Any:
    """Poll ``provider.get_instance`` until the instance is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        info = provider.get_instance(instance_id)
        if info.state in states:
            return info
        assert time.monotonic() < deadline, f"{instance_id} still {info.state}, wanted {states}"
        time.sleep(0.02)


def terminate_all(provider: Any, fake: FakeCloud) -> None:
    """Terminate every instance the fake launched, then check its record."""
    for inst in fake.launched():
        provider.terminate(inst.id)
    fake.assert_all_terminated()
