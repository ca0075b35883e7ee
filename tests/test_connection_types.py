"""The clouds' connection types: their forms as Airflow 3.3 reads them, and that a connection of the new
type, an older ``http`` one and one saved by Airflow 2's form all give the hook its key and settings."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import airflow
import jsonschema
import pytest

from gpu_training.hooks.cloud_api import CloudApiHook
from gpu_training.hooks.connection_types import (
    CLOUD_CONNECTION_TYPES,
    COMMON_FIELDS,
    LAMBDA_CLOUD,
    RUNPOD,
    VASTAI,
    CloudConnectionType,
    connection_settings,
)
from gpu_training.hooks.lambda_cloud import LambdaCloudHook
from gpu_training.hooks.runpod import RunPodHook
from gpu_training.hooks.vast import VastHook
from gpu_training.providers.base import NAME_PREFIX
from gpu_training.providers.cloud import HttpCloudProvider
from gpu_training.providers.lambda_cloud import LambdaProvider
from gpu_training.providers.runpod import DEFAULT_IMAGE as RUNPOD_IMAGE
from gpu_training.providers.runpod import RunPodProvider
from gpu_training.providers.vast import DEFAULT_IMAGE as VAST_IMAGE
from gpu_training.providers.vast import VastProvider
from tests.fakeclouds.base import FakeCloud
from tests.fakeclouds.lambda_cloud import FakeLambda
from tests.fakeclouds.runpod import FakeRunPod
from tests.fakeclouds.vast import FakeVast

AIRFLOW_DIR = Path(airflow.__file__).parent
PLUGINS = Path(__file__).resolve().parents[1] / "plugins" / "gpu_training"
HOOKS: dict[str, type[CloudApiHook]] = {"lambda_cloud": LambdaCloudHook, "runpod": RunPodHook, "vastai": VastHook}
PROVIDERS: dict[str, type[HttpCloudProvider[Any]]] = {
    "lambda_cloud": LambdaProvider,
    "runpod": RunPodProvider,
    "vastai": VastProvider,
}
SOURCES = {"lambda_cloud": "lambda_cloud.py", "runpod": "runpod.py", "vastai": "vast.py"}


def airflow_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((AIRFLOW_DIR / name).read_text())
    return schema


# --- the forms --------------------------------------------------------------------------------------


@pytest.mark.parametrize("conn", CLOUD_CONNECTION_TYPES, ids=lambda c: c.conn_type)
def test_each_form_is_what_airflows_provider_schema_allows(conn: CloudConnectionType) -> None:
    """Airflow's development schema of a connection type (``provider.yaml.schema.json``) is the strict one:
    no unknown keys in a field or in the field behaviour."""
    item = airflow_schema("provider.yaml.schema.json")["properties"]["connection-types"]["items"]
    jsonschema.validate(conn.provider_info(), item)
    jsonschema.validate(conn.field_behaviour(), airflow_schema("customized_form_field_behaviours.schema.json"))


@pytest.mark.parametrize("conn", CLOUD_CONNECTION_TYPES, ids=lambda c: c.conn_type)
def test_the_key_is_labelled_unused_fields_hidden_and_the_host_shows_the_public_api(conn: CloudConnectionType) -> None:
    hook = HOOKS[conn.conn_type]
    behaviour = hook.get_ui_field_behaviour()
    assert behaviour == conn.field_behaviour()
    assert set(behaviour["hidden_fields"]) == {"schema", "port", "login"}
    assert behaviour["relabeling"] == {"password": "API key", "host": "API base URL"}
    assert behaviour["placeholders"]["host"] == hook.default_url + hook.api_path
    assert conn.hook_name in behaviour["placeholders"]["password"]


@pytest.mark.parametrize("conn", CLOUD_CONNECTION_TYPES, ids=lambda c: c.conn_type)
def test_each_hook_declares_its_connection_type(conn: CloudConnectionType) -> None:
    hook = HOOKS[conn.conn_type]
    assert hook.connection_type is conn
    assert (hook.conn_type, hook.hook_name) == (conn.conn_type, conn.hook_name)
    assert f"{hook.__module__}.{hook.__qualname__}" == conn.hook_class_name
    assert PROVIDERS[conn.conn_type].hook_class is hook


@pytest.mark.parametrize("conn", CLOUD_CONNECTION_TYPES, ids=lambda c: c.conn_type)
def test_every_setting_the_provider_reads_has_a_field(conn: CloudConnectionType) -> None:
    """The settings are read as ``settings.get("key")`` / ``_int_setting("key", ...)`` in the provider,
    ``_setting("key")`` in the HTTP client and ``ssh_conn_id`` in ``providers/cloud.py``."""
    source = (PLUGINS / "providers" / SOURCES[conn.conn_type]).read_text()
    read = set(re.findall(r'settings\.get\("(\w+)"', source)) | set(re.findall(r'_int_setting\("(\w+)"', source))
    read |= set(re.findall(r'_setting\("(\w+)"\)', (PLUGINS / "hooks" / "cloud_api.py").read_text()))
    read |= set(re.findall(r'settings\.get\("(\w+)"', (PLUGINS / "providers" / "cloud.py").read_text()))
    assert read, "no settings found: the pattern no longer matches the providers' code"
    assert read == set(conn.conn_fields())


@pytest.mark.parametrize("conn", CLOUD_CONNECTION_TYPES, ids=lambda c: c.conn_type)
def test_every_field_may_stay_empty_or_starts_with_the_default(conn: CloudConnectionType) -> None:
    """A type without null is a required field in Airflow's form (an empty one blocks saving)."""
    for name, field in conn.conn_fields().items():
        schema = field["schema"]
        assert "null" in schema["type"] or "default" in schema, name
        assert field["label"] and field["description"], name


def test_the_forms_name_the_providers_defaults() -> None:
    assert RUNPOD_IMAGE in RUNPOD.fields["image"]["description"]
    assert VAST_IMAGE in VASTAI.fields["image"]["description"]
    assert VASTAI.fields["verified_only"]["schema"]["default"] is True
    assert list(LAMBDA_CLOUD.conn_fields())[:2] == ["ssh_key_name", "file_system_names"]
    assert list(VASTAI.conn_fields())[-len(COMMON_FIELDS) :] == list(COMMON_FIELDS)


# --- the settings a connection gives ----------------------------------------------------------------


def test_settings_take_the_forms_keys_then_airflow_2s_and_drop_empty_ones() -> None:
    extra = {
        "extra__vastai__disk_gb": 80,
        "extra__vastai__image": "old/image",
        "image": "new/image",
        "onstart": "  ",
        "bid_multiplier": None,
        "verified_only": False,
        "extra__runpod__image": "not this type's",
    }
    assert connection_settings(extra, "vastai") == {
        "disk_gb": 80,
        "image": "new/image",
        "verified_only": False,
        "extra__runpod__image": "not this type's",
    }
    assert connection_settings(None, "vastai") == {}


FAKES: dict[str, type[FakeCloud]] = {"lambda_cloud": FakeLambda, "runpod": FakeRunPod, "vastai": FakeVast}
CONNECTIONS = {"lambda_cloud": "LAMBDA_DEFAULT", "runpod": "RUNPOD_DEFAULT", "vastai": "VAST_DEFAULT"}
SETTINGS = {
    "lambda_cloud": {"ssh_key_name": "team-key", "file_system_names": "fs-a, fs-b"},
    "runpod": {"image": "team/pod:1", "cloud_type": "COMMUNITY", "volume_gb": 20},
    "vastai": {"image": "team/trainer:1", "disk_gb": 80, "verified_only": False, "bid_multiplier": 1.5},
}
FAST_RETRIES = {"retry_initial_seconds": 0.05, "retry_max_wait_seconds": 1, "retry_attempts": 2}


@pytest.fixture(params=sorted(FAKES), scope="module")
def fake(request: pytest.FixtureRequest) -> Iterator[tuple[str, FakeCloud]]:
    server = FAKES[request.param]()
    yield request.param, server
    server.stop()


def connection(fake: FakeCloud, conn_type: str, extra: dict[str, Any]) -> str:
    return json.dumps({"conn_type": conn_type, "host": fake.url, "password": fake.api_key, "extra": extra})


@pytest.mark.parametrize("form", ["new type", "http", "airflow 2 form"])
def test_a_connection_gives_the_hook_its_key_and_settings(
    form: str, fake: tuple[str, FakeCloud], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn_type, server = fake
    server.reset()
    settings = {**SETTINGS[conn_type], **FAST_RETRIES, "ssh_conn_id": "team_ssh"}
    if form == "new type":
        # What the Add Connection form saves: each field under its name, the ones left empty as null.
        extra: dict[str, Any] = {**settings, **{k: None for k in set(COMMON_FIELDS) - set(settings)}}
        stored = connection(server, conn_type, extra)
    elif form == "http":  # before the connection types: key in the password, settings typed into Extra
        stored = connection(server, "http", settings)
    else:
        stored = connection(server, conn_type, {f"extra__{conn_type}__{k}": v for k, v in settings.items()})
    monkeypatch.setenv(f"AIRFLOW_CONN_{CONNECTIONS[conn_type]}", stored)

    provider = PROVIDERS[conn_type]()
    assert provider.hook.api_key == server.api_key
    assert provider.settings == settings
    assert provider.ssh_conn_id == "team_ssh"
    assert provider.hook._setting("retry_attempts") == 2 and provider.hook._setting("timeout_seconds") == 30
    assert provider.list_instances(NAME_PREFIX) == []  # the fake answers only its key
    assert server.calls and all(status == 200 for _, _, status in server.calls), server.calls
    server.assert_contract()


def test_the_uri_form_of_a_new_type(monkeypatch: pytest.MonkeyPatch) -> None:
    """``AIRFLOW_CONN_*`` as a URI: the scheme's dash stands for the type's underscore."""
    monkeypatch.setenv("AIRFLOW_CONN_LAMBDA_DEFAULT", "lambda-cloud://:the-key@/?ssh_key_name=team-key")
    hook = LambdaCloudHook()
    assert hook.connection.conn_type == "lambda_cloud"
    assert (hook.api_key, hook.extras, hook.base_url) == ("the-key", {"ssh_key_name": "team-key"}, LAMBDA_CLOUD.api_url)


def test_an_empty_field_leaves_the_providers_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_VAST_DEFAULT",
        json.dumps({"conn_type": "vastai", "password": "k", "extra": {"disk_gb": None, "image": "", "onstart": None}}),
    )
    provider = VastProvider()
    assert (provider.disk_gb, provider.image, provider.bid_multiplier, provider.verified_only) == (
        40.0,
        VAST_IMAGE,
        1.0,
        True,
    )
