"""A webhook's URL (its token in the path and query) never reaches a task log of a deployment.

The HTTP hook logs the URL it calls and fails to reach; the notifier hands every part of it to
Airflow's log maskers first (the Task SDK's in the worker, the core one in the triggerer), so the
logs show ``***`` where the token was: the worker's ``finalize`` task log (the job's end) and the
triggerer's log (progress, sent by the follower).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from gpu_training.results.store import ResultsStore
from tests.airflow_cluster import AirflowCluster

from . import DAG_ID, TOKEN_HOOK_URL

pytestmark = pytest.mark.e2e

SCRIPTED = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "scripted_trainer.py"
SECRETS = ("cluster-path-token-3c9f1e", "cluster-query-secret-8a2d", TOKEN_HOOK_URL)


def test_a_webhook_token_in_its_url_is_masked_in_the_task_logs(cluster: AirflowCluster, store: ResultsStore) -> None:
    conf = {
        "project_id": f"mask-{time.time_ns()}",
        "command": ["{python}", str(SCRIPTED), "ok", "2", "1"],
        "notify": ["webhook://token_hook"],
        "notify_every_epochs": 1,
        "poll_interval_seconds": 1,
    }
    run_id = cluster.trigger(DAG_ID, conf)
    assert cluster.wait_run(DAG_ID, run_id, timeout=180) == "success"  # a failing notifier fails nothing
    [uuid] = store.jobs_for_run(DAG_ID, run_id)
    rows = store.notifications(uuid)
    assert {(n.event, n.status) for n in rows} >= {("completed", "failed"), ("progress", "failed")}, rows
    # The job's end is told by finalize on a worker: its task log; progress by the follower in the
    # triggerer, in a thread whose lines land in the triggerer's own log.
    finalize = json.dumps(cluster.task_log_entries(DAG_ID, run_id, "finalize"))
    triggerer = (cluster.logs / "triggerer.log").read_text(errors="replace")
    for where, text in (("finalize's task log", finalize), ("the triggerer's log", triggerer)):
        assert "Tenacity will retry" in text, f"{where}: the hook's failure was not logged at all"
        assert "/***?***" in text, where
        for secret in SECRETS:
            assert secret not in text, (where, secret)
    for secret in SECRETS:
        assert secret not in json.dumps(cluster.task_log_entries(DAG_ID, run_id, "sense_progress"))
    for row in rows:
        for secret in SECRETS:
            assert secret not in (row.error or ""), secret
