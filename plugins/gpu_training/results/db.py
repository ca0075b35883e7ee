"""The results database's engine and schema revision, apart from the code that uses them.

The engine: a SQLAlchemy URL (from the ``training_results`` connection: ``hooks/results.py``) made into an
engine tuned for concurrent writers. The schema: Alembic's revision of a database, its upgrade to head,
and the check that it is there. This module imports nothing of the package but ``errors``, so the hook,
the store and the migrations' command line can all use it (no import cycle).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import URL, Engine, create_engine, event, make_url

from gpu_training.errors import ResultsDbError

# --- the engine ---------------------------------------------------------------------------------


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


# --- the schema's revision ----------------------------------------------------------------------

VERSION_TABLE = "training_results_alembic_version"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the results schema to ``revision`` (idempotent)."""
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def check_at_head(engine: Engine) -> None:
    """Raise :class:`ResultsDbError` with what to run when the schema is not migrated."""
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise ResultsDbError(
            f"results DB {engine.url.render_as_string(hide_password=True)} is at schema revision "
            f"{current or 'none'}, expected {head}: run `make migrate` in a checkout, else "
            "`gpu-training-migrate upgrade` (python -m gpu_training.results.migrate upgrade)"
        )
