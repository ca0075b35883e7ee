"""Params: the schema the trigger form shows and the validation that runs before provisioning."""

from __future__ import annotations

import pytest

from gpu_training.errors import JobParamsError
from gpu_training.params import DEFAULT_COMMAND, PARAM_SPECS, parse_job_params, render_command


def test_defaults_are_a_valid_job() -> None:
    spec = parse_job_params({})
    assert (spec.project_id, spec.provider, spec.runtime) == ("demo", "local", "process")
    assert list(spec.command) == DEFAULT_COMMAND
    assert (spec.max_runtime_minutes, spec.stall_timeout_minutes, spec.poll_interval_seconds) == (120, 15, 5)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"provider": "azure"}, "provider"),
        ({"project_id": "has spaces"}, "project_id"),
        ({"project_id": ""}, "project_id"),
        ({"project_id": "x" * 65}, "project_id"),
        ({"max_runtime_minutes": -5}, "max_runtime_minutes"),
        ({"stall_timeout_minutes": 0}, "stall_timeout_minutes"),
        ({"poll_interval_seconds": -1}, "poll_interval_seconds"),
        ({"command": []}, "command"),
        ({"command": "python train.py"}, "command"),
        ({"command": ["  "]}, "command"),
        ({"runtime": "vm"}, "runtime"),
        ({"dataset_uri": "http://example.com/data.csv"}, "dataset_uri"),
        ({"outputs_uri": "/tmp/outputs"}, "outputs_uri"),
        ({"config": [1, 2]}, "config"),
    ],
)
def test_bad_params_are_rejected_naming_the_param(params: dict, param: str) -> None:
    with pytest.raises(JobParamsError) as info:
        parse_job_params(params)
    assert info.value.param == param
    assert f"invalid param {param!r}" in str(info.value)


def test_airflow_params_carry_schema_title_and_description() -> None:
    from gpu_training.params import airflow_params

    params = airflow_params()
    assert list(params) == list(PARAM_SPECS)
    for name, param in params.items():
        assert param.schema["title"], name
        assert param.description, name
        assert param.schema["type"], name
    assert params["provider"].schema["enum"] == ["local", "ssh", "lambda", "runpod", "vast", "ec2", "cloud", None]


def test_the_trigger_form_requires_only_the_project_and_groups_params_in_sections() -> None:
    """Airflow's form marks a param required (and blocks an empty one) unless its type admits null."""
    from gpu_training.params import SECTIONS, airflow_params

    params = airflow_params()
    required = [name for name, p in params.items() if "null" not in p.schema["type"]]
    assert required == ["project_id"]
    for name, param in params.items():
        if name != "project_id" and "enum" in param.schema:
            assert None in param.schema["enum"], name  # null must also pass the enum
    sections = [p.schema.get("section", "") for p in params.values()]
    assert sections[:3] == ["", "", ""] and list(dict.fromkeys(sections)) == list(SECTIONS)
    assert list(params)[:3] == ["project_id", "provider", "config"]
    # Empty optional texts are empty (null) in the form, not the string "".
    assert params["gpu"].value is None and params["ssh_conn_id"].value is None
    params_dict = __import__("airflow.sdk", fromlist=["ParamsDict"]).ParamsDict(params)
    params_dict.validate()  # the defaults submit as they are


def test_the_form_defaults_and_nulls_are_a_valid_job() -> None:
    from gpu_training.params import airflow_params

    spec = parse_job_params({name: p.value for name, p in airflow_params().items()})
    assert spec == parse_job_params({})
    everything_cleared = {name: None for name in PARAM_SPECS if name != "project_id"}
    assert parse_job_params({**everything_cleared, "project_id": "p"}) == parse_job_params({"project_id": "p"})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"project_id": "../../etc"},
            "invalid param 'project_id' (Project): '../../etc' is not allowed: "
            "1 to 64 letters, digits, '_', '.' or '-'",
        ),
        (
            {"max_runtime_minutes": -5},
            "invalid param 'max_runtime_minutes' (Max runtime (minutes)): -5 is not allowed: "
            "a number greater than 0, at most 20160",
        ),
        (
            {"provider": "azure"},
            "invalid param 'provider' (Provider): 'azure' is not allowed: one of 'local', 'ssh', 'lambda', "
            "'runpod', 'vast', 'ec2', 'cloud'",
        ),
        (
            {"max_recoveries": 2.5},
            "invalid param 'max_recoveries' (Max spot recoveries): 2.5 is not allowed: a whole number from 0 to 20",
        ),
        (
            {"providers": ["lambda", "gcp"]},
            'invalid param \'providers\' (Providers to consider): ["lambda", "gcp"] is not allowed: a list of '
            "'local', 'ssh', 'lambda', 'runpod', 'vast', 'ec2' (each at most once)",
        ),
        ({"spot": "yes"}, "invalid param 'spot' (Allow spot / interruptible): 'yes' is not allowed: true or false"),
    ],
)
def test_a_refusal_names_the_title_and_what_is_allowed_in_words(params: dict, message: str) -> None:
    with pytest.raises(JobParamsError) as info:
        parse_job_params(params)
    assert str(info.value) == message


def test_command_placeholders_are_the_only_thing_expanded() -> None:
    argv = render_command(
        ["{python}", "{workdir}/t.py", "--name", "$HOME;rm -rf /"], python="/usr/bin/python3", workdir="/w"
    )
    assert argv == ["/usr/bin/python3", "/w/t.py", "--name", "$HOME;rm -rf /"]


#: A good value of every param whose schema has a pattern (on the value or on each item).
GOOD = {
    "project_id": "demo",
    "ssh_conn_id": "my_box",
    "image": "registry.example.com:5000/team/trainer:1.4",
    "registry_conn_id": "team_registry",
    "container_memory": "32g",
    "container_shm_size": "1g",
    "dataset_uri": "s3://data/digits.csv",
    "init_checkpoint_uri": "file:///models/m.npz",
    "outputs_uri": "s3://runs/",
    "aws_conn_id": "team_aws",
    "notify": ["slack://team"],
}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_param_must_be_finite(value: float) -> None:
    """NaN is neither below a minimum nor above a maximum: JSON schema alone lets it through."""
    with pytest.raises(JobParamsError, match="is not allowed: a number from 0 to 1440"):
        parse_job_params({"boot_timeout_minutes": value})


def test_every_pattern_matches_the_whole_value_so_a_trailing_newline_is_refused() -> None:
    patterned = {
        name
        for name, spec in PARAM_SPECS.items()
        if "pattern" in spec.schema or "pattern" in spec.schema.get("items", {})
    }
    assert patterned == set(GOOD)
    for name, good in GOOD.items():
        parse_job_params({name: good})
        bad = [good[0] + "\n"] if isinstance(good, list) else good + "\n"
        with pytest.raises(JobParamsError) as info:
            parse_job_params({name: bad})
        assert info.value.param == name
        with pytest.raises(JobParamsError):  # nor is a newline inside it
            parse_job_params({name: [good[0] + "\nx"] if isinstance(good, list) else good + "\nx"})
