"""The one thing the results API asks of Airflow itself: mark a job's dag run failed.

``POST /training/v1/jobs/{uuid}/cancel`` ends in the same place as the Airflow UI's "Mark run as
failed" and ``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}``: the api-server's own
``patch_dag_run_state`` (so Airflow kills the running task, fails the deferred one, skips the
rest, runs the teardown tasks, and fires its listeners), called in-process in the api-server that
serves this app. Only the api-server has the metadata DB; elsewhere this raises.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def fail_dag_run(dag_id: str, run_id: str) -> bool:
    """Mark a running or queued dag run failed; False when it is gone or already finished."""
    from airflow.api_fastapi.core_api.datamodels.dag_run import DagRunMutableStates
    from airflow.api_fastapi.core_api.services.public.dag_run import patch_dag_run_state
    from airflow.models.dagbag import DBDagBag
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    with create_session() as session:
        dag_run = session.scalar(select(DagRun).filter_by(dag_id=dag_id, run_id=run_id))
        if dag_run is None or dag_run.state not in (DagRunState.RUNNING, DagRunState.QUEUED):
            return False
        dag = DBDagBag().get_dag_for_run(dag_run, session=session)
        if dag is None:
            log.warning("cancel: no serialized DAG for %s/%s", dag_id, run_id)
            return False
        patch_dag_run_state(dag=dag, dag_run=dag_run, state=DagRunMutableStates.FAILED, session=session)
    return True
