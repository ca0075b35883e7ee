"""Run the suite as two pytest processes at once (``make test``), each with its own servers.

Most of the suite waits (SSH round trips, a real Airflow deployment scheduling, trainers
running), so two shards on a 2-core machine finish in about the time of the longer one. Every
fixture starts its servers on free ports in private directories, so the shards share nothing but
Docker's image cache. Each shard's output goes to ``$SHARD_LOG_DIR/<shard>.log`` (default
``.pytest-shards/``) and its summary is printed when it ends; the exit code is the first non-zero
one (pytest's 5, "no tests collected", counts as a failure).

    python tests/run_shards.py [pytest args...]      # e.g. -q --durations=25
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# About equal halves on CI's 2 cores: the two real deployments (LocalExecutor and Celery), the
# in-process fault matrix, the per-cloud and multi-node job tests in one, everything else (the
# other end-to-end runs, servers, unit tests) in the other. Fresh clone before the multi-node tests:
# 16.8 and 20.5 min.
SLOW_AND_SEPARATE = [
    "tests/e2e/cluster",
    "tests/e2e/celery",
    "tests/e2e/test_multinode_dag.py",
    "tests/test_cloud_jobs.py",
    "tests/test_fault_matrix.py",
    "tests/test_multinode.py",
]
SHARDS = {
    "cluster-clouds-faults": SLOW_AND_SEPARATE,
    "rest": ["tests", *[f"--ignore={p}" for p in SLOW_AND_SEPARATE]],
}
# The results DB of each shard (``RESULTS_DB``, tests/conftest.py) unless the caller chose one: the
# rest runs every store-level test on SQLite and on PostgreSQL and its end-to-end runs on SQLite;
# the deployments, the per-cloud job tests and the fault matrix run on PostgreSQL (production's backend,
# and the Celery deployment's anyway), once: on both they would add ~5 min to the longer shard.
SHARD_RESULTS_DB = {"cluster-clouds-faults": "postgresql", "rest": "both"}


def main(argv: list[str]) -> int:
    log_dir = Path(os.environ.get("SHARD_LOG_DIR") or REPO / ".pytest-shards")
    log_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    procs: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    for name, paths in SHARDS.items():
        log = log_dir / f"{name}.log"
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *argv, *paths]
        print(f"[{name}] {' '.join(cmd[1:])} > {log}", flush=True)
        env = dict(os.environ)
        if env.get("RESULTS_DB", "both") == "both":
            env["RESULTS_DB"] = SHARD_RESULTS_DB[name]
        print(f"[{name}] RESULTS_DB={env['RESULTS_DB']}", flush=True)
        procs[name] = (
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT),
            log,
        )
    codes: dict[str, int] = {}
    while len(codes) < len(procs):
        for name, (proc, log) in procs.items():
            if name in codes or proc.poll() is None:
                continue
            codes[name] = proc.returncode
            lines = log.read_text(errors="replace").splitlines()
            # The summary: from the failures if any, else pytest's "slowest" / "short test summary"
            # section, else the tail.
            marks = ("= FAILURES =", "= ERRORS =", "slowest", "short test summary")
            start = next((i for mark in marks for i, line in enumerate(lines) if mark in line), max(0, len(lines) - 40))
            print(f"\n[{name}] exit {proc.returncode} after {time.monotonic() - started:.0f} s:", flush=True)
            print("\n".join(lines[start:][-400:]), flush=True)
        time.sleep(1)
    print(f"\nall shards done in {time.monotonic() - started:.0f} s: {codes}", flush=True)
    return next((code for code in codes.values() if code != 0), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
