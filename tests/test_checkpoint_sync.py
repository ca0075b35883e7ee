"""Checkpoints kept in the outputs URI while a job trains, and restored onto a new instance: a real
sshd on 127.0.0.1 as the instance, moto's S3 server as the bucket."""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import stat
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from gpu_training.errors import StorageError
from gpu_training.hosts.base import Host
from gpu_training.hosts.local import LocalHost
from gpu_training.hosts.ssh import SshHost
from gpu_training.providers.ssh import ssh_hook
from gpu_training.storage import CHECKPOINT_ARCHIVE, restore_checkpoint, start_checkpoint_sync

# Iteration N of a fake trainer: two files, then the pointer replaced atomically (the contract).
FAKE_TRAINER = r"""
ckpt() {
  mkdir -p outputs/checkpoints
  head -c $((3000 + $1)) /dev/urandom > "outputs/checkpoints/iter00$1_model.npz"
  head -c $((2000 + $1)) /dev/urandom > "outputs/checkpoints/iter00$1_optimizer.npz"
  printf '{"iteration": %s, "epoch": %s, "model_path": "%s", "optimizer_path": "%s"}' "$1" "$1" \
    "checkpoints/iter00$1_model.npz" "checkpoints/iter00$1_optimizer.npz" > outputs/checkpoints/latest.json.tmp
  mv outputs/checkpoints/latest.json.tmp outputs/checkpoints/latest.json
}
ckpt 1
while [ ! -e run/go2 ]; do sleep 0.05; done
ckpt 2
while [ ! -e run/go3 ]; do sleep 0.05; done
ckpt 3
"""


def wait_for(check: Callable[[], Any], timeout: float = 15, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def sync_pid(host: Host) -> int:
    return int(Path(host.path("run/checkpoint_sync.pid")).read_text())


def archive_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def expected_members(host: Host, iteration: int) -> dict[str, bytes]:
    out = Path(host.path("outputs"))
    names = [
        "checkpoints/latest.json",
        f"checkpoints/iter00{iteration}_model.npz",
        f"checkpoints/iter00{iteration}_optimizer.npz",
    ]
    return {name: (out / name).read_bytes() for name in names}


@pytest.fixture
def s3(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", moto_server.aws_connection())
    client = moto_server.client()
    client.bucket = f"ck{time.monotonic_ns()}"
    client.create_bucket(Bucket=client.bucket)
    return client


@pytest.fixture
def ssh_hosts(sshd_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[[str], SshHost]]:
    """Prepared SSH work directories on the box; their syncs stopped and directories removed after."""
    monkeypatch.setenv("AIRFLOW_CONN_CKPT_BOX", sshd_server.connection())
    made: list[SshHost] = []

    def make(name: str) -> SshHost:
        host = SshHost(ssh_hook("ckpt_box"), str(tmp_path / name))
        host.prepare()
        made.append(host)
        return host

    yield make
    for host in made:
        host.destroy()  # the sync loop ends once its work directory is gone
        host.hook.get_conn().close()


def s3_archive(s3: Any, key: str, bucket: str | None = None) -> bytes | None:
    try:
        return bytes(s3.get_object(Bucket=bucket or s3.bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def test_checkpoints_reach_s3_while_training_and_restore_on_a_new_instance(
    s3: Any, ssh_hosts: Callable[[str], SshHost]
) -> None:
    host = ssh_hosts("instance-a")
    outputs_uri = f"s3://{s3.bucket}/runs/job-1"
    key = f"runs/job-1/{CHECKPOINT_ARCHIVE}"
    host.start_trainer(["bash", "-c", FAKE_TRAINER, "fake-trainer"], {"PATH": os.environ["PATH"]})
    assert start_checkpoint_sync(host, outputs_uri, expiry_seconds=600, interval_seconds=0.2)
    first_pid = sync_pid(host)
    assert start_checkpoint_sync(host, outputs_uri, expiry_seconds=600, interval_seconds=0.2)  # idempotent
    assert sync_pid(host) == first_pid and pid_alive(first_pid)

    def archive_of(iteration: int) -> dict[str, bytes] | None:
        data = s3_archive(s3, key)
        members = archive_members(data) if data else {}
        pointer = json.loads(members.get("checkpoints/latest.json", b"{}"))
        return members if pointer.get("iteration") == iteration else None

    assert wait_for(lambda: archive_of(1), what="checkpoint 1 in S3") == expected_members(host, 1)
    Path(host.path("run/go2")).touch()
    assert wait_for(lambda: archive_of(2), what="checkpoint 2 in S3") == expected_members(host, 2)

    # The presigned URL: in a private file only; not in the log, not in the host's process list.
    url_file = Path(host.path("run/checkpoint_sync.url"))
    assert stat.S_IMODE(url_file.stat().st_mode) == 0o600
    query = parse_qs(urlparse(url_file.read_text().strip()).query)
    signature = (query.get("X-Amz-Signature") or query["Signature"])[0]
    assert len(signature) > 20
    _, processes, _ = host.run(["ps", "-eo", "args"])
    assert "sync_checkpoints.sh" in processes
    assert signature not in processes
    log_text = Path(host.path("logs/checkpoint_sync.log")).read_text()
    assert "uploaded checkpoint" in log_text and signature not in log_text

    # The trainer writes a last checkpoint and exits: the final pass sends it, then the sync stops.
    Path(host.path("run/go3")).touch()
    wait_for(lambda: not pid_alive(first_pid), what="the sync to stop after the trainer")
    assert Path(host.path("run/exit_code")).read_text().strip() == "0"
    assert archive_of(3) == expected_members(host, 3)
    assert "final pass done" in Path(host.path("logs/checkpoint_sync.log")).read_text()
    assert not Path(host.path("run/ckpt.tar.tmp")).exists()

    # A replacement instance gets it back before its trainer starts; the bytes never pass here.
    fresh = ssh_hosts("instance-b")
    fresh.bytes_sent = fresh.bytes_received = 0
    pointer = restore_checkpoint(fresh, outputs_uri, expiry_seconds=600)
    assert pointer == json.loads(expected_members(host, 3)["checkpoints/latest.json"])
    for name, data in expected_members(host, 3).items():
        assert Path(fresh.path(f"outputs/{name}")).read_bytes() == data
    assert fresh.bytes_sent == 0 and fresh.bytes_received == 0
    assert not Path(fresh.path("run/ckpt-restore.tar")).exists()

    # Its sync does not send the restored checkpoint back, and stops once the trainer ended.
    assert start_checkpoint_sync(fresh, outputs_uri, expiry_seconds=600, interval_seconds=0.2)
    fresh_pid = sync_pid(fresh)
    time.sleep(1.0)
    Path(fresh.path("run/exit_code")).write_text("0\n")
    wait_for(lambda: not pid_alive(fresh_pid), what="the fresh sync to stop")
    assert "uploaded" not in Path(fresh.path("logs/checkpoint_sync.log")).read_text()


def test_no_checkpoint_restores_nothing(s3: Any, ssh_hosts: Callable[[str], SshHost], tmp_path: Path) -> None:
    host = ssh_hosts("instance-empty")
    assert restore_checkpoint(host, f"s3://{s3.bucket}/runs/none", expiry_seconds=60) is None
    assert restore_checkpoint(host, (tmp_path / "store" / "none").as_uri(), expiry_seconds=60) is None
    assert host.list_files("outputs") == []


ABSOLUTE_EVIL = "/tmp/gpu-training-test-checkpoint-evil.txt"


def bad_archive(kind: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        pointer = b'{"iteration": 1, "model_path": "checkpoints/m.npz"}'
        info = tarfile.TarInfo("checkpoints/latest.json")
        info.size = len(pointer)
        tar.addfile(info, io.BytesIO(pointer))
        if kind == "link":
            link = tarfile.TarInfo("checkpoints/m.npz")
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(link)
        else:
            names = {"dotdot": "checkpoints/../../evil.txt", "parent": "../evil.txt", "absolute": ABSOLUTE_EVIL}
            evil = tarfile.TarInfo(names[kind])
            evil.size = 4
            tar.addfile(evil, io.BytesIO(b"evil"))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("dotdot", "escapes outputs/"),
        ("parent", "escapes outputs/"),
        ("absolute", "escapes outputs/"),
        ("link", "links or special files"),
    ],
)
def test_an_archive_that_escapes_outputs_is_refused(
    kind: str, reason: str, s3: Any, ssh_hosts: Callable[[str], SshHost], tmp_path: Path
) -> None:
    host = ssh_hosts(f"instance-{kind}")
    s3.put_object(Bucket=s3.bucket, Key=f"runs/bad/{CHECKPOINT_ARCHIVE}", Body=bad_archive(kind))
    with pytest.raises(StorageError, match=f"refusing the checkpoint .*{reason}"):
        restore_checkpoint(host, f"s3://{s3.bucket}/runs/bad", expiry_seconds=60)
    assert not list(tmp_path.rglob("evil.txt")) and not Path(ABSOLUTE_EVIL).exists()
    assert host.list_files("outputs") == []  # nothing was extracted


def test_file_outputs_sync_from_a_local_host_only(
    tmp_path: Path, ssh_hosts: Callable[[str], SshHost], caplog: pytest.LogCaptureFixture
) -> None:
    outputs_uri = (tmp_path / "store" / "job-3").as_uri()
    local = LocalHost(tmp_path / "local-a")
    local.prepare()
    out = Path(local.path("outputs"))
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints/e1_model.npz").write_bytes(b"m" * 100)
    (out / "checkpoints/e1_optimizer.npz").write_bytes(b"o" * 50)
    (out / "checkpoints/latest.json").write_text(
        json.dumps(
            {"epoch": 1, "model_path": "checkpoints/e1_model.npz", "optimizer_path": "checkpoints/e1_optimizer.npz"}
        )
    )
    try:
        assert start_checkpoint_sync(local, outputs_uri, expiry_seconds=60, interval_seconds=0.2)
        target = tmp_path / "store" / "job-3" / CHECKPOINT_ARCHIVE
        wait_for(target.exists, what="the archive copied into the file:// outputs")
        assert archive_members(target.read_bytes()) == {
            name: (out / name).read_bytes()
            for name in ("checkpoints/latest.json", "checkpoints/e1_model.npz", "checkpoints/e1_optimizer.npz")
        }
    finally:
        Path(local.path("run/exit_code")).write_text("0\n")
    wait_for(lambda: not pid_alive(sync_pid(local)), what="the local sync to stop")

    restored = LocalHost(tmp_path / "local-b")
    restored.prepare()
    assert restore_checkpoint(restored, outputs_uri, expiry_seconds=60) == {
        "epoch": 1,
        "model_path": "checkpoints/e1_model.npz",
        "optimizer_path": "checkpoints/e1_optimizer.npz",
    }
    assert Path(restored.path("outputs/checkpoints/e1_model.npz")).read_bytes() == b"m" * 100

    # A remote instance cannot reach this worker's files: no sync, said so; a restore still works.
    remote = ssh_hosts("instance-file")
    with caplog.at_level(logging.WARNING, logger="gpu_training.storage"):
        assert start_checkpoint_sync(remote, outputs_uri, expiry_seconds=60) is False
    assert "checkpoints are not synced" in caplog.text and "restarts from scratch" in caplog.text
    assert not Path(remote.path("run/checkpoint_sync.pid")).exists()
    assert restore_checkpoint(remote, outputs_uri, expiry_seconds=60) is not None
    assert Path(remote.path("outputs/checkpoints/e1_optimizer.npz")).read_bytes() == b"o" * 50


def test_a_local_host_syncs_to_s3_and_keeps_trying_through_errors(s3: Any, tmp_path: Path) -> None:
    """A worker that is its own host PUTs to the presigned URL too; a failed upload is logged
    (without the URL) and tried again next round; removing the work directory ends the loop."""
    bucket = f"late{time.monotonic_ns()}"  # created only after the first uploads failed
    outputs_uri = f"s3://{bucket}/runs/job-4"
    host = LocalHost(tmp_path / "local-s3")
    host.prepare()
    out = Path(host.path("outputs"))
    (out / "checkpoints").mkdir(parents=True)
    (out / "weights.bin").write_bytes(b"w" * 10)
    (out / "checkpoints/latest.json").write_text(json.dumps({"step": 7, "state": {"weights_path": "weights.bin"}}))
    try:
        assert start_checkpoint_sync(host, outputs_uri, expiry_seconds=60, interval_seconds=0.2)
        pid = sync_pid(host)
        log_file = Path(host.path("logs/checkpoint_sync.log"))
        wait_for(lambda: "upload failed" in log_file.read_text(), what="a failed upload logged")
        time.sleep(0.6)  # a few more failed rounds: logged once, the loop goes on
        assert log_file.read_text().count("upload failed") == 1 and pid_alive(pid)
        s3.create_bucket(Bucket=bucket)
        key = f"runs/job-4/{CHECKPOINT_ARCHIVE}"
        data = wait_for(lambda: s3_archive(s3, key, bucket), what="the archive once the bucket exists")
        assert set(archive_members(data)) == {"checkpoints/latest.json", "weights.bin"}
        url = Path(host.path("run/checkpoint_sync.url")).read_text().strip()
        assert urlparse(url).query and urlparse(url).query not in log_file.read_text()
    finally:
        # teardown: the loop ends with its work directory (it may write a file meanwhile: again)
        shutil.rmtree(host.workdir, ignore_errors=True)
    wait_for(lambda: not pid_alive(pid), what="the sync to stop")
    shutil.rmtree(host.workdir, ignore_errors=True)
    assert not Path(host.workdir).exists()

    restored = LocalHost(tmp_path / "local-s3-b")
    restored.prepare()
    assert restore_checkpoint(restored, outputs_uri, expiry_seconds=60) == {
        "step": 7,
        "state": {"weights_path": "weights.bin"},
    }
    assert Path(restored.path("outputs/weights.bin")).read_bytes() == b"w" * 10
