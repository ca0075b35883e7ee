"""The results store of this process: created on first use (never at import), then shared.

It is only ever asked for once the request's user is authenticated (:func:`get_store` depends on
Airflow's ``get_user``), so an anonymous request gets its 401 without the results DB being touched.
A database that cannot be reached (or is not migrated) raises :class:`ResultsDbError`, answered 503
without naming where the database is (``app.py``).
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

from airflow.api_fastapi.core_api.security import GetUserDep
from fastapi import Depends
from sqlalchemy import Engine, event
from sqlalchemy.exc import SQLAlchemyError

from gpu_training.errors import ResultsDbError
from gpu_training.results.store import ResultsStore

#: A PostgreSQL server that does not answer fails a request after this long (libpq's default is to
#: wait for the kernel: minutes), and an established connection whose peer vanished is found dead
#: by TCP keepalives within about ``10 + 3 * 5`` s instead of hanging the request.
POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}

_lock = threading.Lock()
_store: ResultsStore | None = None


def bound_waits(engine: Engine) -> Engine:
    """``engine`` with :data:`POSTGRES_CONNECT_ARGS` on every new PostgreSQL connection (explicit
    ones in the connection's URL win)."""
    if engine.dialect.name == "postgresql":

        @event.listens_for(engine, "do_connect")
        def _timeouts(_dialect: Any, _record: Any, _cargs: Any, cparams: dict[str, Any]) -> None:
            for key, value in POSTGRES_CONNECT_ARGS.items():
                cparams.setdefault(key, value)

    return engine


def open_results_store() -> ResultsStore:
    """A store on connection ``training_results`` (no connection made yet)."""
    from gpu_training.hooks.results import ResultsDbHook

    return ResultsStore(bound_waits(ResultsDbHook().get_engine()))


def results_store() -> ResultsStore:
    """The process's store, its schema checked once: ResultsDbError if the database cannot be
    reached or is not migrated (then the next request tries again)."""
    global _store
    if _store is None:
        with _lock:
            if _store is None:
                store = open_results_store()
                try:
                    store.check_schema()
                except (ResultsDbError, SQLAlchemyError, OSError) as err:
                    store.engine.dispose()
                    if isinstance(err, ResultsDbError):
                        raise
                    raise ResultsDbError(f"the results database could not be reached: {err}") from err
                _store = store
    return _store


def get_store(user: GetUserDep) -> ResultsStore:
    """FastAPI dependency (a plain function: FastAPI calls it in its thread pool). It depends on the
    authenticated user, so the results DB is opened only after authentication (401 first)."""
    return results_store()


StoreDep = Annotated[ResultsStore, Depends(get_store)]
