"""The SSH host and provider against a real OpenSSH server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_training.errors import BadRequestError, HostError, ProviderUnavailableError, TransferError
from gpu_training.hosts.ssh import SshHost
from gpu_training.providers.base import GpuRequest
from gpu_training.providers.ssh import SshProvider

from .servers import free_port
from .sshd import Sshd, start_sshd

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sshd for root login needs root (CI runs as root)")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


@pytest.fixture
def conn(sshd: Sshd, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    monkeypatch.setenv("AIRFLOW_CONN_GPU_BOX", sshd.connection(work_root=str(tmp_path / "jobs"), python=sys.executable))
    return "gpu_box"


@pytest.fixture
def provider(conn: str) -> SshProvider:
    return SshProvider(conn)


@pytest.fixture
def host(provider: SshProvider) -> Iterator[SshHost]:
    info = provider.launch(provider.list_offers(GpuRequest())[0], f"gpujob-test-{time.monotonic_ns()}")
    h = provider.host(info)
    h.prepare()
    yield h
    provider.terminate(info.instance_id)


def test_launch_is_idempotent_and_terminate_removes_everything(provider: SshProvider, tmp_path: Path) -> None:
    offer = provider.list_offers(GpuRequest())[0]
    assert offer.provider == "ssh" and offer.price_per_hour == 0.0
    first = provider.launch(offer, "gpujob-idem")
    again = provider.launch(offer, "gpujob-idem")
    assert first.instance_id == again.instance_id == "gpujob-idem"
    workdir = Path(first.details["workdir"])
    assert workdir == tmp_path / "jobs" / "gpujob-idem" and workdir.is_dir()
    assert [i.name for i in provider.list_instances()] == ["gpujob-idem"]
    provider.terminate(first.instance_id)
    assert not workdir.exists()
    assert provider.find_instance("gpujob-idem") is None
    provider.terminate(first.instance_id)  # gone already: fine


def test_no_param_value_can_inject_shell(host: SshHost, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = f"x; touch {marker}; $(touch {marker}) `touch {marker}`"
    _, out, _ = host.run(["echo", evil])
    assert out.strip() == evil
    host.put_bytes(b"data", f"data/{evil.replace('/', '_')}")
    assert not marker.exists()


def test_put_file_verifies_and_renames_into_place(host: SshHost, tmp_path: Path) -> None:
    local = tmp_path / "blob.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest = host.put_file(local, "data/blob.bin")
    assert digest == hashlib.sha256(local.read_bytes()).hexdigest()
    assert Path(host.path("data/blob.bin")).read_bytes() == local.read_bytes()
    assert not Path(host.path("data/blob.bin.partial")).exists()


def test_a_tree_goes_up_verified_in_few_round_trips(host: SshHost, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    files = {f"d{i % 4}/sub/f{i}.bin": os.urandom(1000 + i) for i in range(60)}
    for rel, data in files.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_bytes(data)
    sessions = []
    real_run = host.run
    monkeypatch_run = lambda argv, **kw: sessions.append(argv[0]) or real_run(argv, **kw)  # noqa: E731
    host.run = monkeypatch_run  # type: ignore[method-assign]
    copied = host.put_tree(tree, "data/tree")
    assert sorted((f.path, f.size) for f in copied) == sorted((k, len(v)) for k, v in files.items())
    for rel, data in files.items():
        assert Path(host.path(f"data/tree/{rel}")).read_bytes() == data
    assert len(sessions) <= 3  # mkdir for all, one checksum pass: not three round trips per file


def test_interrupted_transfer_resumes_where_it_stopped(host: SshHost, tmp_path: Path) -> None:
    local = tmp_path / "big.bin"
    data = os.urandom(4 * 1024 * 1024)
    local.write_bytes(data)
    Path(host.path("data")).mkdir(exist_ok=True)
    Path(host.path("data/big.bin.partial")).write_bytes(data[: 2 * 1024 * 1024 + 5])  # the cut copy
    host.bytes_sent = 0
    host.put_file(local, "data/big.bin")
    assert host.bytes_sent == len(data) - (2 * 1024 * 1024 + 5)
    assert Path(host.path("data/big.bin")).read_bytes() == data


def test_transfer_cut_mid_file_resumes_with_a_good_checksum(host: SshHost, tmp_path: Path) -> None:
    import threading

    local = tmp_path / "cut.bin"
    data = os.urandom(24 * 1024 * 1024)
    local.write_bytes(data)
    partial = Path(host.path("data/cut.bin.partial"))
    cut_at = 4 * 1024 * 1024

    def cut_the_connection() -> None:  # drop the SSH connection once 4 MiB have arrived
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if partial.exists() and partial.stat().st_size >= cut_at:
                host.client().get_transport().close()
                return
            time.sleep(0.002)

    cutter = threading.Thread(target=cut_the_connection)
    cutter.start()
    with pytest.raises(TransferError, match=r"connection lost after about .* a retry resumes"):
        host.put_file(local, "data/cut.bin")
    cutter.join()
    kept = -1
    while kept != partial.stat().st_size:  # sshd may still be writing what it had received
        kept = partial.stat().st_size
        time.sleep(0.5)
    assert cut_at <= kept < len(data)

    host.bytes_sent = 0
    digest = host.put_file(local, "data/cut.bin")  # the task's retry: a new connection, resumed
    assert host.bytes_sent == len(data) - kept
    assert digest == hashlib.sha256(data).hexdigest()
    assert Path(host.path("data/cut.bin")).read_bytes() == data


def test_corrupt_partial_is_not_resumed(host: SshHost, tmp_path: Path) -> None:
    local = tmp_path / "f.bin"
    data = os.urandom(100_000)
    local.write_bytes(data)
    Path(host.path("data/f.bin.partial")).write_bytes(b"garbage" * 100)
    host.bytes_sent = 0
    host.put_file(local, "data/f.bin")
    assert host.bytes_sent == len(data)
    assert Path(host.path("data/f.bin")).read_bytes() == data


def test_wrong_checksum_is_resent_once_then_fails(
    host: SshHost, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = tmp_path / "c.bin"
    local.write_bytes(b"payload")
    real = host.remote_sha256_many
    lies = iter([[(7, "0" * 64)]])  # the first arrival looks corrupted, the re-send is fine

    def flaky(remotes: list[str]) -> list[tuple[int, str]]:
        return next(lies, None) or real(remotes)

    monkeypatch.setattr(host, "remote_sha256_many", flaky)
    host.put_file(local, "data/c.bin")
    assert Path(host.path("data/c.bin")).read_bytes() == b"payload"

    monkeypatch.setattr(host, "remote_sha256_many", lambda remotes: [(7, "f" * 64)] * len(remotes))
    with pytest.raises(TransferError, match="SHA256 mismatch after a re-send"):
        host.put_file(local, "data/d.bin")
    assert not Path(host.path("data/d.bin")).exists()


def test_read_chunk_by_offset(host: SshHost) -> None:
    assert host.read_chunk("outputs/global.json", 0, 100) is None
    Path(host.path("outputs/global.json")).write_bytes(b"0123456789")
    assert host.read_chunk("outputs/global.json", 4, 3) == b"456"
    assert host.read_chunk("outputs/global.json", 10, 3) == b""
    with pytest.raises(HostError, match="escapes"):
        host.read_chunk("../../etc/passwd", 0, 10)


def test_trainer_runs_detached_and_reports_its_exit(host: SshHost) -> None:
    script = "import sys, time\nprint('hello from the box', flush=True)\ntime.sleep(0.5)\nsys.exit(5)\n"
    host.put_bytes(script.encode(), "t.py")
    status = host.start_trainer([host.python, host.path("t.py")], {"PATH": "/usr/bin:/bin", "SECRET_FREE": "1"})
    assert status.started
    again = host.start_trainer([host.python, host.path("t.py")], {"PATH": "/usr/bin:/bin"})
    assert again.pid == status.pid  # re-attached, not started twice
    for _ in range(100):
        if not host.trainer_status().running:
            break
        time.sleep(0.1)
    final = host.trainer_status()
    assert (final.running, final.exit_code) == (False, 5)
    assert host.log_tail() == "hello from the box"


def test_stop_kills_the_process_group(host: SshHost) -> None:
    host.put_bytes(b"import time\ntime.sleep(600)\n", "t.py")
    status = host.start_trainer([host.python, host.path("t.py")], {"PATH": "/usr/bin:/bin"})
    assert status.running
    host.stop_trainer(grace_seconds=5)
    after = host.trainer_status()
    assert not after.running


def test_outputs_listing_and_verified_fetch(host: SshHost, tmp_path: Path) -> None:
    Path(host.path("outputs/checkpoints")).mkdir(parents=True)
    Path(host.path("outputs/checkpoints/m.npz")).write_bytes(b"model")
    Path(host.path("outputs/global.json")).write_bytes(b"{}\n")
    files = host.list_files("outputs")
    assert [(f.path, f.size) for f in files] == [("checkpoints/m.npz", 5), ("global.json", 3)]
    digest = host.fetch_file("outputs/checkpoints/m.npz", tmp_path / "m.npz")
    assert digest == hashlib.sha256(b"model").hexdigest()


def test_host_key_mismatch_is_refused(sshd: Sshd, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "other")], check=True)
    other = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    monkeypatch.setenv("AIRFLOW_CONN_EVIL", sshd.connection(host_key=other, conn_retry_attempts=1))
    with pytest.raises(BadRequestError, match=r"host key of 127.0.0.1:.* does not match"):
        SshProvider("evil").list_offers(GpuRequest())


def test_unknown_host_key_is_refused_unless_explicitly_skipped(
    sshd: Sshd, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    conn = sshd.connection(conn_retry_attempts=1, work_root=str(tmp_path / "w"))
    import json

    data = json.loads(conn)
    del data["extra"]["host_key"]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ssh/known_hosts
    monkeypatch.setenv("AIRFLOW_CONN_NOKEY", json.dumps(data))
    with pytest.raises(BadRequestError, match="is not trusted"):
        SshProvider("nokey").list_offers(GpuRequest())
    data["extra"]["no_host_key_check"] = "true"
    monkeypatch.setenv("AIRFLOW_CONN_SKIP", json.dumps(data))
    assert SshProvider("skip").list_offers(GpuRequest())[0].provider == "ssh"


def test_wrong_user_key_is_refused(sshd: Sshd, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import subprocess

    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "stranger")], check=True)
    monkeypatch.setenv(
        "AIRFLOW_CONN_STRANGER", sshd.connection(key_file=str(tmp_path / "stranger"), conn_retry_attempts=1)
    )
    with pytest.raises(BadRequestError, match=r"authentication to 127.0.0.1:.* failed"):
        SshProvider("stranger").list_offers(GpuRequest())


def test_unreachable_host_retries_then_fails_clearly(sshd: Sshd, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    data = json.loads(sshd.connection(conn_retry_attempts=2))
    data["port"] = free_port()  # nothing listens there
    monkeypatch.setenv("AIRFLOW_CONN_DOWN", json.dumps(data))
    started = time.monotonic()
    with pytest.raises(ProviderUnavailableError, match="is unreachable"):
        SshProvider("down").list_offers(GpuRequest())
    assert time.monotonic() - started >= 3  # it waited and tried again


def test_undefined_connection_is_a_clear_non_retryable_error() -> None:
    with pytest.raises(BadRequestError, match="SSH connection 'nobody_defined_this' is not defined"):
        SshProvider("nobody_defined_this").list_offers(GpuRequest())
