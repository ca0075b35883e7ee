"""What the job params cost Airflow: serializing this project's DAGs (what the dag-processor does at
every parse, and ``airflow dags test`` twice) resolves each task's 39 params twice, and each resolve
checks the param's schema against its dialect's metaschema before checking the value.

Prints, measured in this run on this machine: the time to serialize every DAG of ``dags/`` with the
params' schemas in the JSON schema dialect they declare (draft-07) and in jsonschema's default
(2020-12, what a schema without ``$schema`` gets), and ``parse_job_params`` with its cached
validators against ``jsonschema.validate`` per param, with the ratio of each pair.

    python bench/params.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="bench-params-"))
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(REPO / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(REPO / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
sys.path.insert(0, str(REPO / "plugins"))


def best_of(rounds: int, work: Callable[[], Any]) -> float:
    """The median of ``rounds`` timings of ``work()``, in seconds (after one warm-up run)."""
    work()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import jsonschema
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    from gpu_training import params as params_module

    bag = DagBag(dag_folder=str(REPO / "dags"))
    dags = list(bag.dags.values())
    tasks = sum(len(d.tasks) for d in dags)

    def serialize_all() -> None:
        for dag in dags:
            DagSerialization.to_dict(dag)

    def without_dialect() -> None:
        """The same schemas without ``$schema``: jsonschema's default dialect."""
        for dag in dags:
            for task in dag.tasks:
                for key in task.params:
                    task.params.get_param(key).schema.pop("$schema", None)
            for key in dag.params:
                dag.params.get_param(key).schema.pop("$schema", None)

    declared = best_of(args.rounds, serialize_all)
    without_dialect()
    default = best_of(args.rounds, serialize_all)
    print(f"serializing the {len(dags)} DAGs of dags/ ({tasks} tasks, {len(params_module.PARAM_SPECS)} params each):")
    print(f"  params in draft-07 (as declared)   {declared * 1000:8.1f} ms")
    print(f"  params in the default dialect       {default * 1000:8.1f} ms")
    print(f"  ratio default / declared            {default / declared:8.2f}x")

    conf = {"project_id": "bench", "config": {"lr": 0.01}, "provider": "local"}

    def parse_cached() -> None:
        for _ in range(100):
            params_module.parse_job_params(conf)

    def parse_uncached() -> None:
        for _ in range(100):
            for name, spec in params_module.PARAM_SPECS.items():
                jsonschema.validate(conf.get(name, spec.default), spec.schema)

    cached = best_of(args.rounds, parse_cached)
    uncached = best_of(args.rounds, parse_uncached)
    print("parse_job_params, 100 calls:")
    print(f"  cached validators                   {cached * 1000:8.1f} ms")
    print(f"  jsonschema.validate per param       {uncached * 1000:8.1f} ms   (the value checks alone)")
    print(f"  ratio                               {uncached / cached:8.2f}x")


if __name__ == "__main__":
    main()
