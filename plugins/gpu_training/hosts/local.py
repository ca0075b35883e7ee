"""``LocalHost``: the host interface on this machine's filesystem and process table."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from gpu_training.errors import HostError, TransferError
from gpu_training.hosts.base import (
    CONFIG_PATH,
    DATA_DIR,
    LOG_PATH,
    OUTPUT_DIR,
    RUN_DIR,
    RUN_TRAINER_SCRIPT,
    Host,
    RemoteFile,
    TrainerStatus,
    sha256_file,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group, from /proc."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class LocalHost(Host):
    """A work directory on this machine; the trainer runs in its own session and process group."""

    def __init__(
        self,
        workdir: Path | str,
        *,
        python: str | None = None,
        gpus: Sequence[str] = (),
        run_as: str | None = None,
    ) -> None:
        self.root = Path(workdir)
        self.workdir = str(self.root)
        self.python = python or sys.executable
        self.gpus = tuple(gpus)
        self.user = f"{os.getuid()}:{os.getgid()}"
        #: The unprivileged user the trainer runs as (``[gpu_training] local_run_as_user``).
        self.run_as = run_as or None

    def _trainer_identity(self) -> tuple[int, int] | None:
        """(uid, gid) the trainer runs as; None: the worker's own. The wrapper stays the worker's
        (it writes run/: pid, process group, exit code, which only the worker may write), and only
        ``outputs/`` belongs to the trainer's user."""
        if not self.run_as:
            return None
        import pwd

        try:
            entry = pwd.getpwnam(self.run_as)
        except KeyError:
            raise HostError(
                f"[gpu_training] local_run_as_user = {self.run_as!r} is not a user on this machine: create it "
                f"(useradd --system --no-create-home {self.run_as}) or change the setting"
            ) from None
        if os.geteuid() != 0:
            raise HostError(
                f"[gpu_training] local_run_as_user = {self.run_as!r} needs the worker to run as root (it switches "
                "to that user to start the trainer)"
            )
        return entry.pw_uid, entry.pw_gid

    def script(
        self, body: str, *args: str, stdin: bytes | None = None, timeout: float = 300, check: bool = True
    ) -> tuple[int, str, str]:
        try:
            proc = subprocess.run(
                ["bash", "-c", body, "bash", *args],
                input=stdin or b"",
                capture_output=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise HostError(f"local script timed out after {timeout:g} s") from exc
        out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
        if check and proc.returncode != 0:
            raise HostError(f"local script exited {proc.returncode}: {err.strip()[-2000:] or out[-2000:]}")
        return proc.returncode, out, err

    def remote_script(self, script: Path) -> str:
        return str(script)

    def _abs(self, relpath: str) -> Path:
        target = (self.root / relpath).resolve()
        if target != self.root.resolve() and self.root.resolve() not in target.parents:
            raise HostError(f"path {relpath!r} escapes the work directory {self.workdir}")
        return target

    def prepare(self) -> None:
        for sub in ("config", DATA_DIR, OUTPUT_DIR, "logs", RUN_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def put_bytes(self, data: bytes, relpath: str) -> str:
        import hashlib

        dest = self._abs(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        tmp.write_bytes(data)
        os.replace(tmp, dest)
        expected = hashlib.sha256(data).hexdigest()
        if sha256_file(dest) != expected:
            raise TransferError(f"{relpath}: SHA256 mismatch after write")
        return expected

    def put_file(self, local_path: Path, relpath: str) -> str:
        dest = self._abs(relpath)
        dest.parent.mkdir(parents=True, exist_ok=True)
        expected = sha256_file(local_path)
        size = local_path.stat().st_size
        for _attempt in range(2):  # a bad copy is re-sent once
            tmp = dest.with_name(dest.name + ".partial")
            shutil.copyfile(local_path, tmp)
            if tmp.stat().st_size == size and sha256_file(tmp) == expected:
                os.replace(tmp, dest)
                return expected
        raise TransferError(f"{local_path} -> {relpath}: size or SHA256 mismatch after two copies")

    def read_chunk(self, relpath: str, offset: int, max_bytes: int) -> bytes | None:
        try:
            with self._abs(relpath).open("rb") as fh:
                fh.seek(offset)
                return fh.read(max_bytes)
        except FileNotFoundError:
            return None

    def start_trainer(self, argv: Sequence[str], env: Mapping[str, str]) -> TrainerStatus:
        status = self.trainer_status()
        if status.started:
            return status
        self.prepare()
        identity = self._trainer_identity()
        if identity is not None:
            uid, gid = identity
            for path in [self.root / OUTPUT_DIR, *(self.root / OUTPUT_DIR).rglob("*")]:
                os.chown(path, uid, gid, follow_symlinks=False)
            setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
            argv = [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--", *argv]
        # setsid in a backgrounded shell: the wrapper leads a new session and process group that
        # teardown kills whole, and it is not our child, so it outlives the task that started it
        # and is never left a zombie of a long-lived worker.
        subprocess.run(
            [
                "bash",
                "-c",
                'setsid bash "$0" "$@" </dev/null >/dev/null 2>&1 &',
                str(RUN_TRAINER_SCRIPT),
                self.workdir,
                "--",
                *argv,
            ],
            cwd=self.workdir,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=30,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = self.trainer_status()
            if status.started:
                return status
            time.sleep(0.05)
        raise HostError(f"the trainer wrapper did not start in {self.workdir} within 10 s")

    def follow_target(self) -> dict[str, Any]:
        return {"kind": "local", "workdir": str(self.root)}

    def trainer_status(self) -> TrainerStatus:
        run = self.root / RUN_DIR
        exit_code = _read_int(run / "exit_code")
        pid = _read_int(run / "trainer.pid")
        if exit_code is not None:
            return TrainerStatus(started=True, running=False, exit_code=exit_code, pid=pid)
        if pid is None:
            return TrainerStatus(started=False, running=False)
        alive = _pid_alive(pid)
        if not alive:  # the wrapper may be writing exit_code right now
            time.sleep(0.2)
            exit_code = _read_int(run / "exit_code")
        return TrainerStatus(started=True, running=alive, exit_code=exit_code, pid=pid)

    def _pgid(self) -> int | None:
        return _read_int(self.root / RUN_DIR / "pgid")

    def stop_trainer(self, grace_seconds: float = 10.0) -> None:
        """SIGTERM the trainer, SIGKILL what is left after the grace: its process group and every
        process started with its environment (torchrun starts its workers in sessions of their own,
        which a group kill alone would leave running)."""
        pgid = self._pgid()
        group = pgid if pgid is not None and pgid > 1 else None

        def alive() -> list[int]:
            return (_group_members(group) if group else []) + self._with_our_environment()

        def send(sig: signal.Signals) -> None:
            if group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(group, sig)
            for pid in self._with_our_environment():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

        if not alive():
            return
        send(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline:
            if not alive():
                return
            time.sleep(0.1)
        send(signal.SIGKILL)

    def _with_our_environment(self) -> list[int]:
        """Processes started with this work directory's ``TRAINING_CONFIG`` (the trainer's own)."""
        marker = f"TRAINING_CONFIG={self.path(CONFIG_PATH)}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry))
        return found

    def group_alive(self) -> bool:
        """Whether any process of the trainer's process group still exists."""
        pgid = self._pgid()
        return pgid is not None and bool(_group_members(pgid))

    def log_tail(self, max_lines: int = 40) -> str:
        try:
            with (self.root / LOG_PATH).open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                tail = deque(fh.read().decode("utf-8", errors="replace").splitlines(), maxlen=max_lines)
        except FileNotFoundError:
            return ""
        return "\n".join(tail)

    def list_files(self, relpath: str) -> list[RemoteFile]:
        base = self._abs(relpath)
        if not base.is_dir():
            return []
        return [
            RemoteFile(p.relative_to(base).as_posix(), p.stat().st_size)
            for p in sorted(base.rglob("*"))
            if p.is_file() and not p.is_symlink()
        ]

    def fetch_file(self, relpath: str, local_path: Path) -> str:
        src = self._abs(relpath)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, local_path)
        return sha256_file(local_path)

    def destroy(self) -> None:
        self.remove_container()
        self.stop_trainer(grace_seconds=5.0)
        shutil.rmtree(self.root, ignore_errors=True)
