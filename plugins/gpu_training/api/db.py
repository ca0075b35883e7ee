"""The results store of this process: created on first use (never at import), then shared."""

from __future__ import annotations

import threading
from typing import Annotated

from fastapi import Depends

from gpu_training.results.store import ResultsStore

_lock = threading.Lock()
_store: ResultsStore | None = None


def results_store() -> ResultsStore:
    """The store of connection ``training_results``, its schema checked once (ResultsDbError if
    it is not migrated; then the next request tries again)."""
    global _store
    if _store is None:
        with _lock:
            if _store is None:
                from gpu_training.hooks.results import ResultsDbHook

                store = ResultsDbHook().get_store()
                store.check_schema()
                _store = store
    return _store


def get_store() -> ResultsStore:
    """FastAPI dependency (a plain function: FastAPI calls it in its thread pool)."""
    return results_store()


StoreDep = Annotated[ResultsStore, Depends(get_store)]
