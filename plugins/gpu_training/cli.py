"""Command line for operators: ``python -m gpu_training.cli run --conf JSON`` and ``show UUID``.

``run`` runs one ``gpu_training`` DAG run through ``airflow dags test`` (a real dag run in the
Airflow home, every task executed) and prints the job's summary from the results DB; it exits
non-zero when the job did not complete.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from gpu_training.errors import JobParamsError
from gpu_training.params import parse_job_params
from gpu_training.results.models import Artifact, EpochTrain, Eval, Instance, TrainingJob
from gpu_training.results.store import ResultsStore

DAG_ID = "gpu_training"


def _store() -> ResultsStore:
    from gpu_training.hooks.results import ResultsDbHook

    return ResultsDbHook().get_store()


def summary(store: ResultsStore, job_uuid: str) -> str:
    """A human-readable report of one job: status, per-epoch loss, final eval, outputs."""
    job = store.job(job_uuid)
    lines = [
        f"job        {job.uuid}",
        f"project    {job.project_id}    provider {job.provider}    run {job.run_id}",
        f"status     {job.status}" + (f"    reason: {job.failure_reason}" if job.failure_reason else ""),
    ]
    if job.time_taken is not None:
        lines.append(f"time taken {job.time_taken:.1f} s    cost {job.cost_usd or 0:.4f} USD")
    with store.session() as s:
        epochs = s.scalars(
            select(EpochTrain).where(EpochTrain.job_id == job.id).order_by(EpochTrain.iteration, EpochTrain.epoch)
        ).all()
        evals = s.scalars(select(Eval).where(Eval.job_id == job.id).order_by(Eval.iteration, Eval.epoch)).all()
        artifacts = s.scalars(select(Artifact).where(Artifact.job_id == job.id)).all()
        instances = s.scalars(select(Instance).where(Instance.job_id == job.id)).all()
    if epochs:
        lines.append("per-epoch loss:")
        for e in epochs:
            val = (e.metrics or {}).get("val_accuracy")
            extra = f"    val_accuracy {val:.4f}" if isinstance(val, (int, float)) else ""
            loss = f"{e.avg_loss:.4f}" if e.avg_loss is not None else "n/a"
            lines.append(f"  iteration {e.iteration} epoch {e.epoch:3d}  avg_loss {loss}{extra}")
    if evals:
        last = evals[-1]
        metrics = "  ".join(
            f"{name} {getattr(last, name):.4f}"
            for name in ("accuracy", "precision", "recall", "f1", "auc", "loss")
            if getattr(last, name) is not None
        )
        lines.append(f"final eval (iteration {last.iteration}, epoch {last.epoch}): {metrics}")
    for inst in instances:
        lines.append(
            f"instance   {inst.name} ({inst.provider}"
            + (f" {inst.instance_type}" if inst.instance_type and inst.provider not in ("local", "ssh") else "")
            + (f" {inst.region}" if inst.region and inst.provider not in ("local", "ssh") else "")
            + f") state {inst.state}"
            + (f", terminated {inst.terminated_at:%Y-%m-%d %H:%M:%S} UTC" if inst.terminated_at else "")
            + (f" ({inst.state_reason})" if inst.state_reason and inst.state != "running" else "")
        )
        if inst.price_per_hour and inst.billable_seconds is not None:
            lines.append(
                f"  cost     {inst.billable_seconds:.0f} s x {inst.price_per_hour:g} USD/h"
                f" = {inst.cost_usd or 0:.4f} USD"
            )
    if artifacts:
        lines.append(f"outputs    {job.outputs_uri}  ({len(artifacts)} files, MANIFEST.sha256)")
    lines.append(f"results DB {store.engine.url.render_as_string(hide_password=True)}")
    return "\n".join(lines)


def run(conf: dict, *, quiet: bool = False) -> int:
    try:
        parse_job_params(conf)
    except JobParamsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    store = _store()
    store.check_schema()
    started = datetime.now(UTC) - timedelta(seconds=1)
    cmd = [sys.executable, "-m", "airflow", "dags", "test", DAG_ID, "--conf", json.dumps(conf)]
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, stdout=subprocess.DEVNULL if quiet else None, stderr=subprocess.STDOUT if quiet else None
    )
    elapsed = time.monotonic() - t0
    with store.session() as s:
        job = s.scalars(
            select(TrainingJob)
            .where(TrainingJob.dag_id == DAG_ID, TrainingJob.created_at >= started)
            .order_by(TrainingJob.created_at.desc())
        ).first()
    print()
    if job is None:
        print(f"no job was registered (airflow dags test exited {proc.returncode}); see the log above", file=sys.stderr)
        return proc.returncode or 1
    print(summary(store, job.uuid))
    print(f"wall time  {elapsed:.1f} s (airflow dags test)")
    final = store.job(job.uuid).status
    return 0 if proc.returncode == 0 and final == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpu_training.cli", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_run = sub.add_parser("run", help="run one gpu_training job and print its summary")
    p_run.add_argument("--conf", default="{}", help="JSON object of DAG params")
    p_run.add_argument("--quiet", action="store_true", help="hide Airflow's task logs")
    p_show = sub.add_parser("show", help="print the summary of a job")
    p_show.add_argument("uuid")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        try:
            conf = json.loads(args.conf or "{}")
        except json.JSONDecodeError as err:
            print(f"error: --conf is not valid JSON: {err}", file=sys.stderr)
            return 2
        if not isinstance(conf, dict):
            print("error: --conf must be a JSON object of params", file=sys.stderr)
            return 2
        return run(conf, quiet=args.quiet)
    print(summary(_store(), args.uuid))
    return 0


if __name__ == "__main__":
    sys.exit(main())
