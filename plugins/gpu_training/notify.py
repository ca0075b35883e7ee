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
notifier that fails never fails the job: the error is logged and kept on the row (secrets masked),
and a send that hangs is given up after :data:`SEND_TIMEOUT_SECONDS`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import html
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseNotifier

from gpu_training.results.models import TrainingJob
from gpu_training.results.store import ResultsStore

log = logging.getLogger(__name__)

#: The most one notification may take, connection lookup included: a server that accepts and
#: never answers must not hold the finalize task or the follower.
SEND_TIMEOUT_SECONDS = 60.0
#: The most a progress check in the follower may take (its sends are bounded one by one as well).
PROGRESS_TIMEOUT_SECONDS = 3 * SEND_TIMEOUT_SECONDS
#: The HTTP timeout of a webhook POST and of a Slack webhook call.
WEBHOOK_TIMEOUT_SECONDS = 10
FINAL_EVENTS = ("completed", "failed", "cancelled")
PROGRESS = "progress"
_EVAL_METRICS = ("accuracy", "precision", "recall", "f1", "auc", "loss")


@dataclasses.dataclass(frozen=True)
class Target:
    """One entry of the ``notify`` param."""

    raw: str
    kind: str  # smtp, slack, webhook
    conn_id: str
    to: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One notification sent by this call: ``sent``, or ``failed`` with its error (secrets masked)."""

    target: str
    event: str
    key: str
    status: str
    error: str | None = None


def parse_target(raw: str) -> Target:
    """``smtp://conn/a@x,b@y``, ``slack://conn`` or ``webhook://conn`` (see ``params.NOTIFY_TARGET_PATTERN``)."""
    kind, _, rest = raw.partition("://")
    conn_id, _, recipients = rest.partition("/")
    if kind not in ("smtp", "slack", "webhook") or not conn_id or (kind == "smtp") != bool(recipients):
        raise ValueError(
            f"{raw!r} is not a notify target: use 'smtp://<connection>/<to>[,<to>...]', "
            "'slack://<connection>' or 'webhook://<connection>'"
        )
    return Target(raw, kind, conn_id, tuple(r for r in recipients.split(",") if r))


class WebhookNotifier(BaseNotifier):
    """POSTs a JSON body to the URL of an HTTP connection (the http provider's ``HttpHook``); the
    connection's password, when it has no login, is sent as ``Authorization: Bearer``."""

    # Nothing is rendered: the payload carries a failure reason as it is, "{{" included.
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
        if conn.password and not conn.login:  # with a login, HttpHook sends basic auth instead
            headers["Authorization"] = f"Bearer {conn.password}"
        HttpHook(method="POST", http_conn_id=self.http_conn_id).run(
            endpoint=None, json=self.payload, headers=headers, extra_options={"timeout": self.timeout}
        )


# --- what is said --------------------------------------------------------------------------------


def _links(job: TrainingJob) -> dict[str, str]:
    """Where to look: the job's page and its dag run in the Airflow UI (absolute when ``[api]
    base_url`` is set), and its outputs."""
    from airflow.sdk import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    links = {
        "job": f"{base}/training/ui/#/jobs/{job.uuid}",
        "dag_run": f"{base}/dags/{quote(job.dag_id, safe='')}/runs/{quote(job.run_id, safe='')}",
    }
    if job.outputs_uri:
        links["outputs"] = job.outputs_uri
    return links


def job_facts(store: ResultsStore, job_uuid: str) -> dict[str, Any]:
    """What a notification says about the job (no secret: the params' connections are names)."""
    job = store.job(job_uuid)
    epochs = store.epoch_count(job_uuid)
    last_epoch, last_eval = store.latest_epoch_and_eval(job_uuid)
    metrics: dict[str, float] = {}
    if last_eval is not None:
        metrics = {k: getattr(last_eval, k) for k in _EVAL_METRICS if getattr(last_eval, k) is not None}
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
        "links": _links(job),
    }


def message(event: str, facts: dict[str, Any]) -> tuple[str, list[str]]:
    """The subject and the lines of a notification of ``event``."""
    what = {PROGRESS: f"{facts['epochs']} epochs done"}.get(event, event)
    subject = f"[gpu-training] {facts['project_id']}: job {what}"
    lines = [f"Training job {facts['job_uuid']} ({facts['project_id']}): {what}."]
    if event == "failed":
        lines.append(f"Reason: {facts['reason'] or 'unknown'}")
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
    if event != PROGRESS:
        if facts["cost_usd"] is not None:
            lines.append(f"Cost: {facts['cost_usd']:.4f} USD")
        if facts["time_taken_seconds"] is not None:
            lines.append(f"Time: {facts['time_taken_seconds']:.0f} s")
        if facts["outputs_uri"] and event == "completed":
            lines.append(f"Outputs: {facts['outputs_uri']}")
    lines.append(f"Run: {facts['dag_id']} / {facts['run_id']}")
    lines.append(f"Job: {facts['links']['job']}")
    return subject, lines


def slack_escaped(text: str) -> str:
    """Text as Slack shows it literally: ``&``, ``<`` and ``>`` escaped (Slack's message formatting
    rules), so ``<!channel>``, ``<@U123>`` and ``<http://x|click>`` are words, not commands or links."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def notifier_for(target: Target, event: str, facts: dict[str, Any]) -> BaseNotifier:
    """The Airflow notifier that says ``event`` to ``target``."""
    subject, lines = message(event, facts)
    if target.kind == "smtp":
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier
        from airflow.sdk import BaseHook, conf

        sender = (
            BaseHook.get_connection(target.conn_id).extra_dejson.get("from_email")
            or conf.get("email", "from_email", fallback=None)
            or f"gpu-training@{socket.gethostname()}"  # not getfqdn(): that may wait on DNS
        )
        body = "".join(f"<p>{html.escape(line)}</p>" for line in lines)
        return SmtpNotifier(
            smtp_conn_id=target.conn_id,
            to=list(target.to),
            from_email=sender,
            subject=subject,
            html_content=f"<html><body>{body}</body></html>",
        )
    if target.kind == "slack":
        from airflow.providers.slack.notifications.slack_webhook import SlackWebhookNotifier

        # What the job says (its project, a failure reason quoting the trainer's log) is escaped as
        # Slack asks: no <!channel> pings, no disguised <url|text> links.
        return SlackWebhookNotifier(
            slack_webhook_conn_id=target.conn_id,
            text="\n".join([f"*{slack_escaped(subject)}*", *map(slack_escaped, lines)]),
            timeout=WEBHOOK_TIMEOUT_SECONDS,
        )
    return WebhookNotifier(http_conn_id=target.conn_id, payload={"event": event, "summary": subject, **facts})


# --- sending, once -------------------------------------------------------------------------------


def _url_secrets(url: str) -> set[str]:
    """A webhook URL and its parts as an error may quote them: whole, host, path, each long path
    segment (a token in the path), the query and each of its values, raw and percent-encoded."""
    url = url.strip()
    if len(url) < 4:
        return set()
    found = {url, quote(url, safe=""), quote(url, safe="/:")}
    parts = urlsplit(url if "://" in url else f"//{url}")
    path = parts.path.strip("/")
    found |= {p for p in (parts.netloc, parts.hostname or "", path, parts.query) if len(p) >= 4}
    found |= {segment for segment in path.split("/") if len(segment) >= 8}
    found |= {value for _, _, value in (pair.partition("=") for pair in parts.query.split("&")) if len(value) >= 4}
    found |= {quote(p, safe="") for p in list(found)}
    return found


def _secrets_of(target: Target) -> list[str]:
    """What must never reach a log or the ``error`` column: the connection's password (a webhook
    token, or a whole webhook URL) and, for a webhook, its whole URL (host, path, query: a token
    is often in the path), in whatever form an error may quote them."""
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(target.conn_id)
    except Exception:
        return []
    found: set[str] = set()
    secret = (conn.password or "").strip()
    if len(secret) >= 4:
        found |= {secret, quote(secret, safe=""), quote(secret, safe="/:")}
        # A Slack token (T.../B.../secret) or a whole webhook URL: its path and last part are secret too.
        path = urlsplit(secret).path.strip("/") if "://" in secret else secret
        for part in (path, path.rsplit("/", 1)[-1]):
            if len(part) >= 8:
                found.add(part)
        if "://" in secret:
            found |= _url_secrets(secret)
    if target.kind == "webhook" and conn.host:
        host = conn.host if "://" in conn.host else f"{conn.schema or 'https'}://{conn.host}"
        found |= _url_secrets(host)
        if conn.port:
            parts = urlsplit(host)
            found.add(f"{parts.hostname}:{conn.port}")
    # Longest first, so that a URL is masked whole rather than around its masked token.
    return sorted(found, key=len, reverse=True)


def _mask(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def masked(text: str, target: Target) -> str:
    """``text`` with the secrets of ``target``'s connection replaced by ``***``."""
    return _mask(text, _secrets_of(target))


def _within(seconds: float, call: Callable[[], None]) -> None:
    """Run ``call`` in a daemon thread and give up after ``seconds`` (the thread is left to end on
    its own: a daemon never holds the process when it exits, unlike a thread pool's workers)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
        except BaseException as err:  # handed to the caller below
            outcome.append(err)
        else:
            outcome.append(None)

    thread = threading.Thread(target=run, name="gpu-training-notify", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise TimeoutError(f"no answer within {seconds:g} s")
    err = outcome[0]
    if isinstance(err, Exception):
        raise err
    if err is not None:  # SystemExit and the like from a notifier: a failure like any other here
        raise RuntimeError(f"{type(err).__name__}: {err}")


def mask_in_logs(secret: str) -> None:
    """Hand ``secret`` to Airflow's log maskers. A task's log goes through the Task SDK's masker (and
    its supervisor's); the triggerer's, and ``airflow dags test``'s, through the core one: two
    separate instances in Airflow 3.3, so both are told."""
    from airflow.sdk.log import mask_secret

    mask_secret(secret)
    try:
        from airflow._shared.secrets_masker import mask_secret as mask_in_core
    except ImportError:  # a worker with the Task SDK alone
        return
    mask_in_core(secret)


def _send_one(target: Target, event: str, facts: dict[str, Any], secrets: list[str]) -> None:
    # The secrets are looked up here, within the time limit, for the error to be masked with, and
    # handed to Airflow's log maskers: the HTTP hook logs the URL it calls (and fails to reach).
    secrets += _secrets_of(target)
    for secret in secrets:
        mask_in_logs(secret)
    # notifier.notify(), not notifier(context): the latter renders Jinja in the message, and a
    # failure reason may hold "{{".
    notifier_for(target, event, facts).notify({})


def send(
    store: ResultsStore, job_uuid: str, event: str, *, key: str = "", targets: Sequence[str] | None = None
) -> list[Delivery]:
    """Say ``event`` to every target of the job (or ``targets``) that was not told before: each is
    claimed in the results DB first, then sent and marked ``sent`` or ``failed``. Returns what this
    call sent; a notifier's failure is logged and recorded, never raised."""
    raw_targets = list(targets if targets is not None else (store.job(job_uuid).params or {}).get("notify") or [])
    facts: dict[str, Any] | None = None
    deliveries = []
    for raw in raw_targets:
        try:
            target = parse_target(raw)
        except ValueError as err:
            log.warning("notify: %s", err)
            continue
        if not store.claim_notification(job_uuid, event, key, raw):
            continue  # sent (or being sent, or failed) by an earlier try
        error = None
        secrets: list[str] = []
        try:
            if facts is None:
                facts = job_facts(store, job_uuid)
            _within(SEND_TIMEOUT_SECONDS, functools.partial(_send_one, target, event, facts, secrets))
        except Exception as err:
            error = _mask(f"{type(err).__name__}: {err}", secrets)
        label = f"{event} ({key})" if key else event
        if error:
            log.warning("notifying %s of job %s to %s failed: %s", label, job_uuid, raw, error)
        else:
            log.info("notified %s of job %s to %s", label, job_uuid, raw)
        store.finish_notification(job_uuid, event, key, raw, error=error)
        deliveries.append(Delivery(raw, event, key, "failed" if error else "sent", error))
    return deliveries


def notify_job_end(store: ResultsStore, job_uuid: str) -> list[Delivery]:
    """Say how the job ended (completed; failed, with the reason; cancelled, by whom) to its
    targets, once each. Nothing for a job without targets or not ended; never raises."""
    try:
        job = store.job(job_uuid)
        targets = list((job.params or {}).get("notify") or [])
        if job.status not in FINAL_EVENTS or not targets:
            return []
        return send(store, job_uuid, job.status, targets=targets)
    except Exception:  # the job's outcome stands whatever happens here
        log.exception("notifying the end of job %s failed", job_uuid)
        return []


def notify_progress(store: ResultsStore, job_uuid: str) -> int:
    """Progress to the job's targets once its stored epochs reach a multiple of
    ``notify_every_epochs`` not said yet (the latest multiple only); returns how many were sent.
    Called after every stored batch, so a check with nothing due is three small queries. Never raises."""
    try:
        params = store.job(job_uuid).params or {}
        every = int(params.get("notify_every_epochs") or 0)
        targets = list(params.get("notify") or [])
        if every <= 0 or not targets:
            return 0
        epochs = store.epoch_count(job_uuid)
        if epochs < every:
            return 0
        key = f"epochs {epochs // every * every}"
        if set(targets) <= store.notified_targets(job_uuid, PROGRESS, key):
            return 0
        return sum(d.status == "sent" for d in send(store, job_uuid, PROGRESS, key=key, targets=targets))
    except Exception:  # the job goes on whatever happens here
        log.exception("notifying the progress of job %s failed", job_uuid)
        return 0


class ProgressNotifier:
    """Progress notifications of a followed job, sent in the background as its events are stored
    (a :class:`~gpu_training.follow.ProgressListener`): one check at a time in a thread (one asked
    for meanwhile runs next), so a slow mail server never holds the follower."""

    def __init__(self, log: Any = log) -> None:
        self.log = log
        self._task: asyncio.Task[None] | None = None
        self._wanted = False

    def events_stored(self, store: ResultsStore, job_uuid: str) -> None:
        """Check (soon) whether a progress notification is due."""
        self._wanted = True
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._send(store, job_uuid), name="notify progress")

    async def _send(self, store: ResultsStore, job_uuid: str) -> None:
        while self._wanted:
            self._wanted = False
            try:
                await asyncio.wait_for(asyncio.to_thread(notify_progress, store, job_uuid), PROGRESS_TIMEOUT_SECONDS)
            except Exception as err:  # notify_progress logs its own failures: a timeout, say
                self.log.warning("progress notification of job %s: %r (training goes on)", job_uuid, err)
                return

    async def close(self) -> None:
        """Let a notification in flight finish (15 s at most) before following stops."""
        task, self._task = self._task, None
        if task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(task), 15)
        except Exception:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
