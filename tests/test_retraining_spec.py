"""Retraining specs: YAML -> RetrainingSpec (every error naming the file and the field) -> one DAG each.

Parsing is tested on text; the DAGs as the dag processor sees them (``DagBag`` over ``dags/``, the
spec directory moved with ``GPU_TRAINING_RETRAINING_DIR``).
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training.retraining.spec import (
    DEFAULT_SPEC_DIR,
    MAX_SWEEP_TRIALS,
    SPEC_DIR_ENV,
    RetrainingSpec,
    RetrainingSpecError,
    load_specs,
    merge_job_params,
    parse_spec,
    sweep_trials,
)

REPO = Path(__file__).resolve().parents[1]
DAGS_DIR = REPO / "dags"
SPEC_PATH = "/specs/team.yaml"


def parse(text: str, path: str = SPEC_PATH) -> RetrainingSpec:
    return parse_spec(textwrap.dedent(text), path)


# --- valid specs ---------------------------------------------------------------------------------


def test_a_cron_spec_with_a_promotion_rule() -> None:
    spec = parse(
        """
        name: digits-nightly
        schedule: "0 3 * * *"
        params: {project_id: digits, config: {epochs: 8}}
        promotion: {metric: f1, min_delta: 0.005}
        """
    )
    assert spec.dag_id == "retrain_digits_nightly"
    assert (spec.schedule, spec.asset_uri) == ("0 3 * * *", None)
    assert spec.params == {"project_id": "digits", "config": {"epochs": 8}}
    assert spec.catchup is False and spec.start_date == "2026-01-01"
    assert spec.promotion is not None
    assert (spec.promotion.metric, spec.promotion.mode, spec.promotion.min_delta) == ("f1", "max", 0.005)
    assert spec.promotion.min_value is None and spec.promotion.stage == ""
    assert spec.promotion.as_dict() == {"metric": "f1", "mode": "max", "min_delta": 0.005}
    assert spec.stages == () and spec.sweep is None


@pytest.mark.parametrize("schedule", ["@daily", "@hourly", "@weekly", "@once", "*/15 * * * 1-5"])
def test_presets_and_cron_expressions_are_schedules(schedule: str) -> None:
    assert parse(f"name: a\nschedule: '{schedule}'\n").schedule == schedule


def test_no_schedule_is_manual_only() -> None:
    assert parse("name: a\n").schedule is None
    assert parse("name: a\nschedule: null\n").schedule is None


def test_an_asset_schedule_trains_on_the_asset_unless_told_otherwise() -> None:
    spec = parse(
        """
        name: on-new-data
        schedule: {asset: "s3://training-data/digits/"}
        params: {project_id: digits}
        """
    )
    assert (spec.schedule, spec.asset_uri) == (None, "s3://training-data/digits/")
    assert spec.params["dataset_uri"] == "s3://training-data/digits/"
    explicit = parse(
        """
        name: on-new-data
        schedule: {asset: "s3://training-data/digits/"}
        params: {project_id: digits, dataset_uri: "s3://training-data/all/"}
        """
    )
    assert explicit.params["dataset_uri"] == "s3://training-data/all/"


def test_stages_fan_out_and_in_with_init_from_defaulting_to_the_single_dependency() -> None:
    spec = parse(
        """
        name: rlhf
        params: {project_id: p, config: {epochs: 4, hidden_size: 64}}
        stages:
          - name: sft
          - {name: ppo, depends_on: [sft], params: {config: {learning_rate: 0.003}}}
          - {name: dpo, depends_on: [sft], checkpoint: checkpoints/best.npz}
          - {name: merge, depends_on: [ppo, dpo]}
          - {name: eval, depends_on: [ppo, dpo], init_from: dpo}
          - {name: report, depends_on: [merge, eval]}
        promotion: {metric: loss, mode: min}
        """
    )
    by_name = {s.name: s for s in spec.stages}
    assert list(by_name) == ["sft", "ppo", "dpo", "merge", "eval", "report"]
    assert by_name["sft"].depends_on == () and by_name["sft"].init_from == ""
    assert by_name["ppo"].depends_on == ("sft",) and by_name["ppo"].init_from == "sft"
    assert by_name["dpo"].init_from == "sft" and by_name["dpo"].checkpoint == "checkpoints/best.npz"
    assert by_name["ppo"].checkpoint == "model_final.npz"
    assert by_name["merge"].init_from == ""  # two dependencies and none named: starts fresh
    assert by_name["eval"].init_from == "dpo"
    # A stage keeps its own params; the spec's are the run's (merged at registration).
    assert by_name["ppo"].params == {"config": {"learning_rate": 0.003}}
    assert spec.params == {"project_id": "p", "config": {"epochs": 4, "hidden_size": 64}}
    assert spec.promotion is not None and spec.promotion.stage == "report"  # the only sink


def test_the_promotion_stage_may_be_any_stage_when_named() -> None:
    spec = parse(
        """
        name: two-sinks
        stages: [{name: a}, {name: b, depends_on: [a]}, {name: c, depends_on: [a]}]
        promotion: {metric: f1, stage: c}
        """
    )
    assert spec.promotion is not None and spec.promotion.stage == "c"


def test_merge_job_params_merges_config_key_by_key() -> None:
    base = {"project_id": "p", "gpu": "A10", "config": {"epochs": 4, "hidden_size": 64}}
    override = {"gpu": "H100", "config": {"epochs": 1, "learning_rate": 0.1}}
    assert merge_job_params(base, override) == {
        "project_id": "p",
        "gpu": "H100",
        "config": {"epochs": 1, "hidden_size": 64, "learning_rate": 0.1},
    }
    assert merge_job_params(base, {}) == base
    assert base["config"] == {"epochs": 4, "hidden_size": 64}  # not modified


def test_sweep_trials_are_the_configs_then_the_grid_in_key_order() -> None:
    trials = sweep_trials(
        {"learning_rate": [0.1, 0.01], "hidden_size": [32, 64, 128]}, [{"learning_rate": 0.5, "epochs": 1}]
    )
    assert trials == [
        {"learning_rate": 0.5, "epochs": 1},
        {"learning_rate": 0.1, "hidden_size": 32},
        {"learning_rate": 0.1, "hidden_size": 64},
        {"learning_rate": 0.1, "hidden_size": 128},
        {"learning_rate": 0.01, "hidden_size": 32},
        {"learning_rate": 0.01, "hidden_size": 64},
        {"learning_rate": 0.01, "hidden_size": 128},
    ]
    assert sweep_trials({}, []) == []
    assert len(sweep_trials({"a": list(range(16)), "b": list(range(16))})) == MAX_SWEEP_TRIALS
    with pytest.raises(ValueError, match=f"257 trials: at most {MAX_SWEEP_TRIALS}"):
        sweep_trials({"a": list(range(16)), "b": list(range(16))}, [{"a": -1}])


def test_a_sweep_spec_takes_its_metric_from_the_promotion_rule() -> None:
    spec = parse(
        """
        name: sweep
        params: {project_id: p, config: {epochs: 2}}
        sweep:
          grid: {learning_rate: [0.003, 0.02], hidden_size: [32, 64]}
          budget_usd: 2
        promotion: {metric: loss, mode: min}
        """
    )
    assert spec.sweep is not None
    assert (spec.sweep.metric, spec.sweep.mode, spec.sweep.budget_usd, spec.sweep.pool) == (
        "loss",
        "min",
        2.0,
        "gpu_instances",
    )
    assert len(sweep_trials(spec.sweep.grid, spec.sweep.configs)) == 4
    bare = parse("name: s\nsweep: {configs: [{epochs: 1}, {epochs: 2}]}\n")
    assert bare.sweep is not None and (bare.sweep.metric, bare.sweep.mode) == ("f1", "max")


def test_the_repos_example_specs_all_parse() -> None:
    files = sorted(DEFAULT_SPEC_DIR.glob("*.yaml"))
    assert files, f"no example specs in {DEFAULT_SPEC_DIR}"
    for path in files:
        parse_spec(path.read_text(encoding="utf-8"), path)
    specs = {s.name: s for s in load_specs(DEFAULT_SPEC_DIR)}
    assert len(specs) == len(files)
    nightly, new_data = specs["digits-nightly"], specs["digits-on-new-data"]
    assert nightly.schedule == "0 3 * * *" and nightly.promotion is not None
    assert new_data.asset_uri and new_data.params["dataset_uri"] == new_data.asset_uri
    pipeline = specs["digits-rlhf-pipeline"]
    assert [(s.name, s.init_from) for s in pipeline.stages] == [
        ("sft", ""),
        ("ppo", "sft"),
        ("dpo", "sft"),
        ("eval", "ppo"),
    ]
    assert pipeline.promotion is not None and pipeline.promotion.stage == "eval"
    sweep = specs["digits-sweep"].sweep
    assert sweep is not None and len(sweep_trials(sweep.grid, sweep.configs)) == 4


# --- malformed specs: each error names the file and the field --------------------------------------

MALFORMED = [
    ("unknown top-level key", "name: a\nschedul: '@daily'\n", "schedul", "'schedul' was unexpected"),
    ("missing name", "schedule: '@daily'\n", "name", "required"),
    ("bad name", "name: Team Model\n", "name", "does not match"),
    ("bad cron", "name: a\nschedule: '61 * * * *'\n", "schedule", "neither a cron expression nor a preset"),
    ("unknown preset", "name: a\nschedule: '@sometimes'\n", "schedule", "'@sometimes'"),
    ("asset not a URI", "name: a\nschedule: {asset: digits}\n", "schedule.asset", "does not match"),
    ("bad start_date", "name: a\nstart_date: '2026-13-01'\n", "start_date", "month must be in 1..12"),
    ("unknown job param", "name: a\nparams: {project_id: p, foo: 1}\n", "params.foo", "not a gpu_training param"),
    ("invalid job param", "name: a\nparams: {provider: nope}\n", "params.provider", "'nope' is not allowed: one of"),
    ("invalid job param type", "name: a\nparams: {max_cost_usd: lots}\n", "params.max_cost_usd", "'lots'"),
    ("min_delta not a number", "name: a\npromotion: {metric: f1, min_delta: x}\n", "promotion.min_delta", "number"),
    ("negative min_delta", "name: a\npromotion: {metric: f1, min_delta: -1}\n", "promotion.min_delta", "minimum"),
    ("bad mode", "name: a\npromotion: {metric: f1, mode: best}\n", "promotion.mode", "'best'"),
    ("promotion without metric", "name: a\npromotion: {mode: max}\n", "promotion.metric", "required"),
    (
        "depends on a later stage",
        "name: a\nstages: [{name: x, depends_on: [y]}, {name: y}]\n",
        "stages.0.depends_on",
        "'y' is not a stage defined before 'x'",
    ),
    (
        "depends on an unknown stage",
        "name: a\nstages: [{name: x}, {name: y, depends_on: [z]}]\n",
        "stages.1.depends_on",
        "'z' is not a stage defined before 'y'",
    ),
    (
        "init_from not in depends_on",
        "name: a\nstages: [{name: x}, {name: w}, {name: y, depends_on: [x], init_from: w}]\n",
        "stages.2.init_from",
        "'w' is not in depends_on",
    ),
    ("stage defined twice", "name: a\nstages: [{name: x}, {name: x}]\n", "stages.1.name", "defined twice"),
    ("unknown stage key", "name: a\nstages: [{name: x, dependson: []}]\n", "stages.0.dependson", "unexpected"),
    (
        "invalid stage param",
        "name: a\nstages: [{name: x, params: {provider: nope}}]\n",
        "stages.0.params.provider",
        "'nope'",
    ),
    (
        "promotion stage missing with two sinks",
        "name: a\nstages: [{name: x}, {name: y, depends_on: [x]}, {name: z, depends_on: [x]}]\n"
        "promotion: {metric: f1}\n",
        "promotion.stage",
        "required: the pipeline ends in ['y', 'z']",
    ),
    (
        "promotion stage unknown",
        "name: a\nstages: [{name: x}]\npromotion: {metric: f1, stage: y}\n",
        "promotion.stage",
        "'y' is not a stage",
    ),
    (
        "stages and sweep together",
        "name: a\nstages: [{name: x}]\nsweep: {grid: {learning_rate: [0.1]}}\n",
        "sweep",
        "stages or a sweep, not both",
    ),
    ("empty sweep", "name: a\nsweep: {metric: f1}\n", "sweep", "needs a grid or configs"),
    ("empty grid value", "name: a\nsweep: {grid: {learning_rate: []}}\n", "sweep.grid.learning_rate", "empty"),
    (
        "too many trials",
        f"name: a\nsweep: {{grid: {{a: {list(range(17))}, b: {list(range(16))}}}}}\n",
        "sweep",
        "272 trials",
    ),
]


@pytest.mark.parametrize(("text", "field", "fragment"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_a_malformed_spec_names_its_file_and_field(text: str, field: str, fragment: str) -> None:
    with pytest.raises(RetrainingSpecError) as caught:
        parse_spec(text, SPEC_PATH)
    err = caught.value
    assert (err.path, err.field) == (SPEC_PATH, field)
    assert str(err).startswith(f"{SPEC_PATH}: {field}: "), str(err)
    assert fragment in str(err)


def test_a_yaml_syntax_error_names_the_file_and_the_line() -> None:
    with pytest.raises(RetrainingSpecError) as caught:
        parse_spec("name: a\nparams: {config: [1, 2}\n", SPEC_PATH)
    message = str(caught.value)
    assert message.startswith(f"{SPEC_PATH}: not valid YAML")
    assert "line 2" in message


@pytest.mark.parametrize("text", ["- name: a\n", "just a string\n", ""])
def test_a_spec_that_is_not_a_mapping_is_refused(text: str) -> None:
    with pytest.raises(RetrainingSpecError, match="a spec is a mapping"):
        parse_spec(text, SPEC_PATH)


# --- a directory of specs ------------------------------------------------------------------------

GOOD = "name: {name}\nschedule: '@daily'\nparams: {{project_id: p, provider: local}}\n"


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


def test_load_specs_reads_yaml_and_yml_sorted_by_file_name(tmp_path: Path) -> None:
    directory = write(
        tmp_path / "specs",
        {"b.yaml": GOOD.format(name="b"), "a.yml": GOOD.format(name="a"), "notes.txt": "not a spec"},
    )
    assert [s.name for s in load_specs(directory)] == ["a", "b"]
    assert load_specs(tmp_path / "missing") == []


def test_load_specs_reads_the_directory_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, {"x.yaml": GOOD.format(name="from-env")})
    monkeypatch.setenv(SPEC_DIR_ENV, str(tmp_path))
    assert [s.name for s in load_specs()] == ["from-env"]


def test_load_specs_reports_every_bad_file_in_one_error(tmp_path: Path) -> None:
    directory = write(
        tmp_path,
        {
            "a_good.yaml": GOOD.format(name="good"),
            "b_bad.yaml": "name: b\nschedule: 'every day'\n",
            "c_bad.yaml": "name: c\nparams: {foo: 1}\n",
            "d_broken.yaml": "name: [\n",
        },
    )
    with pytest.raises(RetrainingSpecError) as caught:
        load_specs(directory)
    message = str(caught.value)
    assert f"{directory / 'b_bad.yaml'}: schedule: " in message
    assert f"{directory / 'c_bad.yaml'}: params.foo: " in message
    assert f"{directory / 'd_broken.yaml'}: not valid YAML" in message
    assert "a_good.yaml" not in message


def test_two_files_with_the_same_name_are_refused(tmp_path: Path) -> None:
    # "team-model" and "team_model" would be the same DAG id.
    directory = write(tmp_path, {"a.yaml": GOOD.format(name="team-model"), "b.yaml": GOOD.format(name="team_model")})
    with pytest.raises(RetrainingSpecError) as caught:
        load_specs(directory)
    assert f"{directory / 'b.yaml'}: name: " in str(caught.value)
    assert str(directory / "a.yaml") in str(caught.value)


# --- the DAGs, as the dag processor parses them ----------------------------------------------------


def dagbag(spec_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    from airflow.dag_processing.dagbag import DagBag

    monkeypatch.setenv(SPEC_DIR_ENV, str(spec_dir))
    return DagBag(dag_folder=str(DAGS_DIR))


def test_a_bad_spec_is_one_import_error_naming_it_and_the_rest_still_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = write(
        tmp_path,
        {"good.yaml": GOOD.format(name="good"), "bad.yaml": "name: bad\nparams: {provider: nope}\n"},
    )
    bag = dagbag(directory, monkeypatch)
    errors = {Path(path).name: message for path, message in bag.import_errors.items()}
    assert list(errors) == ["retraining.py"], bag.import_errors
    assert f"{directory / 'bad.yaml'}: params.provider: " in errors["retraining.py"]
    assert "gpu_training" in bag.dag_ids and "gpu_instance_reaper" in bag.dag_ids


@pytest.fixture(scope="module")
def good_dags(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The DAGs of the repo's example specs plus one with a preset schedule."""
    directory = tmp_path_factory.mktemp("good-specs")
    for path in DEFAULT_SPEC_DIR.glob("*.yaml"):
        shutil.copy(path, directory / path.name)
    write(directory, {"daily.yaml": GOOD.format(name="daily-preset")})
    with pytest.MonkeyPatch.context() as monkeypatch:
        bag = dagbag(directory, monkeypatch)
    assert bag.import_errors == {}
    yield bag.dags


def test_every_spec_is_a_dag_that_never_overlaps_or_catches_up(good_dags: dict[str, Any]) -> None:
    from gpu_training.retraining.spec import load_specs as specs_of

    expected = {s.dag_id for s in specs_of(DEFAULT_SPEC_DIR)} | {"retrain_daily_preset"}
    assert expected <= set(good_dags)
    for dag_id in expected:
        dag = good_dags[dag_id]
        assert dag.max_active_runs == 1, dag_id
        assert dag.catchup is False, dag_id
        assert "retraining" in dag.tags and dag.doc_md, dag_id
    assert "gpu_training" in good_dags


def test_schedules_become_cron_asset_or_no_timetable(good_dags: dict[str, Any]) -> None:
    from airflow.sdk.definitions.timetables.assets import AssetTriggeredTimetable
    from airflow.sdk.definitions.timetables.simple import NullTimetable
    from airflow.sdk.definitions.timetables.trigger import CronTriggerTimetable

    nightly = good_dags["retrain_digits_nightly"].timetable
    assert isinstance(nightly, CronTriggerTimetable) and nightly.expression == "0 3 * * *"
    weekly = good_dags["retrain_digits_rlhf_pipeline"].timetable
    assert isinstance(weekly, CronTriggerTimetable) and weekly.expression == "0 0 * * 0"
    daily = good_dags["retrain_daily_preset"].timetable
    assert isinstance(daily, CronTriggerTimetable) and daily.expression == "0 0 * * *"
    on_data = good_dags["retrain_digits_on_new_data"]
    assert isinstance(on_data.timetable, AssetTriggeredTimetable)
    assets = list(on_data.timetable.asset_condition.objects)
    assert [a.name for a in assets] == ["s3://training-data/digits/"]
    assert on_data.params["dataset_uri"] == "s3://training-data/digits/"
    assert isinstance(good_dags["retrain_digits_sweep"].timetable, NullTimetable)


def test_a_single_job_is_promoted_after_its_finalize(good_dags: dict[str, Any]) -> None:
    tasks = good_dags["retrain_digits_nightly"].task_dict
    assert tasks["promote"].upstream_task_ids == {"finalize"}
    assert tasks["promote"].rule == {"metric": "f1", "mode": "max", "min_delta": 0.005, "min_value": 0.8}
    assert tasks["register_job"].stage == "" and tasks["register_job"].init_from is None
    assert good_dags["retrain_digits_nightly"].params["config"]["epochs"] == 6  # the spec's params are defaults


def test_pipeline_stages_are_groups_wired_by_their_dependencies(good_dags: dict[str, Any]) -> None:
    dag = good_dags["retrain_digits_rlhf_pipeline"]
    tasks = dag.task_dict
    assert {"sft", "ppo", "dpo", "eval"} <= set(dag.task_group_dict)
    assert tasks["sft.register_job"].upstream_task_ids == set()
    assert tasks["ppo.register_job"].upstream_task_ids == {"sft.finalize"}
    assert tasks["dpo.register_job"].upstream_task_ids == {"sft.finalize"}
    assert tasks["eval.register_job"].upstream_task_ids == {"ppo.finalize", "dpo.finalize"}
    assert tasks["promote"].upstream_task_ids == {"eval.finalize"}
    assert tasks["promote"].stage == "eval"
    # Each stage's steps find their own job: the stage is on every one of them.
    for stage in ("sft", "ppo", "dpo", "eval"):
        for step in ("register_job", "provision", "sense_progress", "teardown", "finalize"):
            assert tasks[f"{stage}.{step}"].stage == stage
    assert tasks["sft.register_job"].init_from is None
    assert tasks["ppo.register_job"].init_from == ("sft", "model_final.npz")
    assert tasks["eval.register_job"].init_from == ("ppo", "model_final.npz")
    assert tasks["eval.register_job"].job_params == {"config": {"epochs": 1, "learning_rate": 0.0001}}
    # The watched steps of a stage's finalize are its own.
    assert all(t.startswith("ppo.") for t in tasks["ppo.finalize"].watched_task_ids)


def test_a_sweep_is_a_mapped_group_whose_instance_steps_share_the_pool(good_dags: dict[str, Any]) -> None:
    from airflow.sdk.definitions.taskgroup import MappedTaskGroup

    from gpu_training.taskgroup import INSTANCE_STEPS

    dag = good_dags["retrain_digits_sweep"]
    tasks = dag.task_dict
    assert isinstance(dag.task_group_dict["trial"], MappedTaskGroup)
    assert tasks["trial.register_job"].upstream_task_ids == {"plan_sweep"}
    for step in INSTANCE_STEPS:
        assert tasks[f"trial.{step}"].pool == "gpu_instances", step
    for step in ("register_job", "build_config", "teardown", "finalize"):
        assert tasks[f"trial.{step}"].pool != "gpu_instances", step
    # Teardown outranks every instance step (it frees money); later steps outrank earlier ones.
    weights = [tasks[f"trial.{step}"].priority_weight for step in INSTANCE_STEPS]
    assert weights == sorted(weights) and tasks["trial.teardown"].priority_weight > max(weights)
    # The report waits for every trial's finalize (status and cost settled), whatever the outcome.
    assert tasks["report_sweep"].upstream_task_ids == {"trial.finalize"}
    assert tasks["report_sweep"].trigger_rule == "all_done"
    assert tasks["promote"].upstream_task_ids == {"report_sweep"} and tasks["promote"].from_sweep
    assert dag.params["sweep_grid"] == {"learning_rate": [0.003, 0.02], "hidden_size": [32, 64]}
    assert dag.params["sweep_configs"] == []
    assert dag.params["run_budget_usd"] == 2
