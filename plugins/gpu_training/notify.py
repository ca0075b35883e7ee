"""Job notifications through Airflow's notifiers: completed, failed (with the reason), cancelled,
and progress every N epochs, to the targets of the job's ``notify`` param.

A target names a kind and an Airflow connection, never a secret:

- ``smtp://<conn id>/<to>[,<to>...]``: e-mail through the SMTP provider's ``SmtpNotifier`` (host,
  port, login and password in the connection; ``from_email``, ``disable_ssl``, ``disable_tls``,
  ``timeout``, ``retry_limit`` in its extra);
- ``slack://<conn id>``: the Slack provider's ``SlackWebhookNotifier`` (a ``slackwebhook``
  connection whose password is the incoming webhook's token or URL);
- ``webhook://<conn id>``: :class:`WebhookNotifier`, a JSON POST to an HTTP connection's URL (its
  password, if any, goes as ``Authorization: Bearer``).

Each notification is claimed in the results DB before it is sent (``notifications``: one row per
job, event, key and target), so a retried task or a restarted trigger never sends it twice. A
notifier that fails never fails the job: the error is logged and kept on the row (secrets masked).
"""

from __future__ import annotations

import dataclasses
import html
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from airflow.sdk import BaseNotifier
from sqlalchemy import func, select

from gpu_training.results.models import EpochTrain, Eval
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)

#: The most one notification may take (a server that does not answer must not hold a task).
SEND_TIMEOUT_SECONDS = 60.0
WEBHOOK_TIMEOUT_SECONDS = 10.0
FINAL_EVENTS = ("completed", "failed", "cancelled")
_SENDERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gpu-training-notify")


@dataclasses.dataclass(frozen=True)
class Target:
    """One entry of the ``notify`` param."""

    raw: str
    kind: str  # smtp, slack, webhook
    conn_id: str
    to: tuple[str, ...] = ()


def parse_target(raw: str) -> Target:
    kind, _, rest = raw.partition("://")
    conn_id, _, recipients = rest.partition("/")
    if kind not in ("smtp", "slack", "webhook") or not conn_id or (kind == "smtp") != bool(recipients):
        raise ValueError(f"{raw!r} is not a notify target")
    return Target(raw, kind, conn_id, tuple(r for r in recipients.split(",") if r))


class WebhookNotifier(BaseNotifier):
    """POSTs a JSON body to the URL of an HTTP connection (the http provider's ``HttpHook``)."""

    template_fields = ()

    def __init__(self, *, http_conn_id: str, payload: dict[str, Any], timeout: float = WEBHOOK_TIMEOUT_SECONDS) -> None:
        super().__init__()
        self.http_conn_id = http_conn_id
        self.payload = payload
        self.timeout = timeout

    def notify(self, context: Any) -> None:
        from airflow.providers.http.hooks.http import HttpHook
        from airflow.sdk import BaseHook

        headers = {"Content-Type": "application/json"}
        conn = BaseHook.get_connection(self.http_conn_id)
        if conn.password and not conn.login:
            headers["Authorization"] = f"Bearer {conn.password}"
        HttpHook(method="POST", http_conn_id=self.http_conn_id).run(
            endpoint=None, json=self.payload, headers=headers, extra_options={"timeout": self.timeout}
        )


# --- what is said --------------------------------------------------------------------------------


def job_facts(store: ResultsStore, job_uuid: str) -> dict[str, Any]:
    """What a notification says about the job (no secret: the params' connections are names)."""
    job = store.job(job_uuid)
    with store.session() as s:
        epochs = s.scalar(select(func.count()).select_from(EpochTrain).where(EpochTrain.job_id == job.id)) or 0
        last_epoch = s.scalars(
            select(EpochTrain).where(EpochTrain.job_id == job.id).order_by(EpochTrain.id.desc()).limit(1)
        ).first()
        last_eval = s.scalars(select(Eval).where(Eval.job_id == job.id).order_by(Eval.id.desc()).limit(1)).first()
    metrics = {}
    if last_eval is not None:
        metrics = {k: getattr(last_eval, k) for k in ("accuracy", "f1", "loss") if getattr(last_eval, k) is not None}
    return {
        "job_uuid": job.uuid,
        "project_id": job.project_id,
        "status": job.status,
        "reason": job.failure_reason,
        "cancelled_by": job.cancelled_by,
        "dag_id": job.dag_id,
        "run_id": job.run_id,
        "provider": job.provider,
        "num_nodes": (job.params or {}).get("num_nodes", 1),
        "cost_usd": job.cost_usd,
        "time_taken_seconds": job.time_taken,
        "epochs": epochs,
        "last_epoch": {"iteration": last_epoch.iteration, "epoch": last_epoch.epoch, "avg_loss": last_epoch.avg_loss}
        if last_epoch is not None
        else None,
        "eval": metrics,
        "outputs_uri": job.outputs_uri,
    }


def _lines(event: str, facts: dict[str, Any]) -> tuple[str, list[str]]:
    what = {"progress": f"{facts['epochs']} epochs done"}.get(event, event)
    subject = f"[gpu-training] {facts['project_id']}: job {what}"
    lines = [f"Training job {facts['job_uuid']} ({facts['project_id']}): {what}."]
    if event == "failed" and facts["reason"]:
        lines.append(f"Reason: {facts['reason']}")
    if event == "cancelled":
        lines.append(f"Cancelled by: {facts['cancelled_by'] or 'unknown'}")
    if facts["last_epoch"]:
        last = facts["last_epoch"]
        loss = f"{last['avg_loss']:.4f}" if last["avg_loss"] is not None else "n/a"
        lines.append(
            f"Epochs: {facts['epochs']} (last: iteration {last['iteration']} epoch {last['epoch']}, loss {loss})"
        )
    if facts["eval"]:
        lines.append("Evaluation: " + ", ".join(f"{k} {v:.4f}" for k, v in facts["eval"].items()))
    if event != "progress":
        if facts["cost_usd"] is not None:
            lines.append(f"Cost: {facts['cost_usd']:.4f} USD")
        if facts["time_taken_seconds"] is not None:
            lines.append(f"Time: {facts['time_taken_seconds']:.0f} s")
        if facts["outputs_uri"] and event == "completed":
            lines.append(f"Outputs: {facts['outputs_uri']}")
    lines.append(f"Run: {facts['dag_id']} / {facts['run_id']}")
    return subject, lines


def notifier_for(target: Target, event: str, facts: dict[str, Any]) -> BaseNotifier:
    subject, lines = _lines(event, facts)
    if target.kind == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier
        from airflow.sdk import BaseHook

        sender = BaseHook.get_connection(target.conn_id).extra_dejson.get("from_email")
        body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
        return SmtpNotifier(
            smtp_conn_id=target.conn_id,
            to=list(target.to),
            from_email=sender or f"gpu-training@{socket.getfqdn()}",
            subject=subject,
            html_content=f"<html><body>{body}</body></html>",
        )
    if target.kind == "slack":
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        return SlackWebhookNotifier(
            slack_webhook_conn_id=target.conn_id, text="\n".join([f"*{subject}*", *lines]), timeout=30
        )
    return WebhookNotifier(http_conn_id=target.conn_id, payload={"event": event, "summary": subject, **facts})


# --- sending, once -------------------------------------------------------------------------------


def _secrets_of(target: Target) -> list[str]:
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(target.conn_id)
    except Exception:
        return []
    return [s for s in (conn.password, conn.host if target.kind == "slack" else None) if s and len(s) >= 4]


def _masked(text: str, target: Target) -> str:
    for secret in _secrets_of(target):
        text = text.replace(secret, "***")
    return text


def send(store: ResultsStore, job_uuid: str, event: str, *, key: str = "", targets: list[str] | None = None) -> int:
    """Send ``event`` to every target of the job once (claimed in the results DB first); returns
    how many were sent now. Never raises for a notifier's failure: it is logged and recorded."""
    job = store.job(job_uuid)
    raw_targets = list(targets if targets is not None else (job.params or {}).get("notify") or [])
    if not raw_targets:
        return 0
    facts = job_facts(store, job_uuid)
    sent = 0
    for raw in raw_targets:
        try:
            target = parse_target(raw)
        except ValueError as err:
            log.warning("notify: %s", err)
            continue
        if not store.claim_notification(job_uuid, event, key, raw):
            continue  # sent (or being sent) by an earlier try
        error = None
        try:
            notifier = notifier_for(target, event, facts)
            # Not through notifier(context): that renders Jinja in the message (a failure reason
            # may hold "{{"). A send that hangs is given up on after SEND_TIMEOUT_SECONDS.
            _SENDERS.submit(notifier.notify, {}).result(timeout=SEND_TIMEOUT_SECONDS)
            sent += 1
        except FutureTimeout:
            error = f"no answer within {SEND_TIMEOUT_SECONDS:g} s"
        except Exception as err:
            error = _masked(f"{type(err).__name__}: {err}", target)
        if error:
            log.warning("notify %s of job %s: %s failed: %s", event, job_uuid, raw, error)
        else:
            log.info("notified %s of job %s %s%s", raw, job_uuid, event, f" ({key})" if key else "")
        store.finish_notification(job_uuid, event, key, raw, error=error)
    return sent


def notify_job_end(store: ResultsStore, job_uuid: str) -> int:
    """The job's final status (completed, failed with the reason, cancelled) to its targets."""
    try:
        status = store.job(job_uuid).status
        if status not in FINAL_EVENTS:
            return 0
        return send(store, job_uuid, status)
    except Exception:  # never fails the job
        log.exception("notifying the end of job %s failed", job_uuid)
        return 0


def notify_progress(store: ResultsStore, job_uuid: str) -> int:
    """Progress to the job's targets when its stored epochs reached the next multiple of
    ``notify_every_epochs`` (one message per multiple, the latest one only); cheap when none is due."""
    try:
        job = store.job(job_uuid)
        params = job.params or {}
        every = int(params.get("notify_every_epochs") or 0)
        if every <= 0 or not params.get("notify"):
            return 0
        with store.session() as s:
            epochs = s.scalar(select(func.count()).select_from(EpochTrain).where(EpochTrain.job_id == job.id)) or 0
        if epochs < every:
            return 0
        return send(store, job_uuid, "progress", key=f"epochs {epochs // every * every}")
    except Exception:  # never fails the job
        log.exception("notifying the progress of job %s failed", job_uuid)
        return 0
