"""The ``gpu-training-orchestrator`` distribution: what ``pyproject.toml`` declares, and an Airflow with it
installed (``pip install .`` into a fresh virtual environment) listing the provider, its hooks, connection
types and configuration section, and loading the DAGs with no plugins folder.

Installing Airflow itself into a fresh environment takes minutes (and an index); the fresh environment
instead sees this one's packages through a ``.pth`` file, all but this distribution (a folder of links to
them), and gets the distribution built and installed from a copy of the checkout, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpu_training import DISTRIBUTION, __version__
from gpu_training.get_provider_info import PLUGIN_CLASS, PLUGIN_NAME, get_provider_info
from gpu_training.hooks.connection_types import CLOUD_CONNECTION_TYPES
from gpu_training.plugin import ENTRY_POINT, GpuTrainingPlugin
from gpu_training.policy import OPTIONS

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONN_TYPES = {c.conn_type: c for c in CLOUD_CONNECTION_TYPES}


# --- what pyproject.toml declares ---------------------------------------------------------------------


def test_every_package_is_listed() -> None:
    """setuptools is given the packages one by one (``include/`` is mapped in beside them): a new
    subpackage left out of the list would be missing from every installation."""
    found = {
        ".".join(("gpu_training", *p.parent.relative_to(REPO / "plugins" / "gpu_training").parts))
        for p in (REPO / "plugins" / "gpu_training").rglob("__init__.py")
    }
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == found | {"gpu_training.include"}


def test_a_build_leaves_its_metadata_off_sys_path() -> None:
    """``*.egg-info`` in the checkout's root (pytest's and ``python -m``'s sys.path) or in ``plugins/``
    (every Airflow process's) would make Airflow load the plugin entry point twice."""
    egg_base = PYPROJECT["tool"]["distutils"]["egg_info"]["egg_base"]
    assert (REPO / egg_base).is_dir() and Path(egg_base).parts[0] not in ("plugins", "dags", "tests", ".")
    assert not list(REPO.glob("*.egg-info")) and not list((REPO / "plugins").glob("*.egg-info"))


def test_the_entry_points_name_what_exists() -> None:
    project = PYPROJECT["project"]
    assert project["name"] == DISTRIBUTION
    entry_points = project["entry-points"]
    assert entry_points["apache_airflow_provider"] == {
        "provider_info": "gpu_training.get_provider_info:get_provider_info"
    }
    assert entry_points["airflow.plugins"] == {PLUGIN_NAME: ENTRY_POINT}
    assert ENTRY_POINT.replace(":", ".") == PLUGIN_CLASS and GpuTrainingPlugin.name == PLUGIN_NAME
    assert project["scripts"] == {"gpu-training-migrate": "gpu_training.results.migrate:main"}
    assert not any("pytest" in dep or "ruff" in dep or "torch" in dep for dep in project["dependencies"])


def test_the_provider_info_is_what_airflow_validates() -> None:
    from airflow._shared.providers_discovery.providers_discovery import _create_provider_info_schema_validator

    info = get_provider_info()
    _create_provider_info_schema_validator().validate(info)
    assert (info["package-name"], info["versions"]) == (DISTRIBUTION, [__version__])
    assert [c["connection-type"] for c in info["connection-types"]] == ["lambda_cloud", "runpod", "vastai"]
    options = info["config"]["gpu_training"]["options"]
    assert list(options) == list(OPTIONS)
    for key, option in options.items():
        assert option["default"] == OPTIONS[key].default and option["description"], key
        assert option["type"] in ("string", "boolean", "integer") and option["example"], key


def test_the_remote_scripts_are_found_installed_and_in_a_checkout(tmp_path: Path) -> None:
    from gpu_training.hosts.base import INCLUDE_DIR, include_dir

    assert INCLUDE_DIR == REPO / "include"
    installed = tmp_path / "site-packages" / "gpu_training"
    (installed / "include" / "remote").mkdir(parents=True)
    assert include_dir(installed) == installed / "include"
    checkout = tmp_path / "checkout" / "plugins" / "gpu_training"
    checkout.mkdir(parents=True)
    assert include_dir(checkout) == tmp_path / "checkout" / "include"


# --- an Airflow with the distribution installed -------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    python: Path
    bin: Path
    home: Path
    env: dict[str, str]

    def run(self, *argv: str | Path, **env: str) -> str:
        result = subprocess.run(
            [str(a) for a in argv],
            env={**self.env, **env},
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode == 0, (
            f"{argv}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
        return result.stdout

    def airflow_json(self, *args: str, **env: str) -> Any:
        out = self.run(self.python, "-m", "airflow", *args, "--output", "json", **env)
        return json.loads(out[out.index("[") :])

    def script(self, code: str, **env: str) -> Any:
        """Run ``code`` in the environment; its last line of output is JSON."""
        return json.loads(self.run(self.python, "-c", code, **env).strip().splitlines()[-1])


def copy_checkout(dest: Path) -> Path:
    """What a build reads, copied (building in the shared checkout would leave build/ there)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "node_modules", "*.egg-info")
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    shutil.copytree(REPO / "plugins" / "gpu_training", dest / "plugins" / "gpu_training", ignore=ignore)
    shutil.copytree(REPO / "include", dest / "include", ignore=ignore)
    return dest


def site_packages_without_this_distribution(dest: Path) -> Path:
    """This environment's packages as links, less ``gpu_training`` and its metadata (``make install``
    installs it editable): the fresh environment must find only the one it installs."""
    dest.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        name = entry.name.lower()
        if name.startswith(("gpu_training", "__editable__")) or name.endswith(".pth"):
            continue
        (dest / entry.name).symlink_to(entry)
    return dest


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    root = tmp_path_factory.mktemp("distribution")
    source = copy_checkout(root / "source")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(
        subprocess.run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (purelib / "airflow-and-dependencies.pth").write_text(f"{site_packages_without_this_distribution(root / 'site')}\n")
    (root / "home").mkdir()
    (root / "no-plugins").mkdir()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW") and k not in ("PYTHONPATH", "VIRTUAL_ENV")
    }
    env.update(
        AIRFLOW_HOME=str(root / "home"),
        AIRFLOW__CORE__DAGS_FOLDER=str(REPO / "dags"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(root / "no-plugins"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    env_python = Installed(venv / "bin" / "python", venv / "bin", root / "home", env)
    env_python.run(
        env_python.python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index", source
    )
    return env_python


def test_airflow_lists_the_provider(installed: Installed) -> None:
    providers = {p["package_name"]: p for p in installed.airflow_json("providers", "list")}
    assert providers[DISTRIBUTION]["version"] == __version__


def test_airflow_lists_its_hooks_and_connection_types(installed: Installed) -> None:
    hooks = {h["connection_type"]: h for h in installed.airflow_json("providers", "hooks")}
    for conn_type, declared in CONN_TYPES.items():
        assert hooks[conn_type]["class"] == declared.hook_class_name
        assert (hooks[conn_type]["hook_name"], hooks[conn_type]["package_name"]) == (declared.hook_name, DISTRIBUTION)


#: What the Add Connection form is built from: the api-server's ``/ui/connections/hook_meta``.
HOOK_META = """
import json
from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService
types = ("lambda_cloud", "runpod", "vastai")
print(json.dumps({m.connection_type: m.model_dump(mode="json") for m in HookMetaService.hook_meta_data()
                  if m.connection_type in types}))
"""


def test_the_add_connection_form_gets_each_types_fields(installed: Installed) -> None:
    meta = installed.script(HOOK_META)
    assert set(meta) == set(CONN_TYPES)
    for conn_type, declared in CONN_TYPES.items():
        standard = meta[conn_type]["standard_fields"]
        assert standard["password"] == {
            "hidden": False,
            "title": "API key",
            "placeholder": f"the {declared.hook_name} API key",
        }
        assert standard["host"] == {"hidden": False, "title": "API base URL", "placeholder": declared.api_url}
        assert all(standard[f]["hidden"] for f in ("url_schema", "port", "login"))
        fields = meta[conn_type]["extra_fields"]
        assert list(fields) == list(declared.conn_fields())
        for name, field in declared.conn_fields().items():
            assert fields[name]["schema"]["title"] == field["label"]
            assert fields[name]["description"] == field["description"]
    assert meta["runpod"]["extra_fields"]["cloud_type"]["value"] == "SECURE"


def test_airflow_shows_the_configuration_section(installed: Installed) -> None:
    listed = installed.run(
        installed.python, "-m", "airflow", "config", "list", "--section", "gpu_training", "--show-values",
        "--include-descriptions",
    )  # fmt: skip
    for key, option in OPTIONS.items():
        assert f"\n{key} = {option.default}".rstrip() in listed, key
        assert option.description[:60] in listed, key
    get = ("-m", "airflow", "config", "get-value", "gpu_training", "max_metric_rows_per_job")
    assert installed.run(installed.python, *get, AIRFLOW__GPU_TRAINING__MAX_METRIC_ROWS_PER_JOB="5").strip() == "5"


#: The DAGs and plugins as the dag-processor and api-server load them, and where the package's files are.
LOADED = """
import json, sys
import gpu_training
from airflow import plugins_manager
from airflow.dag_processing.dagbag import DagBag
from gpu_training.api.ui import UI_DIST
from gpu_training.hosts.base import INCLUDE_DIR, REFERENCE_TRAINER_DIR, REMOTE_SCRIPTS
from gpu_training.results.migrate import MIGRATIONS_DIR
bag = DagBag()
plugins, plugin_errors = plugins_manager._get_plugins()
print(json.dumps({
    "package": gpu_training.__file__, "dags": sorted(bag.dag_ids), "import_errors": bag.import_errors,
    "plugins": [p.name for p in plugins], "plugin_errors": plugin_errors, "include": str(INCLUDE_DIR),
    "remote_scripts": all(p.is_file() for p in REMOTE_SCRIPTS),
    "trainer": (REFERENCE_TRAINER_DIR / "train.py").is_file(),
    "migrations": len(list(MIGRATIONS_DIR.glob("versions/*.py"))),
    "ui_dist": (UI_DIST / "index.html").is_file(),
}))
"""


@pytest.mark.parametrize("plugins_folder", ["none", "the checkout's plugins/"])
def test_the_dags_load_and_the_plugin_once(installed: Installed, plugins_folder: str) -> None:
    """With no plugins folder, and with the checkout's (its gpu_training_plugin.py then steps aside)."""
    env = {"AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins")} if plugins_folder != "none" else {}
    loaded = installed.script(LOADED, **env)
    site = installed.python.parents[1]
    assert Path(loaded["package"]).is_relative_to(site), "gpu_training imported from outside the environment"
    assert loaded["import_errors"] == {}
    assert {"gpu_training", "gpu_instance_reaper"} <= set(loaded["dags"])
    assert (loaded["plugins"], loaded["plugin_errors"]) == (["gpu_training"], {})
    assert Path(loaded["include"]).is_relative_to(site) and loaded["remote_scripts"] and loaded["trainer"]
    assert loaded["migrations"] == len(list((REPO / "plugins/gpu_training/results/migrations/versions").glob("*.py")))
    assert loaded["ui_dist"] == (REPO / "plugins/gpu_training/ui_dist/index.html").is_file()


def test_the_migrate_command(installed: Installed) -> None:
    url = f"sqlite:///{installed.home / 'results.db'}"
    upgraded = installed.run(installed.bin / "gpu-training-migrate", "upgrade", "--url", url)
    assert "migrated to" in upgraded
    assert "is at head" in installed.run(installed.bin / "gpu-training-migrate", "check", "--url", url)


@pytest.mark.e2e
def test_a_job_runs_on_what_the_distribution_ships(installed: Installed) -> None:
    """One local job by ``airflow dags test``: the remote scripts, the reference trainer and its bundled
    data come from the installed package (the checkout's include/ is not where it looks)."""
    env = {"AIRFLOW_HOME": str(installed.home / "job")}  # no plugins folder, as the fixture sets it
    installed.run(installed.python, "-m", "airflow", "db", "migrate", **env)
    installed.run(installed.bin / "gpu-training-migrate", "upgrade", **env)
    conf = {"project_id": "installed", "config": {"iterations": 1, "epochs": 2}, "poll_interval_seconds": 1}
    dag_file = REPO / "dags" / "gpu_training.py"
    argv = ("-m", "airflow", "dags", "test", "gpu_training", "-f", str(dag_file), "--conf", json.dumps(conf))
    installed.run(installed.python, *argv, **env)
    job = installed.script(
        "import json; from sqlalchemy import select\n"
        "from gpu_training.hooks.results import ResultsDbHook\n"
        "from gpu_training.results.models import EpochTrain, TrainingJob\n"
        "with ResultsDbHook().get_store().session() as s:\n"
        "    [job] = s.scalars(select(TrainingJob).where(TrainingJob.project_id == 'installed')).all()\n"
        "    epochs = len(s.scalars(select(EpochTrain).where(EpochTrain.job_id == job.id)).all())\n"
        "    print(json.dumps({'status': job.status, 'reason': job.failure_reason, 'epochs': epochs}))",
        **env,
    )
    assert job == {"status": "completed", "reason": None, "epochs": 2}
