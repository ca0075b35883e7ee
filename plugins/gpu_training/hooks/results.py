"""``ResultsDbHook``: the SQLAlchemy engine of the results database.

The URL comes from the Airflow connection ``training_results``: its extra ``sqlalchemy_url`` if set,
else the connection's URI (``sqlite`` connections: host is the file path). Without the connection
the embedded default is ``sqlite:///$AIRFLOW_HOME/training_results.db``. The engine itself is made by
``results/db.py`` (its functions re-exported here).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy import Engine

from gpu_training.results.db import (
    POSTGRES_DRIVER,
    airflow_home,
    create_results_engine,
    default_results_url,
    engine_url,
    url_from_connection,
)
from gpu_training.results.store import ResultsStore

__all__ = [
    "DEFAULT_CONN_ID",
    "POSTGRES_DRIVER",
    "ResultsDbHook",
    "airflow_home",
    "create_results_engine",
    "default_results_url",
    "engine_url",
    "url_from_connection",
]

DEFAULT_CONN_ID = "training_results"


class ResultsDbHook(BaseHook):
    """Connects to the results database named by an Airflow connection."""

    conn_name_attr = "results_conn_id"
    default_conn_name = DEFAULT_CONN_ID
    conn_type = "generic"
    hook_name = "Training results DB"

    def __init__(self, results_conn_id: str = DEFAULT_CONN_ID, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.results_conn_id = results_conn_id

    def get_url(self) -> str:
        try:
            conn = self.get_connection(self.results_conn_id)
        except AirflowNotFoundException:
            return default_results_url()
        return url_from_connection(conn)

    @cached_property
    def engine(self) -> Engine:
        return create_results_engine(self.get_url())

    def get_engine(self) -> Engine:
        return self.engine

    def get_store(self) -> ResultsStore:
        return ResultsStore(self.engine)
