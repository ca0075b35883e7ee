"""Notifications of a job's end and progress, through Airflow's notifiers, to real servers: an SMTP
server (aiosmtpd), a webhook and a Slack incoming webhook (local HTTP servers)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_training import notify
from gpu_training.results.models import EpochTrain, Eval, utcnow
from gpu_training.results.store import ResultsStore
from tests.notify_servers import SmtpServer, WebhookServer
from tests.servers import free_port

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


def mail_body(mail: Any) -> str:
    """The decoded text of every part of a message."""
    parts = mail.walk() if mail.is_multipart() else [mail]
    return "".join(p.get_payload(decode=True).decode() for p in parts if not p.is_multipart())


def add_epochs(store: ResultsStore, job: str, count: int, *, first: int = 1) -> None:
    job_id = store.job(job).id
    with store.session() as s, s.begin():
        for epoch in range(first, first + count):
            s.add(EpochTrain(job_id=job_id, iteration=1, epoch=epoch, avg_loss=1.0 / epoch, completed_at=utcnow()))


def test_a_completed_job_is_announced_by_email_webhook_and_slack(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    job = new_job(store)
    add_epochs(store, job, 4)
    with store.session() as s, s.begin():
        s.add(Eval(job_id=store.job(job).id, iteration=1, epoch=4, accuracy=0.9512, f1=0.95, evaluated_at=utcnow()))
    store.update_job(job, cost_usd=0.1234, outputs_uri="s3://bucket/outputs/x")
    store.finish(job, "completed")

    assert notify.notify_job_end(store, job) == 3
    [(recipients, mail)] = smtp.wait_for(1)
    assert sorted(recipients) == ["ml@example.com", "ops@example.com"]
    assert mail["Subject"] == "[gpu-training] digits: job completed" and mail["From"] == "training@example.com"
    body = mail_body(mail)
    assert "loss 0.2500" in body and "accuracy 0.9512" in body and "0.1234 USD" in body
    posts = web.wait_for(2)
    hook = next(p for p in posts if p.path == "/hooks/training")
    assert hook.headers["Authorization"] == f"Bearer {BEARER}"
    assert hook.body["event"] == "completed" and hook.body["job_uuid"] == job and hook.body["epochs"] == 4
    assert hook.body["eval"]["accuracy"] == pytest.approx(0.9512)
    slack = next(p for p in posts if p.path.startswith("/slack/"))
    assert slack.path == f"/slack/{TOKEN}" and "job completed" in slack.body["text"]
    assert [n.status for n in store.notifications(job)] == ["sent"] * 3


def test_a_failure_says_why_without_rendering_it(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    job = new_job(store, ["smtp://mail/ops@example.com", "webhook://hook"])
    store.record_failure(job, "sense_progress: trainer exited with code 3: CUDA error {{ 7 * 7 }}")
    store.finish(job, "failed")
    assert notify.notify_job_end(store, job) == 2
    [(_, mail)] = smtp.wait_for(1)
    assert mail["Subject"] == "[gpu-training] digits: job failed"
    assert "CUDA error {{ 7 * 7 }}" in mail_body(mail)  # the reason as it is: no template is rendered
    [post] = web.wait_for(1)
    assert post.body["status"] == "failed" and post.body["reason"].endswith("CUDA error {{ 7 * 7 }}")


def test_a_cancel_says_by_whom(store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]) -> None:
    _, web = servers
    job = new_job(store, ["webhook://hook"])
    store.request_cancel(job, by="alice")
    store.finish(job, "cancelled")
    assert notify.notify_job_end(store, job) == 1
    [post] = web.wait_for(1)
    assert post.body["event"] == "cancelled" and post.body["cancelled_by"] == "alice"


def test_each_notification_is_sent_once_whatever_retries(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    job = new_job(store)
    store.finish(job, "completed")
    assert notify.notify_job_end(store, job) == 3
    assert notify.notify_job_end(store, job) == 0  # a retried finalize
    time.sleep(0.5)
    assert len(smtp.messages) == 1 and len(web.posts) == 2


def test_a_notifier_that_fails_never_raises_and_keeps_the_error_without_secrets(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, web = servers
    web.status = 500
    closed = SmtpServer.connection.__get__(type("Closed", (), {"port": free_port()})())  # nothing listens
    monkeypatch.setenv("AIRFLOW_CONN_MAIL", closed())
    job = new_job(store)
    store.record_failure(job, "boom")
    store.finish(job, "failed")
    assert notify.notify_job_end(store, job) == 0  # no exception: the job's outcome stands
    rows = {n.target: n for n in store.notifications(job)}
    assert {n.status for n in rows.values()} == {"failed"}
    assert "Connection refused" in (rows[TARGETS[0]].error or "") or "refused" in (rows[TARGETS[0]].error or "")
    assert "500" in (rows["webhook://hook"].error or "")
    for row in rows.values():
        assert TOKEN not in (row.error or "") and BEARER not in (row.error or "")
    assert notify.notify_job_end(store, job) == 0  # a failure is recorded, not retried forever


def test_progress_is_sent_every_n_epochs(store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]) -> None:
    _, web = servers
    job = new_job(store, ["webhook://hook"], notify_every_epochs=2)
    add_epochs(store, job, 1)
    assert notify.notify_progress(store, job) == 0
    add_epochs(store, job, 1, first=2)
    assert notify.notify_progress(store, job) == 1
    assert notify.notify_progress(store, job) == 0  # the same epoch count again: already said
    add_epochs(store, job, 1, first=3)
    assert notify.notify_progress(store, job) == 0
    add_epochs(store, job, 1, first=4)
    assert notify.notify_progress(store, job) == 1
    posts = web.wait_for(2)
    assert [p.body["epochs"] for p in posts] == [2, 4] and all(p.body["event"] == "progress" for p in posts)
    assert [n.event_key for n in store.notifications(job)] == ["epochs 2", "epochs 4"]


def test_no_targets_or_no_interval_sends_nothing(
    store: ResultsStore, servers: tuple[SmtpServer, WebhookServer]
) -> None:
    _, web = servers
    quiet = new_job(store, [])
    store.finish(quiet, "completed")
    assert notify.notify_job_end(store, quiet) == 0
    no_progress = new_job(store, ["webhook://hook"])
    add_epochs(store, no_progress, 5)
    assert notify.notify_progress(store, no_progress) == 0
    assert web.posts == [] and store.notifications(quiet) == []
