"""Notifications of a job's end and progress, through Airflow's notifiers, to real servers: an SMTP
server (aiosmtpd), a webhook and a Slack incoming webhook (local HTTP servers), and a server that
accepts connections and never answers."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training import notify
from gpu_training.hosts.local import LocalHost
from gpu_training.results.models import EpochTrain, Eval, utcnow
from gpu_training.results.store import ResultsStore
from tests.conftest import event_line
from tests.notify_servers import SmtpServer, WebhookServer
from tests.servers import free_port
from tests.test_follow import Trainer, follower, until

TOKEN = "T0001/B0002/slack-secret-token"
BEARER = "webhook-bearer-secret"
TARGETS = ["smtp://mail/ops@example.com,ml@example.com", "webhook://hook", "slack://slack"]


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def web() -> Iterator[WebhookServer]:
    server = WebhookServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def silent() -> Iterator[int]:
    """A port that accepts TCP connections (the kernel's backlog) and never says a word."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield int(sock.getsockname()[1])


@pytest.fixture
def servers(smtp: SmtpServer, web: WebhookServer, monkeypatch: pytest.MonkeyPatch) -> tuple[SmtpServer, WebhookServer]:
    smtp.messages.clear()
    web.posts.clear()
    web.status = 200
    monkeypatch.setenv("AIRFLOW_CONN_MAIL", smtp.connection(from_email="training@example.com"))
    monkeypatch.setenv("AIRFLOW_CONN_HOOK", web.webhook_connection(token=BEARER))
    monkeypatch.setenv("AIRFLOW_CONN_SLACK", web.slack_connection(TOKEN))
    return smtp, web


def new_job(store: ResultsStore, targets: list[str] = TARGETS, **params: Any) -> str:
    return store.create_job(
        project_id="digits",
        provider="local",
        runtime="process",
        params={"project_id": "digits", "notify": targets, **params},
        dag_id="gpu_training",
        run_id=f"manual__{time.monotonic_ns()}",
    )


def smtp_connection(port: int, **extra: Any) -> str:
    """An SMTP connection like ``SmtpServer.connection()``, to a port where no such server is."""
    options = {"disable_ssl": True, "disable_tls": True, "timeout": 5, "retry_limit": 0, **extra}
    return json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": port, "extra": options})


def mail_body(mail: Any) -> str:
    """The decoded text of every part of a message."""
    parts = mail.walk() if mail.is_multipart() else [mail]
    return "".join(p.get_payload(decode=True).decode() for p in parts if not p.is_multipart())


def add_epochs(store: ResultsStore, job: str, count: int, *, first: int = 1) -> None:
    job_id = store.job(job).id
    with store.session() as s, s.begin():
        for epoch in range(first, first + count):
            s.add(EpochTrain(job_id=job_id, iteration=1, epoch=epoch, avg_loss=1.0 / epoch, completed_at=utcnow()))


def statuses(deliveries: list[notify.Delivery]) -> dict[str, str]:
    return {d.target: d.status for d in deliveries}


def test_targets_are_parsed_and_bad_ones_refused() -> None:
    assert notify.parse_target("smtp://mail/a@x.org,b@y.org") == notify.Target(
        "smtp://mail/a@x.org,b@y.org", "smtp", "mail", ("a@x.org", "b@y.org")
    )
    assert notify.parse_target("slack://alerts").kind == "slack"
    assert notify.parse_target("webhook://ops_hook").conn_id == "ops_hook"
    for bad in ("smtp://mail", "slack://", "irc://chan", "webhook"):
        with pytest.raises(ValueError, match="is not a notify target"):
            notify.parse_target(bad)


def test_a_completed_job_is_announced_by_email_webhook_and_slack(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    job = new_job(store)
    add_epochs(store, job, 4)
    with store.session() as s, s.begin():
        s.add(Eval(job_id=store.job(job).id, iteration=1, epoch=4, accuracy=0.9512, f1=0.95, evaluated_at=utcnow()))
    store.update_job(job, cost_usd=0.1234, time_taken=61.0, outputs_uri="s3://bucket/outputs/x")
    store.finish(job, "completed")

    assert statuses(notify.notify_job_end(store, job)) == dict.fromkeys(TARGETS, "sent")
    [(recipients, mail)] = smtp.wait_for(1)
    assert sorted(recipients) == ["ml@example.com", "ops@example.com"]
    assert mail["Subject"] == "[gpu-training] digits: job completed" and mail["From"] == "training@example.com"
    body = mail_body(mail)
    for said in ("Epochs: 4", "loss 0.2500", "accuracy 0.9512", "f1 0.9500", "0.1234 USD", "s3://bucket/outputs/x"):
        assert said in body
    assert f"/training/ui/#/jobs/{job}" in body
    posts = web.wait_for(2)
    hook = next(p for p in posts if p.path == "/hooks/training")
    assert hook.headers["Authorization"] == f"Bearer {BEARER}"
    assert hook.headers["Content-Type"] == "application/json"
    body_json = hook.body
    assert body_json["event"] == "completed" and body_json["status"] == "completed"
    assert body_json["job_uuid"] == job and body_json["project_id"] == "digits" and body_json["epochs"] == 4
    assert body_json["eval"] == {"accuracy": pytest.approx(0.9512), "f1": pytest.approx(0.95)}
    assert body_json["cost_usd"] == pytest.approx(0.1234) and body_json["reason"] is None
    assert body_json["links"]["outputs"] == "s3://bucket/outputs/x"
    assert body_json["links"]["job"].endswith(f"/training/ui/#/jobs/{job}")
    slack = next(p for p in posts if p.path.startswith("/slack/"))
    assert slack.path == f"/slack/{TOKEN}" and "job completed" in slack.body["text"]
    assert "accuracy 0.9512" in slack.body["text"]
    rows = store.notifications(job)
    assert [(n.event, n.event_key, n.status) for n in rows] == [("completed", "", "sent")] * 3
    assert all(n.sent_at is not None and n.error is None for n in rows)


def test_a_failure_says_why_without_rendering_it(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    job = new_job(store, ["smtp://mail/ops@example.com", "webhook://hook"])
    store.record_failure(job, "sense_progress: trainer exited with code 3: CUDA error {{ 7 * 7 }}")
    store.finish(job, "failed")
    assert statuses(notify.notify_job_end(store, job)) == {
        "smtp://mail/ops@example.com": "sent",
        "webhook://hook": "sent",
    }
    [(_, mail)] = smtp.wait_for(1)
    assert mail["Subject"] == "[gpu-training] digits: job failed"
    assert "Reason: sense_progress: trainer exited with code 3: CUDA error {{ 7 * 7 }}" in mail_body(mail)
    [post] = web.wait_for(1)
    assert post.body["status"] == "failed" and post.body["reason"].endswith("CUDA error {{ 7 * 7 }}")


def test_a_cancel_says_by_whom(store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]) -> None:
    smtp, web = servers
    job = new_job(store, ["webhook://hook", "smtp://mail/ops@example.com"])
    store.request_cancel(job, by="alice")
    store.finish(job, "cancelled")
    assert len(notify.notify_job_end(store, job)) == 2
    [post] = web.wait_for(1)
    assert post.body["event"] == "cancelled" and post.body["cancelled_by"] == "alice"
    [(_, mail)] = smtp.wait_for(1)
    assert mail["Subject"] == "[gpu-training] digits: job cancelled" and "Cancelled by: alice" in mail_body(mail)


def test_each_notification_is_sent_once_whatever_retries(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    job = new_job(store)
    store.finish(job, "completed")
    assert len(notify.notify_job_end(store, job)) == 3
    assert notify.notify_job_end(store, job) == []  # a retried finalize
    time.sleep(0.5)
    assert len(smtp.messages) == 1 and len(web.posts) == 2
    assert len(store.notifications(job)) == 3


def test_a_job_still_running_or_without_targets_says_nothing(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    running = new_job(store)
    store.set_status(running, "running")
    assert notify.notify_job_end(store, running) == []
    quiet = new_job(store, [])
    store.finish(quiet, "completed")
    assert notify.notify_job_end(store, quiet) == []
    no_progress = new_job(store, ["webhook://hook"])  # notify_every_epochs: 0
    add_epochs(store, no_progress, 5)
    assert notify.notify_progress(store, no_progress) == 0
    time.sleep(0.3)
    assert smtp.messages == [] and web.posts == []
    assert store.notifications(running) == store.notifications(quiet) == store.notifications(no_progress) == []


def test_a_notifier_that_fails_never_raises_and_keeps_the_error_without_secrets(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, web = servers
    web.status = 500
    closed = free_port()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_MAIL", smtp_connection(closed))
    job = new_job(store, [*TARGETS, "webhook://nowhere"])  # no such connection
    store.record_failure(job, "boom")
    store.finish(job, "failed")

    deliveries = notify.notify_job_end(store, job)  # no exception: the job's outcome stands
    assert {d.status for d in deliveries} == {"failed"} and len(deliveries) == 4
    rows = {n.target: n for n in store.notifications(job)}
    assert {n.status for n in rows.values()} == {"failed"}
    assert "refused" in (rows[TARGETS[0]].error or "")
    assert "500" in (rows["webhook://hook"].error or "")
    assert "500" in (rows["slack://slack"].error or "")
    assert "nowhere" in (rows["webhook://nowhere"].error or "")
    for row in rows.values():
        assert row.error and row.sent_at is not None
        assert TOKEN not in row.error and "slack-secret-token" not in row.error and BEARER not in row.error
    assert notify.notify_job_end(store, job) == []  # a failure is recorded, not retried forever


def test_a_slack_url_in_the_password_is_masked_in_errors(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/services/{TOKEN}"  # the whole webhook URL as password
    monkeypatch.setenv("AIRFLOW_CONN_SLACK", f'{{"conn_type": "slackwebhook", "password": "{dead}"}}')
    job = new_job(store, ["slack://slack"])
    store.finish(job, "completed")
    [delivery] = notify.notify_job_end(store, job)
    assert delivery.status == "failed" and delivery.error
    assert "slack-secret-token" not in delivery.error and dead not in delivery.error
    assert notify.masked(f"POST {dead} failed", notify.parse_target("slack://slack")) == "POST *** failed"
    assert "slack-secret-token" not in notify.masked(
        f"url: /services/{TOKEN.replace('/', '%2F')}", notify.parse_target("slack://slack")
    )


def test_a_server_that_never_answers_is_given_up_on(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer], silent: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    smtp, _ = servers
    monkeypatch.setattr(notify, "SEND_TIMEOUT_SECONDS", 1.0)
    monkeypatch.setenv("AIRFLOW_CONN_HUNG", smtp_connection(silent, timeout=30))
    job = new_job(store, ["smtp://hung/ops@example.com", "smtp://mail/ops@example.com"])
    store.finish(job, "completed")
    started = time.monotonic()
    deliveries = notify.notify_job_end(store, job)
    assert time.monotonic() - started < 5  # not the SMTP connection's 30 s
    assert [(d.status, d.error) for d in deliveries] == [
        ("failed", "TimeoutError: no answer within 1 s"),
        ("sent", None),
    ]
    assert len(smtp.wait_for(1)) == 1  # the next target was still told


def test_progress_is_sent_every_n_epochs(store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]) -> None:
    smtp, web = servers
    job = new_job(store, ["webhook://hook", "smtp://mail/ops@example.com"], notify_every_epochs=2)
    add_epochs(store, job, 1)
    assert notify.notify_progress(store, job) == 0
    add_epochs(store, job, 1, first=2)
    assert notify.notify_progress(store, job) == 2
    assert notify.notify_progress(store, job) == 0  # the same epoch count again: already said
    add_epochs(store, job, 1, first=3)
    assert notify.notify_progress(store, job) == 0
    add_epochs(store, job, 2, first=4)  # 5 epochs: the latest multiple, 4, once
    assert notify.notify_progress(store, job) == 2
    assert notify.notify_progress(store, job) == 0
    add_epochs(store, job, 3, first=6)  # 6 then 8 stored at once: only 8 is said
    assert notify.notify_progress(store, job) == 2
    posts = web.wait_for(3)
    assert [p.body["epochs"] for p in posts] == [2, 5, 8] and all(p.body["event"] == "progress" for p in posts)
    assert [p.body["last_epoch"]["epoch"] for p in posts] == [2, 5, 8]
    subjects = [mail["Subject"] for _, mail in smtp.wait_for(3)]
    assert subjects == [f"[gpu-training] digits: job {n} epochs done" for n in (2, 5, 8)]
    keys = sorted({(n.event, n.event_key) for n in store.notifications(job)})
    assert keys == [("progress", "epochs 2"), ("progress", "epochs 4"), ("progress", "epochs 8")]


def test_the_follower_sends_progress_in_the_background_and_the_last_one_too(
    store: ResultsStore,
    servers: tuple[SmtpServer, WebhookServer],
    silent: int,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A target that hangs does not hold the follower (epochs keep being stored), and epochs stored
    while a check is in flight are checked once it is done: the last multiple is said."""
    _, web = servers
    monkeypatch.setattr(notify, "SEND_TIMEOUT_SECONDS", 2.0)
    monkeypatch.setenv("AIRFLOW_CONN_HUNG", f'{{"conn_type": "http", "host": "http://127.0.0.1:{silent}/"}}')
    job = new_job(store, ["webhook://hung", "webhook://hook"], notify_every_epochs=2)
    host = LocalHost(tmp_path / "instance")
    host.prepare()
    trainer = Trainer(host)

    async def scenario() -> Any:
        task = asyncio.create_task(follower(store, job, host, poll_interval=30).run())
        trainer.write(event_line("PROJECT", "start"))
        trainer.epoch(1)
        trainer.epoch(2)
        await until(lambda: store.epoch_count(job) == 2, timeout=5)
        await until(lambda: bool(store.notified_targets(job, "progress", "epochs 2")), timeout=5)
        for epoch in (3, 4):  # while "webhook://hung" is still being waited for
            trainer.epoch(epoch)
        await until(lambda: store.epoch_count(job) == 4, timeout=1.5)
        trainer.write(event_line("PROJECT", "end"))
        return await asyncio.wait_for(task, 20)

    try:
        result = asyncio.run(scenario())
    finally:
        trainer.stop()
    assert (result.kind, result.succeeded) == ("project_end", True)
    posts = web.wait_for(2)
    assert [p.body["epochs"] for p in posts] == [2, 4]
    rows = {(n.target, n.event_key): n for n in store.notifications(job)}
    assert rows[("webhook://hung", "epochs 2")].error == "TimeoutError: no answer within 2 s"
    assert rows[("webhook://hook", "epochs 4")].status == "sent"


def test_finalize_goes_on_whatever_the_notification_does(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpu_training.operators import FinalizeJobOperator

    _, web = servers
    finalize = FinalizeJobOperator(task_id="finalize")
    job = new_job(store, ["webhook://hook"])
    store.finish(job, "completed")
    finalize._notify_end(store, job)
    assert [p.body["event"] for p in web.wait_for(1)] == ["completed"]

    def broken(*_: Any) -> list[notify.Delivery]:
        raise RuntimeError("results DB gone")

    monkeypatch.setattr(notify, "notify_job_end", broken)
    finalize._notify_end(store, job)  # logged, not raised: the job's status stands


def test_a_webhook_url_with_a_token_in_its_path_and_query_is_masked_in_logs_and_errors(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from airflow.sdk.log import mask_secret  # noqa: F401  (the masker the task logs go through)

    dead = free_port()
    token, key = "hook-path-token-8f3a91c2", "query-secret-77e1"
    url = f"http://127.0.0.1:{dead}/services/{token}?key={key}"
    conn = {"conn_type": "http", "host": url, "extra": {"timeout": 2}}
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_TOKENHOOK", json.dumps(conn))
        job = new_job(store, ["webhook://tokenhook"])
        store.finish(job, "completed")
        with caplog.at_level(logging.DEBUG):
            [delivery] = notify.notify_job_end(store, job)
    assert delivery.status == "failed" and delivery.error
    [row] = store.notifications(job)
    for text in (delivery.error, row.error or ""):
        for secret in (token, key, f"127.0.0.1:{dead}", url):
            assert secret not in text, text
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert token not in logged and key not in logged, logged
    target = notify.parse_target("webhook://tokenhook")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AIRFLOW_CONN_TOKENHOOK", json.dumps(conn))
        assert notify.masked(f"POST {url} refused", target) == "POST *** refused"
        assert token not in notify.masked(f"/services/{token}%3Fkey%3D{key}", target)


def test_slack_text_from_the_job_is_escaped(store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]) -> None:
    _, web = servers
    job = new_job(store, ["slack://slack"])
    store.record_failure(job, "trainer said <!channel> see <http://evil.example/x|the fix> & <@U123>")
    store.finish(job, "failed")
    assert statuses(notify.notify_job_end(store, job)) == {"slack://slack": "sent"}
    [post] = web.wait_for(1)
    text = post.body["text"]
    assert "&lt;!channel&gt; see &lt;http://evil.example/x|the fix&gt; &amp; &lt;@U123&gt;" in text
    assert "<!channel>" not in text and "<http" not in text and "<@" not in text
