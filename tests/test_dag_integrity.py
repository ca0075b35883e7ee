"""Every DAG imports cleanly and without I/O, the your-own-DAG example included; every task's
retries are the DAG's choice, not the deployment's default; gpu_training has its contract's shape.

How fast the files parse is a figure of ``bench/params.py`` (serializing ``dags/``), not a test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
#: DAG files for teams to copy (not shipped): held to the same rules.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "include" / "examples"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(DAGS_DIR))


def test_no_import_errors(dagbag) -> None:
    assert dagbag.import_errors == {}
    assert "gpu_training" in dagbag.dag_ids


@pytest.fixture(scope="module")
def example_dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(EXAMPLES_DIR))


def test_the_examples_import_cleanly(example_dagbag) -> None:
    assert example_dagbag.import_errors == {}
    assert "weekly_training" in example_dagbag.dag_ids


@pytest.mark.parametrize("bag", ["dagbag", "example_dagbag"])
def test_every_dag_has_tags_owner_and_docs(bag: str, request: pytest.FixtureRequest) -> None:
    for dag_id, dag in request.getfixturevalue(bag).dags.items():
        assert dag.tags, f"{dag_id} has no tags"
        assert dag.doc_md, f"{dag_id} has no doc_md"
        for task in dag.tasks:
            assert task.owner and task.owner != "airflow", f"{dag_id}.{task.task_id} has no owner"


def test_gpu_training_shape(dagbag) -> None:
    from gpu_training.taskgroup import STEP_TASK_IDS

    dag = dagbag.dags["gpu_training"]
    assert dag.schedule is None or str(dag.timetable.summary) in ("None", "")
    assert tuple(t.task_id for t in dag.topological_sort()) == STEP_TASK_IDS
    tasks = dag.task_dict
    assert tasks["provision"].is_setup
    assert tasks["teardown"].is_teardown and tasks["finalize"].is_teardown
    assert tasks["teardown"].trigger_rule == "all_done"
    assert tasks["upload_outputs"].trigger_rule == "all_done"
    assert tasks["finalize"].on_failure_fail_dagrun
    for name in (
        "project_id",
        "provider",
        "runtime",
        "image",
        "command",
        "dataset_uri",
        "config",
        "outputs_uri",
        "max_runtime_minutes",
        "stall_timeout_minutes",
        "poll_interval_seconds",
    ):
        assert name in dag.params, name


def test_waiting_steps_defer_instead_of_holding_a_slot(dagbag) -> None:
    from gpu_training.operators import GlobalJsonSensor, _PollingStepOperator

    dag = dagbag.dags["gpu_training"]
    # follows the whole training from the triggerer (tests/e2e/test_airflow_cluster.py samples it)
    assert isinstance(dag.task_dict["sense_progress"], GlobalJsonSensor)
    assert isinstance(dag.task_dict["wait_until_ready"], _PollingStepOperator)


#: Run in a fresh interpreter: imports each DAG file given (after what the DAG processor has loaded
#: already: Airflow's SDK and croniter, which runs ``file`` once at its own import) under an audit
#: hook, and prints what the files did (network, processes, databases, writes, reads outside the
#: Python path) and every task's retries, with the deployment's default retries set to 7.
PROBE = textwrap.dedent(
    """
    import importlib.util, json, os, sys
    import airflow.sdk, croniter
    from airflow.sdk import DAG
    from airflow.sdk.definitions._internal.contextmanager import DagContext
    allowed_reads = tuple(os.environ["PROBE_ALLOWED_READS"].split(os.pathsep))
    # The Python path (imports) and the DAG files' own folders (the files and their bytecode).
    sources = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in sys.argv[1:])
    readable = tuple(sys.path[1:]) + allowed_reads + sources
    did = []
    def audit(event, args):
        if event in ("socket.connect", "socket.getaddrinfo", "subprocess.Popen", "os.system", "os.exec",
                     "os.posix_spawn", "os.fork", "sqlite3.connect", "urllib.Request", "http.client.connect"):
            did.append(f"{event} {args!r}"[:300])
        elif event == "open" and not isinstance(args[0], int):
            path, mode = str(args[0]), str(args[1] or "r")
            if any(c in mode for c in "wax+"):
                did.append(f"open {path} for writing")
            elif not path.startswith(readable) and not path.endswith("__path_hook__") and path not in sys.path:
                did.append(f"open {path}")
    sys.addaudithook(audit)
    for i, path in enumerate(sys.argv[1:]):
        # As the DagBag does: a `with DAG(...)` block registers its DAG with the module it is in.
        name = f"dag_file_{i}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = sys.modules[name] = importlib.util.module_from_spec(spec)
        DagContext.current_autoregister_module_name = name
        spec.loader.exec_module(module)
    dags = {d for d, _ in DagContext.autoregistered_dags}
    modules = [m for n, m in list(sys.modules.items()) if n.startswith("dag_file_")]
    dags |= {v for m in modules for v in vars(m).values() if isinstance(v, DAG)}
    retries = {f"{dag.dag_id}.{t.task_id}": t.retries for dag in dags for t in dag.tasks}
    print(json.dumps({"did": did, "retries": retries}))
    """
)
#: What a DAG file may read while Airflow parses it: the retraining specs it is built from, and the
#: time zones of its schedules.
ALLOWED_READS = (str(Path(__file__).resolve().parents[1] / "include" / "retraining"), "/usr/share/zoneinfo")


def parse_in_a_fresh_interpreter(*files: Path) -> dict[str, Any]:
    env = {
        **os.environ,
        "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "7",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PROBE_ALLOWED_READS": os.pathsep.join(ALLOWED_READS),
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, files)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def parsed() -> dict[str, Any]:
    return parse_in_a_fresh_interpreter(*sorted(DAGS_DIR.glob("*.py")), *sorted(EXAMPLES_DIR.glob("*.py")))


def test_dag_files_do_no_work_at_import(parsed: dict[str, Any]) -> None:
    """Airflow parses these files every 30 s: no network, process, database, write, or read beyond
    the Python path and the retraining specs."""
    assert parsed["did"] == []
    assert "gpu_training.provision" in parsed["retries"]  # the files were imported


def test_the_import_probe_sees_work(tmp_path: Path) -> None:
    """The probe above would see a DAG file that did any of that."""
    dag_file = tmp_path / "busy_dag.py"
    dag_file.write_text(
        textwrap.dedent(
            f"""
            import socket, sqlite3, subprocess
            subprocess.run(["true"])
            open({str(tmp_path / "notes.txt")!r}, "w").close()
            open("/etc/hostname").read()
            sqlite3.connect(":memory:")
            try:
                socket.create_connection(("127.0.0.1", 9), timeout=1)
            except OSError:
                pass
            """
        )
    )
    did = "\n".join(parse_in_a_fresh_interpreter(dag_file)["did"])
    for seen in (
        "subprocess.Popen",
        "notes.txt for writing",
        "open /etc/hostname",
        "sqlite3.connect",
        "socket.connect",
    ):
        assert seen in did, did


#: Retries of the job's steps: those that talk to a machine or a cloud retry, teardown most (a
#: leaked instance costs money); bookkeeping (register, config, finalize) fails at once, as does
#: what is not a job step (the reaper runs again on its schedule; promotion and sweeps are pure).
STEP_RETRIES = {
    "provision": 2,
    "wait_until_ready": 2,
    "transfer_inputs": 2,
    "start_trainer": 1,
    "sense_progress": 2,
    "upload_outputs": 2,
    "teardown": 3,
}


def test_every_task_retries_as_the_dag_says(parsed: dict[str, Any]) -> None:
    """Set by the DAG, not the deployment: parsed with ``default_task_retries = 7``, no task has 7."""
    retries = parsed["retries"]
    assert len(retries) > 20, retries
    wrong = {task: n for task, n in retries.items() if n != STEP_RETRIES.get(task.rsplit(".", 1)[-1].split(".")[-1], 0)}
    assert wrong == {}, wrong


def test_airflow_loads_the_plugin_and_only_the_plugin() -> None:
    import sys

    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    assert errors == {}
    assert "gpu_training" in [p.name for p in plugins]
    # The package is in .airflowignore: its modules must not be imported as top-level modules.
    assert "store" not in sys.modules and "operators" not in sys.modules
