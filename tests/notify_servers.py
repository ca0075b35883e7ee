"""Real servers that notifications go to: an SMTP server (aiosmtpd) and an HTTP server that
records what is POSTed to it (a generic webhook, or Slack's incoming webhooks)."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from email import message_from_bytes
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.servers import free_port


class SmtpServer:
    """aiosmtpd on 127.0.0.1: every message it accepted, parsed."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[tuple[list[str], Message]] = []
        server = self

        class Handler:
            async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
                server.messages.append((list(envelope.rcpt_tos), message_from_bytes(envelope.content)))
                return "250 Message accepted for delivery"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def connection(self, **extra: Any) -> str:
        """An Airflow SMTP connection to it (plain SMTP: no SSL, no STARTTLS, no login)."""
        options = {"disable_ssl": True, "disable_tls": True, "timeout": 5, "retry_limit": 0, **extra}
        return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": self.port, "extra": options})

    def wait_for(self, count: int, timeout: float = 30) -> list[tuple[list[str], Message]]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.messages)

    def stop(self) -> None:
        self.controller.stop()


@dataclasses.dataclass
class Post:
    path: str
    headers: dict[str, str]
    body: Any


class WebhookServer:
    """Records every POST; answers ``status`` (200 by default, with Slack's ``ok`` body)."""

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.status = 200
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body: Any = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
                server.posts.append(Post(self.path, dict(self.headers.items()), body))
                data = b"ok" if server.status == 200 else b"internal error"
                self.send_response(server.status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def webhook_connection(self, path: str = "/hooks/training", token: str | None = None) -> str:
        conn: dict[str, Any] = {"conn_type": "http", "host": f"{self.url}{path}"}
        if token:
            conn["password"] = token
        return json.dumps(conn)

    def slack_connection(self, token: str) -> str:
        """A Slack incoming-webhook connection whose webhook lives on this server."""
        return json.dumps({"conn_type": "slackwebhook", "host": f"{self.url}/slack", "password": token})

    def wait_for(self, count: int, timeout: float = 30) -> list[Post]:
        deadline = time.monotonic() + timeout
        while len(self.posts) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return list(self.posts)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
