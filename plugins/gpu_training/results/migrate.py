"""Alembic migrations of the results schema from the command line; from Python, ``results/db.py``
(``upgrade``, ``current_revision``, ``check_at_head``, re-exported here).

``gpu-training-migrate [upgrade|current|check] [--url URL]`` (the distribution's console command), or
``python -m gpu_training.results.migrate ...`` in a checkout; without ``--url`` the URL comes from the
``training_results`` Airflow connection (or the embedded SQLite default).
"""

from __future__ import annotations

import argparse
import sys

from gpu_training.errors import ResultsDbError
from gpu_training.results.db import (
    MIGRATIONS_DIR,
    VERSION_TABLE,
    alembic_config,
    check_at_head,
    create_results_engine,
    current_revision,
    head_revision,
    upgrade,
)

__all__ = [
    "MIGRATIONS_DIR",
    "VERSION_TABLE",
    "alembic_config",
    "check_at_head",
    "current_revision",
    "head_revision",
    "main",
    "upgrade",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["upgrade", "current", "check"], nargs="?", default="upgrade")
    parser.add_argument("--url", help="SQLAlchemy URL; default: the training_results connection")
    args = parser.parse_args(argv)
    if args.url:
        engine = create_results_engine(args.url)
    else:
        from gpu_training.hooks.results import ResultsDbHook

        engine = ResultsDbHook().get_engine()
    where = engine.url.render_as_string(hide_password=True)
    if args.action == "upgrade":
        upgrade(engine)
        print(f"results DB {where} migrated to {current_revision(engine)}")
    elif args.action == "current":
        print(current_revision(engine) or "none")
    else:
        try:
            check_at_head(engine)
        except ResultsDbError as err:
            print(err, file=sys.stderr)
            return 1
        print(f"results DB {where} is at head {head_revision()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
