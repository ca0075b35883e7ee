"""A pipeline stage's trainer starts from the previous stage's model: ``init_checkpoint_path``."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from .test_trainer import TRAINER, events, run


@pytest.fixture(scope="module")
def train() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reference_trainer", TRAINER)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def saved_model(path: Path, train: ModuleType, *, hidden: int, seed: int = 7) -> dict[str, np.ndarray]:
    params = train.init_params(64, hidden, seed)
    np.savez(path, **params)
    return params


def test_load_initial_model_returns_the_saved_weights(train: ModuleType, tmp_path: Path) -> None:
    saved = saved_model(tmp_path / "model_final.npz", train, hidden=32)
    fresh = train.init_params(64, 32, 0)
    loaded = train.load_initial_model(tmp_path / "model_final.npz", fresh)
    assert set(loaded) == set(fresh)
    for key, value in saved.items():
        np.testing.assert_array_equal(loaded[key], value)


def test_a_model_of_another_hidden_size_is_a_config_error_naming_hidden_size(train: ModuleType, tmp_path: Path) -> None:
    saved_model(tmp_path / "model_final.npz", train, hidden=32)
    with pytest.raises(train.ConfigError) as caught:
        train.load_initial_model(tmp_path / "model_final.npz", train.init_params(64, 64, 0))
    message = str(caught.value)
    assert message.startswith(f"init_checkpoint_path {tmp_path / 'model_final.npz'}: w1 has shape (64, 32)")
    assert "this config needs (64, 64)" in message and "hidden_size must match" in message


def test_a_file_that_is_not_a_model_or_is_missing_is_a_config_error(train: ModuleType, tmp_path: Path) -> None:
    np.savez(tmp_path / "optimizer.npz", step=np.array(3))
    fresh = train.init_params(64, 32, 0)
    with pytest.raises(train.ConfigError, match="has no b1, b2, w1, w2: not a model of this trainer"):
        train.load_initial_model(tmp_path / "optimizer.npz", fresh)
    with pytest.raises(train.ConfigError, match=r"nope\.npz does not exist"):
        train.load_initial_model(tmp_path / "nope.npz", fresh)


def test_the_trainer_starts_from_the_initial_model_and_fails_clearly_on_a_mismatch(tmp_path: Path) -> None:
    first, second, third = (tmp_path / name for name in ("sft", "ppo", "bad"))
    for d in (first, second, third):
        d.mkdir()
    hyper = {"iterations": 1, "epochs": 1, "hidden_size": 16}
    assert run(first, hyper).returncode == 0
    model = first / "out" / "model_final.npz"
    uri = "s3://outputs/sft/model_final.npz"

    result = run(second, hyper, init_checkpoint_path=str(model), init_checkpoint_uri=uri)
    assert result.returncode == 0, result.stderr
    assert f"initialized from {model}" in result.stdout
    initialized = [e for e in events(second) if e["phase"] == "PROJECT" and e["event"] == "initialized"]
    assert [e["data"]["checkpoint"] for e in initialized] == [uri]
    # Trained weights, not a fresh start: the first epoch's loss is well below an untrained model's (~2.3).
    losses = [e["data"]["avg_loss"] for e in events(second) if e["event"] == "epoch_complete"]
    first_losses = [e["data"]["avg_loss"] for e in events(first) if e["event"] == "epoch_complete"]
    assert losses[0] < first_losses[0]

    # A retry of the stage resumes its own checkpoint; the initial model is not read again.
    again = run(second, {**hyper, "epochs": 2}, init_checkpoint_path=str(tmp_path / "gone.npz"))
    assert again.returncode == 0, again.stderr

    mismatch = run(third, {**hyper, "hidden_size": 32}, init_checkpoint_path=str(model))
    assert mismatch.returncode == 2
    assert "hidden_size must match" in mismatch.stderr and "w1 has shape (64, 16)" in mismatch.stderr
