"""Alembic migrations of the results schema, callable from Python and from the command line.

``gpu-training-migrate [upgrade|current|check] [--url URL]`` (the distribution's console command), or
``python -m gpu_training.results.migrate ...`` in a checkout; without ``--url`` the URL comes from the
``training_results`` Airflow connection (or the embedded SQLite default).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from gpu_training.errors import ResultsDbError

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["upgrade", "current", "check"], nargs="?", default="upgrade")
    parser.add_argument("--url", help="SQLAlchemy URL; default: the training_results connection")
    args = parser.parse_args(argv)
    if args.url:
        from gpu_training.hooks.results import create_results_engine

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
