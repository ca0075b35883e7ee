"""Retraining specs: ``include/retraining/*.yaml``, one DAG each (``dags/retraining.py``).

A spec names its schedule (cron, a preset such as ``@daily``, or an Asset such as an S3 prefix of
new data), the job params, and optionally a promotion rule, pipeline stages or a sweep::

    name: digits-nightly
    schedule: "0 3 * * *"                 # or {asset: "s3://training-data/digits/"}
    params: {project_id: digits, config: {epochs: 8}}
    promotion: {metric: f1, mode: max, min_delta: 0.005}

Parsing is cheap (YAML, a JSON schema, the job params' own schemas) and strict: every error names
the file and the field, e.g. ``include/retraining/bad.yaml: promotion.min_delta: 'x' is not of
type 'number'``.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from gpu_training.errors import JobParamsError, RetrainingSpecError
from gpu_training.params import PARAM_SPECS, parse_job_params

DEFAULT_SPEC_DIR = Path(__file__).resolve().parents[3] / "include" / "retraining"
SPEC_DIR_ENV = "GPU_TRAINING_RETRAINING_DIR"
DAG_ID_PREFIX = "retrain_"
DEFAULT_POOL = "gpu_instances"
DEFAULT_CHECKPOINT = "model_final.npz"
#: Hyperparameter values of one sweep trial are merged into the job's ``config``.
MAX_SWEEP_TRIALS = 256

_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"
_STAGE = r"^[a-z0-9][a-z0-9_]{0,63}$"

SPEC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": _NAME},
        "description": {"type": "string", "maxLength": 2000},
        "schedule": {
            "oneOf": [
                {"type": "null"},
                {"type": "string", "minLength": 1},
                {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["asset"],
                    "properties": {"asset": {"type": "string", "pattern": r"^[a-z][a-z0-9+.-]*://.+"}},
                },
            ]
        },
        "start_date": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}"},
        "catchup": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 100}},
        "params": {"type": "object"},
        "promotion": {
            "type": "object",
            "additionalProperties": False,
            "required": ["metric"],
            "properties": {
                "metric": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                "mode": {"enum": ["max", "min"]},
                "min_delta": {"type": "number", "minimum": 0},
                "min_value": {"type": "number"},
                "stage": {"type": "string", "pattern": _STAGE},
            },
        },
        "stages": {
            "type": "array",
            "minItems": 1,
            "maxItems": 32,
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["name"],
                "properties": {
                    "name": {"type": "string", "pattern": _STAGE},
                    "depends_on": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                    "init_from": {"type": "string"},
                    "checkpoint": {"type": "string", "minLength": 1, "maxLength": 512},
                    "params": {"type": "object"},
                },
            },
        },
        "sweep": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "grid": {"type": "object", "additionalProperties": {"type": "array", "minItems": 1}},
                "configs": {"type": "array", "items": {"type": "object"}, "minItems": 1},
                "metric": {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"},
                "mode": {"enum": ["max", "min"]},
                "budget_usd": {"type": "number", "minimum": 0},
                "max_parallel": {"type": "integer", "minimum": 0, "maximum": 1000},
                "pool": {"type": "string", "pattern": r"^[A-Za-z0-9_.-]{1,256}$"},
            },
        },
    },
}


@dataclasses.dataclass(frozen=True)
class Promotion:
    metric: str
    mode: str = "max"
    min_delta: float = 0.0
    min_value: float | None = None
    stage: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, "")}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    params: Mapping[str, Any]
    depends_on: tuple[str, ...] = ()
    init_from: str = ""
    checkpoint: str = DEFAULT_CHECKPOINT


@dataclasses.dataclass(frozen=True)
class Sweep:
    grid: Mapping[str, list[Any]]
    configs: tuple[Mapping[str, Any], ...]
    metric: str = "f1"
    mode: str = "max"
    budget_usd: float = 0.0
    max_parallel: int = 0
    pool: str = DEFAULT_POOL


@dataclasses.dataclass(frozen=True)
class RetrainingSpec:
    path: str
    name: str
    description: str
    schedule: str | None
    asset_uri: str | None
    start_date: str
    catchup: bool
    tags: tuple[str, ...]
    params: Mapping[str, Any]
    promotion: Promotion | None
    stages: tuple[Stage, ...]
    sweep: Sweep | None

    @property
    def dag_id(self) -> str:
        return DAG_ID_PREFIX + self.name.replace("-", "_")


def merge_job_params(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``; ``config`` (the hyperparameters) is merged key by key."""
    merged = {**base, **override}
    if isinstance(base.get("config"), Mapping) and isinstance(override.get("config"), Mapping):
        merged["config"] = {**base["config"], **override["config"]}
    return merged


def sweep_trials(grid: Mapping[str, list[Any]], configs: list[Mapping[str, Any]] | tuple = ()) -> list[dict[str, Any]]:
    """The trials' hyperparameter overrides: every listed config, then the grid's cartesian product
    (keys in the order given). Raises ValueError beyond :data:`MAX_SWEEP_TRIALS`."""
    import itertools

    trials = [dict(c) for c in configs]
    if grid:
        keys = list(grid)
        trials += [dict(zip(keys, values, strict=True)) for values in itertools.product(*(grid[k] for k in keys))]
    if len(trials) > MAX_SWEEP_TRIALS:
        raise ValueError(f"{len(trials)} trials: at most {MAX_SWEEP_TRIALS} per sweep")
    return trials


def _field(err: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in err.absolute_path]
    if err.validator == "required":
        missing = re.search(r"'([^']+)' is a required property", err.message)
        if missing:
            parts.append(missing.group(1))
    elif err.validator == "additionalProperties":
        extra = re.findall(r"'([^']+)'", err.message)
        if extra:
            parts.append(extra[0])
    return ".".join(parts) or "(top level)"


def _check_params(path: Path, field: str, params: Mapping[str, Any]) -> None:
    unknown = sorted(set(params) - set(PARAM_SPECS))
    if unknown:
        raise RetrainingSpecError(path, f"{field}.{unknown[0]}", "not a gpu_training param (known: see docs/params.md)")
    try:
        parse_job_params(params)
    except JobParamsError as err:
        raise RetrainingSpecError(path, f"{field}.{err.param}", err.reason) from None


def _check_schedule(path: Path, schedule: str) -> None:
    from croniter import croniter

    presets = {"@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly"}
    if schedule in presets:
        return
    if not croniter.is_valid(schedule):
        raise RetrainingSpecError(path, "schedule", f"{schedule!r} is neither a cron expression nor a preset")


def _stages(path: Path, raw: list[dict[str, Any]], params: Mapping[str, Any]) -> tuple[Stage, ...]:
    stages: list[Stage] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        field = f"stages.{i}"
        name = item["name"]
        if name in seen:
            raise RetrainingSpecError(path, f"{field}.name", f"stage {name!r} is defined twice")
        depends = tuple(item.get("depends_on", ()))
        for dep in depends:
            if dep not in seen:
                # Only earlier stages may be named: the order in the file is a topological order,
                # so a cycle cannot be written.
                raise RetrainingSpecError(
                    path, f"{field}.depends_on", f"{dep!r} is not a stage defined before {name!r}"
                )
        init_from = item.get("init_from", depends[0] if len(depends) == 1 else "")
        if init_from and init_from not in depends:
            raise RetrainingSpecError(path, f"{field}.init_from", f"{init_from!r} is not in depends_on")
        stage_params = merge_job_params(params, item.get("params", {}))
        _check_params(path, f"{field}.params", stage_params)
        stages.append(
            Stage(
                name=name,
                params=item.get("params", {}),
                depends_on=depends,
                init_from=init_from,
                checkpoint=item.get("checkpoint", DEFAULT_CHECKPOINT),
            )
        )
        seen.add(name)
    return tuple(stages)


def parse_spec(text: str, path: Path | str) -> RetrainingSpec:
    """Validate one spec's YAML text; raises :class:`RetrainingSpecError`."""
    path = Path(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise RetrainingSpecError(path, "", f"not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RetrainingSpecError(path, "", "a spec is a mapping (name, schedule, params, ...)")
    if isinstance(raw.get("start_date"), datetime.date):  # YAML reads an unquoted 2026-01-01 as a date
        raw["start_date"] = raw["start_date"].isoformat()
    errors = sorted(jsonschema.Draft202012Validator(SPEC_SCHEMA).iter_errors(raw), key=lambda e: list(e.path))
    if errors:
        best = jsonschema.exceptions.best_match(errors)
        raise RetrainingSpecError(path, _field(best), best.message)
    if raw.get("stages") and raw.get("sweep"):
        raise RetrainingSpecError(path, "sweep", "a spec has stages or a sweep, not both")
    start_date = raw.get("start_date", "2026-01-01")
    try:
        datetime.date.fromisoformat(start_date[:10])
    except ValueError as err:
        raise RetrainingSpecError(path, "start_date", f"{start_date!r}: {err}") from None
    schedule = raw.get("schedule")
    asset_uri = None
    if isinstance(schedule, dict):
        asset_uri, schedule = schedule["asset"], None
    elif schedule is not None:
        _check_schedule(path, schedule)
    params = dict(raw.get("params") or {})
    if asset_uri and "dataset_uri" not in params:
        params["dataset_uri"] = asset_uri  # new data under the asset is what the run trains on
    stages = _stages(path, raw["stages"], params) if raw.get("stages") else ()
    if not stages:
        _check_params(path, "params", params)
    promotion = None
    if raw.get("promotion"):
        promotion = Promotion(**raw["promotion"])
        sinks = [s.name for s in stages if not any(s.name in t.depends_on for t in stages)]
        if stages and not promotion.stage:
            if len(sinks) != 1:
                raise RetrainingSpecError(path, "promotion.stage", f"required: the pipeline ends in {sinks}")
            promotion = dataclasses.replace(promotion, stage=sinks[0])
        elif promotion.stage and promotion.stage not in {s.name for s in stages}:
            raise RetrainingSpecError(path, "promotion.stage", f"{promotion.stage!r} is not a stage")
    sweep = None
    if raw.get("sweep") is not None:
        s = raw["sweep"]
        try:
            trials = sweep_trials(s.get("grid", {}), s.get("configs", []))
        except ValueError as err:
            raise RetrainingSpecError(path, "sweep", str(err)) from None
        if not trials:
            raise RetrainingSpecError(path, "sweep", "needs a grid or configs")
        for i, trial in enumerate(trials):
            _check_params(path, f"sweep.trial {i}", merge_job_params(params, {"config": trial}))
        sweep = Sweep(
            grid=s.get("grid", {}),
            configs=tuple(s.get("configs", ())),
            metric=s.get("metric", promotion.metric if promotion else "f1"),
            mode=s.get("mode", promotion.mode if promotion else "max"),
            budget_usd=float(s.get("budget_usd", 0)),
            max_parallel=int(s.get("max_parallel", 0)),
            pool=s.get("pool", DEFAULT_POOL),
        )
    return RetrainingSpec(
        path=str(path),
        name=raw["name"],
        description=raw.get("description", ""),
        schedule=schedule,
        asset_uri=asset_uri,
        start_date=start_date,
        catchup=bool(raw.get("catchup", False)),
        tags=tuple(raw.get("tags", ())),
        params=params,
        promotion=promotion,
        stages=stages,
        sweep=sweep,
    )


def spec_dir() -> Path:
    import os

    return Path(os.environ.get(SPEC_DIR_ENV) or DEFAULT_SPEC_DIR)


def load_specs(directory: Path | None = None) -> list[RetrainingSpec]:
    """Every ``*.yaml``/``*.yml`` spec of the directory, sorted by file name.

    Raises one :class:`RetrainingSpecError` listing every bad file (so a broken spec is one clear
    import error, not a traceback), and for two specs with the same name.
    """
    directory = directory or spec_dir()
    if not directory.is_dir():
        return []
    specs: list[RetrainingSpec] = []
    problems: list[str] = []
    by_dag: dict[str, str] = {}
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            spec = parse_spec(path.read_text(encoding="utf-8"), path)
        except RetrainingSpecError as err:
            problems.append(str(err))
            continue
        if spec.dag_id in by_dag:
            problems.append(
                str(RetrainingSpecError(path, "name", f"{spec.name!r} is also the name in {by_dag[spec.dag_id]}"))
            )
            continue
        by_dag[spec.dag_id] = str(path)
        specs.append(spec)
    if problems:
        raise RetrainingSpecError(directory, "", "bad retraining spec(s):\n  " + "\n  ".join(problems))
    return specs
