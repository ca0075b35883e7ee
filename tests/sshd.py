"""A real OpenSSH server on 127.0.0.1 for tests: generated host and user keys, root login by key."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.servers import free_port, wait_for_port


@dataclass
class Sshd:
    port: int
    host_key_pub: str  # "ssh-ed25519 AAAA..."
    user_key: Path
    proc: subprocess.Popen

    def connection(self, **extra: object) -> str:
        """An Airflow connection (JSON form, for AIRFLOW_CONN_*) to this server."""
        extras: dict[str, object] = {
            "key_file": str(self.user_key),
            "host_key": self.host_key_pub,
            "look_for_keys": "false",
        }
        extras.update(extra)
        return json.dumps(
            {"conn_type": "ssh", "host": "127.0.0.1", "port": self.port, "login": "root", "extra": extras}
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def have_sshd() -> bool:
    return shutil.which("sshd") is not None or Path("/usr/sbin/sshd").exists()


def start_sshd(root: Path, extra_config: Sequence[str] = ()) -> Sshd:
    """Start sshd with its keys and config in ``root``; ``extra_config``: more sshd_config lines."""
    root.mkdir(parents=True, exist_ok=True)
    host_key, user_key = root / "host_ed25519", root / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (root / "authorized_keys").write_text((root / "user_ed25519.pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    port = free_port()
    config = root / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                "ListenAddress 127.0.0.1",
                f"HostKey {host_key}",
                f"AuthorizedKeysFile {root / 'authorized_keys'}",
                f"PidFile {root / 'sshd.pid'}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                "StrictModes no",
                "MaxSessions 100",
                "MaxStartups 100:30:200",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                *extra_config,
                "",
            ]
        )
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    sshd = shutil.which("sshd") or "/usr/sbin/sshd"
    proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_port(port, proc, timeout=10)
    except RuntimeError as err:
        raise RuntimeError(f"{err}: {proc.stderr.read().decode() if proc.stderr else ''}") from err
    pub = host_key.with_suffix(".pub").read_text().split()
    return Sshd(port=port, host_key_pub=f"{pub[0]} {pub[1]}", user_key=user_key, proc=proc)
