"""Benchmark: one large file to an SSH host, our SFTP upload (``SshHost.put_file``) against ``scp``.

Starts a real OpenSSH sshd on 127.0.0.1 (``tests/sshd.py``), writes one random file, then sends it
``--repeat`` times with each method (interleaved) and keeps each method's best time. ``put_file`` is
reported twice: the raw SFTP send alone, and the whole call (local SHA256, send, remote size and
SHA256 check, rename), which is what a job pays. ``scp`` runs with its default protocol (SFTP, in
OpenSSH 9+) and, where it works, the legacy one (``scp -O``); the faster is the reference. Every copy
is checked for size, and the first one of each method for SHA256. MB here is 2**20 bytes.

    PYTHONPATH=plugins .venv/bin/python bench/transfer.py [--size-mb 1024] [--repeat 2] [--tmp-dir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))  # gpu_training
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.sshd

from tests.sshd import Sshd, start_sshd

MB = 1 << 20
GOAL = 0.9  # put_file throughput as a fraction of scp's
CONN_ID = "bench_box"


@dataclass
class Method:
    label: str
    runs: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def best(self) -> float:
        return min(self.runs)


def make_payload(path: Path, size: int) -> str:
    """A file of ``size`` random bytes; returns its SHA256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        left = size
        while left:
            chunk = os.urandom(min(4 * MB, left))
            fh.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(4 * MB):
            digest.update(chunk)
    return digest.hexdigest()


def check_copy(dest: Path, size: int, digest: str | None, label: str) -> None:
    """The benchmark must not lie: the copy is complete (and, when asked, byte-identical)."""
    got = dest.stat().st_size
    if got != size:
        raise SystemExit(f"{label}: {dest} has {got} bytes, expected {size}")
    if digest is not None and sha256_of(dest) != digest:
        raise SystemExit(f"{label}: {dest} differs from the source (SHA256)")


def airflow_env(home: Path, sshd: Sshd) -> None:
    """A throwaway Airflow home and the bench connection, set before Airflow is imported."""
    os.environ["AIRFLOW_HOME"] = str(home)
    os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
    os.environ[f"AIRFLOW_CONN_{CONN_ID.upper()}"] = sshd.connection()


class TimedHost:
    """An ``SshHost`` whose SFTP send and remote checksum are timed (instance wrappers, same code)."""

    def __init__(self, workdir: Path) -> None:
        from gpu_training.hosts.ssh import SshHost
        from gpu_training.providers.ssh import ssh_hook

        logging.getLogger("paramiko").setLevel(logging.WARNING)  # no per-connection info lines in the table
        self.host = SshHost(ssh_hook(CONN_ID), str(workdir), python=sys.executable)  # the provider's hook
        self.phases: dict[str, float] = {}
        # put_file checks through remote_sha256_many (batched uploads); older code through remote_sha256.
        check = "remote_sha256_many" if hasattr(self.host, "remote_sha256_many") else "remote_sha256"
        setattr(self.host, check, self._timed("remote check", getattr(self.host, check)))
        self.host._send = self._timed("send", self.host._send)  # type: ignore[method-assign]

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] = self.phases.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    def put(self, local: Path, relpath: str) -> tuple[float, dict[str, float]]:
        self.phases = {"send": 0.0, "remote check": 0.0}
        start = time.perf_counter()
        self.host.put_file(local, relpath)
        return time.perf_counter() - start, self.phases

    def ciphers(self) -> str:
        transport = self.host.client().get_transport()
        cipher = transport.local_cipher
        mac = "<implicit>" if "gcm" in cipher else transport.local_mac
        return f"{cipher} + {mac}, compression {transport.local_compression}"


def scp_argv(sshd: Sshd, known_hosts: Path, *extra: str) -> list[str]:
    return [
        "scp",
        "-q",
        *extra,
        "-F",
        "/dev/null",
        "-i",
        str(sshd.user_key),
        "-P",
        str(sshd.port),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "StrictHostKeyChecking=yes",
        "-o",
        "BatchMode=yes",
    ]


def openssh_cipher(sshd: Sshd, known_hosts: Path) -> str:
    """The cipher OpenSSH's client negotiates with this server (what scp uses)."""
    argv = [
        "ssh",
        "-v",
        "-F",
        "/dev/null",
        "-i",
        str(sshd.user_key),
        "-p",
        str(sshd.port),
        "-o",
        f"UserKnownHostsFile={known_hosts}",
        "-o",
        "BatchMode=yes",
        "root@127.0.0.1",
        "true",
    ]
    err = subprocess.run(argv, capture_output=True, text=True, timeout=30).stderr
    for line in err.splitlines():
        if "kex: client->server cipher:" in line:
            parts = line.split("cipher:", 1)[1].split()
            return f"{parts[0]} + {parts[2]}" if len(parts) > 2 else parts[0]
    return "?"


def run_scp(argv: list[str], local: Path, dest: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([*argv, str(local), f"root@127.0.0.1:{dest}"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"exit {proc.returncode}")
    return elapsed


def report(size: int, repeat: int, versions: str, ciphers: str, methods: dict[str, Method], split: str) -> None:
    scps = [m for k, m in methods.items() if k.startswith("scp") and m.runs]
    ref = min(scps, key=lambda m: m.best) if scps else None
    print(f"\n{size / MB:.0f} MB random file over loopback, best of {repeat}  ({versions})")
    print(f"ciphers: {ciphers}")
    print(f"{'method':<50} {'best s':>8} {'MB/s':>8} {'vs scp':>8}")
    for m in methods.values():
        if not m.runs:
            print(f"{m.label:<50} {'n/a':>8} {'':>8} {'':>8}  ({m.error})")
            continue
        ratio = f"{ref.best / m.best:.2f}x" if ref else "-"
        mark = "  <- reference" if m is ref else ""
        print(f"{m.label:<50} {m.best:>8.2f} {size / MB / m.best:>8.0f} {ratio:>8}{mark}")
    print(f"put_file total, split (best run): {split}")
    if ref:
        for key in ("raw", "total"):
            m = methods[key]
            ratio = ref.best / m.best
            verdict = "met" if ratio >= GOAL else "NOT met"
            print(f"goal: put_file ({key}) >= {GOAL:.2f}x scp: {ratio:.2f}x -> {verdict}")


def s3_dataset_bytes(work: Path, size_mb: int) -> None:
    """An ``s3://`` dataset: bytes through this worker when the instance pulls it (presigned URLs)
    versus relaying it (download here, SFTP up)."""
    from gpu_training.storage import fetch_dataset, fetch_dataset_direct
    from tests.servers import start_moto

    moto = start_moto()
    try:
        os.environ["AIRFLOW_CONN_AWS_DEFAULT"] = moto.aws_connection()
        client = moto.client()
        client.create_bucket(Bucket="bench")
        payload = work / "dataset.bin"
        make_payload(payload, size_mb * MB)
        client.upload_file(str(payload), "bench", "ds/part-0.bin")
        (work / "s3box").mkdir()
        uri = "s3://bench/ds/"
        print(f"\ns3:// dataset of {size_mb} MB onto the SSH host (moto S3 on loopback)")
        print(f"{'mode':<44} {'s':>7} {'worker bytes':>14}")
        logging.getLogger("airflow.providers.amazon").setLevel(logging.WARNING)
        modes: list[tuple[str, Callable[[Any], Any]]] = [
            ("direct (instance pulls a presigned URL)", lambda h: fetch_dataset_direct(uri, h, expiry_seconds=600)),
            ("relay (worker downloads, then SFTP up)", lambda h: fetch_dataset(uri, h)),
        ]
        for label, fetch in modes:
            host = TimedHost(work / "s3box" / label.split()[0]).host
            host.prepare()
            host.bytes_sent = host.bytes_received = 0
            start = time.perf_counter()
            got = fetch(host)
            elapsed = time.perf_counter() - start
            assert got[0][1] == size_mb * MB
            # Relay also downloads the object here first: as many bytes again as it sends up.
            moved = host.bytes_sent + host.bytes_received + (host.bytes_sent if label.startswith("relay") else 0)
            print(f"{label:<44} {elapsed:>7.2f} {moved:>14,}")
        print("goal: direct moves 0 bytes through the worker")
    finally:
        moto.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=1024, help="file size in MB of 2**20 bytes (default 1024)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per method; the best counts (default 2)")
    parser.add_argument("--tmp-dir", default=None, help="where the file and copies go (default: system temp)")
    parser.add_argument("--s3-mb", type=int, default=256, help="size of the s3:// dataset part (default 256)")
    args = parser.parse_args()
    if args.size_mb < 1 or args.repeat < 1:
        parser.error("--size-mb and --repeat must be at least 1")
    if os.geteuid() != 0:
        raise SystemExit("the bench sshd logs in as root: run this as root")

    size = args.size_mb * MB
    work = Path(tempfile.mkdtemp(prefix="bench-transfer-", dir=args.tmp_dir))
    sshd: Sshd | None = None
    try:
        sshd = start_sshd(work / "sshd")
        known_hosts = work / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_pub}\n")
        airflow_env(work / "airflow_home", sshd)

        local = work / "payload.bin"
        print(f"writing {size / MB:.0f} MB of random data to {local} ...", flush=True)
        digest = make_payload(local, size)

        remote = work / "remote"
        remote.mkdir()
        timed = TimedHost(remote)
        timed.host.prepare()  # connects and creates the work dir layout: not part of the timing
        ours_dest = remote / "data" / "payload.bin"
        scp_dest = remote / "data" / "scp.bin"

        import paramiko

        versions = (
            f"paramiko {paramiko.__version__}, "
            + subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip().split(",")[0]
        )
        ciphers = f"put_file {timed.ciphers()}; scp {openssh_cipher(sshd, known_hosts)}"

        methods = {
            "scp": Method("scp (default: SFTP protocol)"),
            "scp-O": Method("scp -O (legacy SCP protocol)"),
            "raw": Method("SshHost.put_file: raw SFTP send"),
            "total": Method("SshHost.put_file: total (+ SHA256 checks, rename)"),
        }
        splits: list[tuple[float, str]] = []
        scp_modes = {"scp": scp_argv(sshd, known_hosts), "scp-O": scp_argv(sshd, known_hosts, "-O")}
        for rnd in range(args.repeat):
            verify = digest if rnd == 0 else None
            for key, argv in scp_modes.items():
                if methods[key].error:
                    continue
                scp_dest.unlink(missing_ok=True)
                try:
                    elapsed = run_scp(argv, local, scp_dest)
                except RuntimeError as exc:
                    methods[key].error = str(exc)[:120]
                    continue
                check_copy(scp_dest, size, verify, key)
                methods[key].runs.append(elapsed)
                print(f"  run {rnd + 1}: {key:<6} {elapsed:7.2f} s", flush=True)

            ours_dest.unlink(missing_ok=True)
            total, phases = timed.put(local, "data/payload.bin")
            check_copy(ours_dest, size, verify, "put_file")
            methods["raw"].runs.append(phases["send"])
            methods["total"].runs.append(total)
            rest = total - phases["send"] - phases["remote check"]
            splits.append(
                (
                    total,
                    f"send {phases['send']:.2f} s, remote size+SHA256 {phases['remote check']:.2f} s, "
                    f"local SHA256 + mkdir + rename {rest:.2f} s",
                )
            )
            print(f"  run {rnd + 1}: put_file {total:7.2f} s (send {phases['send']:.2f} s)", flush=True)
        scp_dest.unlink(missing_ok=True)
        ours_dest.unlink(missing_ok=True)
        report(size, args.repeat, versions, ciphers, methods, min(splits)[1])
        local.unlink(missing_ok=True)  # free the disk before the S3 part
        s3_dataset_bytes(work, args.s3_mb)
    finally:
        if sshd is not None:
            sshd.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
