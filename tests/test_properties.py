"""Property tests (hypothesis): param validation, remote quoting and path containment hold for any
input, not only the examples the other tests thought of.

- Any value of any param is either accepted (and the accepted spec survives its own round trip
  through the results DB's JSON) or refused with a ``JobParamsError`` naming that param: nothing
  else escapes validation, so a bad request never reaches a provider.
- Arguments handed to a host reach the program exactly as given, through ``bash`` locally and over
  SSH to the real test sshd, and through the detached trainer wrapper: no shell ever interprets
  them (quotes, ``$()``, globs, newlines, leading dashes).
- A relative path from outside (an artifact, a dataset object) either is refused or stays inside
  its directory.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_training.errors import JobParamsError, StorageError
from gpu_training.hosts.local import LocalHost
from gpu_training.params import PARAM_SPECS, parse_job_params
from gpu_training.storage import _safe_relpath

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
# Arguments a user could put in ``command``: anything but NUL (which no argv can hold).
ARG_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=30)
ARGS = st.lists(
    ARG_TEXT | st.sampled_from(["$(id)", "`id`", "*", "-rf", "'", '"', "a b", "\n", "$HOME", ";ls"]), max_size=5
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(PARAM_SPECS)), value=JSON_VALUES)
def test_any_param_value_is_accepted_or_refused_by_name(name: str, value: Any) -> None:
    params = {"project_id": "props", name: value} if name != "project_id" else {name: value}
    try:
        spec = parse_job_params(params)
    except JobParamsError as err:
        # the param refused is the one given (or, for a value valid alone, one it depends on)
        assert err.param in (name, "ssh_conn_id", "command"), (name, value, err)
        return
    assert parse_job_params(json.loads(json.dumps(spec.to_dict()))) == spec


@settings(max_examples=150, deadline=None)
@given(params=st.dictionaries(st.sampled_from(sorted(PARAM_SPECS)), JSON_VALUES, max_size=6))
def test_any_params_dict_is_accepted_or_refused_naming_a_param(params: dict[str, Any]) -> None:
    try:
        spec = parse_job_params(params)
    except JobParamsError as err:
        assert err.param in PARAM_SPECS
        return
    assert parse_job_params(spec.to_dict()) == spec


ECHO_ARGS = 'for a in "$@"; do printf "%s\\0" "$a"; done'


def echoed(out: str) -> list[str]:
    return out.split("\0")[:-1]


@pytest.fixture(scope="module")
def local_host(tmp_path_factory: pytest.TempPathFactory) -> LocalHost:
    host = LocalHost(tmp_path_factory.mktemp("props") / "box")
    host.prepare()
    return host


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS)
def test_local_script_arguments_are_never_interpreted(local_host: LocalHost, args: list[str]) -> None:
    _, out, _ = local_host.script(ECHO_ARGS, *args)
    assert echoed(out) == args


@pytest.fixture(scope="module")
def ssh_host(sshd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from gpu_training.providers.base import GpuRequest
    from gpu_training.providers.ssh import SshProvider

    work_root = tmp_path_factory.mktemp("props-ssh")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AIRFLOW_CONN_PROPS_BOX", sshd_server.connection(work_root=str(work_root), python=sys.executable))
        provider = SshProvider("props_box")
        info = provider.launch(provider.list_offers(GpuRequest())[0], f"gpujob-props-{time.monotonic_ns()}")
        host = provider.host(info)
        host.prepare()
        yield host
        provider.terminate(info.instance_id)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS)
def test_ssh_script_arguments_are_never_interpreted(ssh_host: Any, args: list[str]) -> None:
    _, out, _ = ssh_host.script(ECHO_ARGS, *args)
    assert echoed(out) == args


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS)
def test_the_trainer_command_reaches_the_trainer_verbatim(
    tmp_path_factory: pytest.TempPathFactory, args: list[str]
) -> None:
    """The whole way a ``command`` takes: the detached wrapper (run_trainer.sh) and its ``"$@"``."""
    host = LocalHost(tmp_path_factory.mktemp("trainer-argv") / "box")
    host.prepare()
    out = Path(host.path("argv.json"))
    argv = [
        sys.executable,
        "-c",
        "import json,sys; open(sys.argv[1],'w').write(json.dumps(sys.argv[2:]))",
        str(out),
        *args,
    ]
    host.start_trainer(argv, {"PATH": os.environ["PATH"]})
    deadline = time.monotonic() + 20
    while not out.exists() or host.trainer_status().exit_code != 0:
        assert time.monotonic() < deadline, host.log_tail(20)
        time.sleep(0.05)
    assert json.loads(out.read_text()) == args
    host.destroy()


@settings(max_examples=500, deadline=None)
@given(
    relpath=st.text(max_size=40)
    | st.lists(st.sampled_from(["..", ".", "a", "/", "b", "", "~"]), max_size=6).map("/".join)
)
def test_a_relative_path_is_refused_or_stays_inside(relpath: str) -> None:
    root = Path("/srv/outputs/job")
    try:
        safe = _safe_relpath(relpath)
    except StorageError:
        return
    assert not Path(safe).is_absolute() and ".." not in Path(safe).parts
    assert os.path.normpath(root / safe).startswith(str(root) + os.sep)


@settings(max_examples=300, deadline=None)
@given(
    data=st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5),
    iteration=st.none() | st.integers() | st.floats(allow_nan=True),
    ascii_only=st.booleans(),
)
def test_any_line_parses_the_same_with_either_line_decoder(
    data: dict[str, Any], iteration: Any, ascii_only: bool
) -> None:
    """msgspec (production's line decoder) and json's scanner give the same events and errors for
    any line: what msgspec does not take as plain JSON is left to json."""
    from gpu_training.events import LineDecoder, parse_chunk

    payload = {"ts": "2026-11-22T15:04:05Z", "phase": "TRAINING", "event": "epoch_complete", "data": data}
    if iteration is not None:
        payload["iteration"] = iteration
    line = json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass") + b"\n"
    results = {decoder: parse_chunk(line, 0, decoder=decoder) for decoder in LineDecoder}
    assert repr(results[LineDecoder.MSGSPEC]) == repr(results[LineDecoder.JSON])
