"""The reference trainer, run as the orchestrator runs it: a process with the contract's environment."""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

TRAINER = Path(__file__).resolve().parents[2] / "include" / "trainer" / "train.py"
DIGITS = TRAINER.parent / "data" / "digits.csv.gz"


def run(tmp_path: Path, hyper: dict[str, Any] | None = None, **config: Any) -> subprocess.CompletedProcess[str]:
    cfg = {"job_uuid": "u", "project_id": "p", "hyperparameters": hyper or {}, **config}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        "PATH": os.environ["PATH"],
        "TRAINING_CONFIG": str(tmp_path / "job.yaml"),
        "TRAINING_OUTPUT_DIR": str(tmp_path / "out"),
    }
    return subprocess.run([sys.executable, str(TRAINER)], env=env, capture_output=True, text=True, timeout=120)


def events(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "out" / "global.json").read_text().splitlines()]


def test_default_config_reaches_90_percent_test_accuracy(tmp_path: Path) -> None:
    result = run(tmp_path)
    assert result.returncode == 0, result.stderr
    evals = [e for e in events(tmp_path) if e["phase"] == "EVAL_MODEL"]
    assert len(evals) == 2  # two iterations by default
    final = evals[-1]["data"]
    assert final["accuracy"] >= 0.90
    assert 0.9 <= final["auc"] <= 1.0
    assert len(final["confusion_matrix"]) == 10 and sum(map(sum, final["confusion_matrix"])) == final["num_samples"]


def test_event_sequence_follows_the_contract(tmp_path: Path) -> None:
    assert run(tmp_path, {"iterations": 2, "epochs": 2}).returncode == 0
    seq = [(e["phase"], e["event"], e.get("iteration"), e.get("epoch")) for e in events(tmp_path)]
    per_iteration = lambda i: [  # noqa: E731
        ("ITERATION", "start", i, None),
        ("TRAJECTORY", "start", i, None),
        ("TRAJECTORY", "end", i, None),
        ("TRAINING", "start", i, None),
        ("TRAINING", "epoch_complete", i, 1),
        ("TRAINING", "epoch_complete", i, 2),
        ("TRAINING", "end", i, None),
        ("EVAL_TRAINING", "start", i, None),
        ("EVAL_MODEL", "metrics", i, 2),
        ("EVAL_TRAINING", "end", i, None),
        ("ITERATION", "end", i, None),
    ]
    assert seq == [
        ("PROJECT", "start", None, None),
        ("GROUP_ITERATION", "start", None, None),
        *per_iteration(1),
        *per_iteration(2),
        ("GROUP_ITERATION", "end", None, None),
        ("PROJECT", "end", None, None),
    ]
    for e in events(tmp_path):
        assert datetime.fromisoformat(e["ts"]).utcoffset() is not None
    epoch = next(e for e in events(tmp_path) if e["event"] == "epoch_complete")["data"]
    assert {"avg_loss", "model_path", "optimizer_path", "val_accuracy", "train_accuracy"} <= set(epoch)
    group = next(e for e in events(tmp_path) if e["phase"] == "GROUP_ITERATION")
    assert group["data"]["training_config"]["epochs"] == 2


def test_checkpoints_are_relative_and_exist(tmp_path: Path) -> None:
    assert run(tmp_path, {"iterations": 1, "epochs": 3}).returncode == 0
    out = tmp_path / "out"
    for e in events(tmp_path):
        if e["event"] == "epoch_complete":
            for key in ("model_path", "optimizer_path"):
                assert not Path(e["data"][key]).is_absolute()
                assert (out / e["data"][key]).is_file()
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())
    assert (latest["iteration"], latest["epoch"]) == (1, 3)
    assert (out / "model_final.npz").is_file() and json.loads((out / "metrics.json").read_text())["accuracy"] > 0


def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    assert run(tmp_path, {"iterations": 1, "epochs": 2}).returncode == 0
    first = events(tmp_path)
    last_loss = [e for e in first if e["event"] == "epoch_complete"][-1]["data"]["avg_loss"]
    assert run(tmp_path, {"iterations": 1, "epochs": 4}).returncode == 0
    second = events(tmp_path)[len(first) :]
    epochs = [e["epoch"] for e in second if e["event"] == "epoch_complete"]
    assert epochs == [3, 4]
    assert any(e["phase"] == "PROJECT" and e["event"] == "resumed" for e in second)
    resumed_loss = next(e for e in second if e["event"] == "epoch_complete")["data"]["avg_loss"]
    assert resumed_loss < last_loss * 1.5  # continued from trained weights, not from scratch (loss ~2.3)


def test_resume_from_an_explicit_checkpoint(tmp_path: Path) -> None:
    source = tmp_path / "first"
    source.mkdir()
    assert run(source, {"iterations": 1, "epochs": 2}).returncode == 0
    target = tmp_path / "second"
    target.mkdir()
    ckpt = source / "out" / "checkpoints"
    assert run(target, {"iterations": 1, "epochs": 3}, resume_from=str(ckpt)).returncode == 0
    assert [e["epoch"] for e in events(target) if e["event"] == "epoch_complete"] == [3]


@pytest.mark.parametrize(
    ("hyper", "message"),
    [
        ({"epochs": -1}, "hyperparameters.epochs must be a positive integer"),
        ({"learning_rate": "fast"}, "hyperparameters.learning_rate must be a non-negative number"),
        ({"test_fraction": 1.5}, "test_fraction must be between 0 and 1"),
    ],
)
def test_invalid_config_fails_clearly(tmp_path: Path, hyper: dict[str, Any], message: str) -> None:
    result = run(tmp_path, hyper)
    assert result.returncode == 2
    assert message in result.stderr


def test_hyperparameters_must_be_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "job.yaml").write_text("hyperparameters: [1, 2]\n")
    env = {
        "PATH": os.environ["PATH"],
        "TRAINING_CONFIG": str(tmp_path / "job.yaml"),
        "TRAINING_OUTPUT_DIR": str(tmp_path),
    }
    result = subprocess.run([sys.executable, str(TRAINER)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "hyperparameters must be a mapping" in result.stderr


def test_missing_environment_fails_clearly() -> None:
    result = subprocess.run(
        [sys.executable, str(TRAINER)], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True
    )
    assert result.returncode == 2 and "TRAINING_CONFIG and TRAINING_OUTPUT_DIR must be set" in result.stderr


def test_dataset_path_is_used(tmp_path: Path) -> None:
    rows = gzip.decompress(DIGITS.read_bytes()).decode().splitlines()[:400]
    (tmp_path / "small.csv").write_text("\n".join(rows) + "\n")
    assert run(tmp_path, {"iterations": 1, "epochs": 1}, dataset_path=str(tmp_path / "small.csv")).returncode == 0
    start = next(e for e in events(tmp_path) if e["phase"] == "PROJECT")
    assert start["data"]["num_train"] + start["data"]["num_test"] == 400


def test_sigterm_stops_promptly_without_project_end(tmp_path: Path) -> None:
    cfg = {"hyperparameters": {"iterations": 1, "epochs": 50, "epoch_sleep_seconds": 0.2}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(cfg))
    env = {
        "PATH": os.environ["PATH"],
        "TRAINING_CONFIG": str(tmp_path / "job.yaml"),
        "TRAINING_OUTPUT_DIR": str(tmp_path / "out"),
    }
    proc = subprocess.Popen([sys.executable, str(TRAINER)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if (tmp_path / "out" / "global.json").exists() and "epoch_complete" in (
            tmp_path / "out" / "global.json"
        ).read_text():
            break
        time.sleep(0.05)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 5
    assert not any(e["phase"] == "PROJECT" and e["event"] == "end" for e in events(tmp_path))
