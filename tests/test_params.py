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
    assert params["provider"].schema["enum"] == ["local", "ssh", "lambda", "runpod", "vast", "ec2", "cloud"]


def test_command_placeholders_are_the_only_thing_expanded() -> None:
    argv = render_command(
        ["{python}", "{workdir}/t.py", "--name", "$HOME;rm -rf /"], python="/usr/bin/python3", workdir="/w"
    )
    assert argv == ["/usr/bin/python3", "/w/t.py", "--name", "$HOME;rm -rf /"]
