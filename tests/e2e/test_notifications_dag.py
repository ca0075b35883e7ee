"""End to end: a gpu_training DAG run that tells an SMTP server and a webhook how it went, and how it
progressed every N epochs (the follower in the triggerer sends those)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from gpu_training.results.models import Notification
from tests.e2e.test_gpu_training_dag import job_of, run_dag, session
from tests.notify_servers import SmtpServer, WebhookServer
from tests.servers import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def servers() -> Iterator[tuple[SmtpServer, WebhookServer]]:
    smtp, web = SmtpServer(), WebhookServer()
    yield smtp, web
    smtp.stop()
    web.stop()


def test_a_dag_run_notifies_its_end_and_its_progress(
    airflow_env: dict[str, str], servers: tuple[SmtpServer, WebhookServer]
) -> None:
    smtp, web = servers
    # A webhook whose URL carries its token (path and query), answering nothing: its failures are
    # recorded without the URL. (`airflow dags test` masks no log line at all, not even a password:
    # that the task logs of a deployment hide it is tests/e2e/cluster/test_airflow_views.py's.)
    dead = f"http://127.0.0.1:{free_port()}/hooks/url-path-token-5d2e7a?sig=url-query-secret-91b4"
    env = {
        **airflow_env,
        "AIRFLOW_CONN_TEAM_MAIL": smtp.connection(from_email="training@example.com"),
        "AIRFLOW_CONN_TEAM_HOOK": web.webhook_connection(token="hook-secret"),
        "AIRFLOW_CONN_TOKEN_HOOK": json.dumps({"conn_type": "http", "host": dead, "extra": {"timeout": 2}}),
    }
    conf = {
        "project_id": "e2e-notify",
        "config": {"iterations": 1, "epochs": 4, "hidden_size": 16, "epoch_sleep_seconds": 1.5},
        "notify": ["smtp://team_mail/ml-team@example.com", "webhook://team_hook", "webhook://token_hook"],
        "notify_every_epochs": 2,
        "poll_interval_seconds": 1,
    }
    result = run_dag(env, conf)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    job = job_of(env, "e2e-notify")
    posts = web.wait_for(3)
    by_event = {(p.body["event"], p.body["epochs"] if p.body["event"] == "progress" else None) for p in posts}
    assert by_event == {("progress", 2), ("progress", 4), ("completed", None)}, posts
    done = next(p for p in posts if p.body["event"] == "completed")
    assert done.body["job_uuid"] == job.uuid and done.headers["Authorization"] == "Bearer hook-secret"
    mails = smtp.wait_for(3)
    assert all(recipients == ["ml-team@example.com"] for recipients, _ in mails)
    subjects = sorted(mail["Subject"] for _, mail in mails)
    assert subjects == [
        "[gpu-training] e2e-notify: job 2 epochs done",
        "[gpu-training] e2e-notify: job 4 epochs done",
        "[gpu-training] e2e-notify: job completed",
    ]
    with session(env) as s:
        rows = s.scalars(select(Notification).where(Notification.job_id == job.id)).all()
    assert sorted((n.event, n.event_key, n.target, n.status) for n in rows) == sorted(
        (event, key, target, "failed" if target == "webhook://token_hook" else "sent")
        for event, key in (("completed", ""), ("progress", "epochs 2"), ("progress", "epochs 4"))
        for target in conf["notify"]
    )
    errors = " ".join(n.error or "" for n in rows)
    assert "ConnectionError" in errors, errors
    for secret in ("url-path-token-5d2e7a", "url-query-secret-91b4", dead):
        assert secret not in errors, secret
    assert "hook-secret" not in result.stdout + result.stderr
