"""The Docker runtime and direct S3 transfers on a real box: sshd into a host with dockerd, a
registry with a password, and moto's S3 server."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from gpu_training.errors import TrainerFailedError, TransferError
from gpu_training.follow import FollowSettings, JobFollower, source_for
from gpu_training.hosts.base import FETCH_URLS_SCRIPT
from gpu_training.params import parse_job_params
from gpu_training.progress import FollowOutcome, judge
from gpu_training.providers.base import GpuRequest
from gpu_training.providers.ssh import SshProvider
from gpu_training.results.models import utcnow
from gpu_training.results.store import ResultsStore
from gpu_training.runtimes import ContainerSpec, ContainerTrainer, registry_login
from gpu_training.storage import fetch_dataset_direct, upload_outputs


@pytest.fixture
def box(sshd_server: Any, docker_engine: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """A prepared work directory on the SSH box, and its provider; terminated afterwards."""
    monkeypatch.setenv(
        "AIRFLOW_CONN_DOCKER_BOX", sshd_server.connection(work_root=str(tmp_path / "jobs"), python=sys.executable)
    )
    provider = SshProvider("docker_box", require_docker=True)
    name = f"gpujob-docker-{time.monotonic_ns()}"
    info = provider.launch(provider.list_offers(GpuRequest())[0], name)
    host = provider.host(info)
    host.prepare()
    yield provider, host, name
    provider.terminate(name)
    assert not Path(host.workdir).exists()
    assert not container_exists(name)


def container_exists(name: str) -> bool:
    return subprocess.run(["docker", "container", "inspect", name], capture_output=True).returncode == 0


def wait_done(trainer: ContainerTrainer, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = trainer.status()
        if not status.running:
            return status
        time.sleep(0.2)
    raise AssertionError("the container did not end in time")


def py(code: str, image: str, **kw: Any) -> ContainerSpec:
    return ContainerSpec(image=image, command=("python3", "-c", code), **kw)


def test_container_starts_once_streams_its_log_and_reports_its_exit(box: Any, docker_engine: str) -> None:
    _, host, name = box
    trainer = ContainerTrainer(host, name)
    spec = py("import os, sys; print('hello from', os.getcwd(), os.getuid()); sys.exit(3)", docker_engine, user="0:0")
    assert "started container" in trainer.start(spec)
    assert "re-attaching" in trainer.start(spec)  # a retried task does not start a second one
    listed = subprocess.run(
        ["docker", "ps", "-a", "--filter", f"label=gpu-training.instance={name}", "-q"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert len(listed) == 1
    status = wait_done(trainer)
    assert (status.exit_code, status.oom_killed) == (3, False)
    assert host.log_tail() == "hello from /workspace 0"
    # teardown (the fixture) removes the container with the work directory


def test_stop_ends_a_running_container(box: Any, docker_engine: str) -> None:
    _, host, name = box
    trainer = ContainerTrainer(host, name)
    trainer.start(py("import time; print('up', flush=True); time.sleep(600)", docker_engine))
    assert trainer.status().running
    trainer.stop(grace_seconds=2)
    status = wait_done(trainer, timeout=30)
    assert status.exit_code in (137, 143)


def test_oom_killed_container_is_reported_as_out_of_memory(
    box: Any, docker_engine: str, store: ResultsStore, job_uuid: str
) -> None:
    _, host, name = box
    trainer = ContainerTrainer(host, name)
    trainer.start(py("b = bytearray(400 * 1024 * 1024); print(len(b))", docker_engine, memory="48m"))
    status = wait_done(trainer)
    assert (status.exit_code, status.oom_killed) == (137, True)
    store.update_job(job_uuid, status="running")
    verdict = judge(
        store.job(job_uuid), status, now=utcnow(), stall_timeout=timedelta(minutes=5), max_runtime=timedelta(hours=1)
    )
    assert verdict is not None and (verdict.kind, verdict.succeeded) == (FollowOutcome.TRAINER_EXIT, False)
    assert "exited with code 137: out of memory" in verdict.reason


def test_the_triggers_follower_reports_an_oom_killed_container_over_ssh(
    box: Any, docker_engine: str, store: ResultsStore, job_uuid: str
) -> None:
    """What the triggerer sees: the container's status through its own SSH connection."""
    _, host, name = box
    trainer = ContainerTrainer(host, name)
    trainer.start(py("b = bytearray(400 * 1024 * 1024); print(len(b))", docker_engine, memory="48m"))
    store.update_job(job_uuid, status="running")
    spec = FollowSettings(
        job_uuid=job_uuid,
        results_conn_id="unused",
        poll_interval=0.2,
        stall_timeout=timedelta(minutes=5),
        max_runtime=timedelta(hours=1),
        status_command=tuple(trainer.status_command()),
        runtime="docker",
    )
    source = source_for(host.follow_target())

    async def follow() -> Any:
        try:
            return await JobFollower(spec, source, log=logging.getLogger("test"), store=store).run()
        finally:
            await source.close()

    result = asyncio.run(follow())
    assert (result.kind, result.exit_code) == ("trainer_exit", 137)
    assert "exited with code 137: out of memory" in result.reason
    assert store.job(job_uuid).trainer_exit_code == 137


def test_image_from_a_registry_with_login_from_a_connection(
    box: Any, registry: Any, docker_engine: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _, host, name = box
    ref = registry.push(docker_engine, "team/trainer:login-test")
    monkeypatch.setenv("AIRFLOW_CONN_TEST_REGISTRY", registry.connection())
    login = registry_login("test_registry")
    assert login is not None and registry.password not in repr(login)
    trainer = ContainerTrainer(host, name)
    trainer.start(py("print('pulled and ran')", ref, pull="always"), login)
    assert wait_done(trainer).exit_code == 0
    assert host.log_tail() == "pulled and ran"
    # The password is nowhere on the instance after the pull (logged out), nor in our logs.
    workdir = Path(host.workdir)
    for path in workdir.rglob("*"):
        if path.is_file():
            assert registry.password.encode() not in path.read_bytes(), path
    docker_config = workdir / "run" / "docker" / "config.json"
    if docker_config.exists():
        assert not json.loads(docker_config.read_text()).get("auths", {}).get(registry.address, {}).get("auth")
    assert registry.password not in caplog.text


def test_refused_registry_login_fails_with_that_reason(
    box: Any, registry: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, host, name = box
    monkeypatch.setenv("AIRFLOW_CONN_BAD_REGISTRY", registry.connection(password="not-the-password"))
    login = registry_login("bad_registry")
    with pytest.raises(TrainerFailedError, match="registry login refused") as caught:
        ContainerTrainer(host, name).start(py("print(1)", f"{registry.address}/team/trainer:x"), login)
    assert "not-the-password" not in str(caught.value)
    assert not container_exists(name)


def test_missing_image_fails_with_that_reason(box: Any, registry: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, host, name = box
    monkeypatch.setenv("AIRFLOW_CONN_TEST_REGISTRY", registry.connection())
    with pytest.raises(TrainerFailedError, match=r"image not available: image .*/team/no-such-image:1 could not"):
        ContainerTrainer(host, name).start(
            py("print(1)", f"{registry.address}/team/no-such-image:1"), registry_login("test_registry")
        )
    assert not container_exists(name)


def test_container_spec_follows_the_job_and_the_host(box: Any) -> None:
    _, host, _ = box
    spec = parse_job_params(
        {"project_id": "p", "runtime": "docker", "image": "r:5000/t:1", "container_memory": "8g", "container_cpus": 2}
    )
    plain = ContainerSpec.for_job(spec, host)
    assert (plain.command, plain.gpus, plain.memory, plain.cpus, plain.user) == ((), False, "8g", 2, "0:0")
    host.gpus = ("NVIDIA H100 80GB HBM3",)
    custom = parse_job_params({"project_id": "p", "runtime": "docker", "command": ["{python}", "{workdir}/t.py"]})
    with_gpu = ContainerSpec.for_job(custom, host)
    assert with_gpu.gpus and with_gpu.command == ("python3", "/workspace/t.py")


@pytest.mark.parametrize("image", ["-v/:/host", "bad image", ""])
def test_image_param_cannot_be_an_option_or_contain_spaces(image: str) -> None:
    from gpu_training.errors import JobParamsError

    with pytest.raises(JobParamsError, match="image"):
        parse_job_params({"project_id": "p", "runtime": "docker", "image": image})


# --- S3 data moved by the instance itself -----------------------------------------------------------


@pytest.fixture
def bucket(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", moto_server.aws_connection())
    client = moto_server.client()
    name = f"b{time.monotonic_ns()}"
    client.create_bucket(Bucket=name)
    client.bucket = name
    return client


def test_s3_dataset_is_pulled_by_the_instance_and_verified(box: Any, bucket: Any) -> None:
    _, host, _ = box
    files = {"train.csv": b"a,b\n1,2\n" * 5000, "sub/val.csv": b"x\n" * 100}
    bucket.put_object(Bucket=bucket.bucket, Key="ds/train.csv", Body=files["train.csv"], ChecksumAlgorithm="SHA256")
    bucket.put_object(Bucket=bucket.bucket, Key="ds/sub/val.csv", Body=files["sub/val.csv"])
    host.bytes_sent = host.bytes_received = 0  # (prepare() put the remote scripts there)
    got = fetch_dataset_direct(f"s3://{bucket.bucket}/ds/", host, expiry_seconds=300)
    assert sorted(got) == sorted((f"data/{k}", len(v), hashlib.sha256(v).hexdigest()) for k, v in files.items())
    for rel, data in files.items():
        assert Path(host.path(f"data/{rel}")).read_bytes() == data
    assert host.bytes_sent == 0 and host.bytes_received == 0  # nothing went through this worker


def test_cut_download_resumes_and_a_bad_checksum_fails_after_one_retry(box: Any, bucket: Any) -> None:
    _, host, _ = box
    data = bytes(range(256)) * 4096  # 1 MiB
    bucket.put_object(Bucket=bucket.bucket, Key="one/blob.bin", Body=data)
    Path(host.path("data")).mkdir(exist_ok=True)
    Path(host.path("data/blob.bin.partial")).write_bytes(data[:300_000])  # a cut transfer
    got = fetch_dataset_direct(f"s3://{bucket.bucket}/one/blob.bin", host, expiry_seconds=300)
    assert got == [("data/blob.bin", len(data), hashlib.sha256(data).hexdigest())]
    assert Path(host.path("data/blob.bin")).read_bytes() == data

    url = bucket.generate_presigned_url("get_object", Params={"Bucket": bucket.bucket, "Key": "one/blob.bin"})
    line = "\t".join(["0" * 64, "-", str(len(data)), "data/other.bin", url]) + "\n"
    rc, _, err = host.script(
        'exec bash "$1" "$2"', host.remote_script(FETCH_URLS_SCRIPT), host.workdir, stdin=line.encode(), check=False
    )
    assert rc == 21 and "SHA256" in err and "giving up after a second download" in err
    assert "Signature" not in err  # the URL is never printed
    assert not Path(host.path("data/other.bin")).exists()


def test_outputs_are_pushed_by_the_instance_and_checked(box: Any, bucket: Any) -> None:
    _, host, _ = box
    outputs = {"model.npz": b"weights" * 1000, "checkpoints/epoch_1.npz": b"ck" * 10, "global.json": b"{}\n"}
    for rel, data in outputs.items():
        Path(host.path(f"outputs/{rel}")).parent.mkdir(parents=True, exist_ok=True)
        Path(host.path(f"outputs/{rel}")).write_bytes(data)
    Path(host.path("logs/trainer.log")).write_bytes(b"log line\n")
    host.bytes_sent = host.bytes_received = 0
    records = upload_outputs(host, f"s3://{bucket.bucket}/runs", "job-1", direct=True, expiry_seconds=300)
    by_name = {r.name: r for r in records}
    assert set(by_name) == {*outputs, "logs/trainer.log", "MANIFEST.sha256"}
    for rel, data in {**outputs, "logs/trainer.log": b"log line\n"}.items():
        body = bucket.get_object(Bucket=bucket.bucket, Key=f"runs/job-1/{rel}")["Body"].read()
        assert body == data
        assert by_name[rel].sha256 == hashlib.sha256(data).hexdigest()
    assert host.bytes_received == 0  # the worker read no output bytes
    manifest = bucket.get_object(Bucket=bucket.bucket, Key="runs/job-1/MANIFEST.sha256")["Body"].read().decode()
    assert hashlib.sha256(b"{}\n").hexdigest() + "  global.json" in manifest


def test_push_failure_is_a_transfer_error(box: Any, bucket: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _, host, _ = box
    Path(host.path("outputs/model.npz")).write_bytes(b"w")
    with pytest.raises(TransferError, match="could not upload outputs"):
        upload_outputs(host, "s3://no-such-bucket-here/runs", "job-2", direct=True, expiry_seconds=300)


def test_gpus_found_by_nvidia_smi_are_requested_from_docker(
    sshd_server: Any, docker_engine: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A box whose nvidia-smi lists GPUs gets ``--gpus all``; this engine has no NVIDIA runtime,
    so Docker's refusal proves the flag was passed."""
    fake = Path("/usr/local/bin/nvidia-smi")
    if fake.exists():
        pytest.skip("a real nvidia-smi is installed here")
    fake.write_text("#!/bin/sh\necho 'NVIDIA H100 80GB HBM3'\necho 'NVIDIA H100 80GB HBM3'\n")
    fake.chmod(0o755)
    try:
        monkeypatch.setenv("AIRFLOW_CONN_GPU_BOX2", sshd_server.connection(work_root=str(tmp_path / "jobs")))
        provider = SshProvider("gpu_box2", require_docker=True)
        offer = provider.list_offers(GpuRequest())[0]
        assert (offer.gpu_name, offer.gpu_count) == ("NVIDIA H100 80GB HBM3", 2)
        info = provider.launch(offer, "gpujob-gpus")
        host = provider.host(info)
        host.prepare()
        assert host.gpus == ("NVIDIA H100 80GB HBM3",) * 2
        spec = ContainerSpec.for_job(parse_job_params({"project_id": "p", "runtime": "docker"}), host)
        assert spec.gpus
        with pytest.raises(TrainerFailedError, match=r"container did not start: .*(gpu|device driver)"):
            ContainerTrainer(host, "gpujob-gpus").start(dataclasses.replace(spec, image=docker_engine))
        provider.terminate("gpujob-gpus")
    finally:
        fake.unlink()
