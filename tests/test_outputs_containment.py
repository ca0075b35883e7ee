"""A hostile trainer's outputs cannot lose the others (issue 21, item 3): names with a newline or a
control character, names that are not UTF-8, symlinks (to a file or a folder outside, or the
``outputs`` folder itself), FIFOs are skipped, each with its reason recorded where the job page can
show it (``job_events``), and every other output is uploaded: relayed through the worker from the
local provider and over SSH, and pushed to S3 by the instance itself. The hosts read only regular
files for the worker too (a FIFO never blocks, ``/dev/zero`` is never read).
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_training.errors import NotRegularFileError
from gpu_training.hosts.base import Host
from gpu_training.hosts.local import LocalHost
from gpu_training.hosts.ssh import SshHost
from gpu_training.providers.base import GpuRequest
from gpu_training.providers.ssh import SshProvider
from gpu_training.results.store import ResultsStore, SkippedOutput
from gpu_training.storage import MANIFEST_NAME, shown_name, upload_outputs

GOOD = {
    "model.npz": b"weights" * 100,
    "checkpoints/iter001_epoch001_model.npz": b"ck" * 50,
    "name with spaces & 'quotes' $(x).txt": b"fine",
    "two..dots.txt": b"also fine",
    "ünïcödé.txt": b"utf-8 is fine",
    "global.json": b"{}\n",
}
#: Odd names: (name as bytes under outputs/, reason expected).
ODD = {
    b"bad\nname.txt": "its name holds a newline or another control character",
    b"bell\x07.txt": "its name holds a newline or another control character",
    b"sub/tab\tname": "its name holds a newline or another control character",
    b"latin1-\xe9.txt": "its name is not valid UTF-8",
}
LINK = "a symbolic link: links are never followed (what it points to is not uploaded through it)"


def plant(host: Host, outside: Path) -> dict[str, str]:
    """The outputs of a hostile trainer (written in the host's work directory, which is local for
    the SSH box too); returns the skipped names (as shown) and their reasons."""
    out = Path(host.path("outputs"))
    for rel, data in GOOD.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    expected = {}
    for raw, reason in ODD.items():
        path = os.path.join(os.fsencode(out), raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as fh:
            fh.write(b"odd")
        expected[shown_name("outputs/" + os.fsdecode(raw))] = reason
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("not an output\n")
    os.symlink(outside / "secret.txt", out / "leak.txt")
    os.symlink(outside, out / "leakdir")
    os.symlink("model.npz", out / "inside-link.npz")  # inside outputs/: skipped all the same
    os.mkfifo(out / "pipe")
    expected.update(
        {
            "outputs/leak.txt": LINK,
            "outputs/leakdir": LINK,
            "outputs/inside-link.npz": LINK,
            "outputs/pipe": "not a regular file (a FIFO, device or socket)",
        }
    )
    Path(host.path("logs/trainer.log")).write_bytes(b"epoch 1 done\n")
    return expected


def check_upload(store: ResultsStore, job_uuid: str, records: list[Any], expected: dict[str, str]) -> None:
    by_name = {r.name: r for r in records}
    assert set(by_name) == {*GOOD, "logs/trainer.log", MANIFEST_NAME}
    for rel, data in GOOD.items():
        assert by_name[rel].sha256 == hashlib.sha256(data).hexdigest() and by_name[rel].size_bytes == len(data)
    assert {o.name: o.reason for o in store.skipped_outputs(job_uuid)} == expected


def upload(host: Host, store: ResultsStore, job_uuid: str, uri: str, **kw: Any) -> list[Any]:
    return upload_outputs(host, uri, job_uuid, on_skipped=lambda s: store.record_skipped_outputs(job_uuid, s), **kw)


@pytest.fixture
def local_host(tmp_path: Path) -> LocalHost:
    h = LocalHost(tmp_path / "instance")
    h.prepare()
    return h


@pytest.fixture
def ssh_host(sshd_server: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[SshHost]:
    monkeypatch.setenv(
        "AIRFLOW_CONN_OUTPUTS_BOX", sshd_server.connection(work_root=str(tmp_path / "jobs"), python=sys.executable)
    )
    provider = SshProvider("outputs_box")
    name = f"gpujob-outputs-{time.monotonic_ns()}"
    host = provider.host(provider.launch(provider.list_offers(GpuRequest())[0], name))
    assert isinstance(host, SshHost)
    host.prepare()
    yield host
    provider.terminate(name)


@pytest.fixture
def bucket(moto_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", moto_server.aws_connection())
    client = moto_server.client()
    client.bucket = f"b{time.monotonic_ns()}"
    client.create_bucket(Bucket=client.bucket)
    return client


def test_local_outputs_skip_odd_names_and_symlinks_and_upload_the_rest(
    local_host: LocalHost, store: ResultsStore, job_uuid: str, tmp_path: Path
) -> None:
    expected = plant(local_host, tmp_path / "outside")
    records = upload(local_host, store, job_uuid, (tmp_path / "store").as_uri())
    check_upload(store, job_uuid, records, expected)
    root = tmp_path / "store" / job_uuid
    assert not (root / "leak.txt").exists() and not (root / "leakdir").exists()
    manifest = (root / MANIFEST_NAME).read_text().splitlines()
    assert len(manifest) == len(GOOD) + 1  # one line per file, no name split over two
    again = upload(local_host, store, job_uuid, (tmp_path / "store").as_uri())  # a retried upload
    assert len(again) == len(records) and len(store.skipped_outputs(job_uuid)) == len(expected)


def test_ssh_outputs_relayed_through_the_worker_skip_the_same(
    ssh_host: SshHost, store: ResultsStore, job_uuid: str, tmp_path: Path
) -> None:
    expected = plant(ssh_host, tmp_path / "outside")
    records = upload(ssh_host, store, job_uuid, (tmp_path / "store").as_uri())
    check_upload(store, job_uuid, records, expected)


def test_ssh_outputs_pushed_to_s3_by_the_instance_skip_the_same(
    ssh_host: SshHost, store: ResultsStore, job_uuid: str, tmp_path: Path, bucket: Any
) -> None:
    expected = plant(ssh_host, tmp_path / "outside")
    ssh_host.bytes_received = 0
    records = upload(ssh_host, store, job_uuid, f"s3://{bucket.bucket}/runs", direct=True, expiry_seconds=300)
    check_upload(store, job_uuid, records, expected)
    assert ssh_host.bytes_received == 0  # pushed by the instance, nothing relayed
    keys = {o["Key"] for o in bucket.list_objects_v2(Bucket=bucket.bucket)["Contents"]}
    assert keys == {f"runs/{job_uuid}/{name}" for name in (*GOOD, "logs/trainer.log", MANIFEST_NAME)}


def test_the_instance_refuses_to_push_a_file_swapped_for_a_symlink(ssh_host: SshHost, bucket: Any) -> None:
    """Listed as a regular file, a symlink by the time it is sent: the instance skips it."""
    from gpu_training.hosts.base import PUSH_URLS_SCRIPT

    Path(ssh_host.path("outputs/model.npz")).write_bytes(b"w")
    os.symlink("/etc/hostname", ssh_host.path("outputs/swapped.txt"))
    url = bucket.generate_presigned_url("put_object", Params={"Bucket": bucket.bucket, "Key": "k"})
    lines = f"outputs/swapped.txt\t{url}\noutputs/model.npz\t{url}\n"
    _, out, _ = ssh_host.script(
        'exec bash "$1" put "$2"', ssh_host.remote_script(PUSH_URLS_SCRIPT), ssh_host.workdir, stdin=lines.encode()
    )
    assert out.splitlines() == ["skipped\toutputs/swapped.txt", "sent\toutputs/model.npz"]
    _, out, _ = ssh_host.script(
        'exec bash "$1" hash-list "$2"',
        ssh_host.remote_script(PUSH_URLS_SCRIPT),
        ssh_host.workdir,
        stdin=b"outputs/swapped.txt\0outputs/model.npz\0outputs/../run\0",
    )
    assert [line.split("\t")[-1] for line in out.splitlines()] == ["outputs/model.npz"]


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_an_outputs_folder_that_is_a_symlink_uploads_nothing_of_it(
    kind: str, request: pytest.FixtureRequest, store: ResultsStore, job_uuid: str, tmp_path: Path
) -> None:
    host: Host = request.getfixturevalue(f"{kind}_host")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.txt").write_text("x")
    os.rmdir(host.path("outputs"))
    os.symlink(elsewhere, host.path("outputs"))
    Path(host.path("logs/trainer.log")).write_bytes(b"log\n")
    records = upload(host, store, job_uuid, (tmp_path / "store").as_uri())
    assert {r.name for r in records} == {"logs/trainer.log", MANIFEST_NAME}
    assert store.skipped_outputs(job_uuid) == [
        SkippedOutput("outputs", "outputs/ is a symbolic link: nothing in it is uploaded")
    ]


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_a_symlinked_trainer_log_is_skipped(
    kind: str, request: pytest.FixtureRequest, store: ResultsStore, job_uuid: str, tmp_path: Path
) -> None:
    host: Host = request.getfixturevalue(f"{kind}_host")
    Path(host.path("outputs/model.npz")).write_bytes(b"w")
    os.symlink("/dev/zero", host.path("logs/trainer.log"))
    records = upload(host, store, job_uuid, (tmp_path / "store").as_uri())
    assert {r.name for r in records} == {"model.npz", MANIFEST_NAME}
    assert store.skipped_outputs(job_uuid) == [SkippedOutput("logs/trainer.log", LINK)]


# --- the hosts read regular files only -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["local", "ssh"])
def test_hosts_never_read_through_a_symlink_or_from_a_fifo(kind: str, request: pytest.FixtureRequest) -> None:
    host: Host = request.getfixturevalue(f"{kind}_host")
    os.symlink("/dev/zero", host.path("logs/trainer.log"))
    os.mkfifo(host.path("outputs/global.json"))
    started = time.monotonic()
    assert host.log_tail(20) == ""  # tail of /dev/zero would never end
    with pytest.raises(NotRegularFileError):
        host.read_chunk("outputs/global.json", 0, 100)  # opening a FIFO would block
    with pytest.raises(NotRegularFileError):
        host.read_chunk("logs/trainer.log", 0, 100)
    assert time.monotonic() - started < 10
    os.unlink(host.path("logs/trainer.log"))
    Path(host.path("logs/trainer.log")).write_text("a\nb\nc\n")
    assert host.log_tail(2) == "b\nc"
