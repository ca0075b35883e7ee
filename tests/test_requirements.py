"""The pin sets: requirements.txt is what the orchestrator runs (and all the compose image installs),
requirements-dev.txt what tests and lints add, requirements-torch.txt the data-parallel trainer's
torch (its CPU build); all installed here at exactly their pins."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]

#: What the orchestrator's code and Airflow deployment use directly; the runtime pins are exactly
#: these and what they need.
RUNTIME_ROOTS = (
    "apache-airflow",
    "apache-airflow-providers-amazon",
    "apache-airflow-providers-ssh",
    "apache-airflow-providers-celery",
    "apache-airflow-providers-smtp",
    "apache-airflow-providers-http",
    "apache-airflow-providers-slack",
    "celery",
    "redis",
    "psycopg2-binary",
    "asyncpg",
    "statsd",
    "asyncssh",
    "paramiko",
    "numpy",
    "croniter",
    "msgspec",
    "jsonschema",
    "pyyaml",
    "tenacity",
    "requests",
    "boto3",
    "fastapi",
    "sqlalchemy",
    "alembic",
    "pydantic",
)
TEST_AND_LINT_TOOLS = ("pytest", "hypothesis", "schemathesis", "selenium", "moto", "aiosmtpd", "mypy", "ruff")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """name -> version of a requirements file's ``name==version`` lines."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith(("#", "-")):
            name, version = line.split("==")
            out[norm(name)] = version
    return out


def closure(roots: tuple[str, ...]) -> set[str]:
    """The installed distributions ``roots`` need, with the extras they ask for, by name."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(norm(root), ()) for root in roots]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen:
            continue
        seen.add((name, extras))
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras)):
                todo.append((norm(req.name), tuple(sorted(req.extras))))
    return {name for name, _ in seen}


def test_runtime_pins_are_what_runs_needs_and_nothing_more() -> None:
    runtime = pins(REPO / "requirements.txt")
    needed = closure(RUNTIME_ROOTS)
    assert sorted(set(runtime) - needed) == [], "pinned in requirements.txt but needed by nothing that runs"
    assert sorted(needed & set(pins(REPO / "requirements-dev.txt"))) == [], "needed at run time but only in dev"
    assert not set(TEST_AND_LINT_TOOLS) & set(runtime)


def test_dev_pins_add_the_tools_and_torch_its_cpu_build_alone() -> None:
    dev = pins(REPO / "requirements-dev.txt")
    assert set(TEST_AND_LINT_TOOLS) <= set(dev)
    assert not set(dev) & set(pins(REPO / "requirements.txt"))
    assert pins(REPO / "requirements-torch.txt") == {"torch": "2.13.0+cpu"}
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in (REPO / "requirements-torch.txt").read_text()
    # what torch needs is pinned beside it (requirements-torch.txt is installed --no-deps)
    # (setuptools: every venv has it)
    assert closure(("torch",)) - {"torch", "setuptools"} <= set(dev) | set(pins(REPO / "requirements.txt"))


def test_this_environment_has_every_pin() -> None:
    wanted = {name: v for f in ("", "-dev", "-torch") for name, v in pins(REPO / f"requirements{f}.txt").items()}
    wrong = {
        name: (version, metadata.version(name)) for name, version in wanted.items() if metadata.version(name) != version
    }
    assert wrong == {}
