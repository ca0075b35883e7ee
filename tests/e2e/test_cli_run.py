"""``make run`` (``python -m gpu_training.cli run``): the job it reports is the one its own dag run
registered, even when another ``make run`` in the same Airflow home registers a job after it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select

from gpu_training.results.models import TrainingJob

from .test_gpu_training_dag import session

REPO = Path(__file__).resolve().parents[2]


def start(env: dict[str, str], project: str, config: dict[str, Any]) -> subprocess.Popen[str]:
    conf = {"project_id": project, "config": {"iterations": 1, "seed": 1, **config}, "poll_interval_seconds": 1}
    return subprocess.Popen(
        [sys.executable, "-m", "gpu_training.cli", "run", "--conf", json.dumps(conf)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def registered(env: dict[str, str], project: str) -> bool:
    with session(env) as s:
        return s.scalar(select(TrainingJob.id).where(TrainingJob.project_id == project)) is not None


def test_each_run_reports_its_own_job(airflow_env: dict[str, str]) -> None:
    """A's training is slow; B starts once A's job is registered and ends first: A still reports A's
    job (the newest job created since A started is B's)."""
    runs = {"cli-run-a": start(airflow_env, "cli-run-a", {"epochs": 3, "epoch_sleep_seconds": 4})}
    deadline = time.monotonic() + 300
    while not registered(airflow_env, "cli-run-a"):
        assert runs["cli-run-a"].poll() is None and time.monotonic() < deadline, runs["cli-run-a"].communicate()[0]
        time.sleep(0.5)
    runs["cli-run-b"] = start(airflow_env, "cli-run-b", {"epochs": 1})
    reported = {}
    for project, proc in reversed(runs.items()):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
        [job] = re.findall(r"^job +(\S+)$", out, re.M)
        [(shown, run_id)] = re.findall(r"^project +(\S+) +provider local +run (\S+)$", out, re.M)
        assert shown == project, out[-2000:]
        assert re.findall(r"^status +(\S+)", out, re.M) == ["completed"], out[-2000:]
        reported[project] = (job, run_id)
    assert reported["cli-run-a"] != reported["cli-run-b"], reported
