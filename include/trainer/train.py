"""Reference trainer: an MLP on the handwritten-digits data, in numpy, following the global.json contract.

Environment: ``TRAINING_CONFIG`` (the job's YAML) and ``TRAINING_OUTPUT_DIR`` (everything written there
is the job's output). Progress goes to ``$TRAINING_OUTPUT_DIR/global.json``, one JSON event per line.
Checkpoints (model + optimizer) are saved every epoch; a run resumes from ``checkpoints/latest.json``.

Data parallel: started by torchrun with ``WORLD_SIZE`` > 1 (a multi-node job), every process trains
the same model on its share of each global batch (``batch_size`` is the global batch) and the
gradients are averaged across processes with ``torch.distributed`` (gloo, CPU), so each step is the
step a single process takes on the whole batch. Rank 0 writes global.json, checkpoints and the model;
the others only train and print. One process (the default) needs no torch at all.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

DEFAULTS: dict[str, Any] = {
    "iterations": 2,
    "epochs": 8,
    "hidden_size": 64,
    "learning_rate": 0.01,
    "batch_size": 32,
    "seed": 0,
    "test_fraction": 0.2,
    "weight_decay": 0.0,
    "epoch_sleep_seconds": 0.0,
}
N_CLASSES = 10


class ConfigError(ValueError):
    """The job's config is unusable; the message says which key and why."""


# --- config and data --------------------------------------------------------------------------------


def load_config(path: str) -> dict[str, Any]:
    with open(path) as fh:
        raw = yaml.safe_load(fh) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    hyper = raw.get("hyperparameters") or {}
    if not isinstance(hyper, dict):
        raise ConfigError("hyperparameters must be a mapping")
    unknown = sorted(set(hyper) - set(DEFAULTS))
    if unknown:
        print(f"ignoring unknown hyperparameters: {', '.join(unknown)}", flush=True)
    merged = {**DEFAULTS, **{k: v for k, v in hyper.items() if k in DEFAULTS}}
    for key in ("iterations", "epochs", "hidden_size", "batch_size", "seed"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and key != "seed") or value < 0:
            raise ConfigError(f"hyperparameters.{key} must be a positive integer, got {value!r}")
    for key in ("learning_rate", "weight_decay", "epoch_sleep_seconds", "test_fraction"):
        value = merged[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigError(f"hyperparameters.{key} must be a non-negative number, got {value!r}")
    if not 0 < merged["test_fraction"] < 1:
        raise ConfigError(f"hyperparameters.test_fraction must be between 0 and 1, got {merged['test_fraction']!r}")
    raw["hyperparameters"] = merged
    return raw


def bundled_data_path() -> Path:
    base = os.environ.get("TRAINER_DATA_DIR") or str(Path(__file__).resolve().parent / "data")
    return Path(base) / "digits.csv.gz"


def load_dataset(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Rows of 64 pixel values (0..16) then the label; .csv or .csv.gz."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as fh:  # type: ignore[operator]
        table = np.loadtxt(fh, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ConfigError(f"{path}: expected rows of features then a label")
    x, y = table[:, :-1] / 16.0, table[:, -1].astype(np.int64)
    if y.min() < 0 or y.max() >= N_CLASSES:
        raise ConfigError(f"{path}: labels must be 0..{N_CLASSES - 1}")
    return x, y


def split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Stratified, seeded train/test split."""
    rng = np.random.default_rng(seed)
    test_idx = []
    for cls in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == cls))
        test_idx.extend(idx[: max(1, round(len(idx) * test_fraction))])
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    return x[~mask], y[~mask], x[mask], y[mask]


# --- model ------------------------------------------------------------------------------------------


def init_params(n_in: int, hidden: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, np.sqrt(2.0 / n_in), (n_in, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0, np.sqrt(2.0 / hidden), (hidden, N_CLASSES)),
        "b2": np.zeros(N_CLASSES),
    }


def forward(params: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden = np.maximum(0.0, x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return hidden, probs


def cross_entropy(probs: np.ndarray, y: np.ndarray) -> float:
    return float(-np.mean(np.log(probs[np.arange(len(y)), y] + 1e-12)))


def gradients(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, weight_decay: float) -> tuple[float, dict]:
    hidden, probs = forward(params, x)
    loss = cross_entropy(probs, y)
    d_logits = probs.copy()
    d_logits[np.arange(len(y)), y] -= 1.0
    d_logits /= len(y)
    grads = {"w2": hidden.T @ d_logits + weight_decay * params["w2"], "b2": d_logits.sum(axis=0)}
    d_hidden = (d_logits @ params["w2"].T) * (hidden > 0)
    grads["w1"] = x.T @ d_hidden + weight_decay * params["w1"]
    grads["b1"] = d_hidden.sum(axis=0)
    return loss, grads


class Adam:
    """Adam optimizer whose whole state can be saved and restored."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, beta1: float = 0.9, beta2: float = 0.999) -> None:
        self.lr, self.beta1, self.beta2, self.step = lr, beta1, beta2, 0
        self.m = {k: np.zeros_like(v) for k, v in params.items()}
        self.v = {k: np.zeros_like(v) for k, v in params.items()}

    def update(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        self.step += 1
        for key, grad in grads.items():
            self.m[key] = self.beta1 * self.m[key] + (1 - self.beta1) * grad
            self.v[key] = self.beta2 * self.v[key] + (1 - self.beta2) * grad * grad
            m_hat = self.m[key] / (1 - self.beta1**self.step)
            v_hat = self.v[key] / (1 - self.beta2**self.step)
            params[key] -= self.lr * m_hat / (np.sqrt(v_hat) + 1e-8)

    def state(self) -> dict[str, np.ndarray]:
        out = {f"m_{k}": v for k, v in self.m.items()} | {f"v_{k}": v for k, v in self.v.items()}
        out["step"] = np.array(self.step)
        return out

    def load(self, state: dict[str, np.ndarray]) -> None:
        self.step = int(state["step"])
        for key in self.m:
            self.m[key], self.v[key] = state[f"m_{key}"], state[f"v_{key}"]


# --- metrics ----------------------------------------------------------------------------------------


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Binary ROC AUC by the rank-sum (Mann-Whitney U) statistic, ties averaged."""
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def evaluate(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
    _, probs = forward(params, x)
    pred = probs.argmax(axis=1)
    cm = np.zeros((N_CLASSES, N_CLASSES), dtype=np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm).astype(float)
    precision = np.divide(tp, cm.sum(axis=0), out=np.zeros(N_CLASSES), where=cm.sum(axis=0) > 0)
    recall = np.divide(tp, cm.sum(axis=1), out=np.zeros(N_CLASSES), where=cm.sum(axis=1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(N_CLASSES), where=precision + recall > 0)
    aucs = [a for c in range(N_CLASSES) if (a := roc_auc(probs[:, c], y == c)) is not None]
    return {
        "accuracy": float((pred == y).mean()),
        "precision": float(precision.mean()),
        "recall": float(recall.mean()),
        "f1": float(f1.mean()),
        "auc": float(np.mean(aucs)) if aucs else None,
        "loss": cross_entropy(probs, y),
        "confusion_matrix": cm.tolist(),
        "num_samples": len(y),
    }


# --- data parallel ----------------------------------------------------------------------------------


class Alone:
    """One process: nothing to synchronise (no torch needed)."""

    rank = 0
    world_size = 1

    def shard(self, batch: np.ndarray) -> np.ndarray:
        return batch

    def average(self, loss: float, grads: dict[str, np.ndarray], count: int) -> tuple[float, dict[str, np.ndarray]]:
        return loss, grads

    def broadcast(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return arrays

    def close(self) -> None:
        pass


class DataParallel(Alone):
    """Several processes (torchrun: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment),
    synchronised with ``torch.distributed`` over gloo."""

    def __init__(self, timeout_seconds: float) -> None:
        from datetime import timedelta

        import torch
        import torch.distributed as dist

        self.torch, self.dist = torch, dist
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_seconds))
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def shard(self, batch: np.ndarray) -> np.ndarray:
        return batch[self.rank :: self.world_size]

    def average(self, loss: float, grads: dict[str, np.ndarray], count: int) -> tuple[float, dict[str, np.ndarray]]:
        """The whole batch's mean loss and gradients from every process's mean over its shard:
        each weighted by its shard's size, summed across processes, divided by the batch size."""
        keys = sorted(grads)
        flat = np.concatenate([np.ravel(grads[k]) * count for k in keys] + [np.array([loss * count, count])])
        summed = self.torch.from_numpy(flat)
        self.dist.all_reduce(summed, op=self.dist.ReduceOp.SUM)
        total = summed.numpy()
        n = total[-1]
        out, at = {}, 0
        for k in keys:
            size = grads[k].size
            out[k] = (total[at : at + size] / n).reshape(grads[k].shape)
            at += size
        return float(total[-2] / n), out

    def broadcast(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Rank 0's arrays on every process (the model a resumed or initialised run starts from)."""
        out = {}
        for key in sorted(arrays):
            tensor = self.torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=np.float64))
            self.dist.broadcast(tensor, src=0)
            original = np.asarray(arrays[key])
            out[key] = tensor.numpy().reshape(original.shape).astype(original.dtype)
        return out

    def close(self) -> None:
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def data_parallel(timeout_seconds: float = 600) -> Alone:
    """How this process trains: alone, or as one of ``WORLD_SIZE`` started by torchrun."""
    world = os.environ.get("WORLD_SIZE", "1")
    if not world.isdigit() or int(world) <= 1:
        return Alone()
    try:
        return DataParallel(timeout_seconds)
    except ImportError as err:
        raise ConfigError(f"WORLD_SIZE={world}: data-parallel training needs torch ({err})") from err


class NoWriter:
    """What ranks other than 0 write to global.json: nothing."""

    def emit(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def shard_gradients(
    params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, weight_decay: float
) -> tuple[float, dict[str, np.ndarray], int]:
    """Mean loss and gradients over a shard, and its size (a process may get an empty one)."""
    if len(y) == 0:
        return 0.0, {k: np.zeros_like(v) for k, v in params.items()}, 0
    loss, grads = gradients(params, x, y, weight_decay)
    return loss, grads, len(y)


# --- events and checkpoints -------------------------------------------------------------------------


class GlobalJsonWriter:
    """Appends contract events to global.json, one whole line per write, flushed at once."""

    def __init__(self, path: Path) -> None:
        self.fh = path.open("a", encoding="utf-8")

    def emit(
        self, phase: str, event: str, *, iteration: int | None = None, epoch: int | None = None, **data: Any
    ) -> None:
        record: dict[str, Any] = {
            "ts": datetime.now().astimezone().isoformat(timespec="milliseconds"),
            "phase": phase,
            "event": event,
        }
        if iteration is not None:
            record["iteration"] = iteration
        if epoch is not None:
            record["epoch"] = epoch
        record["data"] = data
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def save_checkpoint(out: Path, iteration: int, epoch: int, epochs: int, params: dict, opt: Adam) -> dict[str, Any]:
    ckpt = out / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    model_rel = f"checkpoints/iter{iteration:03d}_epoch{epoch:03d}_model.npz"
    optim_rel = f"checkpoints/iter{iteration:03d}_epoch{epoch:03d}_optimizer.npz"
    atomic_save_npz(out / model_rel, params)
    atomic_save_npz(out / optim_rel, opt.state())
    pointer = {
        "iteration": iteration,
        "epoch": epoch,
        "model_path": model_rel,
        "optimizer_path": optim_rel,
        "epochs_per_iteration": epochs,
    }
    tmp = ckpt / "latest.json.tmp"
    tmp.write_text(json.dumps(pointer))
    os.replace(tmp, ckpt / "latest.json")
    return pointer


def find_checkpoint(config: dict[str, Any], out: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from: ``resume_from`` (file or directory) or the output dir's latest."""
    candidates = []
    if config.get("resume_from"):
        given = Path(str(config["resume_from"]))
        candidates.append(given / "latest.json" if given.is_dir() else given)
    candidates.append(out / "checkpoints" / "latest.json")
    for pointer_path in candidates:
        if pointer_path.is_file():
            # Paths in the pointer are relative to the output dir the checkpoint was written in.
            return pointer_path.parent.parent, json.loads(pointer_path.read_text())
    return None


def load_initial_model(path: Path, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Weights of another run's model file (``model_final.npz`` or an epoch's ``*_model.npz``)."""
    if not path.is_file():
        raise ConfigError(f"init_checkpoint_path {path} does not exist")
    with np.load(path) as saved:
        missing = sorted(set(params) - set(saved.files))
        if missing:
            raise ConfigError(f"init_checkpoint_path {path} has no {', '.join(missing)}: not a model of this trainer")
        loaded = {k: saved[k].copy() for k in params}
    for k, value in loaded.items():
        if value.shape != params[k].shape:
            raise ConfigError(
                f"init_checkpoint_path {path}: {k} has shape {value.shape}, this config needs {params[k].shape} "
                "(hidden_size must match the model it starts from)"
            )
    return loaded


# --- training ---------------------------------------------------------------------------------------


def train(config: dict[str, Any], out: Path, sync: Alone | None = None) -> int:
    sync = sync or Alone()
    lead = sync.rank == 0  # writes global.json, checkpoints and the model
    hp = config["hyperparameters"]
    dataset = Path(config["dataset_path"]) if config.get("dataset_path") else bundled_data_path()
    x, y = load_dataset(dataset)
    x_train, y_train, x_test, y_test = split(x, y, hp["test_fraction"], hp["seed"])
    params = init_params(x.shape[1], hp["hidden_size"], hp["seed"])
    opt = Adam(params, hp["learning_rate"])
    start_iteration, start_epoch = 1, 1
    writer: GlobalJsonWriter | NoWriter = GlobalJsonWriter(out / "global.json") if lead else NoWriter()
    t_project = time.monotonic()
    writer.emit(
        "PROJECT",
        "start",
        job_uuid=config.get("job_uuid"),
        project_id=config.get("project_id"),
        hyperparameters=hp,
        num_train=len(y_train),
        num_test=len(y_test),
        **(
            {"distributed": {"world_size": sync.world_size, "backend": "gloo", "nodes": os.environ.get("NNODES")}}
            if sync.world_size > 1
            else {}
        ),
    )
    found = find_checkpoint(config, out) if lead else None
    if found is None and config.get("init_checkpoint_path"):
        # A pipeline stage starts from the previous stage's model (weights only; a fresh optimizer).
        params = load_initial_model(Path(str(config["init_checkpoint_path"])), params)
        writer.emit(
            "PROJECT",
            "initialized",
            checkpoint=str(config.get("init_checkpoint_uri") or config["init_checkpoint_path"]),
        )
        print(f"initialized from {config['init_checkpoint_path']}", flush=True)
    if found is not None:
        base, pointer = found
        with np.load(base / pointer["model_path"]) as saved:
            params = {k: saved[k].copy() for k in params}
        with np.load(base / pointer["optimizer_path"]) as saved:
            opt = Adam(params, hp["learning_rate"])
            opt.load({k: saved[k].copy() for k in saved.files})
        start_iteration, start_epoch = pointer["iteration"], pointer["epoch"] + 1
        if start_epoch > hp["epochs"]:
            start_iteration, start_epoch = start_iteration + 1, 1
        writer.emit(
            "PROJECT", "resumed", **{"from": pointer, "next_iteration": start_iteration, "next_epoch": start_epoch}
        )
        print(f"resumed from {pointer['model_path']}: iteration {start_iteration}, epoch {start_epoch}", flush=True)
    if sync.world_size > 1:
        # Every process starts from rank 0's model, optimizer state and place (only it resumes).
        state = sync.broadcast(
            {**{f"p_{k}": v for k, v in params.items()}, **{f"o_{k}": v for k, v in opt.state().items()}}
            | {"start": np.array([start_iteration, start_epoch])}
        )
        params = {k: state[f"p_{k}"] for k in params}
        opt = Adam(params, hp["learning_rate"])
        opt.load({k[2:]: v for k, v in state.items() if k.startswith("o_")})
        start_iteration, start_epoch = (int(v) for v in state["start"])
    writer.emit("GROUP_ITERATION", "start", training_config=hp)
    metrics: dict[str, Any] = {}
    model_rel = None
    for it in range(start_iteration, hp["iterations"] + 1):
        t_it = time.monotonic()
        writer.emit("ITERATION", "start", iteration=it, epochs=hp["epochs"])
        t0 = time.monotonic()
        writer.emit("TRAJECTORY", "start", iteration=it)
        writer.emit("TRAJECTORY", "end", iteration=it, num_samples=len(y_train), duration_seconds=time.monotonic() - t0)
        t_train = time.monotonic()
        writer.emit("TRAINING", "start", iteration=it, epochs=hp["epochs"], learning_rate=hp["learning_rate"])
        first = start_epoch if it == start_iteration else 1
        for ep in range(first, hp["epochs"] + 1):
            t_ep = time.monotonic()
            # Seeded per epoch, so a resumed run shuffles exactly as the original would have.
            rng = np.random.default_rng(hp["seed"] + 1000 * it + ep)
            perm = rng.permutation(len(y_train))
            losses = []
            for start in range(0, len(perm), hp["batch_size"]):
                batch = perm[start : start + hp["batch_size"]]
                if sync.world_size > 1:  # this process's share; the step is the whole batch's
                    mine = sync.shard(batch)
                    loss, grads, count = shard_gradients(params, x_train[mine], y_train[mine], hp["weight_decay"])
                    loss, grads = sync.average(loss, grads, count)
                else:
                    loss, grads = gradients(params, x_train[batch], y_train[batch], hp["weight_decay"])
                opt.update(params, grads)
                losses.append(loss)
            _, train_probs = forward(params, x_train)
            val = evaluate(params, x_test, y_test)
            pointer = save_checkpoint(out, it, ep, hp["epochs"], params, opt) if lead else {}
            model_rel = pointer.get("model_path")
            duration = time.monotonic() - t_ep
            writer.emit(
                "TRAINING",
                "epoch_complete",
                iteration=it,
                epoch=ep,
                avg_loss=float(np.mean(losses)),
                model_path=pointer.get("model_path"),
                optimizer_path=pointer.get("optimizer_path"),
                train_accuracy=float((train_probs.argmax(axis=1) == y_train).mean()),
                val_loss=val["loss"],
                val_accuracy=val["accuracy"],
                learning_rate=hp["learning_rate"],
                duration_seconds=duration,
                samples_per_second=len(y_train) / max(duration, 1e-9),
            )
            print(
                f"{_who(sync)}iteration {it} epoch {ep}/{hp['epochs']}: loss {np.mean(losses):.4f} "
                f"val_accuracy {val['accuracy']:.4f}",
                flush=True,
            )
            if hp["epoch_sleep_seconds"]:
                time.sleep(hp["epoch_sleep_seconds"])
        writer.emit("TRAINING", "end", iteration=it, duration_seconds=time.monotonic() - t_train)
        t_eval = time.monotonic()
        writer.emit("EVAL_TRAINING", "start", iteration=it)
        metrics = evaluate(params, x_test, y_test)
        writer.emit("EVAL_MODEL", "metrics", iteration=it, epoch=hp["epochs"], model_path=model_rel, **metrics)
        writer.emit("EVAL_TRAINING", "end", iteration=it, duration_seconds=time.monotonic() - t_eval)
        writer.emit("ITERATION", "end", iteration=it, duration_seconds=time.monotonic() - t_it)
        print(f"{_who(sync)}iteration {it}: test accuracy {metrics['accuracy']:.4f} f1 {metrics['f1']:.4f}", flush=True)
    if not metrics:  # resumed after the last epoch: evaluate what was loaded
        metrics = evaluate(params, x_test, y_test)
    writer.emit("GROUP_ITERATION", "end")
    if lead:
        atomic_save_npz(out / "model_final.npz", params)
        (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items()}, indent=2))
    writer.emit(
        "PROJECT",
        "end",
        duration_seconds=time.monotonic() - t_project,
        accuracy=metrics["accuracy"],
        f1=metrics["f1"],
        model_path="model_final.npz",
    )
    writer.close()
    return 0


def _who(sync: Alone) -> str:
    return f"[rank {sync.rank}] " if sync.world_size > 1 else ""


def main() -> int:
    def on_term(signum: int, _frame: Any) -> None:
        print(f"received signal {signum}: stopping", file=sys.stderr, flush=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    config_path, out_dir = os.environ.get("TRAINING_CONFIG"), os.environ.get("TRAINING_OUTPUT_DIR")
    if not config_path or not out_dir:
        print("error: TRAINING_CONFIG and TRAINING_OUTPUT_DIR must be set", file=sys.stderr)
        return 2
    sync: Alone | None = None
    try:
        config = load_config(config_path)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sync = data_parallel()
        if sync.world_size > 1:
            print(f"{_who(sync)}data parallel: {sync.world_size} processes over gloo", flush=True)
        return train(config, out, sync)
    except (ConfigError, OSError, yaml.YAMLError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if sync is not None:
            sync.close()


if __name__ == "__main__":
    sys.exit(main())
