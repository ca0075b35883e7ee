"""Every DAG imports cleanly, quickly and without I/O, the your-own-DAG example included; gpu_training
has its contract's shape."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

DAGS_DIR = Path(__file__).resolve().parents[1] / "dags"
#: DAG files for teams to copy (not shipped): held to the same rules.
EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "include" / "examples"


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    started = time.monotonic()
    bag = DagBag(dag_folder=str(DAGS_DIR))
    bag.parse_seconds = time.monotonic() - started  # type: ignore[attr-defined]
    return bag


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
            assert task.retries is not None


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


def test_dag_files_do_no_work_at_import() -> None:
    import ast

    for path in [*DAGS_DIR.glob("*.py"), *EXAMPLES_DIR.glob("*.py")]:
        tree = ast.parse(path.read_text())
        imported = {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
            a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
        }
        assert not imported & {"requests", "boto3", "paramiko", "subprocess", "sqlalchemy", "socket"}, path


def test_airflow_loads_the_plugin_and_only_the_plugin() -> None:
    import sys

    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    assert errors == {}
    assert "gpu_training" in [p.name for p in plugins]
    # The package is in .airflowignore: its modules must not be imported as top-level modules.
    assert "store" not in sys.modules and "operators" not in sys.modules
