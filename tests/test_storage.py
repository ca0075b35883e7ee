"""Datasets in and outputs out, on file:// and on a real S3 server (moto's standalone server)."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from gpu_training.errors import StorageError
from gpu_training.hosts.local import LocalHost
from gpu_training.results.store import ResultsStore
from gpu_training.storage import MANIFEST_NAME, fetch_dataset, job_outputs_uri, parse_uri, upload_outputs


@pytest.fixture
def s3(moto_server, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", moto_server.aws_connection())
    client = moto_server.client()
    bucket = f"b{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    client.bucket = bucket  # type: ignore[attr-defined]
    return client


@pytest.fixture
def host(tmp_path: Path) -> LocalHost:
    h = LocalHost(tmp_path / "instance")
    h.prepare()
    return h


def write_outputs(host: LocalHost) -> dict[str, bytes]:
    files = {
        "global.json": b'{"phase": "PROJECT", "event": "end"}\n',
        "checkpoints/iter001_epoch001_model.npz": os.urandom(4096),
        "model_final.npz": os.urandom(1000),
    }
    for name, data in files.items():
        host.put_bytes(data, f"outputs/{name}")
    host.put_bytes(b"epoch 1 done\n", "logs/trainer.log")
    return files


def test_uris() -> None:
    assert parse_uri("s3://bucket/a/b.csv").path == "a/b.csv"
    assert parse_uri("file:///tmp/x%20y").path == "/tmp/x y"
    with pytest.raises(StorageError, match="unsupported scheme"):
        parse_uri("gs://bucket/key")
    with pytest.raises(StorageError, match="needs a bucket"):
        parse_uri("s3:///key")
    assert job_outputs_uri("s3://b/out/", "u1") == "s3://b/out/u1"


def test_outputs_to_file_with_manifest(host: LocalHost, tmp_path: Path) -> None:
    files = write_outputs(host)
    records = upload_outputs(host, (tmp_path / "store").as_uri(), "job-1")
    root = tmp_path / "store" / "job-1"
    by_name = {r.name: r for r in records}
    assert set(by_name) == {*files, "logs/trainer.log", MANIFEST_NAME}
    for name, data in files.items():
        assert (root / name).read_bytes() == data
        assert by_name[name].sha256 == hashlib.sha256(data).hexdigest()
        assert by_name[name].size_bytes == len(data)
    manifest = (root / MANIFEST_NAME).read_text().splitlines()
    assert f"{hashlib.sha256(files['model_final.npz']).hexdigest()}  model_final.npz" in manifest
    assert not list(root.rglob("*.partial"))


def test_outputs_to_s3_with_manifest(host: LocalHost, s3) -> None:
    files = write_outputs(host)
    records = upload_outputs(host, f"s3://{s3.bucket}/runs", "job-2")
    for rec in records:
        assert rec.uri.startswith(f"s3://{s3.bucket}/runs/job-2/")
        body = s3.get_object(Bucket=s3.bucket, Key=rec.uri.split("/", 3)[3])["Body"].read()
        assert hashlib.sha256(body).hexdigest() == rec.sha256
    manifest = s3.get_object(Bucket=s3.bucket, Key=f"runs/job-2/{MANIFEST_NAME}")["Body"].read().decode()
    assert len(manifest.splitlines()) == len(files) + 1  # + the trainer log


def test_dataset_from_file_and_directory(host: LocalHost, tmp_path: Path) -> None:
    single = tmp_path / "train.csv"
    single.write_text("1,2,3\n")
    copied = fetch_dataset(single.as_uri(), host)
    assert copied == [("data/train.csv", 6, hashlib.sha256(b"1,2,3\n").hexdigest())]
    folder = tmp_path / "ds"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.csv").write_text("a")
    (folder / "sub" / "b.csv").write_text("b")
    copied = fetch_dataset(folder.as_uri() + "/", host)
    assert sorted(c[0] for c in copied) == ["data/a.csv", "data/sub/b.csv"]
    assert Path(host.path("data/sub/b.csv")).read_text() == "b"


def test_dataset_from_s3_object_and_prefix(host: LocalHost, s3) -> None:
    s3.put_object(Bucket=s3.bucket, Key="datasets/v1/train.csv", Body=b"x,y\n1,2\n")
    s3.put_object(Bucket=s3.bucket, Key="datasets/v1/eval.csv", Body=b"x,y\n3,4\n")
    one = fetch_dataset(f"s3://{s3.bucket}/datasets/v1/train.csv", host)
    assert one == [("data/train.csv", 8, hashlib.sha256(b"x,y\n1,2\n").hexdigest())]
    many = fetch_dataset(f"s3://{s3.bucket}/datasets/v1/", host)
    assert sorted(c[0] for c in many) == ["data/eval.csv", "data/train.csv"]


def test_missing_dataset_is_a_clear_error(host: LocalHost, s3, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        fetch_dataset(f"s3://{s3.bucket}/nope/train.csv", host)
    with pytest.raises(StorageError, match="does not exist"):
        fetch_dataset((tmp_path / "nope.csv").as_uri(), host)


def test_output_names_cannot_escape(host: LocalHost, tmp_path: Path) -> None:
    from gpu_training.storage import _safe_relpath

    with pytest.raises(StorageError, match="escapes"):
        _safe_relpath("../../etc/passwd")
    with pytest.raises(StorageError, match="escapes"):
        _safe_relpath("/etc/passwd")


def test_a_job_moves_its_s3_data_through_its_own_aws_connection(
    store: ResultsStore, moto_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``aws_conn_id`` names the job's AWS connection: every s3:// read and write of a job goes
    through it (here aws_default points at a port where nothing listens)."""
    from gpu_training import lifecycle
    from tests.servers import free_port

    broken = json.loads(moto_server.aws_connection())
    broken["extra"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    broken["extra"]["config_kwargs"] = {"retries": {"max_attempts": 1}, "connect_timeout": 1}
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(broken))
    monkeypatch.setenv("AIRFLOW_CONN_TEAM_S3", moto_server.aws_connection())
    client = moto_server.client()
    bucket = f"team{time.monotonic_ns()}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="data/train.csv", Body=b"x,y\n1,2\n")
    params = {
        "project_id": "s3conn",
        "aws_conn_id": "team_s3",
        "dataset_uri": f"s3://{bucket}/data/train.csv",
        "outputs_uri": f"s3://{bucket}/runs/",
    }
    job = lifecycle.register_job(store, params, dag_id="gpu_training", run_id=f"manual__{time.time_ns()}")
    lifecycle.build_config(store, job)
    lifecycle.provision(store, job)
    assert lifecycle.check_ready(store, job)
    assert lifecycle.transfer_inputs(store, job)["files"] >= 1
    host = lifecycle.host_for(store, job)
    assert Path(host.path("data/train.csv")).read_bytes() == b"x,y\n1,2\n"
    host.put_bytes(b"epoch 1 done\n", "logs/trainer.log")
    assert lifecycle.upload(store, job) >= 2
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=f"runs/{job}/")["Contents"]}
    assert f"runs/{job}/logs/trainer.log" in keys and f"runs/{job}/MANIFEST.sha256" in keys
    lifecycle.teardown(store, job)
