"""The reference trainer's data-parallel mode: processes started by torchrun really average their
gradients over torch.distributed (gloo), so two nodes take the steps one process takes on the same
global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import free_port

TRAINER = Path(__file__).resolve().parents[2] / "include" / "trainer" / "train.py"
HYPER = {"iterations": 1, "epochs": 3, "hidden_size": 16, "seed": 5, "batch_size": 32}


def config(tmp_path: Path, **hyper: Any) -> Path:
    path = tmp_path / f"job-{len(list(tmp_path.glob('job-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump({"hyperparameters": {**HYPER, **hyper}}))
    return path


def env_for(cfg: Path, out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "TRAINING_CONFIG": str(cfg), "TRAINING_OUTPUT_DIR": str(out), "PYTHONUNBUFFERED": "1", **extra}


def alone(cfg: Path, out: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(TRAINER)], env=env_for(cfg, out), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]


def nodes(cfg: Path, outs: list[Path]) -> list[str]:
    """One torchrun per node (each its own output dir), as a multi-node job starts them."""
    port = free_port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                f"--nnodes={len(outs)}",
                "--nproc-per-node=1",
                f"--node-rank={rank}",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                str(TRAINER),
            ],
            env=env_for(cfg, out),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in enumerate(outs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=180)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    return logs


def losses(out: Path) -> list[float]:
    lines = [json.loads(line) for line in (out / "global.json").read_text().splitlines()]
    return [e["data"]["avg_loss"] for e in lines if e["event"] == "epoch_complete"]


def test_two_nodes_take_the_steps_one_process_takes_on_the_same_global_batch(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    alone(cfg, tmp_path / "one")
    logs = nodes(cfg, [tmp_path / "n0", tmp_path / "n1"])
    single, double = losses(tmp_path / "one"), losses(tmp_path / "n0")
    assert len(single) == len(double) == 3
    assert double == pytest.approx(single, rel=1e-9)  # averaged gradients: the same model, step by step
    assert not (tmp_path / "n1" / "global.json").exists()  # only rank 0 writes progress and outputs
    assert not (tmp_path / "n1" / "checkpoints").exists()
    assert "[rank 1] iteration 1 epoch 3/3" in logs[1] and "data parallel: 2 processes over gloo" in logs[0]
    start = json.loads((tmp_path / "n0" / "global.json").read_text().splitlines()[0])
    assert start["data"]["distributed"]["world_size"] == 2


def test_the_comparison_would_catch_gradients_that_are_not_averaged(tmp_path: Path) -> None:
    """A process that trained on its own half of each batch alone ends elsewhere."""
    alone(config(tmp_path), tmp_path / "whole")
    alone(config(tmp_path, batch_size=16), tmp_path / "half")
    assert losses(tmp_path / "half")[-1] != pytest.approx(losses(tmp_path / "whole")[-1], rel=1e-3)


def test_a_resumed_run_starts_every_node_from_rank_0s_checkpoint(tmp_path: Path) -> None:
    """Only node 0 has the checkpoint (as after a recovery): the others get its model, optimizer
    state and place by broadcast, and the run goes on exactly as a single resumed process would."""
    alone(config(tmp_path, epochs=2), tmp_path / "first")
    shutil.copytree(tmp_path / "first", tmp_path / "n0")
    (tmp_path / "n0" / "global.json").unlink()
    nodes(config(tmp_path, epochs=4), [tmp_path / "n0", tmp_path / "n1"])
    alone(config(tmp_path, epochs=4), tmp_path / "straight")
    resumed = json.loads((tmp_path / "n0" / "global.json").read_text().splitlines()[1])
    assert resumed["event"] == "resumed" and resumed["data"]["next_epoch"] == 3
    assert losses(tmp_path / "n0") == pytest.approx(losses(tmp_path / "straight")[2:], rel=1e-9)
