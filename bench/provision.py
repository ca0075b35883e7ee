"""The orchestrator's own provisioning overhead on each fake cloud, with boot time set to 0.

For every cloud fake in ``tests/fakeclouds`` (Lambda, RunPod, Vast.ai; EC2 through moto) this runs
one real ``gpu_training`` DAG run (``airflow dags test``) whose instance is the test sshd on
127.0.0.1, and prints:

- trigger -> trainer start: from starting the dag run to ``training_jobs.trainer_started_at``
  (goal: <= 20 s), split into trigger -> launched, launched -> ready (boot wait, SSH check and
  remote scripts) and ready -> trainer started (config, data and trainer upload, start);
- the whole job's wall time;
- the cloud API calls the job made (every HTTP request the fake received, 429s included).

Needs root (sshd with root login), like ``bench/transfer.py``. Usage:
``python bench/provision.py [--clouds lambda,runpod] [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # tests.fakeclouds, tests.sshd

from sqlalchemy import create_engine, select  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from tests.fakeclouds.rigs import STARTERS  # noqa: E402
from tests.sshd import start_sshd  # noqa: E402


def airflow_home(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "AIRFLOW_HOME": str(root),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "PYTHONPATH": str(REPO / "plugins"),
        }
    )
    env.pop("AIRFLOW_CONN_TRAINING_RESULTS", None)
    for cmd in (["airflow", "db", "migrate"], ["gpu_training.results.migrate", "upgrade"]):
        subprocess.run([sys.executable, "-m", *cmd], env=env, check=True, capture_output=True)
    return env


def one_job(env: dict[str, str], rig: Any, number: int) -> dict[str, Any]:
    from gpu_training.results.models import Instance, TrainingJob

    rig.fake.reset()
    project = f"bench-{rig.name}-{number}"
    conf = {
        "project_id": project,
        "provider": rig.name,
        "gpu": rig.gpu,
        "config": {"iterations": 1, "epochs": 1, "seed": 1},
        "poll_interval_seconds": 1,
    }
    started = datetime.now(UTC)
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "airflow", "dags", "test", "gpu_training", "--conf", json.dumps(conf)],
        env={**env, **rig.env},
        capture_output=True,
        text=True,
    )
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{rig.name}: the job failed:\n{(proc.stdout + proc.stderr)[-4000:]}")
    engine = create_engine(f"sqlite:///{env['AIRFLOW_HOME']}/training_results.db")
    with Session(engine) as s:
        job = s.scalars(select(TrainingJob).where(TrainingJob.project_id == project)).one()
        inst = s.scalars(select(Instance).where(Instance.job_id == job.id)).one()

    def since(a: datetime | None, b: datetime | None) -> float:
        return (b - a).total_seconds() if a and b else float("nan")

    rig.fake.assert_all_terminated()
    return {
        "to_trainer": since(started, job.trainer_started_at),
        "to_launched": since(started, inst.launched_at),
        "boot_wait": since(inst.launched_at, inst.ready_at),
        "to_start": since(inst.ready_at, job.trainer_started_at),
        "wall": wall,
        "api_calls": len(rig.fake.calls),
        "by_call": calls_by_kind(rig.fake.calls),
        "cost": job.cost_usd or 0.0,
    }


def calls_by_kind(calls: list[tuple[Any, ...]]) -> str:
    """``GET /instances x3, POST /instance-operations/launch x1``: ids folded away."""
    import re
    from collections import Counter

    kinds = Counter(f"{c[0]} " + re.sub(r"/[0-9a-f]{8,}|/i-[0-9a-f]+|/\d+", "/{id}", str(c[1])) for c in calls)
    return ", ".join(f"{k} x{n}" for k, n in kinds.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clouds", default=",".join(sorted(STARTERS)))
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/provision.py needs root (sshd with root login)")
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        root = Path(tmp)
        sshd = start_sshd(root / "sshd")
        env = airflow_home(root / "airflow")
        print(
            f"{'cloud':8} {'trigger->trainer':>17} {'->launched':>11} {'boot wait':>10} {'->started':>10} "
            f"{'job wall':>9} {'API calls':>10}"
        )
        try:
            for name in args.clouds.split(","):
                rig = STARTERS[name](sshd, root / f"{name}-boxes")
                try:
                    rows = [one_job(env, rig, n) for n in range(args.runs)]
                finally:
                    rig.stop()
                for row in rows:
                    print(
                        f"{name:8} {row['to_trainer']:16.1f}s {row['to_launched']:10.1f}s {row['boot_wait']:9.1f}s "
                        f"{row['to_start']:9.1f}s {row['wall']:8.1f}s {row['api_calls']:10d}"
                    )
                print(f"         calls: {rows[-1]['by_call']}")
        finally:
            sshd.stop()
    print("goal: trigger -> trainer start <= 20 s with boot time 0 (the orchestrator's own overhead)")


if __name__ == "__main__":
    main()
