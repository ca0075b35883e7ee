"""``ResultsDbHook``: the SQLAlchemy engine of the results database.

The URL comes from the Airflow connection ``training_results``: its extra ``sqlalchemy_url`` if set,
else the connection's URI (``sqlite`` connections: host is the file path). Without the connection
the embedded default is ``sqlite:///$AIRFLOW_HOME/training_results.db``.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException
from sqlalchemy import URL, Engine, create_engine, event, make_url

from gpu_training.results.store import ResultsStore

DEFAULT_CONN_ID = "training_results"


def airflow_home() -> Path:
    return Path(os.environ.get("AIRFLOW_HOME") or Path.home() / "airflow")


def default_results_url() -> str:
    return f"sqlite:///{airflow_home() / 'training_results.db'}"


def url_from_connection(conn: Any) -> str:
    """Turn an Airflow connection into a SQLAlchemy URL."""
    extra = conn.extra_dejson or {}
    if extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    if conn.conn_type == "sqlite":
        return f"sqlite:///{conn.host}" if conn.host else "sqlite://"
    uri = conn.get_uri()
    if uri.startswith("postgres://"):
        uri = "postgresql://" + uri[len("postgres://") :]
    return uri


#: The PostgreSQL driver of ``requirements.txt``. A URL that names none (``postgresql://``) gets it:
#: SQLAlchemy 2.1's default for such a URL is psycopg 3, which is not installed.
POSTGRES_DRIVER = "psycopg2"


def engine_url(url: str) -> URL:
    """The URL an engine is made with: ``postgres://`` read as ``postgresql://``, and a PostgreSQL
    URL that names no driver gets :data:`POSTGRES_DRIVER`."""
    parsed = make_url("postgresql" + url[len("postgres") :] if url.startswith("postgres://") else url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername=f"postgresql+{POSTGRES_DRIVER}")
    return parsed


def create_results_engine(url: str) -> Engine:
    """An engine tuned for concurrent writers: WAL and a busy timeout on SQLite; psycopg2 for a
    PostgreSQL URL that names no driver."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.close()

        return engine
    return create_engine(engine_url(url), pool_pre_ping=True)


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
